"""The synthesis configuration: every hyper-parameter, with the reference's
defaults (SPEC section 2), and its checks.

`Config` is a frozen dataclass; main.py builds it from absl flags, tests and
sweeps build it directly. `Config.validate` raises `ConfigError` naming the
flag for every inconsistency it can see without touching a file, so a typo
costs a message and not an hour. `Config.to_flag_lines` writes it back as an
absl flag file: `--flagfile=WORKDIR/flags.txt` reproduces the run.
"""

import dataclasses
import math
from typing import Optional, Sequence, Tuple

from cnnmrf_jax import vgg

MODES = ("transfer", "texture", "gatys")
OPTIMIZERS = ("lbfgs", "optax_lbfgs", "adam")
OUTPUT_MODES = ("stretch", "clip")
MATCHINGS = ("matmul", "conv")  # patches.MATCHINGS
DTYPES = ("float32", "bfloat16")
INITS = ("content", "noise")  # or a path to an image file
GATYS_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


class ConfigError(ValueError):
  """A flag or combination of flags is invalid; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Config:
  """All options of a synthesis run. Field names are the flag names."""
  mode: str = "transfer"
  content_image: str = ""
  style_image: Tuple[str, ...] = ()
  style_blend_weights: Tuple[float, ...] = ()
  # Pyramid (SPEC section 2): long side, levels at 1/4, 1/2, 1.
  max_size: int = 384
  num_res: int = 3
  num_iter: Tuple[int, ...] = (100,)
  scaler: float = 2.0  # texture mode: output / exemplar size ratio
  # MRF term (Eq. 2 of Li & Wand): layers, weight per layer, patches.
  mrf_layers: Tuple[str, ...] = ("relu3_1", "relu4_1")
  mrf_weight: Tuple[float, ...] = (1e-4,)
  patch_size: int = 3
  style_stride: int = 2
  synth_stride: int = 2
  num_rotations: int = 0
  num_scales: int = 0
  confidence_threshold: float = 0.0
  chunk_size: int = 0  # 0: patches' default
  # How the matching runs, not what it computes: a matmul of extracted
  # patches (the faster on CPU) or a conv with the style patches as filters.
  matching: str = "matmul"
  # Content term (Eq. 3) and smoothness prior (Eq. 4).
  content_layers: Tuple[str, ...] = ("relu4_2",)
  content_weight: float = 20.0
  tv_weight: float = 1e-3
  # Gatys baseline.
  style_layers: Tuple[str, ...] = GATYS_STYLE_LAYERS
  style_weight: float = 1e3
  # Initialisation, optimiser, network.
  # '' = the mode's default: content (transfer, gatys) or noise (texture).
  init: str = ""
  init_noise_std: float = 1e-3
  seed: int = 0
  optimizer: str = "lbfgs"
  history_size: int = 25
  learning_rate: float = 1.0
  network: str = "vgg19"
  weights: str = ""  # '' = the fetched default for --network
  pooling: str = "max"
  # Compute dtype of the VGG and of the matching products: float32, or
  # bfloat16 (accelerators); losses, gradients and L-BFGS stay float32.
  dtype: str = "float32"
  # Output.
  original_colors: bool = False
  output_mode: str = "stretch"
  save_every: int = 0
  print_every: int = 10
  checkpoint_every: int = 0
  overwrite: bool = False
  resume: bool = False
  # Memory check (memory.py): refuse runs estimated not to fit in the
  # available memory, or in max_memory_gb GiB when > 0.
  check_memory: bool = True
  max_memory_gb: float = 0.0
  # A directory for JAX's persistent compilation cache ('' = none): later
  # runs of the same shapes load their compiled programs instead of
  # compiling them again (~10 s per pyramid level on a 2-core CPU).
  compilation_cache: str = ""

  # -- derived values --------------------------------------------------------

  @property
  def resolved_init(self) -> str:
    if self.init:
      return self.init
    return "noise" if self.mode == "texture" else "content"

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
    """Every VGG layer the objective reads, in no particular order."""
    layers = set()
    if self.mode in ("transfer", "texture"):
      layers.update(self.mrf_layers)
    if self.mode == "gatys":
      layers.update(self.style_layers)
    if self.mode in ("transfer", "gatys") and self.content_weight > 0:
      layers.update(self.content_layers)
    return tuple(sorted(layers))

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
    if self.matching not in MATCHINGS:
      fail("matching",
           f"got {self.matching!r}; expected one of {MATCHINGS}")
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
    if self.mode == "texture" and self.resolved_init == "content":
      fail("init", "--mode=texture has no content image to start from; use "
           "noise or an image path")
    for flag in ("max_size", "num_res", "patch_size", "style_stride",
                 "synth_stride", "history_size"):
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
    if self.mode in ("transfer", "texture") and not self.mrf_layers:
      fail("mrf_layers", f"--mode={self.mode} needs at least one MRF layer")
    if self.mode == "gatys" and not self.style_layers:
      fail("style_layers", "--mode=gatys needs at least one style layer")
    if self.resume and self.overwrite:
      fail("resume", "continues a run and --overwrite would discard "
           "it. Give one of them")
    return self

  def check_coarsest_size(self, height: int, width: int, flag: str) -> None:
    """Raises if a map at any MRF layer is smaller than a patch.

    height, width: the coarsest level's image size of the input `flag`.
    """
    layers = self.mrf_layers if self.mode != "gatys" else ()
    for layer in layers:
      stride = vgg.downsampling_of(layer, self.network)
      fh, fw = math.ceil(height / stride), math.ceil(width / stride)
      if min(fh, fw) < self.patch_size:
        fix = ("raise --max_size" if self.num_res == 1 else
               f"raise --max_size or lower --num_res (now {self.num_res})")
        raise ConfigError(
            f"--{flag}: at the coarsest level the image is {height}x{width} "
            f"px, so {layer} is {fh}x{fw}, smaller than a "
            f"{self.patch_size}x{self.patch_size} patch; {fix}")

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
