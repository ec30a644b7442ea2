"""Warping by optical flow and the temporal loss of video style transfer.

Ruder, Dosovitskiy & Brox, "Artistic style transfer for videos" (GCPR 2016;
manuelruder/artistic-videos): frame t of a stylised clip is kept close to the
previous result(s) warped into frame t by the optical flow, wherever that
flow is reliable. All functions here are pure JAX, jit- and vmap-able, and
work in whatever pixel space the caller optimises in (the preprocessed VGG
input, as the reference does).

Flows are [H, W, 2] float arrays holding (dx, dy) per pixel: a flow from
frame a to frame b says that pixel x of a moves to x + flow(x) in b. To bring
an image of frame t-j into frame t, sample it at x + w^(x) with w^ the
*backward* flow t -> t-j (`warp`).

Border handling of `warp`: the sample position is clamped into the image
(the edge pixels are replicated outwards). Positions that leave the image
get consistency weight 0 in `flow.consistency_weights`, so the clamped
values there only fill the init and, through the weights' smoothing, touch
the loss at a one-to-two pixel rim.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from cnnmrf_jax import image_io


def _check(array, name: str, rank: int, what: str) -> None:
  if array.ndim != rank:
    raise ValueError(f"{name} must be {what}, got shape {array.shape}")


def sample_positions(flow: jnp.ndarray):
  """(x + dx, y + dy) for every pixel: two [H, W] arrays in flow's dtype."""
  height, width = flow.shape[:2]
  dtype = flow.dtype if jnp.issubdtype(flow.dtype, jnp.floating) else (
      jnp.float32)
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=dtype),
                        jnp.arange(width, dtype=dtype), indexing="ij")
  return xs + flow[..., 0], ys + flow[..., 1]


def warp(image: jnp.ndarray, flow: jnp.ndarray) -> jnp.ndarray:
  """Bilinear sampling of image at x + flow(x), edges replicated.

  result(y, x) = bilinear image(y + flow(y, x, 1), x + flow(y, x, 0)), the
  position clamped to [0, W-1] x [0, H-1] first. Differentiable with respect
  to the image (the gradient scatters back to the four neighbours) and the
  flow (away from the clamp).

  Args:
    image: [H, W, C] (any float dtype; any pixel space).
    flow: [H, W, 2] (dx, dy), the flow from the output's frame to the
      image's frame (the backward flow t -> t-j to bring frame t-j into t).

  Returns:
    [H, W, C] in the image's dtype.
  """
  _check(image, "image", 3, "[H, W, C]")
  _check(flow, "flow", 3, "[H, W, 2]")
  if flow.shape != image.shape[:2] + (2,):
    raise ValueError(f"flow of shape {flow.shape} does not match image "
                     f"{image.shape}: expected {image.shape[:2] + (2,)}")
  height, width = image.shape[:2]
  sample_x, sample_y = sample_positions(flow)
  sample_x = jnp.clip(sample_x, 0, width - 1)
  sample_y = jnp.clip(sample_y, 0, height - 1)
  # Left/top neighbour at most W-2 / H-2 so that the right/bottom one exists;
  # at the last column the weight of the right neighbour is then 1.
  x0 = jnp.clip(jnp.floor(sample_x), 0, max(width - 2, 0)).astype(jnp.int32)
  y0 = jnp.clip(jnp.floor(sample_y), 0, max(height - 2, 0)).astype(jnp.int32)
  x1 = jnp.minimum(x0 + 1, width - 1)
  y1 = jnp.minimum(y0 + 1, height - 1)
  ax = (sample_x - x0).astype(image.dtype)[..., None]
  ay = (sample_y - y0).astype(image.dtype)[..., None]
  top = (1 - ax) * image[y0, x0] + ax * image[y0, x1]
  bottom = (1 - ax) * image[y1, x0] + ax * image[y1, x1]
  return (1 - ay) * top + ay * bottom


def warp_batch(images: jnp.ndarray, flows: jnp.ndarray) -> jnp.ndarray:
  """`warp` over a leading axis: [K, H, W, C], [K, H, W, 2] -> [K, H, W, C]."""
  return jax.vmap(warp)(images, flows)


def init_from_previous(previous_result: jnp.ndarray, backward_flow: jnp.ndarray,
                       weights: jnp.ndarray, content: jnp.ndarray
                       ) -> jnp.ndarray:
  """Starting point of frame t: the previous result warped into frame t.

  Where the flow is unreliable (disocclusions, motion boundaries, pixels
  coming from outside the frame) the content frame fills in:
  c * warp(previous) + (1 - c) * content, c the consistency weights.

  Args:
    previous_result: [H, W, C] result of frame t-1 (same pixel space as
      content).
    backward_flow: [H, W, 2] flow t -> t-1.
    weights: [H, W] consistency weights in [0, 1] (`flow.consistency_weights`).
    content: [H, W, C] content frame t.

  Returns:
    [H, W, C].
  """
  _check(weights, "weights", 2, "[H, W]")
  warped = warp(previous_result, backward_flow)
  c = weights[..., None].astype(warped.dtype)
  return c * warped + (1 - c) * content


