"""Shared pytest fixtures: tiny images on disk and random VGG weights."""

import numpy as np
from PIL import Image
import pytest

from cnnmrf_jax import vgg


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
