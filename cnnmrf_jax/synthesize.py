"""Coarse-to-fine CNNMRF synthesis: the pyramid, per-level targets, the solve.

    x* = argmin_x  E_s(Phi(x), Phi(x_s)) + a1 E_c(Phi(x), Phi(x_c)) + a2 Y(x)

(Li & Wand 2016, Eq. 1) minimised over the pixels of x, in the preprocessed
space of the weights' convention, with L-BFGS, one solve per pyramid level
(SPEC section 2): both inputs are resized so that the long side is
`max_size`; level i of `num_res` runs at 1/2**(num_res-1-i) of it (ceil
sizes, bilinear); the content target and the style patch bank are rebuilt at
every level from the inputs at that level; the result of one level, upsampled
bilinearly, starts the next.

Everything runs on a batch axis N of (content, style) pairs of one size: the
objective is written for one pair and vmapped, so each pair keeps its own
targets and its own optimiser state. A single run is N = 1. Per level the
whole iteration (VGG, matching, folding, losses, gradient, L-BFGS update) is
one jitted program, traced once per level shape (`TRACE_COUNTS` counts it);
the Python loop around it only dispatches and, every `print_every`
iterations, fetches the logged scalars in one transfer.

Modes: `transfer` (CNNMRF guided by a content image), `texture` (no content
term; the output is `scaler` times the exemplar; noise init) and `gatys`
(Gram-matrix style loss, the baseline).
"""

import collections
import dataclasses
import json
import math
import pathlib
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import cnnmrf_jax
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import fileio
from cnnmrf_jax import image_io
from cnnmrf_jax import losses
from cnnmrf_jax import optim
from cnnmrf_jax import patches
from cnnmrf_jax import vgg
from cnnmrf_jax import weights as weights_lib

# How often each jitted function was traced; tests assert once per level.
TRACE_COUNTS = collections.Counter()

RESULT_NAME = "result.png"
LOG_NAME = "log.jsonl"
FLAGS_NAME = "flags.txt"
VERSIONS_NAME = "versions.json"


@dataclasses.dataclass
class Inputs:
  """The images of a batch of N pairs, RGB float32 in [0, 1].

  contents: N arrays [H_c, W_c, 3] (None in texture mode).
  styles: N lists of style images [H_s, W_s, 3] (one or more per pair).
  init_images: N arrays or None, for --init=PATH.
  """
  contents: List[Optional[np.ndarray]]
  styles: List[List[np.ndarray]]
  init_images: List[Optional[np.ndarray]]


@dataclasses.dataclass
class Result:
  """What a run returns: the final images and the per-iteration log."""
  images: np.ndarray  # [N, H, W, 3] RGB float32, before stretch or clip
  history: List[Dict[str, Any]]
  paths: List[pathlib.Path]


# --------------------------------------------------------------------------
# Sizes.


def output_size(config: config_lib.Config, inputs: Inputs) -> Tuple[int, int]:
  """(H, W) of the finest level."""
  if config.mode == "texture":
    h, w = inputs.styles[0][0].shape[:2]
  else:
    h, w = inputs.contents[0].shape[:2]
  return image_io.fit_long_side(h, w, config.max_size)


def style_size(config: config_lib.Config, style_hw: Tuple[int, int],
               level_scale: float) -> Tuple[int, int]:
  """(H, W) of a style image at a level: long side max_size (texture:
  max_size / scaler, so the output is `scaler` times the exemplar)."""
  long_side = config.max_size
  if config.mode == "texture":
    long_side = config.max_size / config.scaler
  long_side = max(1, int(math.ceil(long_side * level_scale)))
  return image_io.fit_long_side(style_hw[0], style_hw[1], long_side)


def level_scales(num_res: int) -> List[float]:
  return [1.0 / 2 ** (num_res - 1 - i) for i in range(num_res)]


def check_sizes(config: config_lib.Config, inputs: Inputs) -> None:
  """Raises ConfigError naming the flag if a map is smaller than a patch."""
  height, width = output_size(config, inputs)
  coarse = image_io.pyramid_sizes(height, width, config.num_res)[0]
  flag = "style_image" if config.mode == "texture" else "content_image"
  config.check_coarsest_size(*coarse, flag=flag)
  if config.mode != "gatys":
    scale = level_scales(config.num_res)[0]
    for style in inputs.styles[0]:
      config.check_coarsest_size(*style_size(config, style.shape[:2], scale),
                                 flag="style_image")


# --------------------------------------------------------------------------
# The objective for one pair.


