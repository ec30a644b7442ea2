"""Command line: absl flags only; hands a Config to synthesize.run.

    python -m cnnmrf_jax.main --flagfile=configs/example.flags \
        --workdir=/tmp/cnnmrf_example

Flag names are those users of CNNMRF and neural-style know; every flag is a
field of `config.Config` (see there for what each does). A bad flag or
combination fails before any work with a one-line message naming the flag.
"""

import pathlib
import signal
import sys

from absl import app
from absl import flags
from absl import logging

from cnnmrf_jax import config as config_lib

_DEFAULTS = config_lib.Config()


def _csv(values):
  return ",".join(str(v) for v in values)


_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the result, intermediates, log.jsonl and "
    "flags.txt (which reproduces the run with --flagfile).")
_MODE = flags.DEFINE_enum(
    "mode", _DEFAULTS.mode, config_lib.MODES,
    "transfer: CNNMRF guided by --content_image; texture: synthesis from "
    "--style_image alone; gatys: the Gram-matrix baseline.")
_CONTENT_IMAGE = flags.DEFINE_string(
    "content_image", _DEFAULTS.content_image,
    "Content image path or example:NAME (transfer and gatys modes).")
_STYLE_IMAGE = flags.DEFINE_list(
    "style_image", [], "Style image(s) or texture exemplar(s), comma "
    "separated; paths or example:NAME. Their patches share one bank.")
_STYLE_BLEND_WEIGHTS = flags.DEFINE_list(
    "style_blend_weights", [], "gatys: one weight per --style_image.")
_MAX_SIZE = flags.DEFINE_integer(
    "max_size", _DEFAULTS.max_size, "Long side of the output in pixels.")
_NUM_RES = flags.DEFINE_integer(
    "num_res", _DEFAULTS.num_res, "Pyramid levels (at 1/2**k of max_size).")
_NUM_ITER = flags.DEFINE_list(
    "num_iter", _csv(_DEFAULTS.num_iter),
    "L-BFGS iterations: one value for every level or one per level, "
    "coarsest first.")
_SCALER = flags.DEFINE_float(
    "scaler", _DEFAULTS.scaler, "texture: output size / exemplar size.")
_MRF_LAYERS = flags.DEFINE_list(
    "mrf_layers", _csv(_DEFAULTS.mrf_layers), "Layers of the MRF term.")
_MRF_WEIGHT = flags.DEFINE_list(
    "mrf_weight", _csv(_DEFAULTS.mrf_weight),
    "MRF weight: one value, or one per --mrf_layers entry.")
_PATCH_SIZE = flags.DEFINE_integer(
    "patch_size", _DEFAULTS.patch_size, "Neural patch side k (k x k x C).")
_STYLE_STRIDE = flags.DEFINE_integer(
    "style_stride", _DEFAULTS.style_stride, "Stride of style patches.")
_SYNTH_STRIDE = flags.DEFINE_integer(
    "synth_stride", _DEFAULTS.synth_stride, "Stride of synthesis patches.")
_NUM_ROTATIONS = flags.DEFINE_integer(
    "num_rotations", _DEFAULTS.num_rotations,
    "Style rotations k * 7.5 deg for k in [-R, R].")
_NUM_SCALES = flags.DEFINE_integer(
    "num_scales", _DEFAULTS.num_scales,
    "Style scales 1.05**k for k in [-S, S].")
_CONFIDENCE_THRESHOLD = flags.DEFINE_float(
    "confidence_threshold", _DEFAULTS.confidence_threshold,
    "Matches with a normalised cross-correlation below this are dropped.")
_CHUNK_SIZE = flags.DEFINE_integer(
    "chunk_size", _DEFAULTS.chunk_size, "Style patches scored per step of "
    "the matching scan (memory grows with it); 0 = default.")
_MATCHING = flags.DEFINE_enum(
    "matching", _DEFAULTS.matching, config_lib.MATCHINGS,
    "How the patch matching runs (same result): matmul of extracted patches "
    "(faster on CPU) or conv with the style patches as filters.")
_CONTENT_LAYERS = flags.DEFINE_list(
    "content_layers", _csv(_DEFAULTS.content_layers), "Content layers.")
_CONTENT_WEIGHT = flags.DEFINE_float(
    "content_weight", _DEFAULTS.content_weight, "Content weight.")
