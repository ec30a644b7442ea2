"""Tests of cnnmrf_jax.flow: DIS flow, the cache, the prefetcher, weights."""

import math
import threading

import jax
import numpy as np
import pytest

from cnnmrf_jax import flow
from cnnmrf_jax import temporal

cv2 = pytest.importorskip("cv2")


# ----------------------------------------------------------------------------
# A numpy consistency checker, loop for loop as consistencyChecker.cpp.


def _symmetric(index, size):
  return -1 - index if index < 0 else (
      2 * size - 1 - index if index >= size else index)


def numpy_consistency(forward, backward, sigma=0.8):
  height, width = backward.shape[:2]
  reliable = np.ones((height, width))
  # Motion edges: [-0.5, 0, 0.5] along x and y, symmetric borders.
  edge = np.zeros((height, width))
  for y in range(height):
    for x in range(width):
      for c in range(2):
        dx = 0.5 * (backward[y, _symmetric(x + 1, width), c] -
                    backward[y, _symmetric(x - 1, width), c])
        dy = 0.5 * (backward[_symmetric(y + 1, height), x, c] -
                    backward[_symmetric(y - 1, height), x, c])
        edge[y, x] += dx * dx + dy * dy
  for y in range(height):
    for x in range(width):
      bx, by = x + backward[y, x, 0], y + backward[y, x, 1]
      x1, y1 = math.floor(bx), math.floor(by)
      if x1 < 0 or x1 + 1 >= width or y1 < 0 or y1 + 1 >= height:
        reliable[y, x] = 0
        continue
      ax, ay = bx - x1, by - y1
      f = ((1 - ay) * ((1 - ax) * forward[y1, x1] + ax * forward[y1, x1 + 1])
           + ay * ((1 - ax) * forward[y1 + 1, x1] +
                   ax * forward[y1 + 1, x1 + 1]))
      u, v = f
      cx, cy = bx + u, by + v
      u2, v2 = backward[y, x]
      if ((cx - x) ** 2 + (cy - y) ** 2 >=
          0.01 * (u2 * u2 + v2 * v2 + u * u + v * v) + 0.5):
        reliable[y, x] = -1
        continue
      if edge[y, x] > 0.01 * (u2 * u2 + v2 * v2) + 0.002:
        reliable[y, x] = 0
  if sigma > 0:
    radius = math.ceil(2 * sigma)
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    rows = np.zeros_like(reliable)
    for y in range(height):
      for x in range(width):
        rows[y, x] = sum(taps[i + radius] *
                         reliable[y, _symmetric(x + i, width)]
                         for i in range(-radius, radius + 1))
    smooth = np.zeros_like(reliable)
    for y in range(height):
      for x in range(width):
        smooth[y, x] = sum(taps[i + radius] *
                           rows[_symmetric(y + i, height), x]
                           for i in range(-radius, radius + 1))
    reliable = smooth
  return np.clip(reliable, 0, 1)


def moving_square(size=20, top=6, left=5, side=6, shift=3):
  """A square moving `shift` px right from t-1 to t over a still background.

  Returns (forward t-1 -> t, backward t -> t-1), [size, size, 2] each.
  """
  forward = np.zeros((size, size, 2), np.float32)
  backward = np.zeros((size, size, 2), np.float32)
  forward[top:top + side, left:left + side, 0] = shift
  backward[top:top + side, left + shift:left + shift + side, 0] = -shift
  return forward, backward


def test_weights_of_a_moving_square_unsmoothed():
  top, left, side, shift, size = 6, 5, 6, 3, 20
  forward, backward = moving_square(size, top, left, side, shift)
  got = np.asarray(flow.consistency_weights(forward, backward,
                                            smoothing_sigma=0.0))
  expected = np.ones((size, size))
  rows = slice(top, top + side)
  # Uncovered behind the square (in it at t-1, not at t): the round trip
  # lands on the square's forward flow and does not come back.
  expected[rows, left:left + shift] = 0
  # Motion boundaries of the backward flow: the pixels with an axis
  # neighbour on the other side of the square's outline at t (central
  # differences reach one pixel left, right, up and down; not diagonally).
  square = np.zeros((size + 2, size + 2), bool)
  square[1 + top:1 + top + side, 1 + left + shift:1 + left + shift + side] = (
      True)
  centre = square[1:-1, 1:-1]
  outline = ((centre != square[1:-1, 2:]) | (centre != square[1:-1, :-2]) |
             (centre != square[2:, 1:-1]) | (centre != square[:-2, 1:-1]))
  assert outline.sum() == 4 * side + 4 * (side - 1)  # outer + inner ring
  expected[outline] = 0
  # Sample positions need a right/bottom neighbour: with zero flow the last
  # column and row fail, as in the reference.
  expected[-1, :] = 0
  expected[:, -1] = 0
  np.testing.assert_array_equal(got, expected)
  # The disocclusion is -1 before the clip (checked by the smoothing test).