class Synthesizer:
  """Holds the model and weights; builds per-level targets and solves.

  One Synthesizer serves many runs of the same config shape: its jitted
  functions are traced once per level shape and reused.
  """

  def __init__(self, config: config_lib.Config,
               params: Optional[Dict[str, Any]] = None,
               convention: Optional[str] = None):
    self.config = config.validate()
    if params is None:
      params, convention = weights_lib.load_params(
          config.weights or None, network=config.network)
    self.params = jax.tree.map(jnp.asarray, params)
    self.convention = convention or "caffe"
    self.model = vgg.VGG(network=config.network, pooling=config.pooling)
    self.layers = config.feature_layers()
    self.mrf_weights = dict(zip(config.mrf_layers,
                                config.mrf_weights_per_layer()))
    self.chunk_kwargs = (
        {"chunk_size": config.chunk_size} if config.chunk_size else {})
    self.solver = optim.make(config.optimizer, self.objective,
                             history_size=config.history_size,
                             learning_rate=config.learning_rate)
    self._features = jax.jit(self._features_impl)
    self._init = jax.jit(jax.vmap(self.solver.init, in_axes=(0, None, 0)))
    self._update = jax.jit(self._update_impl)

  # -- traced functions ----------------------------------------------------

  def _features_impl(self, params, images):
    """images: [N, H, W, 3] preprocessed -> {layer: [N, h, w, c]}."""
    TRACE_COUNTS["features"] += 1
    return self.model.apply({"params": params}, images, outputs=self.layers)

  def _update_impl(self, x, state, params, targets):
    TRACE_COUNTS["update"] += 1
    return jax.vmap(self.solver.update, in_axes=(0, 0, None, 0))(
        x, state, params, targets)

  def objective(self, x, params, targets):
    """Total loss for one pair. x: [H, W, 3] preprocessed.

    targets: {'content': {layer: [h, w, c]}, 'bank': {layer: PatchBank},
    'gram': {layer: [c, c]}}. Returns (loss, aux) with aux = {'terms':
    {name: scalar}, 'stats': {name: scalar}}.
    """
    config = self.config
    features = self.model.apply({"params": params}, x[None],
                                outputs=self.layers)
    terms, stats = {}, {}
    for layer, bank in targets.get("bank", {}).items():
      value, layer_stats = losses.mrf_loss(
          features[layer][0], bank, weight=self.mrf_weights[layer],
          patch_size=config.patch_size, stride=config.synth_stride,
          threshold=config.confidence_threshold, **self.chunk_kwargs)
      terms[f"mrf_{layer}"] = value
      for name, stat in layer_stats.items():
        stats[f"{name}_{layer}"] = stat
    for layer, target in targets.get("content", {}).items():
      terms[f"content_{layer}"] = losses.content_loss(
          features[layer][0], target, weight=config.content_weight)
    style_layer_weight = config.style_weight / max(1, len(config.style_layers))
    for layer, target in targets.get("gram", {}).items():
      terms[f"gram_{layer}"] = losses.gram_loss(
          features[layer][0], target, weight=style_layer_weight)
    if config.tv_weight > 0:
      terms["tv"] = losses.tv_loss(x, weight=config.tv_weight)
    total = sum(terms.values())
    return total, {"terms": terms, "stats": stats}

  # -- per-level targets ---------------------------------------------------

  def features(self, rgb: np.ndarray) -> Dict[str, jnp.ndarray]:
    """rgb: [H, W, 3] in [0, 1] -> {layer: [h, w, c]} for self.layers."""
    x = vgg.preprocess(jnp.asarray(rgb, jnp.float32), self.convention)
    return {k: v[0] for k, v in self._features(self.params, x[None]).items()}

  def level_targets(self, inputs: Inputs, size: Tuple[int, int],
                    scale: float) -> Dict[str, Any]:
    """Targets of every pair at one level, stacked on a leading N axis."""
    config = self.config
    per_pair = []
    for n in range(len(inputs.styles)):
      targets = {}
      if config.mode in ("transfer", "gatys") and config.content_weight > 0:
        content = image_io.resize(inputs.contents[n], *size, antialias=False)
        content_features = self.features(np.asarray(content))
        targets["content"] = {l: content_features[l]
                              for l in config.content_layers}
      if config.mode in ("transfer", "texture"):
        maps = collections.defaultdict(list)
        for style in inputs.styles[n]:
          resized = np.asarray(image_io.resize(
              style, *style_size(config, style.shape[:2], scale)))
          for copy in patches.augment_style(
              resized, num_rotations=config.num_rotations,
              num_scales=config.num_scales):
            copy_features = self.features(copy)
            for layer in config.mrf_layers:
              maps[layer].append(copy_features[layer])
        targets["bank"] = {
            layer: patches.build_bank(maps[layer],
                                      patch_size=config.patch_size,
                                      stride=config.style_stride)
            for layer in config.mrf_layers}
      if config.mode == "gatys":
        grams = collections.defaultdict(list)
        for style in inputs.styles[n]:
          resized = np.asarray(image_io.resize(
              style, *style_size(config, style.shape[:2], scale)))
          style_features = self.features(resized)
          for layer in config.style_layers:
            grams[layer].append(losses.gram_matrix(style_features[layer]))
        targets["gram"] = {
            layer: losses.blend_grams(grams[layer], config.blend_weights())
            for layer in config.style_layers}
      per_pair.append(targets)
    try:
      return jax.tree.map(lambda *a: jnp.stack(a), *per_pair)
    except ValueError as e:
      raise ValueError(
          "pairs in one batch must give targets of one shape (same style "
          f"image sizes and augmentation): {e}") from None

  def initial_images(self, inputs: Inputs, size: Tuple[int, int]
                     ) -> jnp.ndarray:
    """[N, H, W, 3] starting point of the coarsest level, preprocessed."""
    config = self.config
    init = config.resolved_init
    images = []
    for n in range(len(inputs.styles)):
      if init == "noise":
        key = jax.random.fold_in(jax.random.key(config.seed), n)
        images.append(config.init_noise_std * jax.random.normal(
            key, size + (3,), jnp.float32))
        continue
      source = (inputs.contents[n] if init == "content"
                else inputs.init_images[n])
      rgb = image_io.resize(source, *size, antialias=False)
      images.append(vgg.preprocess(jnp.asarray(rgb, jnp.float32),
                                   self.convention))
    return jnp.stack(images)

  # -- the solve -----------------------------------------------------------

  def solve_level(self, x: jnp.ndarray, targets: Dict[str, Any], *,
                  level: int, num_iter: int,
                  on_block=None) -> Tuple[jnp.ndarray, List[Dict[str, Any]]]:
    """Runs `num_iter` iterations from x [N, H, W, 3]; returns (x, log).

    The log has one record per iteration (and one for the start, iter 0)
    with every loss term and matching statistic per pair.
    """
    config = self.config
    history = []
    state = self._init(x, self.params, targets)
    pending = [(0, self.solver.value(state), self.solver.aux(state))]
    block_start = time.perf_counter()
    block_iters = 0
    print_every = config.print_every or num_iter or 1
    for it in range(1, num_iter + 1):
      x, state = self._update(x, state, self.params, targets)
      pending.append((it, self.solver.value(state), self.solver.aux(state)))
      block_iters += 1
      if it % print_every == 0 or it == num_iter:
        fetched = jax.device_get(pending)  # one transfer per block
        seconds = (time.perf_counter() - block_start) / max(1, block_iters)
        records = [_record(level, i, v, a, seconds) for i, v, a in fetched]
        history += records
        _log_progress(records[-1], num_iter, seconds)
        if on_block is not None:
          on_block(records, x, it)
        pending, block_iters = [], 0
        block_start = time.perf_counter()
    if pending:  # num_iter == 0: only the starting record
      history += [_record(level, i, v, a, 0.0)
                  for i, v, a in jax.device_get(pending)]
    return x, history

  def run(self, inputs: Inputs, workdir: Optional[pathlib.Path] = None, *,
          names: Optional[Sequence[str]] = None) -> Result:
    """Synthesises every pair of `inputs`; writes into workdir if given."""
    config = self.config
    check_sizes(config, inputs)
    height, width = output_size(config, inputs)
    sizes = image_io.pyramid_sizes(height, width, config.num_res)
    iterations = config.iterations_per_level()
    num_pairs = len(inputs.styles)
    names = list(names or ([RESULT_NAME] if num_pairs == 1 else
                           [f"result_{n}.png" for n in range(num_pairs)]))
    writer = _Writer(workdir, config, names) if workdir else None
    history = []
    x = None
    for level, (size, scale) in enumerate(zip(sizes,
                                              level_scales(config.num_res))):
      logging.info("level %d/%d: %dx%d px, %d iterations", level + 1,
                   config.num_res, size[0], size[1], iterations[level])
      t0 = time.perf_counter()
      targets = self.level_targets(inputs, size, scale)
      if x is None:
        x = self.initial_images(inputs, size)
      else:
        x = image_io.resize(x, *size, antialias=False)
      logging.info("level %d targets built in %.1f s", level + 1,
                   time.perf_counter() - t0)
      on_block = None
      if writer is not None:
        on_block = lambda records, x_now, it, level=level: writer.block(
            records, self._rgb(x_now), level, it)
      x, level_history = self.solve_level(
          x, targets, level=level, num_iter=iterations[level],
          on_block=on_block)
      history += level_history
    rgb = self._rgb(x)
    if config.original_colors and config.mode != "texture":
      contents = np.stack([np.asarray(image_io.resize(c, height, width))
                           for c in inputs.contents])
      rgb = np.asarray(image_io.match_luminance(rgb, contents))
    paths = writer.final(rgb) if writer is not None else []
    return Result(images=rgb, history=history, paths=paths)

  def _rgb(self, x: jnp.ndarray) -> np.ndarray:
    return np.asarray(vgg.deprocess(x, self.convention), np.float32)


