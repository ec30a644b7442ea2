"""An estimate of a run's peak memory, and a check that it fits.

CNNMRF on a large image fails late and badly: users of the reference report
800x638 px needing ~18 GB and 960x1280 over 30 GB, and an out-of-memory kill
takes the machine's other work with it. So before any weights are loaded or
targets built, the plan of the run (plan.py) adds the largest `level_bytes`
of its levels to `fixed_bytes`, and `check_fits` refuses, naming --max_size,
a run that cannot fit in the memory available. `--max_memory_gb` replaces the
available memory with a figure of the user's, `--nocheck_memory` skips the
check.

What is counted per level (float32, 4 bytes a value), from the plan's sizes,
in its two phases, of which the larger is the level's figure: the targets'
build (before the level's first iteration; the previous level's bank and
L-BFGS history are dropped by then, synthesize.run) and the solve.

  1. Solve: the VGG pass over the image being optimised, forward and
     backward: every conv and pool map up to the deepest layer the objective
     reads, twice (the forward maps kept for the backward pass, and the
     gradients flowing back through them), per pair.
  2. Build: the style side: per MRF layer the patch bank [M, 9 C] (M the
     batch's bank size) three times (the extracted pieces, their
     concatenation, the copy stacked over the pairs) and every copy's
     feature map it is built from; one copy's VGG forward pass. The solve
     keeps the bank once. Both: the content target map; gatys: the Gram
     matrices.
  3. Solve: matching, per MRF layer: the synthesis patches and their
     matched targets [P, 9 C] and one chunk of scores [chunk, P]; the
     winograd scan also its transformed map and one chunk's products
     (grid_winograd.products_per_output values per patch, times C and
     times the chunk); PatchMatch (the plan's `matching`) instead the
     patches, one gathered candidate and the matched targets, 3 [P, 9 C],
     the shared candidates' rows and scores, [K, 9 C] and [K, P], and the
     field (tiled: P a tile's patches, plus the whole grid's field
     and scores passed from tile to tile).
  4. Solve: the optimiser: L-BFGS keeps 2 * history_size images (s and y;
     the update donates the state it reads, so they are written in place),
     plus a few working images (x, gradient, direction, new x, ...); Adam a
     few.
  5. Semantic maps (the plan's num_labels L > 0): both phases, the level's
     content map [H, W, L]; build, per MRF layer every copy's map at the
     layer [h, w, L] and the bank's map patches and labels [M, 9 L + 1]
     three times as the bank itself (the solve once); solve, the synthesis
     grid's [P, 9 L + 1] (whole, tiled or not) and one more score chunk
     [chunk, P] (the map part of the scores); tiled, also a tile's gathered
     map patches.

and once: the decoded input images, the VGG weights (a host and a device
copy) and the JAX/XLA runtime itself, with its compiled programs (more of
them when layers run as Winograd).

A tiled level (the plan's `tiling`, tiling.py) counts 1. for one tile's
crop instead of the whole image, plus the padded image and its gradient
accumulator, and 3. for one tile's synthesis patches (those overlapping its
core); the style side, the content target and the optimiser stay whole.

Not counted: XLA's compile-time memory and its choice of which buffers live
at once (it may fuse some of the maps above away, or keep a temporary we do
not list). It answers "will this fit at all", not "how much exactly", and
errs high; tests/robustness_test.py compares it with the peak resident
memory of small real runs, and benchmarks/bench_synthesis.py with large ones.
"""

import math
import os
import pathlib
from typing import Any, Optional, Sequence, Tuple

import jax

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import conv
from cnnmrf_jax import grid_winograd
from cnnmrf_jax import patches
from cnnmrf_jax import terms
from cnnmrf_jax import vgg

GIB = 2 ** 30
_FLOAT = 4  # bytes of a float32
# Resident size of a Python process with JAX, XLA:CPU and the compiled
# programs of a run besides the weights: ~0.5 GB measured at 24-64 px.
RUNTIME_BYTES = 600 * 2 ** 20
# More when a layer runs as Winograd (--conv=auto on CPU): its programs are
# thousands of small fused loops (each transform stage per frequency), and
# compiling and holding them took 0.61-0.72 GiB above the rest of the
# estimate in runs of the reference settings at 128, 256 and 384 px (peak
# 1.58 / 1.77 / 2.16 GiB), where --conv=xla's run at 128 px came within
# 0.08 GiB of its estimate; not a size-dependent term: at 4096 px the
# estimate without it was 0.27 GiB under the peak.
WINOGRAD_PROGRAM_BYTES = 768 * 2 ** 20
# Working images of the optimisers besides the L-BFGS history: x, the
# gradient, the direction, the new x and its gradient, the value_and_grad
# temporaries.
_WORKING_IMAGES = 8


