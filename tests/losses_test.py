"""Tests for cnnmrf_jax.losses: values and gradients against numpy."""

import itertools

import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import pytest

from cnnmrf_jax import losses
from cnnmrf_jax import patches
from cnnmrf_jax import vgg


def _relu_map(rng, shape, zero_fraction=0.5):
  x = rng.standard_normal(shape)
  return np.maximum(x - np.quantile(x, zero_fraction), 0).astype(np.float32)


def _numpy_tbar(features, style_maps, *, patch_size, stride, threshold):
  """Overlap-averaged matched style patches, by loops in float64.

  Returns (tbar [H, W, C], covered [H, W, 1] bool, kept scores, distinct
  bank indices among the kept matches).
  """
  k = patch_size

  def grid_patches(f):
    rows = patches.grid_positions(f.shape[0], k, stride)
    cols = patches.grid_positions(f.shape[1], k, stride)
    positions = list(itertools.product(rows, cols))
    return positions, np.stack(
        [f[r:r + k, c:c + k].reshape(-1) for r, c in positions])

  positions, p = grid_patches(np.asarray(features, np.float64))
  t = np.concatenate([grid_patches(np.asarray(s, np.float64))[1]
                      for s in style_maps])
  p_norm = np.linalg.norm(p, axis=1)
  t_norm = np.linalg.norm(t, axis=1)
  summed = np.zeros(features.shape)
  count = np.zeros(features.shape[:2] + (1,))
  kept_scores, used = [], set()
  for (r, c), row, norm in zip(positions, p, p_norm):
    if norm == 0:
      continue
    ncc = np.where(t_norm > 0, t @ row / (norm * np.maximum(t_norm, 1e-300)),
                   -np.inf)
    j = int(np.argmax(ncc))
    if not ncc[j] >= threshold:
      continue
    kept_scores.append(ncc[j])
    used.add(j)
    summed[r:r + k, c:c + k] += t[j].reshape(k, k, -1)
    count[r:r + k, c:c + k] += 1
  covered = count > 0
  tbar = np.where(covered, summed / np.maximum(count, 1), 0)
  return tbar, covered, np.array(kept_scores), used


