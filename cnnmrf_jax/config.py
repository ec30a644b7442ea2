"""The synthesis configuration: every option, once, with the reference's
defaults (chuanli11/CNNMRF's run_trans.lua), its help text, and its checks.

`Config` is a frozen dataclass; cli.py generates the absl flags from its
fields (name, type, default, help), so main.py and the sweep parse flags into
it alike; tests and library users build it directly. `Config.validate` raises `ConfigError` naming the
flag for every inconsistency it can see without touching a file, so a typo
costs a message and not an hour. `Config.to_flag_lines` writes it back as an
absl flag file: `--flagfile=WORKDIR/flags.txt` reproduces the run.
"""

import dataclasses
import math
from typing import Any, Optional, Sequence, Tuple

from cnnmrf_jax import conv as conv_lib
from cnnmrf_jax import grid_winograd
from cnnmrf_jax import patches
from cnnmrf_jax import vgg

MODES = ("transfer", "texture", "gatys", "doodle")
OPTIMIZERS = ("lbfgs", "optax_lbfgs", "adam")
OUTPUT_MODES = ("stretch", "clip")
DTYPES = ("float32", "bfloat16")
INITS = ("content", "noise")  # or a path to an image file
GATYS_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
# OpenCV's DIS presets, fastest first (flow.PRESETS; flow.py needs OpenCV,
# so the names are repeated here for the flag).
FLOW_PRESETS = ("ultrafast", "fast", "medium")


class ConfigError(ValueError):
  """A flag or combination of flags is invalid; the message names the flag."""


def _option(default: Any, help: str, *,  # pylint: disable=redefined-builtin
            choices: Optional[Sequence[str]] = None) -> Any:
  """A Config field with what its flag needs: the help text and, for an
  enum flag, its choices (cli.py makes the absl flags from these)."""
  return dataclasses.field(default=default, metadata={
      "help": help, "choices": tuple(choices) if choices else None})