def _vgg_maps(height: int, width: int, deepest: str, network: str
              ) -> Tuple[int, int]:
  """(sum, largest) of the values of the maps kept up to `deepest`.

  Spatial sizes follow the ceil-mode pooling of `vgg.pool2x2_ceil`. ReLU
  maps are not counted in the sum: XLA fuses each ReLU into its conv, and
  the backward pass keeps one map per conv (counting them too overestimated
  the peak ~2x at 1024 and 2048 px).
  """
  total = largest = 0
  h, w, channels = height, width, 3
  for name in vgg.layer_names(network):
    if name.startswith("pool"):
      h, w = math.ceil(h / 2), math.ceil(w / 2)
    else:
      channels = vgg.channels_of(name, network)
    size = h * w * channels
    if not name.startswith("relu") or name == deepest:
      total += size
    largest = max(largest, size)
    if name == deepest:
      break
  return total, largest


def _deepest(layers: Sequence[str], network: str) -> str:
  names = vgg.layer_names(network)
  return max(layers, key=names.index)


def level_bytes(config: config_lib.Config, level: Any,
                num_pairs: int) -> int:
  """Estimated bytes in use while one level (`plan.LevelPlan`) of num_pairs
  pairs runs, besides `fixed_bytes`: the larger of its two phases (see the
  module docstring), the targets' build and the solve."""
  network = config.network
  layers = config.feature_layers()
  height, width = level.size
  tiling = getattr(level, "tiling", None)
  num_labels = getattr(level, "num_labels", 0)
  map_depth = config.patch_size ** 2 * num_labels  # Dm, 0 without maps
  build = solve = 0  # values per pair

  # Both phases: the content target (and map), which lives from its build
  # to the level's end.
  kept = 0
  if num_labels:  # 5. the level's content map
    kept += height * width * num_labels
  if config.mode in ("transfer", "gatys") and config.content_weight > 0:
    for layer in level.layers:
      if layer.name in config.content_layers:
        kept += math.prod(layer.size) * layer.channels
  if config.mode == "gatys":
    kept += sum(vgg.channels_of(l, network) ** 2 for l in config.style_layers)
  build += kept
  solve += kept

  # 1. Solve: the VGG forward and backward over the image being optimised
  # (tiled: over one tile's crop, plus the padded image and its gradient).
  if tiling is None:
    total, _ = _vgg_maps(height, width, _deepest(layers, network), network)
  else:
    total, _ = _vgg_maps(tiling.crop, tiling.crop,
                         _deepest(layers, network), network)
    rows, cols = tiling.grid
    total += 2 * 3 * ((rows * tiling.tile_size + 2 * tiling.halo) *
                      (cols * tiling.tile_size + 2 * tiling.halo))
  solve += 2 * total

  # 2. Build: the style side. Copies of the pair with the most.
  copies = max(level.copies, key=lambda c: sum(h * w for h, w in c))
  largest_copy = 0
  for h, w in copies:  # the style pass computes every layer the run reads
    _, largest = _vgg_maps(h, w, _deepest(layers, network), network)
    largest_copy = max(largest_copy, largest)
  build += 2 * largest_copy  # one copy's forward pass at a time
  for mrf in level.mrf:
    channels = vgg.channels_of(mrf.layer, network)
    depth = config.patch_size ** 2 * channels
    bank = mrf.bank_size * (depth + 2)  # patches, inv_norms, valid
    copy_maps = sum(math.prod(vgg.map_size(h, w, mrf.layer, network)) *
                    channels for h, w in copies)
    # The build holds every copy's map and the bank three times (the
    # extracted pieces, their concatenation, the copy stacked over the
    # pairs); the solve keeps the bank once.
    build += copy_maps + 3 * bank
    solve += bank
    if num_labels:
      # 5. The map channels of the copies and the bank, as above.
      build += sum(math.prod(vgg.map_size(h, w, mrf.layer, network)) *
                   num_labels for h, w in copies)
      build += 3 * mrf.bank_size * (map_depth + 1)
      solve += mrf.bank_size * (map_depth + 1)
    # 3. Solve: matching: synthesis patches, matched targets, one score
    # chunk.
    chunk = min(mrf.bank_size,
                config.chunk_size or patches.DEFAULT_CHUNK_SIZE)
    num_patches = mrf.num_patches
    if tiling is not None:
      # The patches overlapping one core; a core of n map positions meets
      # at most n / stride + 2 grid corners per side.
      core = tiling.tile_size // vgg.downsampling_of(mrf.layer, network)
      side = core // config.synth_stride + 2
      num_patches = min(num_patches, side * side)
      solve += 2 * mrf.bank_size  # the used-patch counts
    if getattr(level, "matching", "") == patches.PATCHMATCH:
      solve += 3 * num_patches * depth + 2 * num_patches
      # The shared random candidates: their rows [K, D] and scores [K, P].
      shared = terms.patchmatch_shared(max(len(c) for c in level.copies))
      solve += shared * (depth + num_patches)
      if tiling is not None:
        # The whole grid's field and scores passed from tile to tile, and
        # the carried field in and out.
        solve += 4 * mrf.num_patches
    else:
      solve += 2 * num_patches * depth + 2 * chunk * num_patches
      if patches.scan_method(
          getattr(level, "matching", "") or config.matching,
          patch_size=config.patch_size,
          stride=config.synth_stride) == "winograd":
        # grid_winograd: the transformed map [points, rows, C] and one
        # chunk's products [points, rows, chunk], each
        # products_per_output(...) values per grid patch.
        expansion = grid_winograd.products_per_output(config.patch_size,
                                                      config.synth_stride)
        solve += int(expansion * num_patches *
                     (chunk + depth // config.patch_size ** 2))
    if num_labels:
      # 5. The synthesis grid's map part, the map scores; tiled, a tile's
      # gathered rows.
      solve += mrf.num_patches * (map_depth + 1) + chunk * num_patches
      if tiling is not None:
        solve += num_patches * (map_depth + 1)

  # 4. Solve: the optimiser. The compiled update donates its input state
  # (synthesize.py), so the L-BFGS rings (s and y, history_size images
  # each) are written in place: resident once.
  history = (2 * config.history_size
             if config.optimizer in ("lbfgs", "optax_lbfgs") else 0)
  solve += (history + _WORKING_IMAGES) * height * width * 3
  return _FLOAT * num_pairs * max(build, solve)


def fixed_bytes(config: config_lib.Config, input_pixels: int) -> int:
  """Bytes in use for the whole run: the decoded inputs (float32 RGB), the
  VGG weights (a host and a device copy, plus the kernel forms --conv
  prepares: winograd's 2 x 36 values per 3x3 kernel, matmul's 2 x 9) and
  the runtime with its compiled programs."""
  shapes = vgg.conv_shapes(config.network)
  weights = sum(math.prod(s) for layer in shapes.values()
                for s in layer.values())
  names = vgg.layer_names(config.network)
  deepest = max((names.index(l) for l in config.feature_layers()),
                default=len(names) - 1)
  prepared, winograd = 0, False
  for name in names[:deepest + 1]:
    if name in shapes:
      _, _, c_in, c_out = shapes[name]["kernel"]
      method = conv.layer_method(config.conv, c_in, c_out)
      prepared += {"winograd": 72, "matmul": 18}.get(method, 0) * c_in * c_out
      winograd |= method == "winograd"
  return (_FLOAT * (2 * weights + prepared + 3 * input_pixels) +
          RUNTIME_BYTES + (WINOGRAD_PROGRAM_BYTES if winograd else 0))


def available_bytes() -> Tuple[int, str]:
  """(bytes, where the figure comes from) of memory a run may use.

  On an accelerator, the memory pool of the first device (memory_stats'
  bytes_limit): the images, banks and activations live there. On CPU, on
  Linux, MemAvailable of /proc/meminfo, lowered to the cgroup's limit minus
  its usage when a container limits it; elsewhere os.sysconf's available
  physical pages. (0, 'unknown') when none can be read.
  """
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
      return (int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)),
              f"memory of {device.platform} {device.id}")
  found, where = None, "unknown"
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        found, where = int(line.split()[1]) * 1024, "MemAvailable"
        break
  except (OSError, ValueError, IndexError):
    pass
  if found is None:
    try:
      found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
      where = "available physical memory"
    except (ValueError, OSError, AttributeError):
      return 0, where
  # cgroup v2, then v1: a container's limit can be far below the host's.
  for limit_file, usage_file in (
      ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
      ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
       "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    try:
      limit = pathlib.Path(limit_file).read_text().strip()
      usage = int(pathlib.Path(usage_file).read_text().strip())
    except (OSError, ValueError):
      continue
    if limit.isdigit() and int(limit) - usage < found:
      found, where = max(0, int(limit) - usage), "cgroup memory limit"
    break
  return found, where


def limit_bytes(config: config_lib.Config) -> Tuple[int, str]:
  """(bytes, where from) a run may use: --max_memory_gb when set, else
  `available_bytes()`."""
  if config.max_memory_gb > 0:
    return int(config.max_memory_gb * GIB), "--max_memory_gb"
  return available_bytes()


def _gib(value: float) -> str:
  return f"{value / GIB:.1f} GiB"


def check_fits(config: config_lib.Config, output_size: Tuple[int, int],
               needed: int, *, limit_bytes: Optional[int] = None) -> int:
  """Raises ConfigError naming --max_size if `needed` bytes (the plan's
  estimate for an output of output_size) would not fit.

  The limit is `limit_bytes`, else --max_memory_gb when set, else
  `available_bytes()`. Nothing is checked with --nocheck_memory or when the
  available memory cannot be read. Returns `needed`.
  """
  if not config.check_memory:
    return needed
  if limit_bytes is not None:
    where = "the given limit"
  elif config.max_memory_gb > 0:
    limit_bytes, where = int(config.max_memory_gb * GIB), "--max_memory_gb"
  else:
    limit_bytes, where = available_bytes()
    if limit_bytes <= 0:
      return needed
  if needed > limit_bytes:
    height, width = output_size
    raise config_lib.ConfigError(
        f"--max_size: a {height}x{width} px run (--max_size="
        f"{config.max_size}) needs about {_gib(needed)} of memory, but "
        f"{_gib(limit_bytes)} is available ({where}); lower --max_size (or "
        "--num_rotations, --num_scales, --chunk_size), or pass "
        "--max_memory_gb=GB or --nocheck_memory to try anyway")
  return needed
