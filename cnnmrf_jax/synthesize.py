"""Coarse-to-fine synthesis: the compiled objective and the pyramid driver.

    x* = argmin_x  E_s(Phi(x), Phi(x_s)) + a1 E_c(Phi(x), Phi(x_c)) + a2 Y(x)

(Li & Wand 2016, Eq. 1) minimised over the pixels of x, in the preprocessed
space of the weights' convention, with L-BFGS, one solve per pyramid level:
the plan (plan.py) gives every level's sizes; at each level the targets are
rebuilt from the inputs at that level (targets.py); the result of one level,
upsampled bilinearly, starts the next; the solve loop (solve.py) runs the
level's iterations; the workdir (workdir.py) logs, checkpoints and resumes.

Everything runs on a batch axis N of (content, style) pairs of one output
size: the objective (terms.py) is written for one pair and vmapped, so each
pair keeps its own targets and its own optimiser state. A single run is
N = 1. Given a mesh (`batch.batch_mesh`), the batch axis is sharded over its
devices. Per level the whole iteration (VGG, matching, folding, losses,
gradient, L-BFGS update) is one jitted program, traced once per level shape
(`TRACE_COUNTS` counts it).
"""

import collections
import dataclasses
import pathlib
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cnnmrf_jax import batch
from cnnmrf_jax import compile_cache
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import image_io
from cnnmrf_jax import optim
from cnnmrf_jax import plan as plan_lib
from cnnmrf_jax import semantic
from cnnmrf_jax import solve
from cnnmrf_jax import targets as targets_lib
from cnnmrf_jax import terms as terms_lib
from cnnmrf_jax import vgg
from cnnmrf_jax import weights as weights_lib
from cnnmrf_jax import workdir as workdir_lib

# How often each jitted function was traced; tests assert once per level.
TRACE_COUNTS = collections.Counter()

Inputs = targets_lib.Inputs


@dataclasses.dataclass
class Result:
  """What a run returns: the final images and the per-iteration log."""
  images: np.ndarray  # [N, H, W, 3] RGB float32, before stretch or clip
  history: List[Dict[str, Any]]
  paths: List[pathlib.Path]


