"""Batches of (content, style) pairs and their placement on devices.

The driver (`synthesize.Synthesizer`) runs a batch axis N through the VGG,
the matching, the losses and the L-BFGS state. This module holds what is
about batches rather than about the objective:

  - which config fields may differ between the pairs of one compiled batch
    (`PER_PAIR_FIELDS`, `batch_key`): the images, the seed, the init and the
    loss weights, which the objective reads per pair;
  - how a batch is laid out over devices: a 1-D `Mesh` with axis 'batch'
    over the local devices (`batch_mesh`), N padded with copies of the last
    pair to a multiple of the mesh size (`plan`, `pad`), arrays placed with
    `NamedSharding` (`place`, `replicate`), and the per-pair step run on
    every device's own slice with no communication (`per_device`);
  - reading a `--pairs` file (`read_pairs`) and joining the inputs of several
    pairs (`concat`).

Pairs never interact, so the batch axis is pure data parallelism: a device
holds N / D pairs, their images [N/D, H, W, 3], targets and solver state,
and a replicated copy of the weights.
"""

import dataclasses
import math
import pathlib
import shlex
from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
import numpy as np

from cnnmrf_jax import config as config_lib

AXIS = "batch"  # the mesh axis the pairs are sharded over

# Config fields the objective takes per pair (synthesize.Inputs.configs):
# pairs differing only in these run in one compiled program. Everything else
# shapes the program (sizes, layers, optimiser) or is not part of the
# computation at all, and must agree.
PER_PAIR_FIELDS = ("content_image", "style_image", "style_blend_weights",
                   "init", "init_noise_std", "seed", "content_weight",
                   "mrf_weight", "tv_weight", "style_weight", "content_map",
                   "style_map")


def batch_key(config: config_lib.Config) -> config_lib.Config:
  """The config with its per-pair fields blanked: equal keys batch together.

  Whether the content and smoothness terms exist at all is structure, not a
  weight (a zero weight drops the term from the program), so the key keeps
  `content_weight > 0` and `tv_weight > 0`; the number of MRF weights is
  kept too, as the config checks it against the layers.
  """
  return dataclasses.replace(
      config, content_image="", style_image=(), style_blend_weights=(),
      init="", init_noise_std=0.0, seed=0,
      content_weight=float(config.content_weight > 0),
      mrf_weight=(0.0,) * len(config.mrf_weight),
      tv_weight=float(config.tv_weight > 0), style_weight=0.0,
      content_map="", style_map=())


# ----------------------------------------------------------------------------
# Layout over devices.


def plan(num_pairs: int, num_devices: int) -> Tuple[int, int]:
  """(devices to use, padded batch size) for N pairs on D devices.

  The step's time is set by the pairs per device, ceil(N / D); within that,
  as few devices as hold them all, so the padding is the least possible
  (N = 10 on 8 devices: 5 devices x 2 pairs, no padding; N = 3: 3 devices).
  """
  if num_pairs < 1 or num_devices < 1:
    raise ValueError(f"need at least one pair and one device, got "
                     f"{num_pairs} pairs and {num_devices} devices")
  per_device = math.ceil(num_pairs / num_devices)
  used = math.ceil(num_pairs / per_device)
  return used, used * per_device


def batch_mesh(num_pairs: int, devices: Optional[Sequence[Any]] = None
               ) -> Optional[jax.sharding.Mesh]:
  """A 1-D mesh (axis 'batch') for N pairs over `devices`, or None for one.

  devices: default `jax.local_devices()`, the devices this process drives
  (in a multi-host run each process solves its own pairs; see sweep.py).
  Returns None when one device would hold the whole batch, so a single run
  keeps the plain, unsharded path.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  used, _ = plan(num_pairs, len(devices))
  if used == 1:
    return None
  return jax.sharding.Mesh(np.asarray(devices[:used]), (AXIS,))


def padded_size(num_pairs: int, mesh: Optional[jax.sharding.Mesh]) -> int:
  """N rounded up to a multiple of the mesh's size (N without a mesh)."""
  if mesh is None:
    return num_pairs
  return math.ceil(num_pairs / mesh.size) * mesh.size


