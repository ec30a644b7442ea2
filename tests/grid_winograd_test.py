"""Tests of cnnmrf_jax/grid_winograd.py (the polyphase Winograd dots of the
exact scan) and of how --matching picks it.

The 1-D transforms against a direct correlation in float64, the grid's
dots against extracted patches times the bank for odd sizes, strides and
patch sizes, and the choice of form; match_map's winograd form against a
brute-force numpy argmax is in patches_test (every method of
patches.MATCHINGS), with maps in semantic_test, its loss and gradient in
losses_test.
"""

import numpy as np
import pytest

import jax.numpy as jnp

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import grid_winograd
from cnnmrf_jax import patches
from cnnmrf_jax import plan as plan_lib


@pytest.mark.parametrize("tile", grid_winograd.TILES)
@pytest.mark.parametrize("taps", [1, 2, 3, 4])
def test_toom_cook_is_a_correlation(tile, taps):
  bt, g, at = grid_winograd.toom_cook(tile, taps)
  n = tile + taps - 1
  assert bt.shape == (n, n) and g.shape == (n, taps) and at.shape == (tile, n)
  rng = np.random.default_rng(taps * 10 + tile)
  for _ in range(3):
    d, k = rng.standard_normal(n), rng.standard_normal(taps)
    want = [sum(k[j] * d[i + j] for j in range(taps)) for i in range(tile)]
    np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), want, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("shape,patch_size,stride", [
    ((11, 12, 4), 3, 2), ((10, 9, 3), 3, 2), ((3, 5, 2), 3, 2),
    ((12, 13, 2), 3, 1), ((13, 11, 2), 3, 3), ((9, 10, 2), 5, 2),
    ((8, 9, 2), 2, 2)])
@pytest.mark.parametrize("tile", grid_winograd.TILES)
def test_grid_dots_equal_extracted_patches_times_the_bank(shape, patch_size,
                                                          stride, tile):
  rng = np.random.default_rng(sum(shape) + tile)
  features = rng.standard_normal(shape).astype(np.float32)
  bank = rng.standard_normal(
      (5, patch_size, patch_size, shape[2])).astype(np.float32)
  rows = (shape[0] - patch_size) // stride + 1
  cols = (shape[1] - patch_size) // stride + 1
  # The regular grid (no tail) of the stride-plus-tail grid, row-major.
  every = np.asarray(patches.extract_patches(
      features, patch_size=patch_size, stride=stride))
  grid_rows = len(patches.grid_positions(shape[0], patch_size, stride))
  grid_cols = len(patches.grid_positions(shape[1], patch_size, stride))
  regular = every.reshape(grid_rows, grid_cols, -1)[:rows, :cols]
  want = regular.astype(np.float64) @ bank.reshape(5, -1).T.astype(
      np.float64)
  got = grid_winograd.grid_dots(
      grid_winograd.transform_map(jnp.asarray(features),
                                  patch_size=patch_size, stride=stride,
                                  tile=tile),
      jnp.asarray(bank), height=shape[0], width=shape[1], stride=stride,
      tile=tile)
  assert got.shape == (rows, cols, 5)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_products_per_output_and_supported_grids():
  # Per axis, stride 2, patch 3: F(2, 2) on the even taps (3 products per
  # 2 outputs) plus the odd tap (1 per output): 2.5; squared.
  assert grid_winograd.products_per_output(3, 2, 2) == 6.25
  assert grid_winograd.products_per_output(3, 1, 2) == 4.0   # F(2x2, 3x3)
  assert grid_winograd.products_per_output(3, 3, 2) == 9.0   # no saving
  assert grid_winograd.supports(3, 2) and grid_winograd.supports(6, 1)
  assert not grid_winograd.supports(7, 1)


def test_exact_matching_picks_winograd_on_cpu_only():
  kwargs = dict(patch_size=3, stride=2)
  assert patches.scan_method("exact", backend="cpu", **kwargs) == "winograd"
  assert patches.scan_method("auto", backend="cpu", **kwargs) == "winograd"
  assert patches.scan_method("exact", backend="gpu", **kwargs) == "matmul"
  assert patches.scan_method("exact", backend="tpu", **kwargs) == "matmul"
  for method in patches.MATCHINGS:
    assert patches.scan_method(method, backend="gpu", **kwargs) == method
  assert patches.scan_method("exact", backend="cpu", patch_size=7,
                             stride=1) == "matmul"
  assert config_lib.Config().matching == "exact"


def test_winograd_flag_refuses_grids_it_cannot_transform():
  config = config_lib.Config(content_image="c.png", style_image=("s.png",),
                             matching="winograd", patch_size=7,
                             synth_stride=1)
  with pytest.raises(config_lib.ConfigError,
                     match="--matching: winograd takes at most 6"):
    config.validate()


def test_memory_estimate_counts_the_winograd_scan():
  base = config_lib.Config(content_image="c.png", style_image=("s.png",),
                           max_size=384, tile_size="0")
  sizes = [plan_lib.InputSizes((384, 384), ((384, 384),))]

  def finest(matching):
    config = config_lib.replace(base, matching=matching)
    return plan_lib.make(config, sizes).levels[-1].memory_bytes

  # relu3_1 at 384 px: 48 x 48 grid patches, C = 256, chunks of 512; plus
  # relu4_1's 24 x 24, C = 512: 6.25 values a patch per C and per chunk.
  grid = {256: 48 * 48, 512: 24 * 24}
  extra = sum(int(6.25 * p * (patches.DEFAULT_CHUNK_SIZE + c)) * 4
              for c, p in grid.items())
  assert finest("winograd") - finest("matmul") == pytest.approx(extra,
                                                                rel=0.01)
  assert finest("exact") == finest(
      "winograd" if patches.scan_method(
          "exact", patch_size=3, stride=2) == "winograd" else "matmul")