def test_weights_match_loop_reference_on_square_and_random_flows():
  forward, backward = moving_square()
  np.testing.assert_allclose(flow.consistency_weights(forward, backward),
                             numpy_consistency(forward, backward), atol=1e-5)
  rng = np.random.default_rng(0)
  # Backward flow: two regions of constant sub-pixel motion (an edge between
  # them) pointing out of the frame at one side; forward flow: its negation
  # plus noise that breaks the round trip at some pixels.
  backward = np.zeros((12, 15, 2), np.float32)
  backward[:, :7] = [1.3, -0.6]
  backward[:, 7:] = [-0.4, 0.8]
  forward = -backward + rng.normal(scale=0.5, size=backward.shape).astype(
      np.float32)
  got = np.asarray(flow.consistency_weights(forward, backward))
  expected = numpy_consistency(forward, backward)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  hard = numpy_consistency(forward, backward, sigma=0)
  for value in (0, 1):  # pixels of both kinds, not a trivial mask
    assert 0.1 < np.mean(hard == value) < 0.9


def test_smoothing_spreads_disocclusions_outwards():
  forward, backward = moving_square()
  smooth = np.asarray(flow.consistency_weights(forward, backward))
  hard = np.asarray(flow.consistency_weights(forward, backward,
                                             smoothing_sigma=0.0))
  assert smooth.min() >= 0 and smooth.max() <= 1
  # Row 8, the pixel just left of the uncovered strip (columns 5-7, value -1
  # before smoothing) and its reliable neighbours: rows 6-10 agree there, so
  # only the horizontal taps matter: 1 (cols 2-4) and -1 (cols 5-6).
  taps = np.exp(-np.arange(-2, 3) ** 2 / (2 * 0.8 ** 2))
  taps /= taps.sum()
  assert hard[8, 4] == 1
  assert smooth[8, 4] == pytest.approx(
      taps[0] + taps[1] + taps[2] - taps[3] - taps[4], abs=1e-5)
  assert smooth[1, 1] == pytest.approx(1.0)


def test_consistency_weights_is_jittable_under_vmap():
  forward, backward = moving_square()
  both = jax.vmap(flow.consistency_weights)(np.stack([forward] * 2),
                                            np.stack([backward] * 2))
  np.testing.assert_allclose(both[0], both[1])


def test_long_term_weights():
  rng = np.random.default_rng(1)
  binary = [rng.integers(0, 2, (5, 6)).astype(np.float32) for _ in range(3)]
  got = flow.long_term_weights(binary)
  # The paper's equation on 0/1 masks: subtract the raw nearer weights.
  for k in range(3):
    expected = np.maximum(binary[k] - sum(binary[:k], np.zeros((5, 6))), 0)
    np.testing.assert_array_equal(got[k], expected)
  assert np.max(sum(got)) <= 1
  # Fractional weights: the reference's in-place loop.
  soft = [rng.uniform(size=(5, 6)).astype(np.float32) for _ in range(3)]
  table = [s.copy() for s in soft]
  for j in range(1, 3):
    for k in range(1, j + 1):
      table[j] -= table[j - k]
    table[j] = np.maximum(table[j], 0)
  for a, b in zip(flow.long_term_weights(soft), table):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_temporal_inputs_stacks_jumps():
  forward, backward = moving_square()
  pairs = {2: (forward, backward), 1: (forward * 0, backward * 0)}
  inputs = flow.temporal_inputs(pairs)
  assert inputs.jumps == (1, 2)
  assert inputs.backward_flows.shape == (2, 20, 20, 2)
  assert inputs.weights.shape == (2, 20, 20)
  # Jump 1 (zero flow) is reliable nearly everywhere, so jump 2 gets little.
  assert float(inputs.weights[1, 10, 10]) == 0.0
  assert flow.temporal_inputs({}) is None


# ----------------------------------------------------------------------------
# DIS on a synthetic clip with known motion.


def texture(height, width, shift_x=0.0, shift_y=0.0, seed=0):
  """Sum of random sinusoids, evaluated at (x - shift_x, y - shift_y): the
  frame moved by an exact (sub-pixel) shift. RGB float in [0, 1]."""
  rng = np.random.default_rng(seed)
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
  xs, ys = xs - shift_x, ys - shift_y
  value = np.zeros((height, width))
  for _ in range(12):
    period = rng.uniform(6, 24)
    angle = rng.uniform(0, np.pi)
    kx, ky = 2 * np.pi / period * np.cos(angle), 2 * np.pi / period * np.sin(
        angle)
    value += np.sin(kx * xs + ky * ys + rng.uniform(0, 2 * np.pi))
  value = (value - value.min()) / (value.max() - value.min())
  return np.repeat(value[..., None], 3, axis=-1).astype(np.float32)