def temporal_loss(x: jnp.ndarray, warped: jnp.ndarray, weights: jnp.ndarray, *,
                  weight: float) -> jnp.ndarray:
  """Temporal consistency loss of one frame (Ruder et al. 2016, Eq. 7-8).

    loss = weight * sum over jumps k of (1/D) sum c_k * (x - warped_k)^2,

  D = H * W * C, the weights broadcast over channels: per jump the
  reference's weighted MSE (WeightedContentLoss: MSE of sqrt(c) * x against
  sqrt(c) * warped, times -temporal_weight), one term per previous frame.

  Args:
    x: [H, W, C] the image being optimised.
    warped: [K, H, W, C] previous results t-j warped into frame t, one per
      jump j (`warp_batch`), in x's pixel space; held constant.
    weights: [K, H, W] their consistency weights, long-term ones already
      made exclusive (`flow.long_term_weights`).
    weight: temporal_weight.

  Returns:
    scalar in x's dtype.
  """
  _check(x, "x", 3, "a single [H, W, C] array (vmap over batches)")
  _check(warped, "warped", 4, "[K, H, W, C]")
  _check(weights, "weights", 3, "[K, H, W]")
  if warped.shape[1:] != x.shape or weights.shape != warped.shape[:3]:
    raise ValueError(f"temporal_loss: x {x.shape}, warped {warped.shape} and "
                     f"weights {weights.shape} disagree")
  c = weights[..., None].astype(x.dtype)
  squared = c * jnp.square(x[None] - jax.lax.stop_gradient(warped))
  return weight * jnp.sum(squared) / x.size


def targets_at_size(warped: jnp.ndarray, weights: jnp.ndarray, height: int,
                    width: int):
  """Warped previous results and weights resized to one pyramid level.

  Warping is done once at the frame's full size; each coarser level takes
  the area-filtered (antialiased bilinear) resize of both, so a level's
  weights are the fraction of reliable pixels under each of its pixels.

  Args:
    warped: [K, H, W, C]; weights: [K, H, W].
    height, width: the level's size.

  Returns:
    ([K, height, width, C], [K, height, width]).
  """
  _check(warped, "warped", 4, "[K, H, W, C]")
  _check(weights, "weights", 3, "[K, H, W]")
  resized = image_io.resize(warped, height, width, antialias=True)
  resized_weights = image_io.resize(weights[..., None], height, width,
                                    antialias=True)[..., 0]
  return resized, jnp.clip(resized_weights, 0, 1)


@jax.jit
def _frame_errors(frames, backward_flows, weights):
  warped = warp_batch(frames[:-1], backward_flows)
  c = weights[..., None].astype(frames.dtype)
  squared = jnp.sum(c * jnp.square(frames[1:] - warped), axis=(1, 2, 3))
  reliable = jnp.sum(weights, axis=(1, 2)) * frames.shape[-1]
  return squared / jnp.maximum(reliable, 1e-8)


def temporal_error(frames: Sequence[jnp.ndarray], backward_flows: jnp.ndarray,
                   weights: jnp.ndarray) -> jnp.ndarray:
  """How much a clip flickers: the c-weighted warping error, mean over frames.

  For t = 1..T-1: sum c_t * (frame_t - warp(frame_{t-1}, w^_t))^2 divided by
  C * sum c_t (the mean squared difference over the pixels the flow tracks
  reliably), then the mean over t. Use the content clip's flows and weights
  for both the stylised clip and the content clip and compare the ratio: a
  stylisation as stable as its content scores about 1.

  Args:
    frames: T frames [H, W, C] (or one [T, H, W, C] array), T >= 2.
    backward_flows: [T-1, H, W, 2]; entry t-1 is the flow t -> t-1.
    weights: [T-1, H, W] consistency weights of those flows.

  Returns:
    scalar float.
  """
  frames = jnp.stack([jnp.asarray(f) for f in frames]).astype(jnp.float32)
  backward_flows = jnp.asarray(backward_flows)
  weights = jnp.asarray(weights)
  if frames.ndim != 4 or frames.shape[0] < 2:
    raise ValueError(f"temporal_error needs at least 2 frames [H, W, C], got "
                     f"{frames.shape}")
  expected = (frames.shape[0] - 1,) + frames.shape[1:3]
  if backward_flows.shape != expected + (2,) or weights.shape != expected:
    raise ValueError(f"temporal_error: {frames.shape[0]} frames of "
                     f"{frames.shape[1:3]} need flows {expected + (2,)} and "
                     f"weights {expected}, got {backward_flows.shape} and "
                     f"{weights.shape}")
  return jnp.mean(_frame_errors(frames, backward_flows, weights))
