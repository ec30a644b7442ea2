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
targets and its own optimiser state. A single run is N = 1. Given a mesh
(`batch.batch_mesh`), the batch axis is sharded over its devices. Per level
the whole iteration (VGG, matching, folding, losses, gradient, L-BFGS
update) is one jitted program, traced once per level shape (`TRACE_COUNTS`
counts it); the Python loop around it only dispatches and, every
`print_every` iterations, fetches the logged scalars in one transfer.

Modes: `transfer` (CNNMRF guided by a content image), `texture` (no content
term; the output is `scaler` times the exemplar; noise init) and `gatys`
(Gram-matrix style loss, the baseline).
"""

import collections
import dataclasses
import importlib.metadata
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
from cnnmrf_jax import batch
from cnnmrf_jax import compile_cache
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import fileio
from cnnmrf_jax import image_io
from cnnmrf_jax import losses
from cnnmrf_jax import memory
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
CHECKPOINT_NAME = "checkpoint.npz"
CURRENT_NAME = "interrupted.png"  # the image at Ctrl-C / SIGTERM


@dataclasses.dataclass
class Inputs:
  """The images of a batch of N pairs, RGB float32 in [0, 1].

  contents: N arrays [H_c, W_c, 3] (None in texture mode).
  styles: N lists of style images [H_s, W_s, 3] (one or more per pair).
  init_images: N arrays or None, for --init=PATH.
  configs: None, or N per-pair configs (a sweep batching its points): they
    may differ from the Synthesizer's config in `batch.PER_PAIR_FIELDS`
    only (images, init, seed, loss weights), and each pair then starts from
    the noise a single run of its own config would draw.
  """
  contents: List[Optional[np.ndarray]]
  styles: List[List[np.ndarray]]
  init_images: List[Optional[np.ndarray]]
  configs: Optional[List[config_lib.Config]] = None


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


def check_batch(config: config_lib.Config, inputs: Inputs) -> None:
  """Raises ConfigError unless the pairs can share one compiled program:
  one output size, and per-pair configs that differ from `config` only in
  `batch.PER_PAIR_FIELDS`."""
  height, width = output_size(config, inputs)
  for n in range(1, len(inputs.styles)):
    pair = Inputs(contents=[inputs.contents[n]], styles=[inputs.styles[n]],
                  init_images=[None])
    if output_size(config, pair) != (height, width):
      raise config_lib.ConfigError(
          f"--pairs: pair {n} gives a {output_size(config, pair)} output, "
          f"pair 0 {(height, width)}; the pairs of one batch must have one "
          "size (after fitting the long side to --max_size)")
  if inputs.configs is None:
    return
  if len(inputs.configs) != len(inputs.styles):
    raise ValueError(f"{len(inputs.configs)} per-pair configs for "
                     f"{len(inputs.styles)} pairs")
  key = batch.batch_key(config)
  for n, pair_config in enumerate(inputs.configs):
    if batch.batch_key(pair_config) != key:
      differ = [f.name for f in dataclasses.fields(key)
                if getattr(key, f.name) != getattr(batch.batch_key(
                    pair_config), f.name)]
      raise config_lib.ConfigError(
          f"pair {n} differs from the batch's config in {differ}, which "
          f"shape the program; only {', '.join(batch.PER_PAIR_FIELDS)} may "
          "differ within a batch")


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


def check_memory(config: config_lib.Config, inputs: Inputs) -> int:
  """Raises ConfigError naming --max_size if the run's estimated peak
  memory exceeds what is available (`memory.check_fits`); returns it."""
  height, width = output_size(config, inputs)
  styles = [style_size(config, s.shape[:2], 1.0) for s in inputs.styles[0]]
  images = [*inputs.contents, *inputs.init_images,
            *(s for pair in inputs.styles for s in pair)]
  pixels = sum(a.shape[0] * a.shape[1] for a in images if a is not None)
  needed = memory.check_fits(config, height, width, styles,
                             input_pixels=pixels,
                             num_pairs=len(inputs.styles))
  logging.info("estimated peak memory %.1f GiB (memory.py)",
               needed / memory.GIB)
  return needed


# --------------------------------------------------------------------------
# The objective for one pair.


class Synthesizer:
  """Holds the model and weights; builds per-level targets and solves.

  One Synthesizer serves many runs of the same config shape: its jitted
  functions are traced once per level shape and reused.

  mesh: None (one device), or a 1-D mesh with axis 'batch'
  (`batch.batch_mesh`): the images [N, H, W, 3], the stacked targets and the
  solver state are then sharded over it (N is padded to a multiple of its
  size with copies of the last pair) and every device solves its own pairs.
  """

  def __init__(self, config: config_lib.Config,
               params: Optional[Dict[str, Any]] = None,
               convention: Optional[str] = None, *,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.config = config.validate()
    if config.compilation_cache:
      compile_cache.enable(config.compilation_cache)
    if params is None:
      params, convention = weights_lib.load_params(
          config.weights or None, network=config.network)
    self.params = jax.tree.map(jnp.asarray, params)
    self.convention = convention or "caffe"
    self.model = vgg.VGG(network=config.network, pooling=config.pooling,
                         dtype=jnp.dtype(config.dtype))
    self.layers = config.feature_layers()
    self.chunk_kwargs = (
        {"chunk_size": config.chunk_size} if config.chunk_size else {})
    # How the matching runs (patches.match_map), products in --dtype.
    self.chunk_kwargs.update(
        matching=config.matching,
        compute_dtype=None if config.dtype == "float32" else config.dtype)
    self.solver = optim.make(config.optimizer, self.objective,
                             history_size=config.history_size,
                             learning_rate=config.learning_rate)
    self._features = jax.jit(self._features_impl)
    self.mesh = mesh
    if mesh is None:
      self.solve_params = self.params
      self._init = jax.jit(jax.vmap(self.solver.init, in_axes=(0, None, 0)))
      self._update = jax.jit(self._update_impl)
    else:
      # Targets are built on one device from self.params; the solve runs on
      # every device of the mesh, each with its own copy of the weights.
      self.solve_params = batch.replicate(self.params, mesh)
      self._init = batch.per_device(
          jax.vmap(self.solver.init, in_axes=(0, None, 0)), mesh,
          batched=(True, False, True))
      self._update = batch.per_device(self._update_impl, mesh,
                                      batched=(True, True, False, True))

  # -- traced functions ----------------------------------------------------

  def _features_impl(self, params, images):
    """images: [N, H, W, 3] preprocessed -> {layer: [N, h, w, c]}."""
    TRACE_COUNTS["features"] += 1
    return _float32(self.model.apply({"params": params}, images,
                                     outputs=self.layers))

  def _update_impl(self, x, state, params, targets):
    TRACE_COUNTS["update"] += 1
    return jax.vmap(self.solver.update, in_axes=(0, 0, None, 0))(
        x, state, params, targets)

  def objective(self, x, params, targets):
    """Total loss for one pair. x: [H, W, 3] preprocessed.

    targets: {'content': {layer: [h, w, c]}, 'bank': {layer: PatchBank},
    'gram': {layer: [c, c]}, 'weights': `loss_weights`}. The weights are
    arguments, not constants, so pairs with different weights share one
    program. Returns (loss, aux) with aux = {'terms': {name: scalar},
    'stats': {name: scalar}}.
    """
    config = self.config
    weights = targets["weights"]
    features = _float32(self.model.apply({"params": params}, x[None],
                                         outputs=self.layers))
    terms, stats = {}, {}
    for layer, bank in targets.get("bank", {}).items():
      value, layer_stats = losses.mrf_loss(
          features[layer][0], bank, weight=weights["mrf"][layer],
          patch_size=config.patch_size, stride=config.synth_stride,
          threshold=config.confidence_threshold, **self.chunk_kwargs)
      terms[f"mrf_{layer}"] = value
      for name, stat in layer_stats.items():
        stats[f"{name}_{layer}"] = stat
    for layer, target in targets.get("content", {}).items():
      terms[f"content_{layer}"] = losses.content_loss(
          features[layer][0], target, weight=weights["content"])
    for layer, target in targets.get("gram", {}).items():
      terms[f"gram_{layer}"] = losses.gram_loss(
          features[layer][0], target, weight=weights["style"])
    if config.tv_weight > 0:
      terms["tv"] = losses.tv_loss(x, weight=weights["tv"])
    total = sum(terms.values())
    return total, {"terms": terms, "stats": stats}

  @staticmethod
  def loss_weights(config: config_lib.Config) -> Dict[str, Any]:
    """One pair's loss weights as float32 scalars: {'mrf': {layer: w},
    'content': w, 'style': w per Gram layer, 'tv': w}."""
    scalar = lambda w: np.float32(w)
    return {
        "mrf": {layer: scalar(w) for layer, w in zip(
            config.mrf_layers, config.mrf_weights_per_layer())},
        "content": scalar(config.content_weight),
        "style": scalar(config.style_weight /
                        max(1, len(config.style_layers))),
        "tv": scalar(config.tv_weight),
    }

  def pair_config(self, inputs: Inputs, n: int) -> config_lib.Config:
    """The config of pair n: its own in a sweep's batch, else the shared."""
    return inputs.configs[n] if inputs.configs else self.config

  # -- per-level targets ---------------------------------------------------

  def features(self, rgb: np.ndarray) -> Dict[str, jnp.ndarray]:
    """rgb: [H, W, 3] in [0, 1] -> {layer: [h, w, c]} for self.layers."""
    # On the host: run eagerly on the device, the few ops compiled anew for
    # every style copy's shape (~1 s a level with 9 copies).
    x = vgg.preprocess(np.asarray(rgb, np.float32), self.convention)
    return {k: v[0] for k, v in self._features(self.params, x[None]).items()}

  def level_targets(self, inputs: Inputs, size: Tuple[int, int],
                    scale: float) -> Dict[str, Any]:
    """Targets of every pair at one level, stacked on a leading N axis."""
    config = self.config
    per_pair = []
    for n in range(len(inputs.styles)):
      targets = {"weights": self.loss_weights(self.pair_config(inputs, n))}
      if config.mode in ("transfer", "gatys") and config.content_weight > 0:
        content = image_io.resize(inputs.contents[n], *size, method="torch")
        content_features = self.features(np.asarray(content))
        targets["content"] = {l: content_features[l]
                              for l in config.content_layers}
      if config.mode in ("transfer", "texture"):
        maps = collections.defaultdict(list)
        for style in inputs.styles[n]:
          resized = np.asarray(image_io.resize(
              style, *style_size(config, style.shape[:2], scale),
              method="torch"))
          for copy in patches.augment_style(
              resized, num_rotations=config.num_rotations,
              num_scales=config.num_scales):
            try:  # a rotated or shrunk copy is smaller than check_sizes saw
              config.check_coarsest_size(*copy.shape[:2], flag="style_image")
            except config_lib.ConfigError as e:
              raise config_lib.ConfigError(
                  f"{e}; this is a rotated or scaled copy of the style "
                  f"(--num_rotations={config.num_rotations}, --num_scales="
                  f"{config.num_scales}): fewer give larger copies") from None
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
              style, *style_size(config, style.shape[:2], scale),
              method="torch"))
          style_features = self.features(resized)
          for layer in config.style_layers:
            grams[layer].append(losses.gram_matrix(style_features[layer]))
        blend = self.pair_config(inputs, n).blend_weights()
        targets["gram"] = {
            layer: losses.blend_grams(grams[layer], blend)
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
    images = []
    for n in range(len(inputs.styles)):
      config = self.pair_config(inputs, n)
      init = config.resolved_init
      if init == "noise":
        # Pairs of one run draw different noise; a sweep's pairs (own
        # configs) draw what each would draw alone (index 0).
        index = 0 if inputs.configs else n
        key = jax.random.fold_in(jax.random.key(config.seed), index)
        images.append(config.init_noise_std * jax.random.normal(
            key, size + (3,), jnp.float32))
        continue
      source = (inputs.contents[n] if init == "content"
                else inputs.init_images[n])
      rgb = image_io.resize(source, *size, method="torch")
      images.append(vgg.preprocess(jnp.asarray(rgb, jnp.float32),
                                   self.convention))
    return jnp.stack(images)

  # -- the solve -----------------------------------------------------------

  def solve_level(self, x: jnp.ndarray, targets: Dict[str, Any], *,
                  level: int, num_iter: int, state: Any = None,
                  first_iter: int = 0, on_block=None,
                  num_pairs: Optional[int] = None
                  ) -> Tuple[jnp.ndarray, Any, List[Dict[str, Any]]]:
    """Runs iterations first_iter+1..num_iter from x [N, H, W, 3].

    num_pairs: log only the first num_pairs pairs (the rest are padding).

    state: the optimiser state at x (from a checkpoint), or None to start
    the level afresh. Returns (x, state, log) with one log record per
    iteration (and one for the start, iter 0, when starting afresh), every
    loss term and matching statistic per pair. on_block(records, x, state,
    it) runs at the end of every block of iterations (every print_every,
    checkpoint_every and save_every iterations), after the scalars are
    fetched.

    Raises NonFiniteError (carrying the last finite x) if the loss or the
    gradient turns non-finite; the check runs once per block, so no host
    round trip is added inside it.
    """
    config = self.config
    history = []
    pending = []  # (iteration, loss, aux, gradient finite), not yet fetched
    if state is None:
      state = self._init(x, self.solve_params, targets)
      pending.append((0, self.solver.value(state), self.solver.aux(state),
                      _all_finite(state)))
    # The images since the last fetch (references, no copies), to fall back
    # on the last one whose loss and gradient were finite.
    images = {first_iter: x}
    block_start = time.perf_counter()
    block_iters = 0
    print_every = config.print_every or num_iter or 1
    # A block also ends where run() checkpoints or saves an image, so that
    # --checkpoint_every and --save_every need not be multiples of it.
    block_ends = [n for n in (print_every, config.checkpoint_every,
                              config.save_every) if n]
    # (iteration, x, state) as one value: a Ctrl-C landing between two
    # separate assignments would checkpoint the image of one iteration
    # under the count of another, and --resume would then repeat one.
    position = (first_iter, x, state)
    try:
      for it in range(first_iter + 1, num_iter + 1):
        position = (it, *self._update(x, state, self.solve_params, targets))
        _, x, state = position
        pending.append((it, self.solver.value(state),
                        self.solver.aux(state), _all_finite(state)))
        images[it] = x
        block_iters += 1
        if it == num_iter or any(it % n == 0 for n in block_ends):
          fetched = jax.device_get(pending)  # one transfer per block
          seconds = (time.perf_counter() - block_start) / max(1, block_iters)
          records = [_record(level, i, v, a, seconds, num_pairs)
                     for i, v, a, _ in fetched]
          bad = []  # (iteration, what turned non-finite)
          for r, (_, _, _, finite_grad) in zip(records, fetched):
            if not np.all(np.isfinite(r["loss"])):
              bad.append((r["iter"], "loss"))
            elif not np.all(finite_grad):
              bad.append((r["iter"], "gradient"))
          if bad:
            first_bad, what = bad[0]
            kept = max([i for i in images if i < first_bad] or [min(images)])
            raise NonFiniteError(
                f"level {level + 1}: the {what} became non-finite at "
                f"iteration {first_bad}; stopping with the image of "
                f"iteration {kept} (try a lower --learning_rate, "
                "--mrf_weight or --content_weight)",
                images[kept], history + [r for r in records
                                         if r["iter"] < first_bad])
          history, pending, block_iters = history + records, [], 0
          images = {it: x}
          if it % print_every == 0 or it == num_iter:
            _log_progress(records[-1], num_iter, seconds)
          if on_block is not None:
            on_block(records, x, state, it)
          block_start = time.perf_counter()
    except KeyboardInterrupt:
      done, x, state = position
      known = {r["iter"] for r in history} | {p[0] for p in pending}
      if done > first_iter and done not in known:  # its record was lost
        pending.append((done, self.solver.value(state),
                        self.solver.aux(state), True))
      records = [_record(level, i, v, a, 0.0, num_pairs)
                 for i, v, a, _ in jax.device_get(pending) if i <= done]
      raise Interrupted(level, done, x, state, history + records) from None
    if pending:  # no iterations ran: only the starting record
      history += [_record(level, i, v, a, 0.0, num_pairs)
                  for i, v, a, _ in jax.device_get(pending)]
    return x, state, history

  def state_like(self, x: jnp.ndarray, targets: Dict[str, Any]) -> Any:
    """The optimiser state's structure (shapes only) at x; for restoring."""
    return jax.eval_shape(self._init, x, self.params, targets)

  def run(self, inputs: Inputs, workdir: Optional[pathlib.Path] = None, *,
          names: Optional[Sequence[str]] = None) -> Result:
    """Synthesises every pair of `inputs`; writes into workdir if given.

    With config.resume, continues from workdir's checkpoint. On Ctrl-C (or
    SIGTERM turned into KeyboardInterrupt by main.py) the current image and
    a checkpoint are written before the exception propagates.
    """
    config = self.config
    check_sizes(config, inputs)
    check_batch(config, inputs)
    height, width = output_size(config, inputs)
    sizes = image_io.pyramid_sizes(height, width, config.num_res)
    iterations = config.iterations_per_level()
    num_pairs = len(inputs.styles)
    names = list(names or ([RESULT_NAME] if num_pairs == 1 else
                           [f"result_{n}.png" for n in range(num_pairs)]))
    # What is solved: the pairs, padded to fill the mesh evenly.
    solve_inputs = batch.pad(inputs, batch.padded_size(num_pairs, self.mesh))
    writer = _Writer(workdir, config, names) if workdir else None
    checkpoint = None
    if config.resume:
      if writer is None:
        raise config_lib.ConfigError("--resume: needs --workdir")
      checkpoint = writer.load_checkpoint()
    history = list(checkpoint.history) if checkpoint else []
    x = None
    for level, (size, scale) in enumerate(zip(sizes,
                                              level_scales(config.num_res))):
      if checkpoint is not None and level < checkpoint.level:
        continue
      if (checkpoint is not None and level == checkpoint.level
          and checkpoint.iteration >= iterations[level]):
        # Checkpointed at the end of this level: no targets to rebuild.
        x, checkpoint = jnp.asarray(checkpoint.x), None
        continue
      logging.info("level %d/%d: %dx%d px, %d iterations", level + 1,
                   config.num_res, size[0], size[1], iterations[level])
      t0 = time.perf_counter()
      targets = self.level_targets(solve_inputs, size, scale)
      state, first_iter = None, 0
      if checkpoint is not None and level == checkpoint.level:
        x = jnp.asarray(checkpoint.x)
        state = checkpoint.restore_state(self.state_like(x, targets))
        first_iter = checkpoint.iteration
        logging.info("resuming level %d at iteration %d", level + 1,
                     first_iter)
        checkpoint = None
      elif x is None:
        x = self.initial_images(solve_inputs, size)
      else:
        x = image_io.resize(x, *size, method="torch")
      if self.mesh is not None:
        x, targets = batch.place((x, targets), self.mesh)
        if state is not None:
          state = batch.place(state, self.mesh)
      logging.info("level %d targets built in %.1f s", level + 1,
                   time.perf_counter() - t0)
      on_block = None
      if writer is not None:
        def on_block(records, x_now, state_now, it, level=level):
          writer.block(records, self._rgb(x_now), level, it)
          every = config.checkpoint_every
          if every and it % every == 0 and it < iterations[level]:
            writer.save_checkpoint(level, it, x_now, state_now)
      try:
        x, state, level_history = self.solve_level(
            x, targets, level=level, num_iter=iterations[level],
            state=state, first_iter=first_iter, on_block=on_block,
            num_pairs=num_pairs)
      except NonFiniteError as e:
        if writer is not None:
          writer.records = history + e.history
          writer.write_log()
          e.paths = writer.final(self._rgb(e.last_finite_x)[:num_pairs])
        raise
      except Interrupted as e:
        if writer is not None:
          writer.records = history + e.history
          writer.save_checkpoint(e.level, e.iteration, e.x, e.state)
          writer.save_image(CURRENT_NAME, self._rgb(e.x))
          logging.warning("interrupted at level %d iteration %d: saved %s "
                          "and a checkpoint; continue with --resume",
                          e.level + 1, e.iteration,
                          writer.workdir / CURRENT_NAME)
        raise
      history += level_history
      if writer is not None:
        writer.records = list(history)
        if level + 1 < config.num_res:  # the last level ends in the result
          writer.save_checkpoint(level, iterations[level], x, state)
    rgb = self._rgb(x)[:num_pairs]
    if config.original_colors and config.mode != "texture":
      contents = np.stack([
          np.asarray(image_io.resize(c, height, width, method="torch"))
          for c in inputs.contents])
      rgb = np.asarray(image_io.match_luminance(rgb, contents))
    paths = writer.final(rgb) if writer is not None else []
    return Result(images=rgb, history=history, paths=paths)

  def _rgb(self, x: jnp.ndarray) -> np.ndarray:
    return np.asarray(vgg.deprocess(x, self.convention), np.float32)


@jax.jit
def _all_finite(state) -> jnp.ndarray:
  """[N]: whether each pair's gradient in the optimiser state is finite.

  Reduced per pair, not over the batch: on a sharded batch a reduction over
  N is an all-reduce across devices at every iteration, and on XLA:CPU's
  host devices that collective can deadlock (a device thread waits in the
  rendezvous for one stuck behind it).
  """
  finite = jnp.asarray(True)
  for g in jax.tree.leaves(getattr(state, "grad", None)):  # each [N, ...]
    finite = finite & jnp.all(jnp.isfinite(g), axis=tuple(range(1, g.ndim)))
  return finite


def _float32(features):
  """Losses and targets stay float32 whatever --dtype the VGG runs in."""
  return jax.tree.map(lambda f: f.astype(jnp.float32), features)


def _record(level, iteration, value, aux, seconds,
            num_pairs=None) -> Dict[str, Any]:
  """One log record; per-pair values are lists (of the first num_pairs)."""
  def plain(a):
    a = np.asarray(a)[:num_pairs]
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


class NonFiniteError(FloatingPointError):
  """The loss turned non-finite; carries the last finite image [N,H,W,3]."""

  def __init__(self, message, last_finite_x, history):
    super().__init__(message)
    self.last_finite_x = last_finite_x
    self.history = history
    self.paths: List[pathlib.Path] = []  # where run() wrote that image


class Interrupted(KeyboardInterrupt):
  """Ctrl-C or SIGTERM during a solve, with the state reached."""

  def __init__(self, level, iteration, x, state, history):
    super().__init__(f"interrupted at level {level + 1} iteration "
                     f"{iteration}")
    self.level, self.iteration = level, iteration
    self.x, self.state, self.history = x, state, history


@dataclasses.dataclass
class Checkpoint:
  """A run's position: after `iteration` updates of level `level`.

  x: [N, H, W, 3] preprocessed image; state_leaves: the optimiser state
  flattened (restored onto the structure `Synthesizer.state_like` gives);
  history: every log record so far.
  """
  level: int
  iteration: int
  x: np.ndarray
  state_leaves: List[np.ndarray]
  history: List[Dict[str, Any]]

  def restore_state(self, like):
    leaves, treedef = jax.tree.flatten(like)
    if len(leaves) != len(self.state_leaves) or any(
        tuple(a.shape) != tuple(b.shape)
        for a, b in zip(leaves, self.state_leaves)):
      raise ValueError("--resume: the checkpoint's optimiser state does not "
                       "fit this run (different --optimizer or sizes?)")
    return jax.tree.unflatten(
        treedef, [jnp.asarray(v, a.dtype)
                  for v, a in zip(self.state_leaves, leaves)])


class _Writer:
  """Writes the workdir: flags, versions, log, intermediates, results and
  checkpoints, every file atomically."""

  def __init__(self, workdir: pathlib.Path, config: config_lib.Config,
               names: Sequence[str]):
    self.workdir = pathlib.Path(workdir)
    self.config = config
    self.names = list(names)
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, no permission, ...
      raise config_lib.ConfigError(
          f"--workdir: cannot create the directory {self.workdir} "
          f"({e.strerror or e})") from None
    if not config.overwrite:
      for name in self.names:
        if (self.workdir / name).exists():
          raise fileio.ExistsError(
              f"--workdir: {self.workdir / name} exists; pass --overwrite "
              "to replace it or choose another --workdir")
    if not (config.resume or config.overwrite) and (
        self.workdir / CHECKPOINT_NAME).exists():
      raise fileio.ExistsError(
          f"--workdir: {self.workdir} holds an unfinished run; pass --resume "
          "to continue it or --overwrite to start again")
    self.flag_lines = config.to_flag_lines()
    if not config.resume:
      fileio.atomic_write_bytes(self.workdir / FLAGS_NAME,
                                ("\n".join(self.flag_lines) + "\n").encode())
    fileio.atomic_write_bytes(
        self.workdir / VERSIONS_NAME,
        json.dumps(software_versions(), indent=2).encode())
    self.records: List[Dict[str, Any]] = []

  def write_log(self):
    text = "".join(json.dumps(r) + "\n" for r in self.records)
    fileio.atomic_write_bytes(self.workdir / LOG_NAME, text.encode())

  def save_image(self, name, rgb):
    if len(self.names) == 1:
      return [image_io.write_image(self.workdir / name, rgb[0],
                                   mode=self.config.output_mode)]
    stem, suffix = pathlib.Path(name).stem, pathlib.Path(name).suffix
    return [image_io.write_image(self.workdir / f"{stem}_{n}{suffix}",
                                 rgb[n], mode=self.config.output_mode)
            for n in range(len(self.names))]

  def block(self, records, rgb, level, iteration):
    self.records += records
    self.write_log()
    every = self.config.save_every
    if every and iteration % every == 0:
      self.save_image(f"iter_level{level + 1}_{iteration:04d}.png", rgb)

  def save_checkpoint(self, level, iteration, x, state):
    leaves = jax.device_get(jax.tree.leaves(state))
    arrays = {f"state_{i:03d}": np.asarray(v) for i, v in enumerate(leaves)}
    meta = {"level": level, "iteration": iteration,
            "flags": self.flag_lines, "history": self.records}
    def write(f):
      np.savez(f, x=np.asarray(jax.device_get(x)),
               meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
               **arrays)
    fileio.atomic_write(self.workdir / CHECKPOINT_NAME, write)

  def load_checkpoint(self) -> Checkpoint:
    path = self.workdir / CHECKPOINT_NAME
    if not path.exists():
      raise config_lib.ConfigError(
          f"--resume: no checkpoint in {self.workdir} to resume from")
    try:
      with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        x = data["x"]
        leaves = [data[k] for k in sorted(data.files)
                  if k.startswith("state_")]
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"--resume: cannot read the checkpoint {path}: "
                       f"{e}") from None
    ignored = ("--print_every", "--save_every", "--checkpoint_every")
    keep = lambda lines: [l for l in lines if not l.startswith(ignored)]
    if keep(meta["flags"]) != keep(self.flag_lines):
      changed = sorted(set(keep(self.flag_lines)) ^ set(keep(meta["flags"])))
      raise config_lib.ConfigError(
          f"--resume: the flags differ from the checkpointed run's in "
          f"{changed}; resume with the same flags (--flagfile="
          f"{self.workdir / FLAGS_NAME})")
    self.records = list(meta["history"])
    return Checkpoint(meta["level"], meta["iteration"], x, leaves,
                      meta["history"])

  def final(self, rgb) -> List[pathlib.Path]:
    self.write_log()
    paths = []
    for n, name in enumerate(self.names):
      paths.append(image_io.write_image(self.workdir / name, rgb[n],
                                        mode=self.config.output_mode))
    for name in (CHECKPOINT_NAME, CURRENT_NAME):
      if (self.workdir / name).exists():
        (self.workdir / name).unlink()
    return paths