class Synthesizer:
  """The model, its weights and the compiled steps of one config.

  One Synthesizer serves many runs of the same config: its jitted functions
  are traced once per level shape and reused. Its config is frozen: the
  objective is built from it once (`terms.make_objective`).

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
    self.convention = convention or "caffe"
    self.model = vgg.VGG(network=config.network, pooling=config.pooling,
                         dtype=jnp.dtype(config.dtype), conv=config.conv)
    # The targets' forward passes (one per image and per augmented copy,
    # each of its own size, so one program each) run as 'xla' whatever
    # --conv is: the other forms compile several times slower than 'xla',
    # which costs more than they save on a single pass. Features agree to
    # float rounding (tests/conv_test.py).
    self.target_model = vgg.VGG(network=config.network,
                                pooling=config.pooling,
                                dtype=jnp.dtype(config.dtype), conv="xla")
    self.layers = config.feature_layers()
    # The kernels in the forms --conv runs them in, transformed once here.
    self.params = vgg.prepare_params(jax.tree.map(jnp.asarray, params),
                                     config.conv, config.network,
                                     layers=self.layers)
    self._features = jax.jit(self._features_impl)
    self.mesh = mesh
    # {(H, W): tiling.Tiling or None}: how the objective of a level size is
    # evaluated (the plan's choice), read when it is traced for that size.
    self.tilings = {}
    self._build_steps()

  def _build_steps(self):
    """The objective, the solver and their jitted steps (traced lazily)."""
    config, mesh = self.config, self.mesh
    self.objective = terms_lib.make_objective(config, self.model,
                                              tiling_of=self.tilings.get)
    self.solver = optim.make(config.optimizer, self.objective,
                             history_size=config.history_size,
                             learning_rate=config.learning_rate)
    init = jax.vmap(self.solver.init, in_axes=(0, None, 0))
    # The update donates the optimiser state it reads (argument 1): its
    # L-BFGS rings (2 x history_size images) are then written in place
    # instead of into a second copy, half the history's memory (6.7 GB of
    # the 13.4 at 4096 px). solve.solve_level keeps nothing of a state it
    # has passed to the update.
    if mesh is None:
      self.solve_params = self.params
      self._init = jax.jit(init)
      self._update = jax.jit(self._update_impl, donate_argnums=(1,))
    else:
      # Targets are built on one device from self.params; the solve runs on
      # every device of the mesh, each with its own copy of the weights.
      self.solve_params = batch.replicate(self.params, mesh)
      self._init = batch.per_device(init, mesh, batched=(True, False, True))
      self._update = batch.per_device(self._update_impl, mesh,
                                      batched=(True, True, False, True),
                                      donate_argnums=(1,))

  def set_tiling(self, size: Tuple[int, int], tiling: Any) -> None:
    """Evaluates the objective of images of `size` with `tiling` (a
    `tiling.Tiling`, or None: whole). Programs compiled for that size with
    another tiling are dropped."""
    size = tuple(size)
    if size in self.tilings and self.tilings[size] != tiling:
      self.tilings[size] = tiling
      self._build_steps()
    self.tilings[size] = tiling

  def _features_impl(self, params, images):
    """images: [N, H, W, 3] preprocessed -> {layer: [N, h, w, c]}."""
    TRACE_COUNTS["features"] += 1
    return terms_lib.float32(self.target_model.apply(
        {"params": params}, images, outputs=self.layers))

  def _update_impl(self, x, state, params, targets):
    TRACE_COUNTS["update"] += 1
    # State a term keeps between evaluations (the PatchMatch field) is in
    # the aux of the last evaluation: the next one starts from it.
    targets = terms_lib.with_carry(targets, self.carry(state))
    return jax.vmap(self.solver.update, in_axes=(0, 0, None, 0))(
        x, state, params, targets)

  # The stepper solve.solve_level drives.
  def init(self, x, targets):
    return self._init(x, self.solve_params, targets)

  def update(self, x, state, targets):
    """One iteration from (x, state); state is donated: it is invalid
    after the call (use the returned one)."""
    return self._update(x, state, self.solve_params, targets)

  def value(self, state):
    return self.solver.value(state)

  def aux(self, state):
    """The last evaluation's logged aux: {'terms', 'stats'} (the carried
    state stays on the device)."""
    return {k: v for k, v in self.solver.aux(state).items() if k != "carry"}

  def carry(self, state) -> Dict[str, Any]:
    """{term name: [N, ...]} the terms' state after the last evaluation
    (`terms.CARRY`); empty when no term keeps one."""
    return self.solver.aux(state).get("carry", {})

  def state_like(self, x: jnp.ndarray, targets: Dict[str, Any]) -> Any:
    """The optimiser state's structure (shapes only) at x; for restoring."""
    return jax.eval_shape(self._init, x, self.params, targets)

  def features(self, rgb: np.ndarray) -> Dict[str, jnp.ndarray]:
    """rgb: [H, W, 3] in [0, 1] -> {layer: [h, w, c]} for self.layers."""
    x = vgg.preprocess(np.asarray(rgb, np.float32), self.convention)
    return {k: v[0] for k, v in self._features(self.params, x[None]).items()}

  def rgb(self, x: jnp.ndarray) -> np.ndarray:
    """[N, H, W, 3] preprocessed -> RGB float32, before stretch or clip."""
    return np.asarray(vgg.deprocess(x, self.convention), np.float32)

  def run(self, inputs: Inputs, workdir: Optional[pathlib.Path] = None, *,
          names: Optional[Sequence[str]] = None,
          run_plan: Optional[plan_lib.Plan] = None) -> Result:
    """`synthesize` with this synthesizer (the plan made if not given)."""
    if run_plan is None:
      run_plan = plan_lib.make(self.config, inputs.sizes())
      plan_lib.check_sizes(self.config, run_plan)
      plan_lib.check_batch(run_plan)
    check_batch_configs(self.config, inputs)
    return synthesize(self, inputs, run_plan, workdir, names=names)


def check_batch_configs(config: config_lib.Config, inputs: Inputs) -> None:
  """Raises ConfigError unless per-pair configs differ from `config` only
  in `batch.PER_PAIR_FIELDS` (what the objective takes per pair)."""
  if inputs.configs is None:
    return
  if len(inputs.configs) != len(inputs.styles):
    raise ValueError(f"{len(inputs.configs)} per-pair configs for "
                     f"{len(inputs.styles)} pairs")
  key = batch.batch_key(config)
  for n, pair_config in enumerate(inputs.configs):
    pair_key = batch.batch_key(pair_config)
    if pair_key != key:
      differ = [f.name for f in dataclasses.fields(key)
                if getattr(key, f.name) != getattr(pair_key, f.name)]
      raise config_lib.ConfigError(
          f"pair {n} differs from the batch's config in {differ}, which "
          f"shape the program; only {', '.join(batch.PER_PAIR_FIELDS)} may "
          "differ within a batch")