class TestMrfLoss:

  @pytest.mark.parametrize("matching", patches.MATCHINGS)
  @pytest.mark.parametrize("threshold", [0.0, "median"])
  def test_grad_is_weight_times_residual(self, threshold, matching):
    rng = np.random.default_rng(0)
    features = _relu_map(rng, (11, 10, 4))
    features[:4, :4] = 0  # zero patches: (0, 0) stays uncovered
    style_maps = [_relu_map(rng, (9, 12, 4)), _relu_map(rng, (7, 7, 4))]
    if threshold == "median":
      _, _, scores, _ = _numpy_tbar(features, style_maps, patch_size=3,
                                    stride=2, threshold=0.0)
      threshold = float(np.median(scores))
    tbar, covered, kept, used = _numpy_tbar(
        features, style_maps, patch_size=3, stride=2, threshold=threshold)
    assert not covered.all()
    bank = patches.build_bank([jnp.asarray(s) for s in style_maps],
                              patch_size=3, stride=2)
    weight = 0.3

    def loss_fn(f):
      return losses.mrf_loss(f, bank, weight=weight, threshold=threshold,
                             chunk_size=7, matching=matching)

    (loss, stats), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        jnp.asarray(features))
    residual = np.where(covered, features - tbar, 0)
    np.testing.assert_allclose(grad, weight * residual, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, weight / 2 * np.sum(residual ** 2),
                               rtol=1e-5)
    assert int(stats["num_matched"]) == len(kept)
    assert int(stats["num_distinct"]) == len(used)
    np.testing.assert_allclose(stats["mean_ncc"], kept.mean(), rtol=1e-5)

  def test_nothing_matched(self):
    bank = patches.build_bank([jnp.ones((5, 5, 2))], patch_size=3, stride=2)
    f = jnp.zeros((6, 6, 2))
    (loss, stats), grad = jax.jit(jax.value_and_grad(
        lambda f: losses.mrf_loss(f, bank, weight=1.0), has_aux=True))(f)
    assert float(loss) == 0 and int(stats["num_matched"]) == 0
    assert float(stats["mean_ncc"]) == 0 and int(stats["num_distinct"]) == 0
    np.testing.assert_array_equal(grad, 0)

  def test_vmap_batch_with_different_banks(self):
    rng = np.random.default_rng(1)
    feats = [_relu_map(rng, (8, 8, 3)) for _ in range(2)]
    styles = [_relu_map(rng, (9, 7, 3)) for _ in range(2)]
    banks = [patches.build_bank([jnp.asarray(s)]) for s in styles]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *banks)
    grad_fn = jax.grad(lambda f, b: losses.mrf_loss(f, b, weight=1.0)[0])
    grads = jax.jit(jax.vmap(grad_fn))(jnp.asarray(np.stack(feats)), stacked)
    for n in range(2):
      tbar, covered, _, _ = _numpy_tbar(feats[n], [styles[n]], patch_size=3,
                                        stride=2, threshold=0.0)
      np.testing.assert_allclose(grads[n], np.where(covered,
                                                    feats[n] - tbar, 0),
                                 rtol=1e-5, atol=1e-6)

  def test_no_recompilation_for_new_values(self):
    rng = np.random.default_rng(2)
    fn = jax.jit(lambda f, b: losses.mrf_loss(f, b, weight=1.0))
    for _ in range(2):
      bank = patches.build_bank([jnp.asarray(_relu_map(rng, (6, 6, 2)))])
      fn(jnp.asarray(_relu_map(rng, (6, 6, 2))), bank)
    assert fn._cache_size() == 1

  def test_errors(self):
    bank = patches.build_bank([jnp.ones((5, 5, 2))])
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
      losses.mrf_loss(jnp.ones((1, 5, 5, 2)), bank, weight=1.0)
    with pytest.raises(ValueError, match=r"\[M, 27\]"):
      losses.mrf_loss(jnp.ones((5, 5, 3)), bank, weight=1.0)


