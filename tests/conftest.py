"""Shared pytest fixtures: tiny images on disk and random VGG weights; and
one persistent compilation cache for the whole test session."""

import atexit
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
import pytest

from cnnmrf_jax import compile_cache
from cnnmrf_jax import vgg


def _share_compiled_programs():
  """Points JAX's persistent compilation cache at one directory for this
  session, in this process and (by the environment) in the CLI processes
  the tests start.

  Most of the suite's time is XLA compiling (a 48 px run is ~70 % compile):
  tests that run the same shapes again (a resumed run, a run repeated from
  its flag file, a batch against its pairs) then load the executables
  instead. Results are those of the same program either way. A fresh
  directory each session unless CNNMRF_TEST_XLA_CACHE names one; "0" turns
  it off.
  """
  directory = os.environ.get("CNNMRF_TEST_XLA_CACHE", "")
  if directory == "0":
    return
  if not directory:
    directory = tempfile.mkdtemp(prefix="cnnmrf-test-xla-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
  directory = compile_cache.enable(directory)
  # Kept for the CLI processes, and for a second import of this module
  # (`import conftest` beside pytest's own).
  os.environ["CNNMRF_TEST_XLA_CACHE"] = directory
  os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


_share_compiled_programs()


def write_random_image(path, height, width, seed):
  """A smooth random RGB image (so it has structure at every VGG layer)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (height // 4 + 2, width // 4 + 2, 3))
  image = Image.fromarray(coarse.astype(np.uint8)).resize(
      (width, height), Image.BILINEAR)
  noise = rng.integers(-20, 20, (height, width, 3))
  pixels = np.clip(np.asarray(image, np.int32) + noise, 0, 255)
  Image.fromarray(pixels.astype(np.uint8)).save(path)
  return str(path)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory):
  """Paths of a 40x48 content image and two small style images."""
  root = tmp_path_factory.mktemp("images")
  return {
      "content": write_random_image(root / "content.png", 40, 48, 0),
      "style": write_random_image(root / "style.png", 44, 40, 1),
      "style2": write_random_image(root / "style2.png", 44, 40, 2),
  }


@pytest.fixture(scope="session")
def random_vgg19():
  """Random VGG19 weights in the Caffe convention (no fetch needed)."""
  return vgg.init_params("vgg19", seed=0), "caffe"