_TV_WEIGHT = flags.DEFINE_float(
    "tv_weight", _DEFAULTS.tv_weight, "Smoothness (TV) weight.")
_STYLE_LAYERS = flags.DEFINE_list(
    "style_layers", _csv(_DEFAULTS.style_layers), "gatys: Gram layers.")
_STYLE_WEIGHT = flags.DEFINE_float(
    "style_weight", _DEFAULTS.style_weight, "gatys: style weight.")
_INIT = flags.DEFINE_string(
    "init", _DEFAULTS.init, "content, noise or an image path; empty: "
    "content (transfer, gatys) or noise (texture).")
_INIT_NOISE_STD = flags.DEFINE_float(
    "init_noise_std", _DEFAULTS.init_noise_std,
    "Std of the noise init in the preprocessed space.")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Random seed.")
_OPTIMIZER = flags.DEFINE_enum(
    "optimizer", _DEFAULTS.optimizer, config_lib.OPTIMIZERS, "Optimizer.")
_HISTORY_SIZE = flags.DEFINE_integer(
    "history_size", _DEFAULTS.history_size, "L-BFGS history.")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", _DEFAULTS.learning_rate,
    "Step size (L-BFGS: fixed step; adam: learning rate).")
_NETWORK = flags.DEFINE_enum(
    "network", _DEFAULTS.network, ("vgg19", "vgg16"), "Network.")
_WEIGHTS = flags.DEFINE_string(
    "weights", _DEFAULTS.weights, "Weights file (.npz, .caffemodel, .pth, "
    ".h5); empty: the fetched default for --network.")
_POOLING = flags.DEFINE_enum(
    "pooling", _DEFAULTS.pooling, ("max", "avg"), "Pooling.")
_DTYPE = flags.DEFINE_enum(
    "dtype", _DEFAULTS.dtype, config_lib.DTYPES, "Compute dtype of the VGG "
    "and the matching products (bfloat16 for accelerators); losses, "
    "gradients and the optimiser stay float32.")
_ORIGINAL_COLORS = flags.DEFINE_boolean(
    "original_colors", _DEFAULTS.original_colors,
    "Keep the content image's colours (transfer luminance only).")
_OUTPUT_MODE = flags.DEFINE_enum(
    "output_mode", _DEFAULTS.output_mode, config_lib.OUTPUT_MODES,
    "stretch: min-max stretch as the reference; clip: clip to [0, 1].")
_SAVE_EVERY = flags.DEFINE_integer(
    "save_every", _DEFAULTS.save_every, "Save an intermediate image every N "
    "iterations (0: never).")
_PRINT_EVERY = flags.DEFINE_integer(
    "print_every", _DEFAULTS.print_every, "Log progress every N iterations.")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", _DEFAULTS.checkpoint_every,
    "Checkpoint every N iterations (and at the end of every level).")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", _DEFAULTS.overwrite, "Replace existing results in --workdir.")
_RESUME = flags.DEFINE_boolean(
    "resume", _DEFAULTS.resume, "Continue from --workdir's last checkpoint.")
_CHECK_MEMORY = flags.DEFINE_boolean(
    "check_memory", _DEFAULTS.check_memory, "Refuse a run whose estimated "
    "peak memory exceeds the available memory (see cnnmrf_jax/memory.py).")
_MAX_MEMORY_GB = flags.DEFINE_float(
    "max_memory_gb", _DEFAULTS.max_memory_gb, "Memory (GiB) the memory check "
    "allows instead of the available memory; 0: the available memory.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", _DEFAULTS.compilation_cache, "Directory of JAX's "
    "persistent compilation cache: later runs of the same sizes skip "
    "compiling (~10 s a level on CPU). Empty: off.")
_PAIRS = flags.DEFINE_string(
    "pairs", None, "A file of pairs solved together as one batch, sharded "
    "over the local devices: one 'CONTENT STYLE[,STYLE...]' per line "
    "('STYLE' in texture mode). Replaces --content_image and --style_image "
    "(flags.txt names the first pair); results are result_{n}.png.")


def _numbers(flag, values, kind):
  try:
    return tuple(kind(v) for v in values)
  except ValueError:
    raise config_lib.ConfigError(
        f"--{flag.name}: expected comma-separated {kind.__name__}s, got "
        f"{','.join(values)!r}") from None


