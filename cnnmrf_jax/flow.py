"""Optical flow between content frames and its consistency weights.

Flows are [H, W, 2] float32 arrays of (dx, dy) per pixel; the flow from
frame a to frame b says that pixel x of a moves to x + flow(x) in b. For
frame t and a jump j, the forward flow is t-j -> t and the backward flow is
t -> t-j; the backward one warps the result of t-j into frame t
(`temporal.warp`).

Host side (numpy, OpenCV; optional `video` extra):
  `dis_flow` OpenCV's DIS optical flow (Kroeger et al., ECCV 2016);
  `FlowCache` one .npz per (i, j) pair in a directory, reused when present;
  `FlowPrefetcher` computes the next frame's flows in a background thread
  while the caller synthesises the current one.
Device side (JAX, jit-able):
  `consistency_weights` the forward-backward check of Ruder, Dosovitskiy &
  Brox (GCPR 2016) as their consistencyChecker computes it;
  `long_term_weights` their 'closestFirst' long-term weights;
  `temporal_inputs` both, stacked per jump for `temporal.temporal_loss`.
"""

import concurrent.futures
import functools
import hashlib
import os
import pathlib
import threading
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence
from typing import Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from cnnmrf_jax import fileio
from cnnmrf_jax import temporal
from cnnmrf_jax import video_io

PathLike = Union[str, os.PathLike]
FlowFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]

PRESET_FLAG = "--flow_preset"
# DIS presets, fastest first (cv2.DISOPTICAL_FLOW_PRESET_*).
PRESETS = ("ultrafast", "fast", "medium")
_MIN_DIS_SIZE = 16

# consistencyChecker.cpp constants: the disocclusion test
# |w~ + w^|^2 >= 0.01 (|w~|^2 + |w^|^2) + 0.5 and the motion-boundary test
# |grad w^|^2 > 0.01 |w^|^2 + 0.002; then a Gaussian of sigma 0.8 (kernel
# radius ceil(2 sigma)) and a clip to [0, 1].
_DISOCCLUSION_RELATIVE = 0.01
_DISOCCLUSION_ABSOLUTE = 0.5
_MOTION_EDGE_RELATIVE = 0.01
_MOTION_EDGE_ABSOLUTE = 0.002
SMOOTHING_SIGMA = 0.8
_SMOOTHING_PRECISION = 2.0


class FlowError(ValueError):
  """A bad flow request; the message is one line naming the flag."""


# ----------------------------------------------------------------------------
# DIS optical flow (host).


def check_preset(preset: str) -> str:
  if preset not in PRESETS:
    raise FlowError(f"{PRESET_FLAG}={preset!r}: expected one of "
                    f"{', '.join(PRESETS)}")
  return preset


def to_gray_uint8(frame: np.ndarray) -> np.ndarray:
  """[H, W, 3] RGB (uint8, or float in [0, 1]) or [H, W] -> [H, W] uint8."""
  frame = np.asarray(frame)
  if frame.dtype != np.uint8:
    frame = np.clip(np.rint(frame * 255.0), 0, 255).astype(np.uint8)
  if frame.ndim == 3:
    # BT.601 luma, what cv2.cvtColor(RGB2GRAY) uses.
    cv2 = video_io.require_cv2(PRESET_FLAG)
    frame = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
  if frame.ndim != 2:
    raise ValueError(f"expected a frame [H, W, 3] or [H, W], got shape "
                     f"{frame.shape}")
  return np.ascontiguousarray(frame)


_DIS_INSTANCES = threading.local()


def _dis(preset: str):
  # One DIS object per thread and preset: creating one is cheap but not
  # free, and an instance must not be shared between threads.
  cache = _DIS_INSTANCES.__dict__.setdefault("by_preset", {})
  if preset not in cache:
    cv2 = video_io.require_cv2(PRESET_FLAG)
    code = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
            "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
            "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}[preset]
    cache[preset] = cv2.DISOpticalFlow_create(code)
  return cache[preset]


