"""Tests for cnnmrf_jax.augment: the rotated and scaled style copies."""

import numpy as np
import pytest

from cnnmrf_jax import augment


class TestAugment:

  def test_count_sizes_and_identity(self):
    rng = np.random.default_rng(7)
    image = rng.random((40, 60, 3)).astype(np.float32)
    copies = augment.augment_style(image, num_rotations=1, num_scales=2)
    assert len(copies) == 3 * 5
    np.testing.assert_array_equal(copies[1 * 5 + 2], image)
    for n, copy in enumerate(copies):
      assert copy.dtype == np.float32 and copy.ndim == 3
      assert copy.shape[-1] == 3
      rotation, scale = divmod(n, 5)
      base = copies[rotation * 5 + 2]
      factor = 1.05 ** (scale - 2)
      assert 0 <= base.shape[1] * factor - copy.shape[1] < 2
      assert 0 <= base.shape[0] * factor - copy.shape[0] < 2
    # Rotated copies are cropped inside the original and symmetric in size.
    assert copies[2].shape == copies[12].shape
    assert copies[2].shape[0] < 40 and copies[2].shape[1] < 60
    assert len(augment.augment_style(image)) == 1

  @pytest.mark.parametrize("shape", [(40, 60), (64, 64), (101, 37), (17, 90)])
  def test_rotations_have_no_blank_corners(self, shape):
    ones = np.ones(shape + (3,), np.float32)
    copies = augment.augment_style(ones, num_rotations=3, num_scales=1)
    assert len(copies) == 7 * 3
    for copy in copies:
      assert copy.min() > 0.99, copy.shape

  def test_crop_is_nearly_largest(self):
    # The crop of a square rotated by 45 degrees is the inscribed square of
    # side w / sqrt(2) (each corner touches a side).
    w, h = augment._rotated_crop_size(100, 100, np.pi / 4)
    np.testing.assert_allclose([w, h], [100 / np.sqrt(2)] * 2, rtol=1e-9)
    w, h = augment._rotated_crop_size(100, 40, 0.0)
    np.testing.assert_allclose([w, h], [100, 40])

  def test_errors(self):
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
      augment.augment_style(np.ones((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="num_rotations"):
      augment.augment_style(np.ones((8, 8, 3), np.float32), num_rotations=-1)

  @pytest.mark.parametrize("shape", [(40, 60), (37, 91), (64, 64)])
  def test_copy_sizes_are_the_sizes_made(self, shape):
    image = np.zeros(shape + (3,), np.float32)
    copies = augment.augment_style(image, num_rotations=2, num_scales=1)
    assert [c.shape[:2] for c in copies] == augment.copy_sizes(
        *shape, num_rotations=2, num_scales=1)


def test_scaled_sizes_are_the_references():
  # transfer_CNNMRF_wrapper.lua: max_sz = math.floor(math.max(h, w) *
  # torch.pow(1.05, i_s)); image.scale(img, max_sz) then truncates the short
  # side: floor(short * max_sz / long).
  assert augment.scaled_size(300, 400, 1.05) == (315, 420)
  assert augment.scaled_size(96, 82, 1.05) == (100, 85)  # 100.8 -> 100
  assert augment.scaled_size(96, 82, 1 / 1.05) == (91, 77)  # 91.43, 77.7
  assert augment.scaled_size(41, 48, 1.05 ** -2) == (36, 43)  # 43.5; 36.7
