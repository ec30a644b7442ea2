"""Tests for cnnmrf_jax.patches against plain numpy references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnmrf_jax import patches


def _relu_map(rng, shape, zero_fraction=0.5):
  """A random non-negative map with ReLU-like sparsity, float32."""
  x = rng.standard_normal(shape)
  return np.maximum(x - np.quantile(x, zero_fraction), 0).astype(np.float32)


def _naive_patches(features, patch_size, stride):
  """[P, D] by explicit loops over the stride-plus-tail grid."""
  height, width, _ = features.shape
  rows = patches.grid_positions(height, patch_size, stride)
  cols = patches.grid_positions(width, patch_size, stride)
  return np.stack([features[r:r + patch_size, c:c + patch_size].reshape(-1)
                   for r in rows for c in cols])


def _reference_match(p, t):
  """Brute-force NCC argmax in float64; (indices, scores) as `match` says."""
  p = np.asarray(p, np.float64)
  t = np.asarray(t, np.float64)
  p_norm = np.linalg.norm(p, axis=1)
  t_norm = np.linalg.norm(t, axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    ncc = (p @ t.T) / (p_norm[:, None] * t_norm[None, :])
  ncc[:, t_norm == 0] = -np.inf
  indices = np.argmax(ncc, axis=1)
  scores = ncc[np.arange(len(p)), indices]
  unmatched = (p_norm == 0) | np.isneginf(scores)
  indices[unmatched] = 0
  scores[unmatched] = -np.inf
  return indices, scores


def _check_match(p, bank_patches, chunk_sizes):
  bank = patches.build_bank([jnp.asarray(bank_patches)[None]],
                            patch_size=1, stride=1)
  want_idx, want_score = _reference_match(p, bank_patches)
  match = jax.jit(patches.match, static_argnames="chunk_size")
  for chunk_size in chunk_sizes:
    idx, score = match(jnp.asarray(p), bank, chunk_size=chunk_size)
    assert idx.dtype == jnp.int32
    np.testing.assert_array_equal(idx, want_idx, err_msg=f"{chunk_size=}")
    np.testing.assert_allclose(score, want_score, rtol=1e-5, atol=1e-6,
                               err_msg=f"{chunk_size=}")


class TestGrid:

  @pytest.mark.parametrize("size,patch_size,stride,want", [
      (10, 3, 2, [0, 2, 4, 6, 7]),
      (9, 3, 2, [0, 2, 4, 6]),
      (3, 3, 2, [0]),
      (4, 3, 5, [0, 1]),
      (7, 1, 3, [0, 3, 6]),
  ])
  def test_positions(self, size, patch_size, stride, want):
    got = patches.grid_positions(size, patch_size, stride)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)

  def test_covers_every_position(self):
    for size, patch_size, stride in itertools.product(
        range(1, 20), (1, 2, 3, 5), (1, 2, 3, 4)):
      if size < patch_size or stride > patch_size:
        continue
      starts = patches.grid_positions(size, patch_size, stride)
      covered = np.zeros(size, bool)
      for s in starts:
        covered[s:s + patch_size] = True
      assert covered.all(), (size, patch_size, stride)
      assert np.all(np.diff(starts) > 0) and starts[-1] == size - patch_size

  def test_errors(self):
    with pytest.raises(ValueError, match="smaller than the patch size"):
      patches.grid_positions(2, 3, 1)
    with pytest.raises(ValueError, match="stride"):
      patches.grid_positions(5, 3, 0)

  def test_bank_size(self):
    shapes = [(10, 9, 4), (5, 5), (3, 8)]
    want = sum(len(_naive_patches(np.zeros(s[:2] + (1,)), 3, 2))
               for s in shapes)
    assert patches.bank_size(shapes, 3, 2) == want


class TestExtractFold:

  @pytest.mark.parametrize("shape,patch_size,stride", [
      ((7, 9, 4), 3, 1), ((7, 9, 4), 3, 2), ((10, 6, 2), 3, 3),
      ((5, 5, 3), 5, 2), ((6, 11, 2), 2, 4), ((4, 4, 1), 1, 1)])
  def test_extract_equals_naive(self, shape, patch_size, stride):
    f = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = patches.extract_patches(jnp.asarray(f), patch_size=patch_size,
                                  stride=stride)
    np.testing.assert_array_equal(got, _naive_patches(f, patch_size, stride))

  @pytest.mark.parametrize("shape,patch_size,stride", [
      ((7, 9, 4), 3, 1), ((7, 9, 4), 3, 2), ((10, 6, 2), 3, 3),
      ((6, 11, 2), 2, 2)])
  def test_fold_own_patches_reproduces_map(self, shape, patch_size, stride):
    f = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    p = patches.extract_patches(jnp.asarray(f), patch_size=patch_size,
                                stride=stride)
    summed, count = patches.fold(p, height=shape[0], width=shape[1],
                                 channels=shape[2], patch_size=patch_size,
                                 stride=stride)
    assert summed.shape == shape and count.shape == shape[:2] + (1,)
    assert np.all(np.asarray(count) >= 1)
    np.testing.assert_allclose(summed / count, f, rtol=1e-6)

  def test_fold_with_mask_equals_loops(self):
    rng = np.random.default_rng(2)
    height, width, channels, k, stride = 8, 7, 3, 3, 2
    rows = patches.grid_positions(height, k, stride)
    cols = patches.grid_positions(width, k, stride)
    p = rng.standard_normal((len(rows) * len(cols), k * k * channels))
    mask = rng.random(len(p)) < 0.6
    want_sum = np.zeros((height, width, channels))
    want_count = np.zeros((height, width, 1))
    for n, (r, c) in enumerate(itertools.product(rows, cols)):
      if mask[n]:
        want_sum[r:r + k, c:c + k] += p[n].reshape(k, k, channels)
        want_count[r:r + k, c:c + k] += 1
    summed, count = jax.jit(
        lambda p, m: patches.fold(p, height=height, width=width,
                                  channels=channels, patch_size=k,
                                  stride=stride, mask=m))(
                                      jnp.asarray(p, jnp.float32), mask)
    np.testing.assert_allclose(summed, want_sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(count, want_count)

  @pytest.mark.parametrize("shape,patch_size,stride", [
      ((7, 9, 4), 3, 1), ((7, 9, 4), 3, 2), ((10, 6, 2), 3, 3),
      ((6, 11, 2), 2, 4), ((5, 5, 3), 5, 2), ((8, 8, 1), 3, 2),
      ((4, 4, 1), 1, 1)])
  def test_fold_is_the_adjoint_of_extract(self, shape, patch_size, stride):
    num = patches.num_patches(shape[0], shape[1], patch_size, stride)
    p = np.random.default_rng(4).standard_normal(
        (num, patch_size * patch_size * shape[2])).astype(np.float32)
    extract = lambda f: patches.extract_patches(f, patch_size=patch_size,
                                                stride=stride)
    (want,) = jax.linear_transpose(
        extract, jax.ShapeDtypeStruct(shape, jnp.float32))(jnp.asarray(p))
    summed, _ = patches.fold(jnp.asarray(p), height=shape[0],
                             width=shape[1], channels=shape[2],
                             patch_size=patch_size, stride=stride)
    np.testing.assert_allclose(summed, want, rtol=1e-6, atol=1e-6)

  def test_errors(self):
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
      patches.extract_patches(jnp.zeros((1, 5, 5, 3)))
    with pytest.raises(ValueError, match="expected patches of shape"):
      patches.fold(jnp.zeros((4, 10)), height=5, width=5, channels=1,
                   patch_size=3, stride=2)


class TestBank:

  def test_build_bank(self):
    rng = np.random.default_rng(3)
    maps = [_relu_map(rng, (6, 7, 2)), _relu_map(rng, (5, 5, 2))]
    maps[0][:3, :3] = 0  # the first patch is all zero
    bank = patches.build_bank([jnp.asarray(m) for m in maps], patch_size=3,
                              stride=2)
    want = np.concatenate([_naive_patches(m, 3, 2) for m in maps])
    np.testing.assert_array_equal(bank.patches, want)
    assert bank.patches.shape[0] == patches.bank_size(
        [m.shape for m in maps], 3, 2)
    norms = np.linalg.norm(want, axis=1)
    np.testing.assert_array_equal(bank.valid, norms > 0)
    assert not bank.valid[0]
    np.testing.assert_allclose(
        bank.inv_norms, np.where(norms > 0, 1 / np.maximum(norms, 1e-30), 0),
        rtol=1e-6)

  def test_build_bank_errors(self):
    with pytest.raises(ValueError, match="same number of channels"):
      patches.build_bank([jnp.ones((5, 5, 2)), jnp.ones((5, 5, 3))])
    with pytest.raises(ValueError, match="at least one"):
      patches.build_bank([])


class TestMatch:

  def test_random_maps_equal_reference(self):
    rng = np.random.default_rng(4)
    synth = _relu_map(rng, (9, 11, 3))
    style = _relu_map(rng, (12, 10, 3))
    synth[:4, :4] = 0  # all-zero synthesis patches
    style[-5:, -5:] = 0  # all-zero bank patches
    p = np.asarray(patches.extract_patches(jnp.asarray(synth), stride=1))
    t = np.asarray(patches.extract_patches(jnp.asarray(style), stride=1))
    assert (np.linalg.norm(p, axis=1) == 0).any()
    assert (np.linalg.norm(t, axis=1) == 0).any()
    m = len(t)  # 80
    _check_match(p, t, [1, 7, 16, 33, m - 1, m, m + 5, 4096])

  def test_ties_go_to_lowest_index(self):
    # Small integers: every dot product and norm is exact, so duplicated
    # bank rows tie exactly in any summation order.
    rng = np.random.default_rng(5)
    base = rng.integers(0, 4, size=(6, 5)).astype(np.float32)
    base[0] = 0
    t = np.concatenate([base, base[::-1], base, np.zeros((3, 5))])
    t = t.astype(np.float32)
    p = np.concatenate([base, rng.integers(0, 3, size=(10, 5))])
    p = p.astype(np.float32)
    _check_match(p, t, [1, 2, 4, 5, 7, len(t)])
    idx, _ = patches.match(jnp.asarray(p), patches.build_bank(
        [jnp.asarray(t)[None]], patch_size=1, stride=1), chunk_size=4)
    # Each non-zero base row matches its first copy in the bank.
    np.testing.assert_array_equal(idx[1:6], np.arange(1, 6))

  def test_all_bank_patches_zero(self):
    p = jnp.ones((4, 3))
    bank = patches.build_bank([jnp.zeros((1, 5, 3))], patch_size=1, stride=1)
    idx, score = patches.match(p, bank, chunk_size=2)
    np.testing.assert_array_equal(idx, 0)
    assert np.all(np.isneginf(score))

  def test_vmap_over_batch_with_different_banks(self):
    rng = np.random.default_rng(6)
    synth = [_relu_map(rng, (7, 7, 2)) for _ in range(2)]
    style = [_relu_map(rng, (8, 9, 2)) for _ in range(2)]
    banks = [patches.build_bank([jnp.asarray(s)], patch_size=3, stride=2)
             for s in style]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *banks)
    p = jnp.stack([patches.extract_patches(jnp.asarray(s), patch_size=3,
                                           stride=2) for s in synth])
    idx, score = jax.jit(jax.vmap(
        lambda p, b: patches.match(p, b, chunk_size=5)))(p, stacked)
    for n in range(2):
      want_idx, want_score = _reference_match(p[n], banks[n].patches)
      np.testing.assert_array_equal(idx[n], want_idx)
      np.testing.assert_allclose(score[n], want_score, rtol=1e-5)

  def test_errors(self):
    bank = patches.build_bank([jnp.ones((4, 4, 2))], patch_size=3, stride=1)
    with pytest.raises(ValueError, match="patch length mismatch"):
      patches.match(jnp.ones((3, 17)), bank)
    with pytest.raises(ValueError, match=r"\[P, D\]"):
      patches.match(jnp.ones((2, 3, 18)), bank)
    with pytest.raises(ValueError, match="chunk_size"):
      patches.match(jnp.ones((3, 18)), bank, chunk_size=0)


class TestMatchMap:

  @pytest.mark.parametrize("shape,patch_size,stride", [
      ((9, 11, 3), 3, 2), ((10, 10, 2), 3, 2), ((8, 7, 2), 3, 3),
      ((7, 6, 2), 2, 1), ((7, 7, 2), 3, 4)])
  @pytest.mark.parametrize("method", patches.MATCHINGS)
  def test_every_method_equals_reference(self, shape, patch_size, stride,
                                         method):
    rng = np.random.default_rng(8)
    synth = _relu_map(rng, shape)
    synth[:3, :3] = 0  # an all-zero synthesis patch: unmatched
    maps = [_relu_map(rng, (shape[0] + i, shape[1], shape[2]))
            for i in range(2)]
    bank = patches.build_bank([jnp.asarray(m) for m in maps],
                              patch_size=patch_size, stride=stride)
    want_idx, want_score = _reference_match(
        _naive_patches(synth, patch_size, stride), bank.patches)
    for chunk_size in (1, 4, 4096):
      idx, score = jax.jit(lambda f, b, c=chunk_size: patches.match_map(
          f, b, patch_size=patch_size, stride=stride, chunk_size=c,
          method=method))(jnp.asarray(synth), bank)
      np.testing.assert_array_equal(idx, want_idx)
      np.testing.assert_allclose(score, want_score, rtol=1e-5, atol=1e-6)

  @pytest.mark.parametrize("method", patches.MATCHINGS)
  def test_bfloat16_products_keep_float32_scores(self, method):
    rng = np.random.default_rng(9)
    synth = _relu_map(rng, (12, 12, 8))
    bank = patches.build_bank([jnp.asarray(_relu_map(rng, (14, 13, 8)))])
    want_idx, _ = patches.match_map(jnp.asarray(synth), bank)
    idx, score = patches.match_map(jnp.asarray(synth), bank, method=method,
                                   compute_dtype=jnp.bfloat16)
    assert score.dtype == jnp.float32
    # Near-ties may flip with 8-bit mantissas; most matches may not.
    assert np.mean(np.asarray(idx) == np.asarray(want_idx)) > 0.8

  def test_errors(self):
    bank = patches.build_bank([jnp.ones((4, 4, 2))], patch_size=3, stride=1)
    with pytest.raises(ValueError, match="--matching"):
      patches.match_map(jnp.ones((5, 5, 2)), bank, method="fft")
    with pytest.raises(ValueError, match="patch length mismatch"):
      patches.match_map(jnp.ones((5, 5, 3)), bank, method="conv")
    with pytest.raises(ValueError, match="compute_dtype"):
      patches.match_map(jnp.ones((5, 5, 2)), bank, compute_dtype=jnp.int32)