def dis_flow(frame_a: np.ndarray, frame_b: np.ndarray, *,
             preset: str = "medium") -> np.ndarray:
  """DIS optical flow from frame_a to frame_b.

  Args:
    frame_a, frame_b: [H, W, 3] RGB (uint8 or float in [0, 1]) or [H, W]
      grey, the same size. DIS runs on the 8-bit luma.
    preset: 'ultrafast', 'fast' or 'medium' (OpenCV's presets: more
      patch-search scales and variational refinement iterations, slower).

  Returns:
    [H, W, 2] float32 (dx, dy): frame_a(x) ~ frame_b(x + flow(x)).
  """
  check_preset(preset)
  gray_a, gray_b = to_gray_uint8(frame_a), to_gray_uint8(frame_b)
  if gray_a.shape != gray_b.shape:
    raise ValueError(f"frames of different sizes {gray_a.shape} and "
                     f"{gray_b.shape}")
  height, width = gray_a.shape
  # DIS refuses frames under about 12 px a side; tiny frames (tests, the
  # coarsest levels) are edge-padded to _MIN_DIS_SIZE and the flow cropped.
  pad = ((0, max(0, _MIN_DIS_SIZE - height)),
         (0, max(0, _MIN_DIS_SIZE - width)))
  if pad[0][1] or pad[1][1]:
    gray_a = np.pad(gray_a, pad, mode="edge")
    gray_b = np.pad(gray_b, pad, mode="edge")
  flow = _dis(preset).calc(gray_a, gray_b, None)
  return np.ascontiguousarray(flow[:height, :width], np.float32)


# ----------------------------------------------------------------------------
# Cache and prefetcher (host).


def _fingerprint(frame_a: np.ndarray, frame_b: np.ndarray) -> str:
  """Digest of both frames' 8-bit luma, so a cached flow of other frames
  (another clip or --frames range in the same directory) is not reused."""
  digest = hashlib.blake2b(digest_size=16)
  for frame in (frame_a, frame_b):
    gray = to_gray_uint8(frame)
    digest.update(np.asarray(gray.shape, np.int64).tobytes())
    digest.update(gray.tobytes())
  return digest.hexdigest()


class FlowCache:
  """Flows between frame pairs, one .npz file per (i, j) in a directory.

  A flow is computed once and written atomically (`fileio.atomic_write`),
  so a resumed run reads it back instead of recomputing it. Each file holds
  the flow and a digest of the two frames it was computed from; a file
  whose digest does not match the frames given (a different clip in the
  same directory) or that cannot be read is recomputed and replaced.
  Safe to use from several threads (a pair asked for twice at once may be
  computed twice; either write leaves a whole file).

  Attributes:
    computed: how many flows this object has computed.
    loaded: how many it has read back from files.
  """

  def __init__(self, directory: PathLike, *, preset: str = "medium",
               compute: Optional[FlowFunction] = None):
    """directory: where the files go (created on the first write).
    preset: the DIS preset (part of the file names).
    compute: (frame_a, frame_b) -> [H, W, 2] flow a -> b; default
      `dis_flow` with the preset (tests pass a counting fake)."""
    self.directory = pathlib.Path(directory)
    self.preset = check_preset(preset)
    self._compute = compute or functools.partial(dis_flow, preset=preset)
    self._lock = threading.Lock()
    self.computed = 0
    self.loaded = 0

  def path(self, i: int, j: int) -> pathlib.Path:
    """File of the flow from frame i to frame j."""
    return self.directory / f"flow_dis-{self.preset}_{i:06d}_{j:06d}.npz"

  def _read(self, path: pathlib.Path, key: str, shape) -> Optional[np.ndarray]:
    try:
      with np.load(path, allow_pickle=False) as data:
        if str(data["key"]) != key:
          return None
        flow = np.asarray(data["flow"], np.float32)
    except (OSError, ValueError, KeyError, EOFError):
      return None  # missing, truncated or foreign: compute afresh
    return flow if flow.shape == shape else None

  def flow(self, i: int, j: int, frame_i: np.ndarray, frame_j: np.ndarray
           ) -> np.ndarray:
    """[H, W, 2] float32 flow from frame i to frame j, cached."""
    path = self.path(i, j)
    key = _fingerprint(frame_i, frame_j)
    shape = np.shape(frame_i)[:2] + (2,)
    flow = self._read(path, key, shape)
    if flow is not None:
      with self._lock:
        self.loaded += 1
      return flow
    flow = np.asarray(self._compute(frame_i, frame_j), np.float32)
    if flow.shape != shape:
      raise ValueError(f"flow function returned shape {flow.shape}, "
                       f"expected {shape}")
    fileio.atomic_write(
        path, lambda f: np.savez(f, flow=flow, key=np.str_(key)))
    with self._lock:
      self.computed += 1
    return flow

  def pair(self, i: int, j: int, frame_i: np.ndarray, frame_j: np.ndarray
           ) -> Tuple[np.ndarray, np.ndarray]:
    """(flow i -> j, flow j -> i), both cached."""
    return (self.flow(i, j, frame_i, frame_j),
            self.flow(j, i, frame_j, frame_i))


# Flows needed at frame t: jump j -> (forward t-j -> t, backward t -> t-j).
FramePairs = Dict[int, Tuple[np.ndarray, np.ndarray]]