def _record(level, iteration, value, aux, seconds) -> Dict[str, Any]:
  """One log record; per-pair values are lists."""
  def plain(a):
    a = np.asarray(a)
    return a.tolist()
  record = {"level": level, "iter": int(iteration), "loss": plain(value),
            "seconds_per_iter": round(float(seconds), 4)}
  for name, v in aux["terms"].items():
    record[name] = plain(v)
  for name, v in aux["stats"].items():
    record[name] = plain(v)
  return record


def _log_progress(record, num_iter, seconds):
  losses_text = " ".join(
      f"{k}={np.mean(v):.4g}" for k, v in record.items()
      if k == "loss" or k.startswith(("mrf_", "content_", "gram_", "tv")))
  left = (num_iter - record["iter"]) * seconds
  logging.info("level %d iter %d/%d %s | %.2f s/iter, %.0f s left in level",
               record["level"] + 1, record["iter"], num_iter, losses_text,
               seconds, left)


class _Writer:
  """Writes the workdir: flags, versions, log, intermediates, results."""

  def __init__(self, workdir: pathlib.Path, config: config_lib.Config,
               names: Sequence[str]):
    self.workdir = pathlib.Path(workdir)
    self.config = config
    self.names = list(names)
    self.workdir.mkdir(parents=True, exist_ok=True)
    if not config.overwrite:
      for name in self.names:
        if (self.workdir / name).exists():
          raise fileio.ExistsError(
              f"{self.workdir / name} exists; pass --overwrite to replace it "
              "or choose another --workdir")
    fileio.atomic_write_bytes(
        self.workdir / FLAGS_NAME,
        ("\n".join(config.to_flag_lines()) + "\n").encode())
    fileio.atomic_write_bytes(
        self.workdir / VERSIONS_NAME,
        json.dumps(software_versions(), indent=2).encode())
    self.log_path = self.workdir / LOG_NAME
    self.log_lines: List[str] = []
    fileio.atomic_write_bytes(self.log_path, b"")

  def block(self, records, rgb, level, iteration):
    self.log_lines += [json.dumps(r) for r in records]
    fileio.atomic_write_bytes(self.log_path,
                              ("\n".join(self.log_lines) + "\n").encode())
    every = self.config.save_every
    if every and iteration % every == 0:
      for n, name in enumerate(self.names):
        stem = pathlib.Path(name).stem
        image_io.write_image(
            self.workdir / f"{stem}_level{level + 1}_iter{iteration:04d}.png",
            rgb[n], mode=self.config.output_mode)

  def final(self, rgb) -> List[pathlib.Path]:
    return [image_io.write_image(self.workdir / name, rgb[n],
                                 mode=self.config.output_mode)
            for n, name in enumerate(self.names)]


