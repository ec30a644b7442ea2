"""The plan of a run: every size it will use, made before any pixel is read.

A run is a coarse-to-fine pyramid (Li & Wand 2016, section 4; the reference
code's run_trans.lua): both inputs are resized so that the long side is
`max_size` (texture mode: the exemplar to max_size / scaler, so the output is
`scaler` times it); level i of `num_res` runs at 1/2**(num_res-1-i) of that
(ceil sizes); at each level every style image is resized to the level and
augmented into rotated and scaled copies (augment.py), whose patches on the
stride-plus-tail grid of every MRF layer form the style bank.

`make` computes all of it from the input images' sizes alone (their headers
suffice): per level the image size, every style copy's size, every layer's
feature-map size, the synthesis patch grid and the bank size per MRF layer,
the matching (--matching=auto: the exact scan, or PatchMatch where the
scan's flops would exceed the VGG's, `choose_matching`), the tiling of the
objective (tiling.py; --tile_size=auto tiles a level only when its untiled
estimate does not fit) and the memory estimate (memory.py). `check` holds
every size rule of a run (a map smaller than a patch, pairs that cannot
share a batch, a run too big for the memory), each failing in one line that
names the flag. The driver, the memory check, the sweep's batching and the
workdir's plan.json all read the plan; nothing recomputes a size.
"""

import dataclasses
import json
import math
from typing import Any, List, Optional, Sequence, Tuple

from cnnmrf_jax import augment
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import image_io
from cnnmrf_jax import memory
from cnnmrf_jax import patches
from cnnmrf_jax import terms
from cnnmrf_jax import tiling as tiling_lib
from cnnmrf_jax import vgg

Size = Tuple[int, int]  # (height, width) in pixels


