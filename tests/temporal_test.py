"""Tests of cnnmrf_jax.temporal: warping, the temporal loss and error."""

import jax
from jax import test_util
import jax.numpy as jnp
import numpy as np
import pytest

from cnnmrf_jax import temporal


def numpy_warp(image, flow):
  """Bilinear sampling as a sum of tent weights over every pixel, the
  position clamped into the image first (independent of floor logic)."""
  height, width, channels = image.shape
  out = np.zeros((height, width, channels))
  for y in range(height):
    for x in range(width):
      sx = np.clip(x + flow[y, x, 0], 0, width - 1)
      sy = np.clip(y + flow[y, x, 1], 0, height - 1)
      for yi in range(height):
        wy = max(0.0, 1 - abs(sy - yi))
        if wy == 0:
          continue
        for xi in range(width):
          wx = max(0.0, 1 - abs(sx - xi))
          out[y, x] += wy * wx * image[yi, xi]
  return out


def test_warp_matches_numpy_bilinear_with_clamped_borders():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(7, 9, 3)).astype(np.float32)
  flow = rng.uniform(-4, 4, size=(7, 9, 2)).astype(np.float32)
  flow[0, 0] = [2.0, 3.0]  # an integer position
  flow[1, 1] = [7.0, 0.5]  # exactly on the last column
  flow[2, 2] = [-10.0, 20.0]  # far outside: clamped to a corner
  got = jax.jit(temporal.warp)(image, flow)
  np.testing.assert_allclose(got, numpy_warp(image, flow), atol=1e-5)
  assert got.dtype == jnp.float32


def test_warp_integer_shift_moves_content():
  rng = np.random.default_rng(1)
  image = rng.normal(size=(6, 8, 2)).astype(np.float32)
  flow = np.zeros((6, 8, 2), np.float32)
  flow[..., 0] = 2.0  # sample two pixels to the right
  flow[..., 1] = -1.0  # and one up
  got = np.asarray(temporal.warp(image, flow))
  np.testing.assert_allclose(got[1:, :-2], image[:-1, 2:], atol=1e-6)


def test_warp_batch_vmaps():
  rng = np.random.default_rng(2)
  images = rng.normal(size=(3, 5, 6, 3)).astype(np.float32)
  flows = rng.uniform(-2, 2, size=(3, 5, 6, 2)).astype(np.float32)
  got = jax.jit(temporal.warp_batch)(images, flows)
  for k in range(3):
    np.testing.assert_allclose(got[k], numpy_warp(images[k], flows[k]),
                               atol=1e-5)


def test_warp_rejects_mismatched_flow():
  with pytest.raises(ValueError, match="does not match"):
    temporal.warp(jnp.zeros((4, 5, 3)), jnp.zeros((4, 4, 2)))


def test_warp_gradients_by_finite_differences():
  rng = np.random.default_rng(3)
  with jax.enable_x64():
    image = jnp.asarray(rng.normal(size=(4, 5, 2)))
    # Non-integer positions inside the image: differentiable in the flow too.
    flow = jnp.asarray(rng.uniform(0.1, 0.4, size=(4, 5, 2)))
    test_util.check_grads(lambda im: temporal.warp(im, flow), (image,),
                          order=1, modes=("rev",))
    test_util.check_grads(lambda fl: temporal.warp(image, fl), (flow,),
                          order=1, modes=("rev",))


def test_temporal_loss_value_and_gradients():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(5, 6, 3))
  warped = rng.normal(size=(2, 5, 6, 3))
  weights = rng.uniform(0, 1, size=(2, 5, 6))
  expected = 3.0 * sum(
      np.mean(weights[k][..., None] * (x - warped[k]) ** 2) for k in range(2))
  got = jax.jit(lambda *a: temporal.temporal_loss(*a, weight=3.0))(
      x.astype(np.float32), warped.astype(np.float32),
      weights.astype(np.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  with jax.enable_x64():
    def loss(image):
      return temporal.temporal_loss(image, jnp.asarray(warped),
                                    jnp.asarray(weights), weight=3.0)
    test_util.check_grads(loss, (jnp.asarray(x),), order=2)
    # dloss/dx = 2 * weight / D * sum_k c_k (x - warped_k).
    grad = jax.grad(loss)(jnp.asarray(x))
    expected_grad = 2 * 3.0 / x.size * np.sum(
        weights[..., None] * (x[None] - warped), axis=0)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10)


def test_temporal_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match="vmap"):
    temporal.temporal_loss(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 3)),
                           jnp.zeros((1, 4, 4)), weight=1.0)
  with pytest.raises(ValueError, match="disagree"):
    temporal.temporal_loss(jnp.zeros((4, 4, 3)), jnp.zeros((1, 4, 4, 3)),
                           jnp.zeros((2, 4, 4)), weight=1.0)


def test_init_from_previous_blends_by_weights():
  rng = np.random.default_rng(5)
  previous = rng.normal(size=(4, 6, 3)).astype(np.float32)
  content = rng.normal(size=(4, 6, 3)).astype(np.float32)
  flow = np.zeros((4, 6, 2), np.float32)
  flow[..., 0] = 1.0
  weights = np.zeros((4, 6), np.float32)
  weights[:, :3] = 1.0
  weights[:, 3] = 0.25
  got = np.asarray(temporal.init_from_previous(previous, flow, weights,
                                               content))
  np.testing.assert_allclose(got[:, :3], previous[:, 1:4], atol=1e-6)
  np.testing.assert_allclose(got[:, 4:], content[:, 4:], atol=1e-6)
  np.testing.assert_allclose(
      got[:, 3], 0.25 * previous[:, 4] + 0.75 * content[:, 3], atol=1e-6)


def test_temporal_error_of_a_translation():
  rng = np.random.default_rng(6)
  # Frame t is frame t-1 moved one pixel right: frame_t(x) = frame_{t-1}(x-1),
  # so the backward flow is dx = -1 and warping reproduces frame t exactly
  # where the weights are 1 (not on the first column).
  base = rng.uniform(size=(8, 12, 3)).astype(np.float32)
  frames = [np.roll(base, t, axis=1) for t in range(3)]
  flows = np.zeros((2, 8, 12, 2), np.float32)
  flows[..., 0] = -1.0
  weights = np.ones((2, 8, 12), np.float32)
  weights[:, :, 0] = 0.0
  assert float(temporal.temporal_error(frames, flows, weights)) < 1e-10
  noisy = [f + rng.normal(scale=0.1, size=f.shape).astype(np.float32)
           for f in frames]
  error = float(temporal.temporal_error(noisy, flows, weights))
  # Two independent N(0, 0.01) noises: E (a - b)^2 = 0.02.
  assert 0.015 < error < 0.025
  with pytest.raises(ValueError, match="need flows"):
    temporal.temporal_error(frames, flows[:1], weights)


def test_targets_at_size():
  warped = jnp.ones((2, 16, 20, 3))
  weights = jnp.zeros((2, 16, 20)).at[:, :, :10].set(1.0)
  small, small_weights = temporal.targets_at_size(warped, weights, 8, 10)
  assert small.shape == (2, 8, 10, 3) and small_weights.shape == (2, 8, 10)
  np.testing.assert_allclose(small, 1.0, atol=1e-6)
  np.testing.assert_allclose(small_weights[:, :, :4], 1.0, atol=1e-6)
  np.testing.assert_allclose(small_weights[:, :, 6:], 0.0, atol=1e-6)