def software_versions() -> Dict[str, str]:
  """Versions of everything that shapes a result, for the workdir."""
  versions = {"python": sys.version.split()[0],
              "platform": platform.platform(),
              "backend": jax.default_backend(),
              "devices": ", ".join(str(d) for d in jax.devices())}
  for package in ("cnnmrf_jax", "jax", "jaxlib", "flax", "optax", "jaxopt",
                  "numpy", "pillow"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = "not installed"
  versions["cnnmrf_jax"] = cnnmrf_jax.__version__
  return versions


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
        params=None, convention=None,
        pairs: Optional[Sequence[Tuple[str, Sequence[str]]]] = None,
        devices: Optional[Sequence[Any]] = None) -> Result:
  """Runs the synthesis `config` describes; writes results to `workdir`.

  params/convention: VGG weights to use instead of loading `config.weights`
  (tests pass random weights).
  pairs: [(content, (style, ...)), ...] (`batch.read_pairs`) to solve as one
  batch instead of config's own images; the batch is sharded over `devices`
  (default: every local device), results are result_{n}.png.
  """
  config.validate()
  if pairs:
    inputs = batch.concat([load_inputs(config_lib.replace(
        config, content_image=content, style_image=tuple(styles)))
                           for content, styles in pairs])
  else:
    inputs = load_inputs(config)
  # Cheap checks first: a too small image or a run that cannot fit in
  # memory fails before the weights are fetched or any target is built.
  check_sizes(config, inputs)
  check_memory(config, inputs)
  mesh = batch.batch_mesh(len(inputs.styles), devices)
  synthesizer = Synthesizer(config, params, convention, mesh=mesh)
  t0 = time.perf_counter()
  result = synthesizer.run(inputs, pathlib.Path(workdir) if workdir else None)
  logging.info("done in %.1f s%s", time.perf_counter() - t0,
               f": {result.paths[0]}" if result.paths else "")
  return result