# ----------------------------------------------------------------------------
# Size rules.


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def fit_long_side(height: int, width: int, max_size: int) -> Size:
  """(h, w) with the long side exactly `max_size` and the aspect kept.

  As the reference's torch `image.scale(img, max_size)`, which computes
  side * max_size / long_side and truncates it to an integer: the short side
  is floor(short * max_size / long) (600x512 -> 384x327), at least 1. In
  integers, so no float error moves a size. Scales up as well as down, as
  the reference resizes both inputs to max_size whatever their size.
  """
  height = image_io.check_positive_int("height", height)
  width = image_io.check_positive_int("width", width)
  max_size = image_io.check_positive_int("max_size", max_size)
  long_side = max(height, width)
  return (max(1, height * max_size // long_side),
          max(1, width * max_size // long_side))


def pyramid_sizes(height: int, width: int, num_res: int) -> List[Size]:
  """Sizes of a `num_res`-level pyramid, coarsest first.

  Level i has scale 1 / 2**(num_res - 1 - i) and size (ceil(height * scale),
  ceil(width * scale)): 1/4, 1/2, 1 for the reference's 3 levels; the last
  level is (height, width).
  """
  height = image_io.check_positive_int("height", height)
  width = image_io.check_positive_int("width", width)
  num_res = image_io.check_positive_int("num_res", num_res)
  return [(_ceil_div(height, 2 ** (num_res - 1 - i)),
           _ceil_div(width, 2 ** (num_res - 1 - i))) for i in range(num_res)]


def level_scales(num_res: int) -> List[float]:
  """The scale of every level relative to the finest, coarsest first."""
  return [1.0 / 2 ** (num_res - 1 - i) for i in range(num_res)]


@dataclasses.dataclass(frozen=True)
class InputSizes:
  """(h, w) of one pair's images as read, before any resizing.

  content: None in texture mode. styles: one per style image. init: the
  --init image's, when it is a path. num_labels: the label channels of its
  semantic maps (`semantic.load`), 0 without maps.
  """
  content: Optional[Size]
  styles: Tuple[Size, ...]
  init: Optional[Size] = None
  num_labels: int = 0

  @property
  def pixels(self) -> int:
    sizes = [self.content, self.init, *self.styles]
    return sum(h * w for h, w in (s for s in sizes if s is not None))


def output_size(config: config_lib.Config, sizes: InputSizes) -> Size:
  """(H, W) of the finest level: the content's (texture: the exemplar's)
  aspect with the long side max_size."""
  h, w = sizes.styles[0] if config.mode == "texture" else sizes.content
  return fit_long_side(h, w, config.max_size)


def check_map_size(flag: str, path: str, map_size: Size, image_size: Size
                   ) -> None:
  """Raises ConfigError naming the flag unless a semantic map of map_size
  can be resized to its image's image_size: the aspect ratios must agree
  to within a pixel of rounding (then semantic.py resizes it)."""
  (mh, mw), (ih, iw) = map_size, image_size
  # Resizing the map's width to the image's gives a height within 1 px.
  if abs(mh * iw / mw - ih) <= 1 or abs(mw * ih / mh - iw) <= 1:
    return
  raise config_lib.ConfigError(
      f"--{flag}: {path} is {mh}x{mw} px, its image {ih}x{iw}: the aspect "
      "ratios differ; expected a map of the image's size or shape")


def style_size(config: config_lib.Config, style: Size, scale: float) -> Size:
  """(H, W) of a style image at a level of `scale` (1/2**k).

  As the reference (transfer_CNNMRF_wrapper.lua, syn_CNNMRF_wrapper.lua):
  the style is first fitted to the long side max_size (texture:
  floor(max_size / scaler), so the output is `scaler` times the exemplar);
  each level then takes ceil(side * scale) of that, side by side, like the
  content's pyramid.
  """
  long_side = config.max_size
  if config.mode == "texture":
    long_side = max(1, int(math.floor(config.max_size / config.scaler)))
  height, width = fit_long_side(style[0], style[1], long_side)
  return (max(1, int(math.ceil(height * scale))),
          max(1, int(math.ceil(width * scale))))


# ----------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """A VGG layer the objective reads: its map over the synthesis image."""
  name: str
  size: Size
  channels: int


@dataclasses.dataclass(frozen=True)
class MrfPlan:
  """One MRF layer at one level.

  grid: (rows, cols) of synthesis patches on the stride-plus-tail grid.
  bank_sizes: style patches per pair. bank_size: the batch's bank, the
  largest of them; smaller banks are padded with rows never matched.
  """
  layer: str
  grid: Size
  num_patches: int
  bank_sizes: Tuple[int, ...]
  bank_size: int


@dataclasses.dataclass(frozen=True)
class LevelPlan:
  """One pyramid level.

  styles: per pair, every style image's size at this level.
  copies: per pair, every copy's size, style-major then rotation-major
    (`augment.augment_style`'s order); gatys: the style images themselves.
  tiling: how the objective is cut (`tiling.Tiling`), or None: whole.
  num_labels: label channels of the batch's semantic maps (the largest
    pair's; 0: no maps), for the memory estimate of their map patches.
  """
  index: int
  scale: float
  size: Size
  num_iter: int
  styles: Tuple[Tuple[Size, ...], ...]
  copies: Tuple[Tuple[Size, ...], ...]
  layers: Tuple[LayerPlan, ...]
  mrf: Tuple[MrfPlan, ...]
  memory_bytes: int
  tiling: Optional[tiling_lib.Tiling] = None
  num_labels: int = 0
  # How the MRF matching runs at this level ('' without an MRF term):
  # matmul or conv (exact scans) or patchmatch; `choose_matching`.
  matching: str = ""
  # Per pair and evaluation: the exact scan's flops over every MRF layer
  # (2 P M D each) and the VGG's, forward and backward (`vgg_flops`), the
  # figures --matching=auto compares.
  scan_flops: int = 0
  vgg_flops: int = 0


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every size of a run of N pairs, and its estimated peak memory."""
  num_pairs: int
  inputs: Tuple[InputSizes, ...]
  output_sizes: Tuple[Size, ...]  # per pair; one batch needs them equal
  levels: Tuple[LevelPlan, ...]
  memory_bytes: int

  @property
  def output_size(self) -> Size:
    return self.levels[-1].size

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  def table(self) -> str:
    """A few lines for the log: per level the size, copies, maps, banks."""
    lines = [f"plan: {self.num_pairs} pair(s), output "
             f"{self.output_size[0]}x{self.output_size[1]} px, estimated "
             f"peak memory {self.memory_bytes / memory.GIB:.2f} GiB"]
    for level in self.levels:
      copies = level.copies[0]
      text = (f"  level {level.index + 1}: {level.size[0]}x{level.size[1]} "
              f"px, {level.num_iter} iterations, {len(copies)} style "
              f"cop{'y' if len(copies) == 1 else 'ies'}")
      for mrf in level.mrf:
        text += (f"; {mrf.layer} {mrf.grid[0]}x{mrf.grid[1]} patches, bank "
                 f"{mrf.bank_size}")
      if level.matching:
        text += (f"; matching {level.matching} (exact scan "
                 f"{level.scan_flops / max(level.vgg_flops, 1):.2g}x the "
                 "VGG's flops)")
      if level.tiling is not None:
        tiles = level.tiling
        text += (f"; tiled {tiles.grid[0]}x{tiles.grid[1]} of "
                 f"{tiles.tile_size} px (+{tiles.halo} px halo), "
                 f"{level.memory_bytes / memory.GIB:.2f} GiB")
      lines.append(text)
    return "\n".join(lines)


def _level_copies(config: config_lib.Config, styles: Sequence[Size]
                  ) -> Tuple[Size, ...]:
  if config.mode == "gatys":
    return tuple(styles)
  return tuple(c for s in styles for c in augment.copy_sizes(
      *s, num_rotations=config.num_rotations, num_scales=config.num_scales))


def _bank_size(config: config_lib.Config, copies: Sequence[Size],
               layer: str) -> int:
  maps = [vgg.map_size(h, w, layer, config.network) for h, w in copies]
  maps = [m for m in maps if min(m) >= config.patch_size]
  return patches.bank_size(maps, config.patch_size, config.style_stride)


# --matching=auto keeps the exact scan at a level while its flops are at
# most this many times the VGG's forward and backward pass, i.e. while the
# scan does not dominate an evaluation. At 384 px with one style copy the
# scan is ~0.15x the VGG (measured: 13 % of an iteration on a 2-core CPU);
# its flops grow with the fourth power of the side (P x M) and the VGG's
# with the square, so the ratio reaches 1 near 1024 px with one copy and
# near 384 px with nine (README, Speed and memory).
AUTO_SCAN_RATIO = 1.0
EXACT_FOR_AUTO = patches.EXACT  # auto's exact levels: patches.scan_method


def vgg_flops(config: config_lib.Config, size: Size) -> int:
  """Flops of one evaluation's VGG over an image of `size` (h, w): every
  3x3 convolution up to the deepest layer the objective reads, 2 flops a
  multiply-add, times 2 for the backward pass to the image (the input
  gradient costs what the forward convolution does; no weight gradient)."""
  layers = config.feature_layers()
  if not layers:
    return 0
  names = vgg.layer_names(config.network)
  deepest = max(names.index(l) for l in layers)
  height, width, channels = size[0], size[1], 3
  forward = 0
  for name in names[:deepest + 1]:
    if name.startswith("pool"):
      height, width = _ceil_div(height, 2), _ceil_div(width, 2)
    elif name.startswith("conv"):
      out = vgg.channels_of(name, config.network)
      forward += 2 * 9 * height * width * channels * out
      channels = out
  return 2 * forward


def scan_flops(config: config_lib.Config, mrf: Sequence[MrfPlan]) -> int:
  """Flops of the exact matching scan of one evaluation: per MRF layer a
  [M, D] x [D, P] product, 2 P M D."""
  return sum(2 * m.num_patches * m.bank_size * config.patch_size ** 2 *
             vgg.channels_of(m.layer, config.network) for m in mrf)


def choose_matching(config: config_lib.Config, scan: int, vgg_: int) -> str:
  """The matching of a level whose exact scan costs `scan` flops and whose
  VGG costs `vgg_` (`scan_flops`, `vgg_flops`): --matching itself unless
  auto; auto: patchmatch where scan > AUTO_SCAN_RATIO * vgg_, else the
  exact matmul scan. Tiled or not: a tiled level carries the field over
  the whole grid and each tile improves its own patches (terms.py)."""
  if config.matching != "auto":
    return config.matching
  if scan > AUTO_SCAN_RATIO * vgg_:
    return patches.PATCHMATCH
  return EXACT_FOR_AUTO


def _resolve_level(config: config_lib.Config, level: LevelPlan,
                   num_pairs: int, fixed: int,
                   limit_bytes: Optional[int]) -> LevelPlan:
  """The level with its flops, matching, tiling and memory estimate."""
  if level.mrf:
    level = dataclasses.replace(
        level, scan_flops=scan_flops(config, level.mrf),
        vgg_flops=vgg_flops(config, level.size))
    level = dataclasses.replace(level, matching=choose_matching(
        config, level.scan_flops, level.vgg_flops))
  return _tiled_level(config, level, num_pairs, fixed, limit_bytes)


def _tiled_level(config: config_lib.Config, level: LevelPlan,
                 num_pairs: int, fixed: int,
                 limit_bytes: Optional[int]) -> LevelPlan:
  """The level with its tiling (--tile_size) and memory estimate.

  auto: untiled if it fits in limit_bytes (or the limit is unknown), else
  the largest of `tiling.candidate_sizes` that fits, else the smallest
  (check_memory then refuses the run).
  """
  untiled = dataclasses.replace(level, memory_bytes=memory.level_bytes(
      config, level, num_pairs))
  tile_size = tiling_lib.parse_tile_size(config)
  if tile_size == 0:
    return untiled
  untileable = terms.untileable_terms(config)
  if untileable and tile_size is None:
    return untiled  # auto: check_memory says whether it fits whole
  if untileable:
    raise config_lib.ConfigError(
        f"--tile_size: the term(s) {untileable} cannot be tiled (the Gram "
        "matrix needs the whole image's features); pass --tile_size=0")
  if tile_size is not None:
    sizes = [tile_size]
  elif not limit_bytes or untiled.memory_bytes + fixed <= limit_bytes:
    return untiled
  else:
    sizes = tiling_lib.candidate_sizes(config, level.size)
  best = untiled
  for size in sizes:
    tiles = tiling_lib.make(config, level.size, size)
    if tiles is None:
      continue
    tiled = dataclasses.replace(level, tiling=tiles)
    best = dataclasses.replace(tiled, memory_bytes=memory.level_bytes(
        config, tiled, num_pairs))
    if limit_bytes and best.memory_bytes + fixed <= limit_bytes:
      break
  return best


def make(config: config_lib.Config, inputs: Sequence[InputSizes], *,
         limit_bytes: Optional[int] = None) -> Plan:
  """The plan of a run of `config` over pairs of these input sizes.

  Pure and cheap: no image is decoded. Sizes too small for a patch are
  planned as they are (`check` refuses them, naming the flag).
  limit_bytes: the memory --tile_size=auto fits the levels into (default:
  `memory.limit_bytes`, read only when tile_size is auto).
  """
  inputs = tuple(inputs)
  if not inputs:
    raise ValueError("a plan needs at least one pair")
  outputs = tuple(output_size(config, s) for s in inputs)
  height, width = outputs[0]
  iterations = config.iterations_per_level()
  layers = config.feature_layers()
  # Maps take part only in the MRF matching, and only at a positive weight
  # (terms._uses_maps); the batch pads every pair to the most labels.
  num_labels = 0
  if (config.mode in ("transfer", "doodle") and config.semantic_weight > 0):
    num_labels = max(s.num_labels for s in inputs)
  fixed = memory.fixed_bytes(config, sum(s.pixels for s in inputs))
  if limit_bytes is None and tiling_lib.parse_tile_size(config) is None:
    limit_bytes = memory.limit_bytes(config)[0]
  levels = []
  for index, (size, scale) in enumerate(zip(
      pyramid_sizes(height, width, config.num_res),
      level_scales(config.num_res))):
    styles = tuple(tuple(style_size(config, s, scale) for s in pair.styles)
                   for pair in inputs)
    copies = tuple(_level_copies(config, pair) for pair in styles)
    layer_plans = tuple(
        LayerPlan(l, vgg.map_size(*size, l, config.network),
                  vgg.channels_of(l, config.network)) for l in layers)
    mrf_plans = []
    if config.mode in ("transfer", "texture", "doodle"):
      for layer in config.mrf_layers:
        synth = vgg.map_size(*size, layer, config.network)
        grid = (0, 0)
        if min(synth) >= config.patch_size:
          grid = (len(patches.grid_positions(synth[0], config.patch_size,
                                             config.synth_stride)),
                  len(patches.grid_positions(synth[1], config.patch_size,
                                             config.synth_stride)))
        banks = tuple(_bank_size(config, c, layer) for c in copies)
        mrf_plans.append(MrfPlan(layer, grid, grid[0] * grid[1], banks,
                                 max(banks)))
    level = LevelPlan(index, scale, size, iterations[index], styles, copies,
                      layer_plans, tuple(mrf_plans), 0,
                      num_labels=num_labels)
    levels.append(_resolve_level(config, level, len(inputs), fixed,
                                 limit_bytes))
  return Plan(len(inputs), inputs, outputs, tuple(levels),
              max(l.memory_bytes for l in levels) + fixed)


# ----------------------------------------------------------------------------
# Checks.


def _too_small(config: config_lib.Config, size: Size
               ) -> Optional[Tuple[str, Size]]:
  """(layer, map size) of the first MRF layer whose map at `size` is smaller
  than a patch, or None."""
  if config.mode == "gatys":
    return None
  for layer in config.mrf_layers:
    fh, fw = vgg.map_size(*size, layer, config.network)
    if min(fh, fw) < config.patch_size:
      return layer, (fh, fw)
  return None


# Past this long side a run is not practical, so a size rule that only a
# larger --max_size would meet is reported as the image's aspect ratio.
_LARGEST_USEFUL_SIZE = 8192


def _size_error(config: config_lib.Config, flag: str, size: Size,
                layer: str, fmap: Size, source: Size
                ) -> config_lib.ConfigError:
  """The error for an image of `size` at the coarsest level, resized from
  one of `source` (whose aspect ratio says whether --max_size can help)."""
  height, width = size
  stride = vgg.downsampling_of(layer, config.network)
  # The long side at the finest level that would give the short side a
  # patch at `layer` on the coarsest level.
  needed = (config.patch_size * stride * 2 ** (config.num_res - 1) *
            max(source) / min(source))
  if needed > _LARGEST_USEFUL_SIZE:
    fix = (f"the aspect ratio ({source[0]}:{source[1]}) is the problem, no "
           "--max_size helps: crop the image closer to square")
  elif config.num_res == 1:
    fix = "raise --max_size"
  else:
    fix = f"raise --max_size or lower --num_res (now {config.num_res})"
  return config_lib.ConfigError(
      f"--{flag}: at the coarsest level the image is {height}x{width} px, so "
      f"{layer} is {fmap[0]}x{fmap[1]}, smaller than a "
      f"{config.patch_size}x{config.patch_size} patch; {fix}")


def check_sizes(config: config_lib.Config, run_plan: Plan) -> None:
  """Raises ConfigError naming the flag if a map is smaller than a patch:
  the synthesis image's or a style copy's, at any MRF layer and level."""
  coarsest = run_plan.levels[0]
  first = run_plan.inputs[0]
  flag = {"texture": "style_image", "doodle": "content_map"}.get(
      config.mode, "content_image")
  small = _too_small(config, coarsest.size)
  if small:
    source = first.styles[0] if config.mode == "texture" else first.content
    raise _size_error(config, flag, coarsest.size, *small, source)
  for level in run_plan.levels:
    for styles, pair in zip(level.styles, run_plan.inputs):
      for style, source in zip(styles, pair.styles):  # the images first
        small = _too_small(config, style)
        if small:
          raise _size_error(config, "style_image", style, *small, source)
    for copies in level.copies:
      for copy in copies:
        small = _too_small(config, copy)
        if small:
          error = _size_error(config, "style_image", copy, *small, copy)
          raise config_lib.ConfigError(
              f"{error}; this is a rotated or scaled copy of the style "
              f"(--num_rotations={config.num_rotations}, --num_scales="
              f"{config.num_scales}): fewer give larger copies")


def check_batch(run_plan: Plan) -> None:
  """Raises ConfigError unless every pair gives one output size (one
  compiled program). Style sizes may differ: smaller banks are padded."""
  first = run_plan.output_sizes[0]
  for n, size in enumerate(run_plan.output_sizes[1:], start=1):
    if size != first:
      raise config_lib.ConfigError(
          f"--pairs: pair {n} gives a {size} output, pair 0 {first}; the "
          "pairs of one batch must have one size (after fitting the long "
          "side to --max_size)")


def check_memory(config: config_lib.Config, run_plan: Plan, *,
                 limit_bytes: Optional[int] = None) -> int:
  """Raises ConfigError naming --max_size if the plan's estimated peak
  memory exceeds what is available (`memory.check_fits`); returns it.

  When even the tiled run would not fit, the one line says so, with the
  largest --max_size that would.
  """
  tiled = [l.tiling for l in run_plan.levels if l.tiling is not None]
  try:
    return memory.check_fits(config, run_plan.output_size,
                             run_plan.memory_bytes, limit_bytes=limit_bytes)
  except config_lib.ConfigError:
    if not tiled:
      raise
  if limit_bytes is not None:
    limit, where = limit_bytes, "the given limit"
  else:
    limit, where = memory.limit_bytes(config)
  height, width = run_plan.output_size
  fits = _largest_fitting_size(config, run_plan, limit)
  raise config_lib.ConfigError(
      f"--max_size: a {height}x{width} px run (--max_size={config.max_size}"
      f") needs about {run_plan.memory_bytes / memory.GIB:.1f} GiB of "
      f"memory, but {limit / memory.GIB:.1f} GiB is available ({where}), "
      f"even tiled (--tile_size={tiled[-1].tile_size}); "
      + (f"a --max_size of {fits} would fit" if fits else
         "no --max_size fits")
      + " (or lower --num_rotations, --num_scales), or pass "
      "--max_memory_gb=GB or --nocheck_memory to try anyway")


def _largest_fitting_size(config: config_lib.Config, run_plan: Plan,
                          limit: int) -> int:
  """The largest --max_size (below the config's) whose auto-tiled plan
  fits in limit bytes; 0 if none."""
  low, high = 0, config.max_size
  auto = config_lib.replace(config, tile_size=tiling_lib.AUTO)
  while high - low > 1:
    middle = (low + high) // 2
    smaller = make(config_lib.replace(auto, max_size=middle),
                   run_plan.inputs, limit_bytes=limit)
    if smaller.memory_bytes <= limit:
      low = middle
    else:
      high = middle
  return low


def check(config: config_lib.Config, run_plan: Plan, *,
          limit_bytes: Optional[int] = None) -> None:
  """Every size rule of a run, cheapest first."""
  check_sizes(config, run_plan)
  check_batch(run_plan)
  check_memory(config, run_plan, limit_bytes=limit_bytes)

