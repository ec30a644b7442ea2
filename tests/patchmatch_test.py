"""Tests for patches.patchmatch: an approximate field scored by exact NCC."""

import numpy as np
import jax
import jax.numpy as jnp

from cnnmrf_jax import patches


def _smooth_map(rng, height, width, channels):
  coarse = rng.normal(size=(height // 3 + 2, width // 3 + 2, channels))
  rows = np.linspace(0, coarse.shape[0] - 1, height)
  cols = np.linspace(0, coarse.shape[1] - 1, width)
  r0, c0 = rows.astype(int), cols.astype(int)
  image = coarse[np.minimum(r0, coarse.shape[0] - 2)][
      :, np.minimum(c0, coarse.shape[1] - 2)]
  return np.maximum(image + 0.1 * rng.normal(size=image.shape), 0).astype(
      np.float32)


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  copies = [_smooth_map(rng, 21, 17, 8), _smooth_map(rng, 15, 19, 8)]
  bank = patches.build_bank([jnp.asarray(c) for c in copies])
  grid = patches.bank_grid([c.shape for c in copies])
  return rng, copies, bank, grid


def test_bank_grid_indexes_the_bank():
  _, copies, bank, grid = _setup()
  assert int(grid.starts[-1] + grid.rows[-1] * grid.cols[-1]) == (
      bank.patches.shape[0])
  index = jnp.arange(bank.patches.shape[0])
  copy, row, col = patches._grid_coords(index, grid)
  np.testing.assert_array_equal(
      patches._grid_index(copy, row, col, grid), index)
  assert int(copy[-1]) == len(copies) - 1


def test_it_finds_a_copied_map_and_never_gets_worse():
  rng, copies, bank, grid = _setup()
  # The synthesis map is the first copy: every patch has an exact twin.
  synth = patches.extract_patches(jnp.asarray(copies[0]), patch_size=3,
                                  stride=2)
  rows = len(patches.grid_positions(21, 3, 2))
  cols = len(patches.grid_positions(17, 3, 2))
  exact, exact_scores = patches.match(synth, bank)
  field = jnp.asarray(rng.integers(0, bank.patches.shape[0], rows * cols),
                      jnp.int32)
  run = jax.jit(lambda f, k: patches.patchmatch(
      synth, bank, grid, f, k, synth_grid=(rows, cols)))
  previous = -np.inf * np.ones(rows * cols)
  key = jax.random.PRNGKey(0)
  for _ in range(6):
    key, step = jax.random.split(key)
    field, scores = run(field, step)
    assert np.all(np.asarray(scores) >= previous - 1e-6)
    previous = np.asarray(scores)
  assert np.all(np.asarray(scores) <= np.asarray(exact_scores) + 1e-5)
  share = np.mean(np.asarray(scores) >= np.asarray(exact_scores) - 1e-5)
  assert share > 0.9
  np.testing.assert_allclose(np.mean(scores), np.mean(exact_scores),
                             rtol=0.01)


def test_the_exact_field_is_kept():
  rng, copies, bank, grid = _setup(1)
  synth_map = _smooth_map(rng, 13, 11, 8)
  synth = patches.extract_patches(jnp.asarray(synth_map), patch_size=3,
                                  stride=2)
  exact, exact_scores = patches.match(synth, bank)
  field, scores = patches.patchmatch(synth, bank, grid, exact,
                                     jax.random.PRNGKey(1), synth_grid=(6, 5),
                                     num_passes=2)
  np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