def software_versions() -> Dict[str, str]:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxopt  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return {
      "cnnmrf_jax": cnnmrf_jax.__version__, "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
      else "", "flax": flax.__version__, "optax": optax.__version__,
      "jaxopt": jaxopt.__version__, "numpy": np.__version__,
      "python": sys.version.split()[0], "platform": platform.platform(),
      "backend": jax.default_backend(),
      "devices": ", ".join(str(d) for d in jax.devices()),
  }


# --------------------------------------------------------------------------
# Entry points.


def load_inputs(config: config_lib.Config) -> Inputs:
  """Reads the images a config names (N = 1), logging any conversions."""
  def read(path, flag):
    image, notes = image_io.read_image(path, flag=flag)
    for note in notes:
      logging.info("%s", note)
    return image
  styles = [read(p, "style_image") for p in config.style_image]
  content = None
  if config.mode in ("transfer", "gatys"):
    content = read(config.content_image, "content_image")
  init_image = None
  if config.resolved_init not in config_lib.INITS:
    init_image = read(config.resolved_init, "init")
  return Inputs(contents=[content], styles=[styles], init_images=[init_image])


def run(config: config_lib.Config, workdir: Optional[str] = None, *,
        params=None, convention=None) -> Result:
  """Runs the synthesis `config` describes; writes results to `workdir`.

  params/convention: VGG weights to use instead of loading `config.weights`
  (tests pass random weights).
  """
  config.validate()
  inputs = load_inputs(config)
  synthesizer = Synthesizer(config, params, convention)
  t0 = time.perf_counter()
  result = synthesizer.run(inputs, pathlib.Path(workdir) if workdir else None)
  logging.info("done in %.1f s%s", time.perf_counter() - t0,
               f": {result.paths[0]}" if result.paths else "")
  return result