def _start_level(synthesizer, level, targets, solve_inputs, x, checkpoint):
  """(x, state, first iteration) a level starts from: the checkpoint's
  position, the initial images, or the previous level's result upsampled."""
  if checkpoint is not None and level.index == checkpoint.level:
    x = jnp.asarray(checkpoint.x)
    state = checkpoint.restore_state(synthesizer.state_like(x, targets))
    logging.info("resuming level %d at iteration %d", level.index + 1,
                 checkpoint.iteration)
    return x, state, checkpoint.iteration
  if x is None:
    return targets_lib.initial_images(synthesizer.config, solve_inputs,
                                      level.size,
                                      synthesizer.convention), None, 0
  return image_io.resize(x, *level.size, method="torch"), None, 0


def synthesize(synthesizer: Synthesizer, inputs: Inputs,
               run_plan: plan_lib.Plan,
               workdir: Optional[pathlib.Path] = None, *,
               names: Optional[Sequence[str]] = None) -> Result:
  """Synthesises every pair of `inputs` by the plan; writes into workdir.

  With config.resume, continues from workdir's checkpoint. On Ctrl-C (or
  SIGTERM turned into KeyboardInterrupt by main.py) the current image and
  a checkpoint are written before the exception propagates. The workdir is
  held (`workdir.claim`) throughout: another process's run on it fails.
  """
  if workdir is None:
    return _synthesize(synthesizer, inputs, run_plan, None, names=names)
  with workdir_lib.claim(workdir):
    return _synthesize(synthesizer, inputs, run_plan, workdir, names=names)


def _synthesize(synthesizer, inputs, run_plan, workdir, *, names):
  """`synthesize`, the workdir (if any) held."""
  config = synthesizer.config
  num_pairs = len(inputs.styles)
  names = list(names or workdir_lib.result_names(num_pairs))
  # What is solved: the pairs, padded to fill the mesh evenly.
  solve_inputs = batch.pad(inputs, batch.padded_size(num_pairs,
                                                     synthesizer.mesh))
  writer = workdir_lib.Writer(workdir, config, names) if workdir else None
  checkpoint = None
  if config.resume:
    if writer is None:
      raise config_lib.ConfigError("--resume: needs --workdir")
    checkpoint = writer.load_checkpoint()
  if writer is not None:
    writer.write_plan(run_plan.to_json())
  history = list(checkpoint.history) if checkpoint else []
  x = None
  carried = {}  # the terms' carried state at the end of the last level
  for level in run_plan.levels:
    if checkpoint is not None and level.index < checkpoint.level:
      continue
    if (checkpoint is not None and level.index == checkpoint.level
        and checkpoint.iteration >= level.num_iter):
      # Checkpointed at the end of this level: no targets to rebuild.
      x, carried = jnp.asarray(checkpoint.x), checkpoint.carry
      checkpoint = None
      continue
    logging.info("level %d/%d: %dx%d px, %d iterations%s", level.index + 1,
                 len(run_plan.levels), *level.size, level.num_iter,
                 f", matching {level.matching}" if level.matching else "")
    if level.tiling is not None:
      logging.info("level %d tiled: %dx%d tiles of %d px (+%d px halo)",
                   level.index + 1, *level.tiling.grid,
                   level.tiling.tile_size, level.tiling.halo)
    synthesizer.set_tiling(level.size, level.tiling)
    t0 = time.perf_counter()
    targets = targets_lib.level_targets(config, run_plan, level,
                                        solve_inputs, synthesizer.features,
                                        carried=carried)
    x, state, first_iter = _start_level(synthesizer, level, targets,
                                        solve_inputs, x, checkpoint)
    checkpoint = None
    if synthesizer.mesh is not None:
      x, targets, state = batch.place((x, targets, state), synthesizer.mesh)
    logging.info("level %d targets built in %.1f s", level.index + 1,
                 time.perf_counter() - t0)
    try:
      x, state, level_history = solve.solve_level(
          synthesizer, x, targets, level=level.index,
          num_iter=level.num_iter, state=state, first_iter=first_iter,
          on_block=writer and _block_writer(writer, synthesizer, level),
          num_pairs=num_pairs, print_every=config.print_every,
          block_ends=(config.checkpoint_every, config.save_every))
    except (solve.NonFiniteError, solve.Interrupted) as e:
      if writer is not None:
        writer.records = history + e.history
        _write_stop(writer, synthesizer, e, num_pairs)
      raise
    history += level_history
    carried = synthesizer.carry(state)
    if writer is not None:
      writer.records = list(history)
      if level.index + 1 < len(run_plan.levels):  # the last ends in results
        writer.save_checkpoint(level.index, level.num_iter, x, state,
                               carry=carried)
    # Drop this level's bank and L-BFGS history before the next level's
    # targets are built beside them (memory.py counts one level at a time).
    del targets, state
  rgb = synthesizer.rgb(x)[:num_pairs]
  if config.original_colors and config.mode in ("transfer", "gatys"):
    contents = np.stack([np.asarray(image_io.resize(
        c, *run_plan.output_size, method="torch")) for c in inputs.contents])
    rgb = np.asarray(image_io.match_luminance(rgb, contents))
  for n, image in enumerate(rgb):
    warning = image_io.flat_image_warning(image, flag_hint=_FLAT_HINT)
    if warning:
      logging.warning("%s%s", f"pair {n}: " if num_pairs > 1 else "",
                      warning)
  paths = writer.final(rgb) if writer is not None else []
  return Result(images=rgb, history=history, paths=paths)


