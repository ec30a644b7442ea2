"""Tests for patchmatch_lib.patchmatch: an approximate field scored by exact NCC."""

import numpy as np
import jax
import jax.numpy as jnp

from cnnmrf_jax import patches
from cnnmrf_jax import patchmatch as patchmatch_lib


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
  grid = patchmatch_lib.bank_grid([c.shape for c in copies])
  return rng, copies, bank, grid


def test_bank_grid_indexes_the_bank():
  _, copies, bank, grid = _setup()
  assert int(grid.starts[-1] + grid.rows[-1] * grid.cols[-1]) == (
      bank.patches.shape[0])
  index = jnp.arange(bank.patches.shape[0])
  copy, row, col = patchmatch_lib._grid_coords(index, grid)
  np.testing.assert_array_equal(
      patchmatch_lib._grid_index(copy, row, col, grid), index)
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
  run = jax.jit(lambda f, k: patchmatch_lib.patchmatch(
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
  field, scores = patchmatch_lib.patchmatch(synth, bank, grid, exact,
                                     jax.random.PRNGKey(1), synth_grid=(6, 5),
                                     num_passes=2)
  np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)


def test_semantic_maps_rank_the_candidates_as_the_exact_scan():
  """With maps (Champandard 2016) PatchMatch ranks by feature NCC plus the
  map part, as `match`: the exact semantic field is kept, and from a
  random start the field converges on the semantic argmax."""
  rng, copies, _, grid = _setup(2)
  labels = [np.zeros(c.shape[:2] + (2,), np.float32) for c in copies]
  for label in labels:  # left half label 0, right half label 1
    half = label.shape[1] // 2
    label[:, :half, 0], label[:, half:, 1] = 1, 1
  bank = patches.build_bank([jnp.asarray(c) for c in copies],
                            semantic_maps=labels)
  synth_features = _smooth_map(rng, 13, 11, 8)
  synth_labels = np.zeros((13, 11, 2), np.float32)
  synth_labels[:7, :, 0], synth_labels[7:, :, 1] = 1, 1
  synth_map = patches.synthesis_map(synth_labels, weight=10.0)
  synth = patches.extract_patches(jnp.asarray(synth_features), stride=2)
  exact, exact_scores = patches.match(synth, bank, synth_map=synth_map)
  run = jax.jit(lambda f, k: patchmatch_lib.patchmatch(
      synth, bank, grid, f, k, synth_grid=(6, 5), synth_map=synth_map,
      num_passes=2))
  kept, kept_scores = run(exact, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(kept, exact)
  np.testing.assert_allclose(kept_scores, exact_scores, rtol=1e-5)
  field = jnp.asarray(rng.integers(0, bank.patches.shape[0], 30), jnp.int32)
  key = jax.random.PRNGKey(1)
  for _ in range(8):
    key, step = jax.random.split(key)
    field, scores = run(field, step)
  agree = np.mean(np.asarray(bank.labels[field]) ==
                  np.asarray(synth_map.labels))
  assert agree == np.mean(np.asarray(bank.labels[exact]) ==
                          np.asarray(synth_map.labels))
  assert np.mean(np.asarray(field) == np.asarray(exact)) > 0.6
  np.testing.assert_allclose(np.mean(scores), np.mean(exact_scores),
                             rtol=0.03)
