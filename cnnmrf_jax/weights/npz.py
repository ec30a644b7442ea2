"""The canonical on-disk weights format: an uncompressed, deterministic npz.

It holds `conv1_1/kernel` (HWIO `[3, 3, C_in, C_out]`, float32),
`conv1_1/bias` (`[C_out]`), ... for every conv layer of the network, plus
the strings `__network__` ('vgg19' or 'vgg16'), `__convention__` ('caffe' or
'torchvision', the preprocessing the weights expect, see `vgg.preprocess`)
and `__source__` (where they came from).
"""

import pathlib
import zipfile
from typing import BinaryIO

import numpy as np

from cnnmrf_jax import fileio
from cnnmrf_jax.weights import common

_META_KEYS = ("__network__", "__convention__", "__source__")
# Fixed zip timestamps make a converted npz byte-identical on every machine,
# so its sha256 identifies the weights and concurrent writers agree.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_npz(path: common.PathLike, params: common.Params, *, network: str,
             convention: str, source: str = "") -> pathlib.Path:
  """Atomically writes `params` ({'conv1_1': {'kernel', 'bias'}, ...}) to an
  npz with the metadata strings; arrays are stored float32, uncompressed."""
  common.check_network(network)
  common.check_convention(convention)
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


def read_npz(path: common.PathLike) -> common.Converted:
  """Reads an npz written by `save_npz`: (params, network, convention).

  Shapes are not checked here (see `load_params`). A file without
  `__network__` gets it from its layer names; one without `__convention__`
  is refused, since guessing the preprocessing silently ruins results.
  """
  with common.reading(path, "weights npz"):
    with np.load(path, allow_pickle=False) as npz:
      arrays = {key: npz[key] for key in npz.files}
  meta = {}
  for key in _META_KEYS:
    if key in arrays:
      value = arrays.pop(key)
      if value.dtype.kind != "U" or value.ndim != 0:
        raise common.WeightsError(f"{path}: {key} must be a string, got "
                                  f"{value.dtype} {value.shape}")
      meta[key] = str(value.item())
  params: common.Params = {}
  bad = []
  for key, value in arrays.items():
    parts = key.split("/")
    if len(parts) != 2 or not all(parts):
      bad.append(key)
      continue
    params.setdefault(parts[0], {})[parts[1]] = value
  if bad:
    raise common.WeightsError(
        f"{path}: keys {bad} are not of the form 'conv1_1/kernel'; not a "
        "cnnmrf_jax weights file")
  convention = meta.get("__convention__")
  if convention is None:
    raise common.WeightsError(
        f"{path}: no __convention__ entry; re-save it with "
        "weights.save_npz(..., convention='caffe' or 'torchvision')")
  network = meta.get("__network__") or common.network_from_names(params,
                                                                 path)
  common.check_network(network, where=path)
  common.check_convention(convention, where=path)
  return params, network, convention