def jumps_at(t: int, jumps: Sequence[int]) -> List[int]:
  """The jumps j (sorted, unique) with a frame t-j to constrain against."""
  return sorted({int(j) for j in jumps if 0 <= t - int(j) < t})


class FlowPrefetcher:
  """Computes frame t+1's flows in a background thread while t is worked on.

  Usage, one frame after another:

    with flow.FlowPrefetcher(cache, clip, jumps=(1, 2, 4)) as prefetch:
      for t in range(len(clip)):
        pairs = prefetch.flows(t)  # waits for t's, starts t+1's
        ...synthesise frame t...

  OpenCV releases the GIL while it computes, so the flows overlap with the
  caller's (also GIL-free) JAX work.
  """

  def __init__(self, cache: FlowCache, frames: Sequence[np.ndarray], *,
               jumps: Sequence[int] = (1,)):
    """cache: where flows come from. frames: the content frames (indexable,
    len()); frame t's index in the cache is t. jumps: flow_relative_indices,
    positive ints (1 = the previous frame)."""
    jumps = [int(j) for j in jumps]
    if not jumps or min(jumps) < 1:
      raise FlowError(f"--flow_relative_indices={jumps}: expected positive "
                      f"frame offsets, e.g. 1,2,4")
    self.cache = cache
    self.frames = frames
    self.jumps = sorted(set(jumps))
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="flow")
    self._futures: Dict[int, concurrent.futures.Future] = {}

  def _compute(self, t: int) -> FramePairs:
    current = self.frames[t]
    return {j: self.cache.pair(t - j, t, self.frames[t - j], current)
            for j in jumps_at(t, self.jumps)}

  def submit(self, t: int) -> None:
    """Starts computing frame t's flows (no-op if started or out of range)."""
    if 0 < t < len(self.frames) and t not in self._futures:
      self._futures[t] = self._executor.submit(self._compute, t)

  def flows(self, t: int) -> FramePairs:
    """Frame t's flows {j: (forward t-j -> t, backward t -> t-j)} ({} at
    t = 0); then starts t+1's in the background."""
    self.submit(t)
    future = self._futures.pop(t, None)
    pairs = future.result() if future is not None else {}
    self.submit(t + 1)
    return pairs

  def close(self) -> None:
    for future in self._futures.values():
      future.cancel()
    self._futures.clear()
    self._executor.shutdown(wait=True)

  def __enter__(self) -> "FlowPrefetcher":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ----------------------------------------------------------------------------
# Consistency weights (JAX).


def _central_differences(field: jnp.ndarray):
  """d/dx and d/dy of [H, W, C] with the kernel [-1/2, 0, 1/2] and
  symmetric borders (the edge sample repeated), as CDerivative(3) and
  NFilter::filter do."""
  padded = jnp.pad(field, ((1, 1), (1, 1), (0, 0)), mode="symmetric")
  d_dx = 0.5 * (padded[1:-1, 2:] - padded[1:-1, :-2])
  d_dy = 0.5 * (padded[2:, 1:-1] - padded[:-2, 1:-1])
  return d_dx, d_dy


def _gaussian_smooth(image: jnp.ndarray, sigma: float) -> jnp.ndarray:
  """Separable normalised Gaussian of [H, W], radius ceil(2 sigma), symmetric
  borders (CSmooth(sigma, 2) in the reference's CFilter.h)."""
  radius = int(np.ceil(_SMOOTHING_PRECISION * sigma))
  taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2.0 * sigma ** 2))
  taps = (taps / taps.sum()).astype(np.float32)
  padded = jnp.pad(image, radius, mode="symmetric")
  height, width = image.shape
  rows = sum(taps[k] * padded[:, k:k + width] for k in range(taps.size))
  return sum(taps[k] * rows[k:k + height] for k in range(taps.size))