class TestOtherLosses:

  def test_content_loss(self):
    rng = np.random.default_rng(3)
    f, t = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
    np.testing.assert_allclose(
        losses.content_loss(jnp.asarray(f), jnp.asarray(t), weight=20.0),
        20.0 * np.mean((f - t) ** 2), rtol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
      losses.content_loss(jnp.ones((5, 6, 4)), jnp.ones((5, 6, 3)), weight=1)
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
      losses.content_loss(jnp.ones((6, 4)), jnp.ones((6, 4)), weight=1)

  def test_tv_loss_reference_form(self):
    x = np.random.default_rng(4).standard_normal((5, 7, 3))
    want = 0.0
    for i in range(4):
      for j in range(6):
        want += np.sum((x[i, j + 1] - x[i, j]) ** 2 +
                       (x[i + 1, j] - x[i, j]) ** 2)
    np.testing.assert_allclose(
        losses.tv_loss(jnp.asarray(x, jnp.float32), weight=1e-3),
        1e-3 / 2 * want, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
      losses.tv_loss(jnp.ones((1, 5, 5, 3)), weight=1.0)
    with pytest.raises(ValueError, match="at least 2 x 2"):
      losses.tv_loss(jnp.ones((1, 5, 3)), weight=1.0)

  def test_gram_is_neural_styles(self):
    rng = np.random.default_rng(5)
    f = rng.standard_normal((6, 5, 4))
    s = rng.standard_normal((8, 9, 4))
    flat_f, flat_s = f.reshape(-1, 4), s.reshape(-1, 4)
    # neural_style.lua: GramMatrix(F) / F:nElement(); StyleLoss: strength *
    # MSE(G, target), the mean over the C^2 entries.
    g = flat_f.T @ flat_f / f.size
    a = flat_s.T @ flat_s / s.size
    gram = losses.gram_matrix(jnp.asarray(f, jnp.float32))
    np.testing.assert_allclose(gram, g, rtol=1e-5)
    target = losses.gram_matrix(jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(
        losses.gram_loss(jnp.asarray(f, jnp.float32), target, weight=100.0),
        100.0 * np.mean((g - a) ** 2), rtol=1e-4)
    # = weight * 4 / N^2 * Gatys' E_l (paper form, unnormalised Grams).
    n, m = 4, 30
    e_l = np.sum((flat_f.T @ flat_f - (flat_s.T @ flat_s) * m / len(flat_s)
                  ) ** 2) / (4 * n ** 2 * m ** 2)
    np.testing.assert_allclose(
        losses.gram_loss(jnp.asarray(f, jnp.float32), target, weight=1.0),
        4 / n ** 2 * e_l, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
      losses.gram_loss(jnp.asarray(f), jnp.ones((3, 3)), weight=1.0)
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
      losses.gram_matrix(jnp.ones((30, 4)))

  def test_blend_grams(self):
    a, b = jnp.eye(3), jnp.ones((3, 3))
    np.testing.assert_allclose(losses.blend_grams([a, b], [3.0, 1.0]),
                               0.75 * np.eye(3) + 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
      losses.blend_grams([a, b], [1.0])
    with pytest.raises(ValueError, match="same square"):
      losses.blend_grams([a, jnp.ones((4, 4))], [1.0, 1.0])
    with pytest.raises(ValueError, match="positive sum"):
      losses.blend_grams([a], [0.0])


class TestGradientsThroughVgg:
  """check_grads of every loss w.r.t. the image through a random VGG19.

  float64 and a 16 px image, so finite differences do not cross ReLU kinks.
  """

  @pytest.fixture(autouse=True)
  def _x64(self):
    with jax.enable_x64():
      yield

  def _setup(self):
    model = vgg.VGG("vgg19", dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64),
                                    vgg.init_params("vgg19", seed=0))
    rng = np.random.default_rng(6)
    image = vgg.preprocess(jnp.asarray(rng.random((16, 16, 3))))
    style = vgg.preprocess(jnp.asarray(rng.random((16, 16, 3))))

    def features(x, layer):
      out = model.apply({"params": params}, x[None], outputs=[layer])
      return out[layer][0]

    return image, style, features

  def _check(self, loss_fn, image, **kwargs):
    fn = jax.jit(loss_fn)
    value = fn(image)
    assert value.dtype == jnp.float64 and np.isfinite(value) and value > 0
    jtu.check_grads(fn, (image,), order=2, modes=("fwd", "rev"), **kwargs)

  def test_mrf(self):
    image, style, features = self._setup()
    layer = "relu2_1"
    bank = patches.build_bank([features(style, layer)])
    scale = 1.0 / float(jnp.mean(jnp.square(features(image, layer))))
    # The match is piecewise constant in the image: a small eps keeps every
    # probe on the same matches, so the derivative is that of a quadratic.
    self._check(lambda x: losses.mrf_loss(features(x, layer), bank,
                                          weight=scale)[0], image, eps=1e-6)

  def test_content(self):
    image, style, features = self._setup()
    target = features(style, "relu2_1")
    scale = 1.0 / float(jnp.mean(jnp.square(target)))
    self._check(lambda x: losses.content_loss(features(x, "relu2_1"), target,
                                              weight=scale), image)

  def test_tv(self):
    image, _, _ = self._setup()
    self._check(lambda x: losses.tv_loss(x, weight=1e-3), image)

  def test_gram(self):
    image, style, features = self._setup()
    target = losses.gram_matrix(features(style, "relu1_1"))
    scale = 1.0 / float(jnp.mean(jnp.square(target)))
    self._check(lambda x: losses.gram_loss(features(x, "relu1_1"), target,
                                           weight=scale), image)