_FLAT_HINT = ("more --num_iter (at the coarsest level above all), a larger "
              "--init_noise_std, or --output_mode=clip to see the image "
              "unstretched")


def _block_writer(writer, synthesizer, level):
  """solve_level's on_block: log, intermediates, --checkpoint_every."""
  def on_block(records, x, state, iteration):
    writer.block(records, synthesizer.rgb(x), level.index, iteration)
    every = synthesizer.config.checkpoint_every
    if every and iteration % every == 0 and iteration < level.num_iter:
      writer.save_checkpoint(level.index, iteration, x, state,
                             carry=synthesizer.carry(state))
  return on_block


def _write_stop(writer, synthesizer, error, num_pairs) -> None:
  """What a stopped run leaves: the last finite image (non-finite), or a
  checkpoint and the current image (interrupted)."""
  if isinstance(error, solve.NonFiniteError):
    writer.write_log()
    error.paths = writer.final(synthesizer.rgb(error.last_finite_x)
                               [:num_pairs])
    return
  writer.save_checkpoint(error.level, error.iteration, error.x, error.state,
                         carry=synthesizer.carry(error.state))
  writer.save_image(workdir_lib.CURRENT_NAME, synthesizer.rgb(error.x))
  logging.warning("interrupted at level %d iteration %d: saved %s and a "
                  "checkpoint; continue with --resume", error.level + 1,
                  error.iteration, writer.workdir / workdir_lib.CURRENT_NAME)


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
  extras = None
  map_paths, notes = semantic.find(config)
  for note in notes:
    logging.info("%s", note)
  if map_paths is not None:
    maps, notes = semantic.load(
        map_paths, None if content is None else content.shape[:2],
        [s.shape[:2] for s in styles])
    for note in notes:
      if note.startswith("WARNING "):
        logging.warning("%s", note[len("WARNING "):])
      else:
        logging.info("%s", note)
    extras = [maps]
  return Inputs(contents=[content], styles=[styles], init_images=[init_image],
                extras=extras)


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
    if config.mode == "doodle":
      raise config_lib.ConfigError("--pairs: --mode=doodle runs one map at "
                                   "a time")
    if config.content_map or config.style_map:
      raise config_lib.ConfigError(
          "--content_map: with --pairs every pair's maps are found as "
          f"NAME{semantic.SUFFIX} beside its images; drop --content_map and "
          "--style_map")
    parts = [load_inputs(config_lib.replace(
        config, content_image=content, style_image=tuple(styles)))
             for content, styles in pairs]
    with_maps = [p.extras is not None for p in parts]
    if any(with_maps) and not all(with_maps):
      raise config_lib.ConfigError(
          f"--pairs: pair {with_maps.index(not with_maps[0])} "
          f"{'has no' if with_maps[0] else 'has'} semantic maps and pair 0 "
          f"{'has' if with_maps[0] else 'has none'}; one batch needs maps "
          "for every pair or for none")
    inputs = batch.concat(parts)
    semantic.equalize_labels(inputs.extras)
  else:
    inputs = load_inputs(config)
  # Every size rule first: a too small image, pairs of different sizes or
  # a run that cannot fit in memory fail before the weights are fetched.
  run_plan = plan_lib.make(config, inputs.sizes())
  plan_lib.check(config, run_plan)
  logging.info("%s", run_plan.table())
  mesh = batch.batch_mesh(len(inputs.styles), devices)
  synthesizer = Synthesizer(config, params, convention, mesh=mesh)
  t0 = time.perf_counter()
  result = synthesizer.run(inputs, pathlib.Path(workdir) if workdir else None,
                           run_plan=run_plan)
  logging.info("done in %.1f s%s", time.perf_counter() - t0,
               f": {', '.join(map(str, result.paths))}"
               if result.paths else "")
  return result