@functools.partial(jax.jit, static_argnames=("smoothing_sigma",))
def consistency_weights(forward: jnp.ndarray, backward: jnp.ndarray, *,
                        smoothing_sigma: float = SMOOTHING_SIGMA
                        ) -> jnp.ndarray:
  """Reliability of warping frame t-j into frame t: 1 reliable, 0 not.

  With w^ = backward (t -> t-j) and w~(x) = forward (t-j -> t) bilinearly
  sampled at x + w^(x), pixel x is

    0 if x + w^(x) is outside [0, W-1) x [0, H-1) (no four neighbours),
    -1 if |w~ + w^|^2 >= 0.01 (|w~|^2 + |w^|^2) + 0.5 (disoccluded: the
       round trip does not come back),
    0 if |grad w^|^2 > 0.01 |w^|^2 + 0.002 (motion boundary; grad by
       central differences, summed over both components and directions),
    1 otherwise,

  then Gaussian-smoothed (sigma 0.8, so disocclusions spread outwards: the
  -1 is why) and clipped to [0, 1], as manuelruder/artistic-videos'
  consistencyChecker does (its reliable_t_t-j.pgm files, scaled by 1/255).
  The paper writes '>' in the disocclusion test; the code's '>=' is used.

  Args:
    forward: [H, W, 2] flow t-j -> t.
    backward: [H, W, 2] flow t -> t-j.
    smoothing_sigma: the Gaussian's sigma; 0 returns the unsmoothed mask
      (with -1 clipped to 0).

  Returns:
    [H, W] float32 in [0, 1].
  """
  if forward.shape != backward.shape or forward.ndim != 3 or (
      forward.shape[-1] != 2):
    raise ValueError(f"consistency_weights needs two [H, W, 2] flows, got "
                     f"{forward.shape} and {backward.shape}")
  forward = forward.astype(jnp.float32)
  backward = backward.astype(jnp.float32)
  height, width = backward.shape[:2]
  target_x, target_y = temporal.sample_positions(backward)
  inside = ((target_x >= 0) & (target_x < width - 1) &
            (target_y >= 0) & (target_y < height - 1))
  forward_there = temporal.warp(forward, backward)  # w~
  round_trip = jnp.sum(jnp.square(forward_there + backward), axis=-1)
  magnitudes = (jnp.sum(jnp.square(forward_there), axis=-1) +
                jnp.sum(jnp.square(backward), axis=-1))
  disoccluded = round_trip >= (_DISOCCLUSION_RELATIVE * magnitudes +
                               _DISOCCLUSION_ABSOLUTE)
  d_dx, d_dy = _central_differences(backward)
  motion_edge = jnp.sum(jnp.square(d_dx) + jnp.square(d_dy), axis=-1)
  at_boundary = motion_edge > (
      _MOTION_EDGE_RELATIVE * jnp.sum(jnp.square(backward), axis=-1) +
      _MOTION_EDGE_ABSOLUTE)
  raw = jnp.where(~inside, 0.0,
                  jnp.where(disoccluded, -1.0,
                            jnp.where(at_boundary, 0.0, 1.0)))
  if smoothing_sigma > 0:
    raw = _gaussian_smooth(raw, smoothing_sigma)
  return jnp.clip(raw, 0.0, 1.0)


def long_term_weights(weights: Sequence[jnp.ndarray]) -> List[jnp.ndarray]:
  """Long-term weights: each pixel constrained by its nearest reliable frame.

  weights[k] are the consistency weights [H, W] for increasing jumps (the
  nearest previous frame first). The result is

    c_long[0] = c[0],  c_long[k] = max(c[k] - sum_{m<k} c_long[m], 0),

  the reference's 'closestFirst' (processFlowWeights subtracts the already
  adjusted weights of the nearer jumps, in place). The paper's equation
  subtracts the raw c[m]; the two agree on 0/1 masks, and this one never
  lets the weights of a pixel sum past max_k c[k].
  """
  result = []
  taken = None
  for c in weights:
    c = jnp.asarray(c)
    adjusted = c if taken is None else jnp.maximum(c - taken, 0)
    result.append(adjusted)
    taken = adjusted if taken is None else taken + adjusted
  return result


class TemporalInputs(NamedTuple):
  """What frame t's temporal term needs, stacked over its jumps.

  jumps: the K jumps j, increasing (frames t-j).
  backward_flows: [K, H, W, 2] flows t -> t-j (to warp result t-j).
  forward_flows: [K, H, W, 2] flows t-j -> t.
  weights: [K, H, W] long-term consistency weights.
  """
  jumps: Tuple[int, ...]
  backward_flows: jnp.ndarray
  forward_flows: jnp.ndarray
  weights: jnp.ndarray


def temporal_inputs(pairs: FramePairs, *,
                    smoothing_sigma: float = SMOOTHING_SIGMA
                    ) -> Optional[TemporalInputs]:
  """`FlowPrefetcher.flows(t)` -> stacked flows and long-term weights.

  Returns None for an empty dict (frame 0: no temporal term).
  """
  if not pairs:
    return None
  jumps = tuple(sorted(pairs))
  forward = jnp.stack([jnp.asarray(pairs[j][0]) for j in jumps])
  backward = jnp.stack([jnp.asarray(pairs[j][1]) for j in jumps])
  raw = [consistency_weights(forward[k], backward[k],
                             smoothing_sigma=smoothing_sigma)
         for k in range(len(jumps))]
  weights = jnp.stack(long_term_weights(raw))
  return TemporalInputs(jumps, backward, forward, weights)