@dataclasses.dataclass(frozen=True)
class Config:
  """All options of a synthesis run. Field names are the flag names; each
  field's metadata holds its flag's help text (and choices)."""
  mode: str = _option(
      "transfer", "transfer: CNNMRF guided by --content_image; texture: "
      "synthesis from --style_image alone; gatys: the Gram-matrix baseline; "
      "doodle: CNNMRF painting --content_map's regions with the style's "
      "patches, from noise, no content image.",
      choices=MODES)
  content_image: str = _option(
      "", "Content image path or example:NAME (transfer and gatys modes).")
  style_image: Tuple[str, ...] = _option(
      (), "Style image(s) or texture exemplar(s), comma separated; paths or "
      "example:NAME. Their patches share one bank.")
  style_blend_weights: Tuple[float, ...] = _option(
      (), "gatys: one weight per --style_image.")
  # The pyramid: long side, levels at 1/2**k of it (the reference: 384 px,
  # 1/4, 1/2, 1).
  max_size: int = _option(384, "Long side of the output in pixels.")
  num_res: int = _option(3, "Pyramid levels (at 1/2**k of max_size).")
  num_iter: Tuple[int, ...] = _option(
      (100,), "L-BFGS iterations: one value for every level or one per "
      "level, coarsest first.")
  scaler: float = _option(2.0, "texture: output size / exemplar size.")
  # MRF term (Eq. 2 of Li & Wand): layers, weight per layer, patches.
  mrf_layers: Tuple[str, ...] = _option(("relu3_1", "relu4_1"),
                                        "Layers of the MRF term.")
  mrf_weight: Tuple[float, ...] = _option(
      (1e-4,), "MRF weight: one value, or one per --mrf_layers entry.")
  patch_size: int = _option(3, "Neural patch side k (k x k x C).")
  style_stride: int = _option(2, "Stride of style patches.")
  synth_stride: int = _option(2, "Stride of synthesis patches.")
  num_rotations: int = _option(
      0, "Style rotations k * 7.5 deg for k in [-R, R].")
  num_scales: int = _option(0, "Style scales 1.05**k for k in [-S, S].")
  confidence_threshold: float = _option(
      0.0, "Matches with a normalised cross-correlation below this are "
      "dropped.")
  chunk_size: int = _option(
      0, "Style patches scored per step of the matching scan (memory grows "
      "with it); 0 = default.")
  # How the matching runs: the exact scans compute the same nearest
  # neighbours (a matmul of extracted patches, a conv with the style
  # patches as filters, or polyphase Winograd, grid_winograd; exact picks
  # one per backend, patches.scan_method); patchmatch an approximate field
  # carried between evaluations (patchmatch_lib.patchmatch, Barnes et al. 2009);
  # auto lets the plan choose per level (plan.choose_matching).
  matching: str = _option(
      "exact", "How synthesis patches find their nearest style patch. "
      "exact (the default: the exact scan in the form fastest for the "
      "backend, winograd on CPU and matmul on GPU/TPU), matmul (exact "
      "scan as one product of extracted patches), conv (exact scan with "
      "the style patches as filters) and winograd (exact scan by "
      "polyphase Winograd, fewer multiplications) give the same matches "
      "up to float rounding; patchmatch "
      "keeps an approximate nearest-neighbour field that each evaluation "
      "improves by propagation and random search (cost per evaluation "
      "grows with synthesis patches times a fixed number of candidates, "
      "not times the style patches); auto: the exact scan where it "
      "is cheap, patchmatch at the levels where the plan says the scan "
      "would cost more than the VGG.", choices=patches.MATCHING_CHOICES)
  # One pass per evaluation: the field is carried over and the image moves
  # little between evaluations, so it keeps improving from one to the next;
  # a second pass per evaluation raised the field's mean NCC by under 0.5 %
  # of the exact one in whole runs (benchmarks/bench_patchmatch.py).
  patchmatch_passes: int = _option(
      1, "PatchMatch passes (propagation, random search) per evaluation of "
      "the objective with --matching=patchmatch or auto; a level's first "
      "evaluation runs at least 8. Each costs ~25-30 candidates per "
      "synthesis patch.")
  # Content term (Eq. 3) and smoothness prior (Eq. 4).
  content_layers: Tuple[str, ...] = _option(("relu4_2",), "Content layers.")
  content_weight: float = _option(20.0, "Content weight.")
  tv_weight: float = _option(1e-3, "Smoothness (TV) weight.")
  # Gatys baseline.
  style_layers: Tuple[str, ...] = _option(GATYS_STYLE_LAYERS,
                                          "gatys: Gram layers.")
  style_weight: float = _option(
      100.0, "gatys: style weight of every Gram layer (neural-style's "
      "-style_weight; configs/gatys.flags gives its other defaults).")
  # Initialisation, optimiser, network.
  init: str = _option(
      "", "content, noise or an image path; empty: content (transfer, "
      "gatys) or noise (texture).")
  init_noise_std: float = _option(
      1e-3, "Std of the noise init in the preprocessed space.")
  seed: int = _option(0, "Random seed.")
  optimizer: str = _option("lbfgs", "Optimizer.", choices=OPTIMIZERS)
  history_size: int = _option(25, "L-BFGS history.")
  learning_rate: float = _option(
      1.0, "Step size (L-BFGS: fixed step; adam: learning rate).")
  network: str = _option("vgg19", "Network.", choices=vgg.NETWORKS)
  weights: str = _option(
      "", "Weights file (.npz, .caffemodel, .pth, .h5); empty: the fetched "
      "default for --network.")
  pooling: str = _option("max", "Pooling.", choices=vgg.POOLINGS)
  # How the VGG's 3x3 convolutions run, not what they compute (conv.py).
  conv: str = _option(
      "auto", "How the VGG's 3x3 convolutions run (same features to float "
      "rounding): xla (lax.conv), matmul (nine shifted matmuls), winograd "
      "(F(4x4, 3x3) from conv2_2 on), auto (winograd on CPU, xla on GPU "
      "and TPU).", choices=conv_lib.CONVS)
  # Compute dtype of the VGG and of the matching products: float32, or
  # bfloat16 (accelerators); losses, gradients and L-BFGS stay float32.
  dtype: str = _option(
      "float32", "Compute dtype of the VGG and the matching products "
      "(bfloat16 for accelerators); losses, gradients and the optimiser stay "
      "float32.", choices=DTYPES)
  # Output.
  original_colors: bool = _option(
      False, "Keep the content image's colours (transfer luminance only).")
  output_mode: str = _option(
      "stretch", "stretch: min-max stretch as the reference; clip: clip to "
      "[0, 1].", choices=OUTPUT_MODES)
  save_every: int = _option(
      0, "Save an intermediate image every N iterations (0: never).")
  print_every: int = _option(10, "Log progress every N iterations.")
  checkpoint_every: int = _option(
      0, "Checkpoint every N iterations (and at the end of every level).")
  overwrite: bool = _option(False, "Replace existing results in --workdir.")
  resume: bool = _option(False,
                         "Continue from --workdir's last checkpoint.")
  # Memory check (memory.py): refuse runs estimated not to fit in the
  # available memory, or in max_memory_gb GiB when > 0.
  check_memory: bool = _option(
      True, "Refuse a run whose estimated peak memory exceeds the available "
      "memory (see cnnmrf_jax/memory.py).")
  max_memory_gb: float = _option(
      0.0, "Memory (GiB) the memory check allows instead of the available "
      "memory; 0: the available memory.")
  # A directory for JAX's persistent compilation cache ('' = none): later
  # runs of the same shapes load their compiled programs instead of
  # compiling them again.
  compilation_cache: str = _option(
      "", "Directory of JAX's persistent compilation cache: later runs of "
      "the same sizes skip compiling. Empty: off.")
  # Semantic maps (Champandard 2016, "Semantic Style Transfer and Turning
  # Two-Bit Doodles into Fine Artworks"; alexjc/neural-doodle): semantic.py.
  content_map: str = _option(
      "", "Semantic map of the content image (doodle: the canvas): colours "
      "label regions. Empty: NAME_sem.png beside --content_image if there "
      "is one. Video: one image for every frame, or a directory or glob of "
      "maps, one per selected frame (after --frames and --max_frames), "
      "paired with the frames in natural order.")
  style_map: Tuple[str, ...] = _option(
      (), "Semantic maps of the style images, one per --style_image, comma "
      "separated. Empty: NAME_sem.png beside each style image.")
  semantic_weight: float = _option(
      10.0, "How much the maps count in the matching: the map part of a "
      "patch's NCC counts sqrt(weight) relative to its features' "
      "(neural-doodle's default 10); 0: maps unused.")
  # Video (python -m cnnmrf_jax.video): the temporal term of Ruder,
  # Dosovitskiy & Brox (GCPR 2016) and how frames after the first are run.
  # Image runs keep temporal_weight 0 (the term is then not in the program).
  temporal_weight: float = _option(
      0.0, "Video: weight of the temporal term, the consistency-weighted "
      "mean squared difference to the previous result(s) warped into the "
      "frame by the optical flow; 0: off (image runs).")
  flow_relative_indices: Tuple[int, ...] = _option(
      (1,), "Video: the earlier frames t-j each frame is kept close to "
      "(long-term consistency, e.g. 1,2,4); must include 1.")
  flow_preset: str = _option(
      "medium", "Video: OpenCV DIS optical flow preset.", choices=FLOW_PRESETS)
  video_num_res: int = _option(
      1, "Video: pyramid levels of frames after the first (the finest "
      "--video_num_res of the --num_res levels); they start from the "
      "previous result warped by the flow.")
  video_num_iter: Tuple[int, ...] = _option(
      (50,), "Video: L-BFGS iterations of frames after the first: one value "
      "or one per --video_num_res level, coarsest first.")
  # Big images (tiling.py): the objective evaluated tile by tile, exactly,
  # so the VGG's activations exist for one tile at a time.
  tile_size: str = _option(
      "auto", "Exact tiled evaluation: auto (tile a level only when its "
      "memory estimate does not fit), 0 (never) or the tile side in pixels, "
      "a multiple of the deepest layer's stride (8 for relu4_x).")

  # -- derived values --------------------------------------------------------

  @property
  def resolved_init(self) -> str:
    if self.init:
      return self.init
    return "noise" if self.mode in ("texture", "doodle") else "content"

  def iterations_per_level(self) -> Tuple[int, ...]:
    if len(self.num_iter) == 1:
      return tuple(self.num_iter) * self.num_res
    return tuple(self.num_iter)

  def mrf_weights_per_layer(self) -> Tuple[float, ...]:
    if len(self.mrf_weight) == 1:
      return tuple(self.mrf_weight) * len(self.mrf_layers)
    return tuple(self.mrf_weight)

  def blend_weights(self) -> Tuple[float, ...]:
    if not self.style_blend_weights:
      return (1.0,) * len(self.style_image)
    return tuple(self.style_blend_weights)

  def feature_layers(self) -> Tuple[str, ...]:
    """Every VGG layer the objective reads (terms.feature_layers)."""
    from cnnmrf_jax import terms  # pylint: disable=g-import-not-at-top
    return terms.feature_layers(self)

  # -- checks ----------------------------------------------------------------

  def validate(self) -> "Config":
    """Raises ConfigError naming the flag; returns self when all is well."""
    def fail(flag, message):
      raise ConfigError(f"--{flag}: {message}")

    if self.mode not in MODES:
      fail("mode", f"got {self.mode!r}; expected one of {MODES}")
    if self.network not in vgg.NETWORKS:
      fail("network", f"got {self.network!r}; expected one of {vgg.NETWORKS}")
    if self.pooling not in vgg.POOLINGS:
      fail("pooling", f"got {self.pooling!r}; expected one of {vgg.POOLINGS}")
    if self.optimizer not in OPTIMIZERS:
      fail("optimizer",
           f"got {self.optimizer!r}; expected one of {OPTIMIZERS}")
    if self.matching not in patches.MATCHING_CHOICES:
      fail("matching", f"got {self.matching!r}; expected one of "
           f"{patches.MATCHING_CHOICES}")
    if self.matching == "winograd" and not grid_winograd.supports(
        self.patch_size, self.synth_stride):
      fail("matching", f"winograd takes at most {grid_winograd.max_taps()}"
           f" patch taps per stride phase; --patch_size={self.patch_size} "
           f"at --synth_stride={self.synth_stride} has "
           f"{-(-self.patch_size // self.synth_stride)}: use exact or "
           "matmul")
    if self.dtype not in DTYPES:
      fail("dtype", f"got {self.dtype!r}; expected one of {DTYPES}")
    if self.output_mode not in OUTPUT_MODES:
      fail("output_mode",
           f"got {self.output_mode!r}; expected one of {OUTPUT_MODES}")
    if not self.style_image:
      fail("style_image", "at least one style image is required "
           "(a path or example:NAME; comma-separated for several)")
    if self.mode in ("transfer", "gatys") and not self.content_image:
      fail("content_image", f"--mode={self.mode} needs a content image")
    if self.mode in ("texture", "doodle") and self.resolved_init == "content":
      fail("init", f"--mode={self.mode} has no content image to start from; "
           "use noise or an image path")
    if self.mode == "doodle":
      if not self.content_map:
        fail("content_map", "--mode=doodle needs a content map (the doodle "
             "whose regions the result follows)")
      if self.content_image:
        fail("content_image", "--mode=doodle has no content image (the "
             "--content_map is the canvas); use --mode=transfer to keep one")
      if self.original_colors:
        fail("original_colors", "--mode=doodle has no content image to take "
             "colours from")
      if self.semantic_weight == 0:
        fail("semantic_weight", "--mode=doodle follows the map only through "
             "the matching; expected a positive weight")
    if self.mode in ("texture", "gatys"):
      for flag in ("content_map", "style_map"):
        if getattr(self, flag):
          fail(flag, f"semantic maps are for --mode=transfer or doodle, not "
               f"{self.mode}")
    if self.style_map and len(self.style_map) != len(self.style_image):
      fail("style_map", f"got {len(self.style_map)} maps for "
           f"{len(self.style_image)} style images; expected one per "
           "--style_image")
    _check_finite("semantic_weight", [self.semantic_weight], nonnegative=True)
    for flag in ("max_size", "num_res", "patch_size", "style_stride",
                 "synth_stride", "history_size", "patchmatch_passes"):
      value = getattr(self, flag)
      if not isinstance(value, int) or value < 1:
        fail(flag, f"expected a positive integer, got {value!r}")
    for flag in ("num_rotations", "num_scales", "chunk_size", "save_every",
                 "print_every", "checkpoint_every", "seed"):
      value = getattr(self, flag)
      if not isinstance(value, int) or value < 0:
        fail(flag, f"expected a non-negative integer, got {value!r}")
    for flag in ("content_weight", "tv_weight", "style_weight",
                 "init_noise_std", "confidence_threshold"):
      _check_finite(flag, [getattr(self, flag)], nonnegative=(
          flag != "confidence_threshold"))
    _check_finite("mrf_weight", self.mrf_weight, nonnegative=True)
    _check_finite("style_blend_weights", self.style_blend_weights,
                  nonnegative=True)
    _check_finite("learning_rate", [self.learning_rate], nonnegative=True)
    if self.learning_rate <= 0:
      # jaxopt takes a non-positive step size as "use a line search".
      fail("learning_rate", f"expected a positive step size, got "
           f"{self.learning_rate}")
    _check_finite("scaler", [self.scaler], nonnegative=True)
    _check_finite("max_memory_gb", [self.max_memory_gb], nonnegative=True)
    if self.scaler <= 0:
      fail("scaler", f"expected a positive number, got {self.scaler}")
    if not -1.0 <= self.confidence_threshold <= 1.0:
      fail("confidence_threshold", "is a normalised cross-correlation, "
           f"expected a value in [-1, 1], got {self.confidence_threshold}")
    if len(self.num_iter) not in (1, self.num_res):
      fail("num_iter", f"got {len(self.num_iter)} values "
           f"{list(self.num_iter)}; expected 1 or one per level "
           f"(--num_res={self.num_res})")
    if any(not isinstance(n, int) or n < 0 for n in self.num_iter):
      fail("num_iter", f"expected non-negative integers, got "
           f"{list(self.num_iter)}")
    if len(self.mrf_weight) not in (1, len(self.mrf_layers)):
      fail("mrf_weight", f"got {len(self.mrf_weight)} values; expected 1 or "
           f"one per --mrf_layers entry ({len(self.mrf_layers)})")
    if self.style_blend_weights and (
        len(self.style_blend_weights) != len(self.style_image)):
      fail("style_blend_weights", f"got {len(self.style_blend_weights)} "
           f"values; expected one per --style_image "
           f"({len(self.style_image)})")
    if self.style_blend_weights and sum(self.style_blend_weights) <= 0:
      fail("style_blend_weights", "must not all be zero")
    for flag in ("mrf_layers", "content_layers", "style_layers"):
      layers = getattr(self, flag)
      try:
        vgg.check_layers(layers, self.network, flag=flag)
      except ValueError as e:
        raise ConfigError(str(e)) from None
    if self.mode in ("transfer", "texture", "doodle") and not self.mrf_layers:
      fail("mrf_layers", f"--mode={self.mode} needs at least one MRF layer")
    if self.mode == "gatys" and not self.style_layers:
      fail("style_layers", "--mode=gatys needs at least one style layer")
    self._validate_video(fail)
    from cnnmrf_jax import tiling  # pylint: disable=g-import-not-at-top
    tiling.parse_tile_size(self)  # ConfigError naming --tile_size
    if self.resume and self.overwrite:
      fail("resume", "continues a run and --overwrite would discard "
           "it. Give one of them")
    return self

  def _validate_video(self, fail) -> None:
    """The video fields' checks (they hold for image runs' defaults)."""
    _check_finite("temporal_weight", [self.temporal_weight], nonnegative=True)
    indices = self.flow_relative_indices
    if any(isinstance(j, bool) or not isinstance(j, int) or j < 1
           for j in indices):
      fail("flow_relative_indices", f"expected positive frame offsets "
           f"(e.g. 1,2,4), got {','.join(map(str, indices)) or '(none)'}")
    if 1 not in indices:
      fail("flow_relative_indices", f"must include 1 (the previous frame), "
           f"got {','.join(map(str, indices))}")
    if self.flow_preset not in FLOW_PRESETS:
      fail("flow_preset", f"got {self.flow_preset!r}; expected one of "
           f"{FLOW_PRESETS}")
    if not isinstance(self.video_num_res, int) or not (
        1 <= self.video_num_res <= self.num_res):
      fail("video_num_res", f"expected 1 to --num_res={self.num_res} (the "
           f"finest levels), got {self.video_num_res!r}")
    if len(self.video_num_iter) not in (1, self.video_num_res):
      fail("video_num_iter", f"got {len(self.video_num_iter)} values "
           f"{list(self.video_num_iter)}; expected 1 or one per level "
           f"(--video_num_res={self.video_num_res})")
    if any(not isinstance(n, int) or n < 0 for n in self.video_num_iter):
      fail("video_num_iter", f"expected non-negative integers, got "
           f"{list(self.video_num_iter)}")

  # -- flag files ------------------------------------------------------------

  def to_flag_lines(self) -> list:
    """The config as absl flag-file lines (`--name=value`)."""
    lines = []
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in ("resume", "overwrite", "check_memory",
                        "max_memory_gb", "compilation_cache"):
        continue  # how this run was started, not what it computes
      if isinstance(value, tuple):
        value = ",".join(_format(v) for v in value)
      elif isinstance(value, bool):
        lines.append(f"--{field.name}" if value else f"--no{field.name}")
        continue
      else:
        value = _format(value)
      lines.append(f"--{field.name}={value}")
    return lines


def _format(value) -> str:
  if isinstance(value, float):
    return repr(value)
  return str(value)


def _check_finite(flag: str, values: Sequence[float], *,
                  nonnegative: bool) -> None:
  for value in values:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ConfigError(f"--{flag}: expected a finite number, got {value!r}")
    if nonnegative and value < 0:
      raise ConfigError(f"--{flag}: expected a non-negative number, got "
                        f"{value!r}")


def replace(config: Config, **changes) -> Config:
  """dataclasses.replace that turns lists into tuples."""
  changes = {k: tuple(v) if isinstance(v, list) else v
             for k, v in changes.items()}
  return dataclasses.replace(config, **changes)