@pytest.mark.parametrize("shift", [(2.0, 1.0), (1.5, -0.75)])
def test_dis_recovers_known_translation_and_warp_reproduces_frame(shift):
  height, width, margin = 96, 128, 12
  frame_a = texture(height, width)
  frame_b = texture(height, width, *shift)  # frame_a moved by `shift`
  forward = flow.dis_flow(frame_a, frame_b, preset="medium")
  backward = flow.dis_flow(frame_b, frame_a, preset="medium")
  assert forward.shape == (height, width, 2) and forward.dtype == np.float32
  inner = (slice(margin, -margin), slice(margin, -margin))
  endpoint_error = np.linalg.norm(forward[inner] - np.asarray(shift), axis=-1)
  assert endpoint_error.mean() < 0.1
  endpoint_error = np.linalg.norm(backward[inner] + np.asarray(shift),
                                  axis=-1)
  assert endpoint_error.mean() < 0.1
  # Bring frame a into frame b with the backward flow b -> a.
  warped = np.asarray(temporal.warp(frame_a, backward))
  assert np.abs(warped[inner] - frame_b[inner]).mean() < 0.01
  weights = np.asarray(flow.consistency_weights(forward, backward))
  assert weights[inner].mean() > 0.95


def test_dis_presets_and_bad_preset():
  frame = texture(48, 64)
  for preset in flow.PRESETS:
    assert flow.dis_flow(frame, frame, preset=preset).shape == (48, 64, 2)
  tiny = texture(6, 40)  # under DIS's minimum size: padded, then cropped
  moved = np.asarray(flow.dis_flow(tiny, tiny))
  assert moved.shape == (6, 40, 2) and np.abs(moved).max() < 1e-3
  with pytest.raises(flow.FlowError, match="--flow_preset"):
    flow.dis_flow(frame, frame, preset="slow")
  with pytest.raises(ValueError, match="different sizes"):
    flow.dis_flow(frame, frame[:40])


# ----------------------------------------------------------------------------
# Cache and prefetcher.


class CountingFlow:
  """A fake flow function: (mean of b - mean of a) everywhere, counted."""

  def __init__(self):
    self.calls = []
    self.threads = set()
    self.lock = threading.Lock()

  def __call__(self, frame_a, frame_b):
    with self.lock:
      self.calls.append((float(np.mean(frame_a)), float(np.mean(frame_b))))
      self.threads.add(threading.current_thread().name)
    value = np.mean(frame_b) - np.mean(frame_a)
    return np.full(np.shape(frame_a)[:2] + (2,), value, np.float32)


def test_flow_cache_reuses_files_across_instances(tmp_path):
  frames = [np.full((6, 8, 3), v, np.float32) for v in (0.1, 0.5, 0.9)]
  fake = CountingFlow()
  cache = flow.FlowCache(tmp_path / "flows", preset="fast", compute=fake)
  forward, backward = cache.pair(0, 1, frames[0], frames[1])
  np.testing.assert_allclose(forward, 0.4, atol=1e-2)
  np.testing.assert_allclose(backward, -0.4, atol=1e-2)
  assert len(fake.calls) == 2 and cache.computed == 2
  assert cache.path(0, 1).exists() and cache.path(1, 0).exists()
  again = cache.flow(0, 1, frames[0], frames[1])
  np.testing.assert_array_equal(again, forward)
  # A resumed run: a new cache on the same directory computes nothing.
  resumed = flow.FlowCache(tmp_path / "flows", preset="fast", compute=fake)
  resumed.pair(0, 1, frames[0], frames[1])
  assert len(fake.calls) == 2 and resumed.loaded == 2
  # Other frames under the same indices (another clip): recomputed.
  resumed.flow(0, 1, frames[0], frames[2])
  assert len(fake.calls) == 3
  # A truncated file: recomputed and replaced.
  cache.path(1, 0).write_bytes(b"PK\x03")
  resumed.flow(1, 0, frames[1], frames[0])
  assert len(fake.calls) == 4
  assert not list((tmp_path / "flows").glob(".*tmp"))  # no temp files left
  # Another preset is another file.
  assert flow.FlowCache(tmp_path, preset="medium").path(0, 1) != cache.path(
      0, 1)


def test_prefetcher_computes_next_frame_in_background(tmp_path):
  frames = [np.full((4, 5, 3), v, np.float32) for v in np.linspace(0, 1, 6)]
  fake = CountingFlow()
  cache = flow.FlowCache(tmp_path, compute=fake)
  with flow.FlowPrefetcher(cache, frames, jumps=(1, 2, 4)) as prefetch:
    assert prefetch.flows(0) == {}
    pairs = prefetch.flows(1)
    assert sorted(pairs) == [1]
    np.testing.assert_allclose(pairs[1][0], 0.2, atol=1e-2)
    np.testing.assert_allclose(pairs[1][1], -0.2, atol=1e-2)
    # Frame 2's flows were started by flows(1): wait for them, then check
    # that asking computes nothing more.
    prefetch._futures[2].result()  # pylint: disable=protected-access
    calls = len(fake.calls)
    assert calls == 2 + 4  # t=1: one pair; t=2: jumps 1 and 2
    assert sorted(prefetch.flows(2)) == [1, 2]
    assert sorted(prefetch.flows(4)) == [1, 2, 4]
    assert sorted(prefetch.flows(5)) == [1, 2, 4]
  assert fake.threads == {n for n in fake.threads if n.startswith("flow")}
  with pytest.raises(flow.FlowError, match="flow_relative_indices"):
    flow.FlowPrefetcher(cache, frames, jumps=(0, 1))
