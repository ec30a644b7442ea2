"""Tests for the command line: every flag file in configs/ parses and its run
starts; the resolved flags.txt reproduces a run; bad flags fail early."""

import pathlib
import subprocess
import sys

from absl import flags
import numpy as np
from PIL import Image
import pytest

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import cli
from cnnmrf_jax import main
from cnnmrf_jax import synthesize
from cnnmrf_jax import workdir as workdir_lib

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob(
    "*.flags"))
# --conv=xla: the conv form is not the point here (tests/conv_test.py), and
# XLA's own convolution compiles 2-4x faster than auto's Winograd on CPU.
TINY = ["--max_size=48", "--num_res=1", "--num_iter=1", "--num_rotations=0",
        "--num_scales=0", "--conv=xla"]


def parse(argv):
  """Parses argv into a fresh copy of the flags; returns the Config."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["cnnmrf_jax"] + list(argv))
  try:
    return cli.config_from_flags()
  finally:
    flags.FLAGS.unparse_flags()


def test_there_are_flag_files():
  names = {p.name for p in CONFIGS}
  assert {"example.flags", "transfer.flags", "transfer_fast.flags",
          "texture.flags", "gatys.flags"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_flag_file_parses_and_its_run_starts(path, tiny_images, random_vgg19,
                                             tmp_path):
  text = path.read_text()
  assert text.startswith("#") and "python -m cnnmrf_jax" in text
  images = [f"--content_image={tiny_images['content']}"]
  if "--mode=doodle" in text:  # a two-colour map instead of the content
    images = []
    for name, (height, width) in (("content_map", (40, 48)),
                                  ("style_map", (44, 40))):
      colours = np.zeros((height, width, 3), np.uint8)
      colours[:, width // 2:] = 255
      Image.fromarray(colours).save(tmp_path / f"{name}.png")
      images.append(f"--{name}={tmp_path / f'{name}.png'}")
  config = parse([f"--flagfile={path}", *images,
                  f"--style_image={tiny_images['style']}"] + TINY)
  result = synthesize.run(config, str(tmp_path), params=random_vgg19[0],
                          convention=random_vgg19[1])
  assert np.all(np.isfinite(result.images))


def test_resolved_flag_file_reproduces_the_run(tiny_images, random_vgg19,
                                               tmp_path):
  config = parse(["--mode=texture", f"--style_image={tiny_images['style']}",
                  "--max_size=48", "--num_res=2", "--num_iter=2,3",
                  "--mrf_layers=relu2_1,relu3_1",
                  "--seed=7", "--mrf_weight=1e-4,2e-4", "--conv=xla"])
  first = synthesize.run(config, str(tmp_path / "a"), params=random_vgg19[0],
                         convention=random_vgg19[1])
  again = parse([f"--flagfile={tmp_path / 'a' / workdir_lib.FLAGS_NAME}"])
  assert again == config
  second = synthesize.run(again, str(tmp_path / "b"), params=random_vgg19[0],
                          convention=random_vgg19[1])
  np.testing.assert_array_equal(first.images, second.images)


@pytest.mark.parametrize("argv, flag", [
    (["--num_iter=1,2"], "num_iter"),
    (["--num_iter=ten"], "num_iter"),
    (["--mrf_layers=relu3_1,relu7_1"], "mrf_layers"),
    (["--mrf_weight=-1"], "mrf_weight"),
])
def test_bad_flags_name_the_flag(argv, flag):
  with pytest.raises(config_lib.ConfigError, match=f"--{flag}"):
    parse(["--content_image=a.png", "--style_image=b.png"] + argv)


def test_command_line_error_is_one_line_and_nonzero(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "cnnmrf_jax.main", f"--workdir={tmp_path}",
       "--content_image=a.png", "--style_image=b.png", "--num_iter=1,2"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "--num_iter" in proc.stderr
  missing = subprocess.run(
      [sys.executable, "-m", "cnnmrf_jax.main", f"--workdir={tmp_path}",
       f"--content_image={tmp_path / 'nope.png'}",
       "--style_image=example:chelsea"],
      capture_output=True, text=True, timeout=120)
  assert missing.returncode != 0
  assert "nope.png" in missing.stderr