def pad(inputs: Any, size: int) -> Any:
  """Pads a dataclass of per-pair lists to `size` pairs with copies of the
  last pair (their results are computed and dropped). None fields stay."""
  count = len(inputs.styles)
  if size < count:
    raise ValueError(f"cannot pad {count} pairs down to {size}")
  changes = {}
  for field in dataclasses.fields(inputs):
    values = getattr(inputs, field.name)
    if values is not None:
      changes[field.name] = list(values) + [values[-1]] * (size - count)
  return dataclasses.replace(inputs, **changes)


def concat(parts: Sequence[Any]) -> Any:
  """Joins dataclasses of per-pair lists (e.g. synthesize.Inputs) in order.

  A field that is None in some parts and not in others is an error (e.g.
  per-pair configs given for only some pairs).
  """
  if not parts:
    raise ValueError("concat: no inputs to join")
  changes = {}
  for field in dataclasses.fields(parts[0]):
    values = [getattr(p, field.name) for p in parts]
    if all(v is None for v in values):
      changes[field.name] = None
    elif any(v is None for v in values):
      raise ValueError(f"concat: {field.name} is given for some pairs only")
    else:
      changes[field.name] = [item for v in values for item in v]
  return dataclasses.replace(parts[0], **changes)


def place(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shards every leaf's leading (batch) axis over the mesh."""
  spec = jax.sharding.PartitionSpec(AXIS)
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, spec))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """A full copy of every leaf on every device of the mesh (the weights)."""
  spec = jax.sharding.PartitionSpec()
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, spec))


def per_device(fn: Callable[..., Any], mesh: jax.sharding.Mesh,
               batched: Sequence[bool],
               donate_argnums: Sequence[int] = ()) -> Callable[..., Any]:
  """fn run by every device on its own slice of the batch (jitted).

  batched: per positional argument, True if its leaves carry the leading
  batch axis (sharded), False if replicated (the weights). Every output is
  batched. donate_argnums: arguments whose buffers the call may reuse
  (jax.jit's). Written with shard_map rather than left to the partitioner: the
  pairs are independent, so this states that nothing crosses devices (the
  matching's gathers and scans are then never considered for resharding).
  check_vma is off because the matching's chunked loop (`patches.match`,
  a fori_loop once the bank exceeds one chunk) starts its running max from
  constants, which the check types as unvarying while the body's output
  varies over devices; there are no collectives for it to check.
  """
  sharded, replicated = (jax.sharding.PartitionSpec(AXIS),
                         jax.sharding.PartitionSpec())
  specs = tuple(sharded if b else replicated for b in batched)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs,
                               out_specs=sharded, check_vma=False),
                 donate_argnums=tuple(donate_argnums))


# ----------------------------------------------------------------------------
# Pairs files.


def read_pairs(path: str, *, mode: str = "transfer"
               ) -> List[Tuple[str, Tuple[str, ...]]]:
  """Reads a `--pairs` file: one pair per line, `CONTENT STYLE[,STYLE...]`.

  Shell-style words (quote paths with spaces), `#` comments and blank lines
  are allowed; several comma-separated styles share one patch bank, as in
  --style_image. In texture mode a line is just `STYLE[,STYLE...]`.
  Returns [(content or '', (style, ...)), ...]; raises ConfigError naming
  --pairs and the line.
  """
  file = pathlib.Path(path).expanduser()
  try:
    text = file.read_text()
  except OSError as e:
    raise config_lib.ConfigError(
        f"--pairs: cannot read {file}: {e.strerror or e}") from None
  words_per_line = 1 if mode == "texture" else 2
  expected = "STYLE" if mode == "texture" else "CONTENT STYLE"
  pairs = []
  for number, line in enumerate(text.splitlines(), 1):
    try:
      words = shlex.split(line, comments=True)
    except ValueError as e:
      raise config_lib.ConfigError(
          f"--pairs: {file}:{number}: {e}") from None
    if not words:
      continue
    if len(words) != words_per_line:
      raise config_lib.ConfigError(
          f"--pairs: {file}:{number}: expected '{expected}' "
          f"(--mode={mode}), got {len(words)} words: {line.strip()!r}")
    styles = tuple(s for s in words[-1].split(",") if s)
    if not styles:
      raise config_lib.ConfigError(
          f"--pairs: {file}:{number}: no style image")
    pairs.append((words[0] if words_per_line == 2 else "", styles))
  if not pairs:
    raise config_lib.ConfigError(f"--pairs: {file} lists no pairs")
  return pairs
