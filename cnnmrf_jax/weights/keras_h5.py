"""Keras VGG weights in HDF5 (needs h5py, the `converters` extra).

E.g. vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5: groups
block{b}_conv{i} holding a kernel (HWIO) and a bias, named
block1_conv1_W_1:0 / block1_conv1_b_1:0 in old files and kernel:0 / bias:0
in newer ones; optimizer weights are ignored.
"""

import re
from typing import Any, Dict, Tuple

import numpy as np

from cnnmrf_jax.weights import common

_KERAS_LAYER = re.compile(r"block(\d+)_conv(\d+)$")


def read_keras_h5(path: common.PathLike) -> common.Converted:
  """Keras VGG19/VGG16 weights (e.g. vgg19_weights_tf_dim_ordering_tf_
  kernels_notop.h5): groups block{b}_conv{i} holding a kernel (HWIO, named
  block1_conv1_W_1:0 or kernel:0) and a bias -> (params, network, 'caffe').
  Needs h5py."""
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise common.WeightsError(
        f"{path}: reading Keras .h5 weights needs h5py: pip install "
        "cnnmrf_jax[converters]") from e
  found: Dict[Tuple[int, int], Dict[str, np.ndarray]] = {}
  with common.reading(path, "Keras HDF5 file"):
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
          raise common.WeightsError(f"{path}: two {kind}s for {match[0]}")
        layer[kind] = np.asarray(obj[()], np.float32)

      h5.visititems(visit)
  if not found:
    raise common.WeightsError(
        f"{path}: no block1_conv1-style layers found; not a "
        "Keras VGG weights file")
  params = {}
  for (block, index), layer in sorted(found.items()):
    if set(layer) != {"kernel", "bias"}:
      raise common.WeightsError(
          f"{path}: block{block}_conv{index} lacks a kernel "
          "or bias")
    params[f"conv{block}_{index}"] = layer
  return params, common.network_from_count(len(params), path), "caffe"