def config_from_flags() -> config_lib.Config:
  """Builds and validates the Config from the parsed flags."""
  return config_lib.Config(
      mode=_MODE.value,
      content_image=_CONTENT_IMAGE.value,
      style_image=tuple(_STYLE_IMAGE.value),
      style_blend_weights=_numbers(_STYLE_BLEND_WEIGHTS,
                                   _STYLE_BLEND_WEIGHTS.value, float),
      max_size=_MAX_SIZE.value,
      num_res=_NUM_RES.value,
      num_iter=_numbers(_NUM_ITER, _NUM_ITER.value, int),
      scaler=_SCALER.value,
      mrf_layers=tuple(_MRF_LAYERS.value),
      mrf_weight=_numbers(_MRF_WEIGHT, _MRF_WEIGHT.value, float),
      patch_size=_PATCH_SIZE.value,
      style_stride=_STYLE_STRIDE.value,
      synth_stride=_SYNTH_STRIDE.value,
      num_rotations=_NUM_ROTATIONS.value,
      num_scales=_NUM_SCALES.value,
      confidence_threshold=_CONFIDENCE_THRESHOLD.value,
      chunk_size=_CHUNK_SIZE.value,
      matching=_MATCHING.value,
      content_layers=tuple(_CONTENT_LAYERS.value),
      content_weight=_CONTENT_WEIGHT.value,
      tv_weight=_TV_WEIGHT.value,
      style_layers=tuple(_STYLE_LAYERS.value),
      style_weight=_STYLE_WEIGHT.value,
      init=_INIT.value,
      init_noise_std=_INIT_NOISE_STD.value,
      seed=_SEED.value,
      optimizer=_OPTIMIZER.value,
      history_size=_HISTORY_SIZE.value,
      learning_rate=_LEARNING_RATE.value,
      network=_NETWORK.value,
      weights=_WEIGHTS.value,
      pooling=_POOLING.value,
      dtype=_DTYPE.value,
      original_colors=_ORIGINAL_COLORS.value,
      output_mode=_OUTPUT_MODE.value,
      save_every=_SAVE_EVERY.value,
      print_every=_PRINT_EVERY.value,
      checkpoint_every=_CHECKPOINT_EVERY.value,
      overwrite=_OVERWRITE.value,
      resume=_RESUME.value,
      check_memory=_CHECK_MEMORY.value,
      max_memory_gb=_MAX_MEMORY_GB.value,
      compilation_cache=_COMPILATION_CACHE.value,
  ).validate()


def _raise_interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  # Imported here so that --help and flag errors answer without loading JAX.
  from cnnmrf_jax import synthesize  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  # A scheduler's SIGTERM saves the image and a checkpoint, like Ctrl-C.
  signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    pairs = None
    if _PAIRS.value:
      from cnnmrf_jax import batch  # pylint: disable=g-import-not-at-top
      pairs = batch.read_pairs(_PAIRS.value, mode=_MODE.value)
      # The config carries the first pair, so that it validates as a run.
      flags.FLAGS["content_image"].value = pairs[0][0]
      flags.FLAGS["style_image"].value = list(pairs[0][1])
    config = config_from_flags()
    synthesize.run(config, _WORKDIR.value, pairs=pairs)
  except synthesize.NonFiniteError as e:
    written = f"; that image is in {e.paths[0]}" if e.paths else ""
    print(f"error: {e}{written}", file=sys.stderr)
    sys.exit(3)
  except KeyboardInterrupt as e:
    workdir = pathlib.Path(_WORKDIR.value)
    if isinstance(e, synthesize.Interrupted):
      print(f"interrupted: the current image ({synthesize.CURRENT_NAME}) "
            f"and a checkpoint are in {workdir}; run again with --resume to "
            "continue", file=sys.stderr)
    elif (workdir / synthesize.CHECKPOINT_NAME).exists():
      # Between two solves (building targets, compiling): the last
      # checkpoint is the end of the previous level.
      print(f"interrupted: run again with --resume to continue from the "
            f"last checkpoint in {workdir}", file=sys.stderr)
    else:
      print("interrupted before the first checkpoint; nothing to resume",
            file=sys.stderr)
    sys.exit(130)
  except (ValueError, OSError) as e:
    # Bad input (ConfigError, ImageError, WeightsError, ExistsError, ...):
    # one line naming the flag or file, non-zero exit.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run_main():
  app.run(main)


if __name__ == "__main__":
  run_main()
