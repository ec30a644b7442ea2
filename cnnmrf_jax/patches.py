"""Neural patches on the device: extraction, NCC matching, folding.

CNNMRF (Li & Wand, CVPR 2016) compares k x k x C patches Psi_i(Phi(x)) of a
feature map with patches Psi_j(Phi(x_s)) of the style's map (Eq. 2) and pairs
each synthesis patch with its best match by normalised cross-correlation
(Eq. 3; the paper prints argmin, the reference code takes the argmax):

    NN(i) = argmax_j <Psi_i(Phi(x)), Psi_j(Phi(x_s))>
                     / (|Psi_i(Phi(x))| |Psi_j(Phi(x_s))|).

Patches are sampled on a "stride plus tail" grid: range(0, size - k + 1,
stride) plus the last start position size - k when the stride skips it, so
the borders are covered, as the reference code does on both sides.

Everything here works on one example (features [H, W, C]) with static
shapes, so a driver can `jax.vmap` it over a batch axis and `jax.jit` it.
A patch is flattened in (kh, kw, C) order, D = k * k * C.

Why matching is a chunked matmul: the score matrix is [M, P] (style patches
by synthesis patches), ~0.4 GiB at 384 px with 9 style copies and growing
with the fourth power of the side, so it is never built whole: `match` scans
over chunks of the bank keeping a running max and argmax. On XLA:CPU a
matmul of sliced patch rows beats a convolution with the style patches as
filters by 2.6-4x. Scoring a chunk as [chunk, P] and reducing
over the leading axis with max, then the lowest index equal to the max, ran
10-25 % faster than [P, chunk] with jnp.argmax in a round-robin comparison
on this 2-core CPU; with 512-row chunks the scan was no slower than one
unchunked matmul (whose [M, P] output falls out of cache).

Approximate matching (`patchmatch`, --matching=patchmatch): PatchMatch
(Barnes et al., SIGGRAPH 2009) keeps a nearest-neighbour field, one bank
index per synthesis patch, and improves it by propagation (neighbours'
matches, shifted on the style copy's own grid) and random
search, always scoring candidates by the exact NCC, so its cost grows with
synthesis patches times a fixed number of candidates instead of times the
bank. It lives in patchmatch.py; this module keeps the scoring it uses.

Semantic maps (Champandard 2016, "Semantic Style Transfer and Turning
Two-Bit Doodles into Fine Artworks"; alexjc/neural-doodle) take part in the
matching only: a bank built with `semantic_maps` carries the map part of
every style patch as its own unit-normalised columns (`PatchBank.map_patches`)
and a label per patch, and a `SynthesisMap` holds the synthesis side's map
patches, unit-normalised and scaled by sqrt(semantic weight), constant per
level. The score of style patch j for synthesis patch i is then

    <p_i, t_j> / (|p_i| |t_j|) + sqrt(w) <m_i, n_j> / (|m_i| |n_j|),

the feature NCC plus the map NCC (m, n the map parts), so the map part
counts sqrt(w) relative to the features; without a SynthesisMap (w = 0) the
matching is the plain NCC above, computed by exactly the same operations.
"""

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from cnnmrf_jax import grid_winograd

# benchmarks/bench_matching.py on a 2-core CPU: chunks of 256 to 1024 were
# within noise (+-10 %) of each other for relu3_1 / relu4_1 at 256-512 px
# with 1 and 9 copies; 2048 and 4096 were up to 1.2-1.5x slower. 512 keeps
# the per-step score block at chunk * P * 4 bytes (8 MiB at 512 px relu3_1).
DEFAULT_CHUNK_SIZE = 512


def grid_positions(size: int, patch_size: int, stride: int) -> np.ndarray:
  """Start indices of patches along one axis: stride plus tail.

  Returns int32 [n]: range(0, size - patch_size + 1, stride), plus
  size - patch_size if the stride does not land on it, so the last
  patch_size rows (columns) are always covered; with stride <= patch_size
  every position is.
  """
  for name, value in (("size", size), ("patch_size", patch_size),
                      ("stride", stride)):
    if int(value) != value or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if size < patch_size:
    raise ValueError(f"a feature map of side {size} is smaller than the "
                     f"patch size {patch_size}")
  last = size - patch_size
  positions = list(range(0, last + 1, stride))
  if positions[-1] != last:
    positions.append(last)
  return np.asarray(positions, np.int32)


def num_patches(height: int, width: int, patch_size: int, stride: int) -> int:
  """Number of patches on the stride-plus-tail grid of a [height, width] map."""
  return (len(grid_positions(height, patch_size, stride)) *
          len(grid_positions(width, patch_size, stride)))


def _take_grid(x: jnp.ndarray, axis: int, offset: int, size: int,
               patch_size: int, stride: int) -> jnp.ndarray:
  """x indexed along `axis` at grid_positions(...) + offset.

  Uses a strided slice for the regular part and one more slice for the tail,
  so the transpose (used by `fold`) is a cheap pad rather than a scatter.
  """
  last = size - patch_size
  count = last // stride + 1
  start = offset
  limit = offset + (count - 1) * stride + 1
  regular = lax.slice_in_dim(x, start, limit, stride, axis)
  if (count - 1) * stride == last:
    return regular
  tail = lax.slice_in_dim(x, offset + last, offset + last + 1, 1, axis)
  return lax.concatenate([regular, tail], axis)


def _check_map(features, what: str = "features") -> None:
  if features.ndim != 3:
    raise ValueError(f"{what} must be a single feature map [H, W, C] (vmap "
                     f"over batches), got shape {features.shape}")


def extract_patches(features: jnp.ndarray, *, patch_size: int = 3,
                    stride: int = 1) -> jnp.ndarray:
  """Patches of a feature map on the stride-plus-tail grid.

  Args:
    features: [H, W, C].
    patch_size: k, the patch side.
    stride: grid step (the tail position is added, see `grid_positions`).

  Returns:
    [P, D]: P = len(rows) * len(cols) patches in row-major grid order,
    D = k * k * C in (kh, kw, C) order.
  """
  _check_map(features)
  height, width, channels = features.shape
  rows = grid_positions(height, patch_size, stride)
  cols = grid_positions(width, patch_size, stride)
  taps = []
  for di in range(patch_size):
    band = _take_grid(features, 0, di, height, patch_size, stride)
    for dj in range(patch_size):
      taps.append(_take_grid(band, 1, dj, width, patch_size, stride))
  # [R, Cc, k*k, C] -> [P, D]: the (kh, kw) tap index is major to C.
  stacked = jnp.stack(taps, axis=2)
  return stacked.reshape(len(rows) * len(cols),
                         patch_size * patch_size * channels)


def extract_at(features: jnp.ndarray, rows: jnp.ndarray, cols: jnp.ndarray,
               *, patch_size: int = 3) -> jnp.ndarray:
  """Patches of features [H, W, C] whose top-left corners are rows x cols.

  rows [R], cols [Cc] int32 (traced; each + patch_size <= the side): the
  patches of the row-major product grid, [R * Cc, D] in the layout of
  `extract_patches` (D = k * k * C in (kh, kw, C) order). Used by the tiled
  objective, whose tiles hold a slice of the whole map's grid.
  """
  _check_map(features)
  k = patch_size
  taps = jnp.arange(k, dtype=jnp.int32)
  row_index = (rows[:, None] + taps[None, :]).reshape(-1)  # [R * k]
  col_index = (cols[:, None] + taps[None, :]).reshape(-1)  # [Cc * k]
  block = jnp.take(jnp.take(features, row_index, axis=0), col_index, axis=1)
  channels = features.shape[-1]
  block = block.reshape(rows.shape[0], k, cols.shape[0], k, channels)
  return block.transpose(0, 2, 1, 3, 4).reshape(
      rows.shape[0] * cols.shape[0], k * k * channels)


def fold_at(patches: jnp.ndarray, rows: jnp.ndarray, cols: jnp.ndarray, *,
            height: int, width: int, patch_size: int = 3,
            mask: Optional[jnp.ndarray] = None
            ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """The adjoint of `extract_at`: patches [R * Cc, D] summed back into a
  [height, width, C] map at rows x cols, and the count [height, width, 1]
  of (kept, `mask` [R * Cc]) patches covering each position.

  A scatter-add: used where the target is held constant (the MRF's Tbar),
  so no gradient flows through it.
  """
  k = patch_size
  channels = patches.shape[1] // (k * k)
  dtype = patches.dtype
  weights = (jnp.ones(patches.shape[:1], dtype) if mask is None
             else mask.astype(dtype))
  t = (patches * weights[:, None]).reshape(rows.shape[0], cols.shape[0], k,
                                           k, channels)
  taps = jnp.arange(k, dtype=jnp.int32)
  row_index = rows[:, None, None, None] + taps[None, None, :, None]
  col_index = cols[None, :, None, None] + taps[None, None, None, :]
  shape = (rows.shape[0], cols.shape[0], k, k)
  row_index = jnp.broadcast_to(row_index, shape)
  col_index = jnp.broadcast_to(col_index, shape)
  summed = jnp.zeros((height, width, channels), dtype).at[
      row_index, col_index].add(t)
  ones = jnp.broadcast_to(weights.reshape(shape[:2] + (1, 1)), shape)
  count = jnp.zeros((height, width), dtype).at[row_index, col_index].add(
      ones)
  return summed, count[..., None]


def _pad_axis(x: jnp.ndarray, axis: int, low: int, high: int) -> jnp.ndarray:
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (low, high, 0)
  return lax.pad(x, jnp.zeros((), x.dtype), config)


def _fold_axis(t: jnp.ndarray, axis: int, size: int, patch_size: int,
               stride: int) -> jnp.ndarray:
  """Sums taps back onto one axis: the adjoint of taking a grid of windows.

  t has a grid axis at `axis` (len(grid_positions(size, ...)) entries) and
  the tap axis (patch_size entries) right after it; the two become one axis
  of length `size` with out[i] = sum of t[r, d] over grid_positions[r] + d
  == i. The regular part is split by output phase i mod stride: each phase
  is a sum of shifted taps, and the phases interleave by a stack and a
  reshape; the tail window is added with one pad.
  """
  last = size - patch_size
  count = last // stride + 1
  regular = lax.slice_in_dim(t, 0, count, axis=axis)
  per_phase = -(-size // stride)
  phases = []
  for phase in range(stride):
    acc = None
    # Output i = stride * q + phase receives tap d = phase + stride * m of
    # grid entry q - m.
    for m, d in enumerate(range(phase, patch_size, stride)):
      tap = lax.index_in_dim(regular, d, axis=axis + 1, keepdims=False)
      tap = _pad_axis(tap, axis, m, per_phase - m - count)
      acc = tap if acc is None else acc + tap
    if acc is None:  # stride > patch_size: this phase is never covered
      shape = list(regular.shape)
      del shape[axis + 1]
      shape[axis] = per_phase
      acc = jnp.zeros(shape, t.dtype)
    phases.append(acc)
  out = jnp.stack(phases, axis=axis + 1)
  shape = list(out.shape)
  shape[axis:axis + 2] = [per_phase * stride]
  out = lax.slice_in_dim(out.reshape(shape), 0, size, axis=axis)
  if (count - 1) * stride != last:
    tail = lax.index_in_dim(t, count, axis=axis, keepdims=False)
    out = out + _pad_axis(tail, axis, last, 0)
  return out


def fold(patches: jnp.ndarray, *, height: int, width: int, channels: int,
         patch_size: int, stride: int, mask: Optional[jnp.ndarray] = None
         ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Places patches back at their grid positions, summing overlaps.

  The adjoint of `extract_patches` (tests/patches_test.py checks it against
  jax.linear_transpose and explicit loops). Written as shifted sums per
  output phase rather than as the transpose of the strided slices: that
  transpose is ~100 separate pad kernels per objective, which took 2x the
  run time and 2x the compile time of this form on XLA:CPU.

  Args:
    patches: [P, D] in `extract_patches` layout for a [height, width,
      channels] map.
    mask: optional [P] bool or 0/1; patches with mask 0 are left out of both
      the sum and the count.

  Returns:
    summed [H, W, C] and count [H, W, 1], the number of (kept) patches
    covering each position, in the patches' dtype.
  """
  p = num_patches(height, width, patch_size, stride)
  d = patch_size * patch_size * channels
  if patches.shape != (p, d):
    raise ValueError(
        f"fold: expected patches of shape [{p}, {d}] for a [{height}, "
        f"{width}, {channels}] map with patch_size={patch_size}, "
        f"stride={stride}, got {patches.shape}")
  if mask is not None and mask.shape != (p,):
    raise ValueError(f"fold: mask must have shape [{p}], got {mask.shape}")
  dtype = patches.dtype
  rows = len(grid_positions(height, patch_size, stride))
  cols = len(grid_positions(width, patch_size, stride))

  def place(flat, c):
    # [P, k*k*c] -> [rows, kh, cols, kw, c]: each grid axis next to its taps.
    t = flat.reshape(rows, cols, patch_size, patch_size, c)
    t = t.transpose(0, 2, 1, 3, 4)
    t = _fold_axis(t, 2, width, patch_size, stride)  # [rows, kh, W, c]
    return _fold_axis(t, 0, height, patch_size, stride)  # [H, W, c]

  ones = jnp.ones((p, patch_size * patch_size), dtype)
  if mask is not None:
    weights = mask.astype(dtype)
    patches = patches * weights[:, None]
    ones = ones * weights[:, None]
  return place(patches, channels), place(ones, 1)


class PatchBank(NamedTuple):
  """Style patches ready for matching; a pytree of arrays only.

  Built once per pyramid level; a driver may stack banks of equal M along a
  leading batch axis and vmap over it.

  Attributes:
    patches: [M, D] raw style patches Psi_j(Phi(x_s)), the targets.
    inv_norms: [M] 1 / |Psi_j|, 0 where the patch is all zero.
    valid: [M] bool, False for all-zero patches, which are never matched
      (their NCC is 0/0 in the reference).
    map_patches: None, or [M, Dm] the style patches' semantic-map part
      (Dm = k * k * L for L label channels), each of unit norm (0 where the
      map is all zero); matching only, never a target.
    labels: None, or [M] int32, the label of each patch's centre cell.
  """
  patches: jnp.ndarray
  inv_norms: jnp.ndarray
  valid: jnp.ndarray
  map_patches: Optional[jnp.ndarray] = None
  labels: Optional[jnp.ndarray] = None


class SynthesisMap(NamedTuple):
  """The synthesis side's semantic-map patches at one layer and level.

  Constant during a level (the content map does not change), so the MRF
  term builds it once with its targets (`synthesis_map`).

  Attributes:
    patches: [P, Dm] map patches on the synthesis grid, each of unit norm
      times sqrt(semantic weight).
    labels: [P] int32, the label of each patch's centre cell.
  """
  patches: jnp.ndarray
  labels: jnp.ndarray


def bank_size(shapes: Sequence[Sequence[int]], patch_size: int = 3,
              stride: int = 2) -> int:
  """M of `build_bank` for maps of these shapes ((H, W) or (H, W, C))."""
  return sum(num_patches(int(s[0]), int(s[1]), patch_size, stride)
             for s in shapes)


def build_bank(feature_maps: Sequence[jnp.ndarray], *, patch_size: int = 3,
               stride: int = 2,
               semantic_maps: Optional[Sequence[np.ndarray]] = None
               ) -> PatchBank:
  """Patches of every style map (augmented copy or style image), normalised.

  Args:
    feature_maps: sequence of [H_i, W_i, C] (sizes may differ, C may not).
    semantic_maps: None, or one label map [H_i, W_i, L] per feature map (its
      semantic map at the layer's resolution, `semantic.layer_map`): the
      bank then carries their patches, normalised apart from the features'
      (`map_patches`), and a label per patch (`labels`).

  Returns:
    PatchBank with M = bank_size(shapes) patches, map by map in order.
  """
  if not len(feature_maps):
    raise ValueError("build_bank needs at least one feature map")
  for i, f in enumerate(feature_maps):
    _check_map(f, f"feature_maps[{i}]")
  channels = {f.shape[-1] for f in feature_maps}
  if len(channels) != 1:
    raise ValueError(f"build_bank: all style maps must have the same number "
                     f"of channels, got {sorted(channels)}")
  bank = _build_bank_jit(list(feature_maps), patch_size=patch_size,
                         stride=stride)
  if semantic_maps is None:
    return bank
  if len(semantic_maps) != len(feature_maps):
    raise ValueError(f"build_bank: {len(semantic_maps)} semantic maps for "
                     f"{len(feature_maps)} feature maps")
  for i, (f, m) in enumerate(zip(feature_maps, semantic_maps)):
    if tuple(m.shape[:2]) != tuple(f.shape[:2]) or m.ndim != 3:
      raise ValueError(f"build_bank: semantic_maps[{i}] has shape {m.shape}, "
                       f"expected [{f.shape[0]}, {f.shape[1]}, L]")
  unit, labels = zip(*(map_patches(m, patch_size=patch_size, stride=stride)
                       for m in semantic_maps))
  return bank._replace(map_patches=jnp.concatenate(unit, axis=0),
                       labels=jnp.concatenate(labels, axis=0))


def map_patches(label_map: np.ndarray, *, patch_size: int = 3,
                stride: int = 2) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Unit-normalised patches of a label map and their centre labels.

  Args:
    label_map: [H, W, L] a semantic map at a layer's resolution (label
      fractions per cell).

  Returns:
    (patches [P, k*k*L] float32, each of unit norm or all zero where the map
    is, labels [P] int32: the argmax over L of the patch's centre cell), on
    the stride-plus-tail grid.
  """
  label_map = jnp.asarray(label_map, jnp.float32)
  _check_map(label_map, "label_map")
  flat = extract_patches(label_map, patch_size=patch_size, stride=stride)
  sq_norms = jnp.sum(jnp.square(flat), axis=1, keepdims=True)
  has_norm = sq_norms > 0
  unit = flat * jnp.where(has_norm, lax.rsqrt(jnp.where(has_norm, sq_norms,
                                                        1)), 0)
  centre = (patch_size // 2) * patch_size + patch_size // 2
  channels = label_map.shape[-1]
  labels = jnp.argmax(flat.reshape(-1, patch_size * patch_size, channels)
                      [:, centre], axis=1).astype(jnp.int32)
  return unit, labels


def synthesis_map(label_map: np.ndarray, *, weight: float,
                  patch_size: int = 3, stride: int = 2) -> SynthesisMap:
  """The synthesis side's `SynthesisMap` of a label map [H, W, L] at one
  layer: its unit patches times sqrt(weight), so that in the matching the
  map part counts sqrt(weight) relative to the (unit) feature part."""
  if not math.isfinite(weight) or weight < 0:
    raise ValueError(f"semantic weight must be finite and >= 0, got "
                     f"{weight!r}")
  unit, labels = map_patches(label_map, patch_size=patch_size, stride=stride)
  return SynthesisMap(patches=unit * np.float32(math.sqrt(weight)),
                      labels=labels)


def _build_bank_impl(feature_maps, patch_size, stride):
  patches = jnp.concatenate(
      [extract_patches(f, patch_size=patch_size, stride=stride)
       for f in feature_maps], axis=0)
  sq_norms = jnp.sum(jnp.square(patches), axis=1)
  valid = sq_norms > 0
  inv_norms = jnp.where(valid, lax.rsqrt(jnp.where(valid, sq_norms, 1)), 0)
  return PatchBank(patches=patches, inv_norms=inv_norms.astype(patches.dtype),
                   valid=valid)


# Jitted once per set of map shapes: run eagerly, the ~12 slices per map of
# every copy compiled one by one (7 of the 13 s of building a 9-copy level at
# 384 px); jitted, XLA also writes the pieces straight into the bank.
_build_bank_jit = jax.jit(_build_bank_impl,
                          static_argnames=("patch_size", "stride"))


def _check_bank(patches, bank: PatchBank) -> None:
  if patches.ndim != 2:
    raise ValueError(f"patches must be [P, D] (vmap over batches), got shape "
                     f"{patches.shape}")
  if bank.patches.ndim != 2:
    raise ValueError(f"bank.patches must be [M, D] (vmap over batches), got "
                     f"shape {bank.patches.shape}")
  m, d = bank.patches.shape
  if patches.shape[1] != d:
    raise ValueError(f"patch length mismatch: synthesis patches have D="
                     f"{patches.shape[1]}, the bank has D={d} (different "
                     f"layer, channels or patch size?)")
  if bank.inv_norms.shape != (m,) or bank.valid.shape != (m,):
    raise ValueError(f"bank.inv_norms and bank.valid must be [{m}], got "
                     f"{bank.inv_norms.shape} and {bank.valid.shape}")
  if m == 0:
    raise ValueError("the patch bank is empty")


def _along(vector, axis: int):
  """A bank-axis vector [c] shaped to broadcast along `axis` of [c, P]
  (axis 0) or [P, c] (axis 1) scores."""
  return vector[:, None] if axis == 0 else vector[None, :]


def _normalise_scores(dots, inv_norms, valid, axis: int = 0):
  """[c, P] (axis 0; [P, c] with axis 1) dots of c bank patches ->
  <p, t> / |t| (|p| is applied later).

  Invalid (all-zero) bank rows score -inf so they never win.
  """
  return jnp.where(_along(valid, axis), dots * _along(inv_norms, axis),
                   -jnp.inf)


def _block_best(scores, axis: int = 0):
  """Max over the block axis (0 of [c, P], 1 of [P, c]) and its lowest
  index: ([P], [P] int32).

  max then min-index-of-equals vectorises on XLA:CPU, where the variadic
  reduce behind jnp.argmax does not (~10-20 % of the whole match).
  """
  best = jnp.max(scores, axis=axis, keepdims=True)
  iota = lax.broadcasted_iota(jnp.int32, scores.shape, axis)
  first = jnp.min(jnp.where(scores == best, iota, scores.shape[axis]),
                  axis=axis)
  best = jnp.squeeze(best, axis)
  # A column of all -inf (only invalid rows) equals its max everywhere; any
  # index is fine there since -inf never beats the running best.
  return best, first.astype(jnp.int32)


def _check_chunk_size(chunk_size) -> None:
  if int(chunk_size) != chunk_size or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer, got "
                     f"{chunk_size!r}")


def _check_compute_dtype(compute_dtype) -> None:
  if compute_dtype is not None and not jnp.issubdtype(
      jnp.dtype(compute_dtype), jnp.floating):
    raise ValueError(f"compute_dtype must be a float dtype, got "
                     f"{compute_dtype!r}")


def _semantic_scores(dots, inv_norms, valid, synth_inv_norms, map_block,
                     synth_map, axis: int = 0):
  """[c, P] (axis 0; [P, c] with axis 1) combined scores of c bank
  patches: the feature NCC <p, t> / (|p| |t|) plus the map part <m, n>
  (n unit, m unit times sqrt(w): `SynthesisMap`). Invalid bank rows score
  -inf."""
  operands = (map_block.astype(dots.dtype), synth_map.astype(dots.dtype))
  map_dots = lax.dot_general(*(operands if axis == 0 else operands[::-1]),
                             (((1,), (1,)), ((), ())),
                             preferred_element_type=dots.dtype)
  return jnp.where(_along(valid, axis),
                   dots * _along(inv_norms, axis) *
                   _along(synth_inv_norms, 1 - axis) + map_dots, -jnp.inf)


def _scan_bank(dots_of, bank: PatchBank, num_p: int, chunk_size: int,
               dtype, semantic=None, axis: int = 0
               ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Running max and argmax of <p, t_j> / |t_j| over chunks of the bank.

  dots_of(block [c, D], start) -> [c, P] raw dot products in `dtype`
  ([P, c] with axis=1: the bank along the minor axis).
  Memory grows with chunk_size * P, not M * P. The last partial chunk is
  scored outside the loop instead of padding the bank (padding to a round
  size costs as much as the extra rows). Returns ([P] best, [P] int32
  index), ties to the lowest bank index. semantic: None, or
  (synth_inv_norms [P], synth map patches [P, Dm]): the scores are then
  the combined ones of `_semantic_scores` (|p| already applied).
  """
  m = bank.patches.shape[0]
  chunk = min(int(chunk_size), m)
  num_full = m // chunk

  def update(carry, start, size):
    best, best_index = carry
    block = lax.dynamic_slice_in_dim(bank.patches, start, size, 0)
    inv = lax.dynamic_slice_in_dim(bank.inv_norms, start, size, 0)
    valid = lax.dynamic_slice_in_dim(bank.valid, start, size, 0)
    if semantic is None:
      scores = _normalise_scores(dots_of(block, start), inv.astype(dtype),
                                 valid, axis)
    else:
      map_block = lax.dynamic_slice_in_dim(bank.map_patches, start, size, 0)
      scores = _semantic_scores(dots_of(block, start), inv.astype(dtype),
                                valid, semantic[0].astype(dtype), map_block,
                                semantic[1], axis)
    score, index = _block_best(scores, axis)
    # Strictly greater: an earlier chunk keeps its tie.
    better = score > best
    return (jnp.where(better, score, best),
            jnp.where(better, index + start, best_index))

  carry = (jnp.full((num_p,), -jnp.inf, dtype), jnp.zeros((num_p,),
                                                          jnp.int32))
  if num_full == 1:
    carry = update(carry, 0, chunk)
  else:
    carry = lax.fori_loop(
        0, num_full,
        lambda i, c: update(c, (i * chunk).astype(jnp.int32), chunk), carry)
  if m > num_full * chunk:
    carry = update(carry, num_full * chunk, m - num_full * chunk)
  return carry


def _finish(best, best_index, sq_norms):
  """Divides by |p|; unmatched patches (all zero, or meeting only all-zero
  bank patches) get score -inf and index 0."""
  has_norm = sq_norms > 0
  scores = jnp.where(has_norm,
                     best * lax.rsqrt(jnp.where(has_norm, sq_norms, 1)),
                     -jnp.inf)
  matched = scores > -jnp.inf
  return jnp.where(matched, best_index, 0), scores


def _inv_norms(sq_norms):
  has_norm = sq_norms > 0
  return jnp.where(has_norm, lax.rsqrt(jnp.where(has_norm, sq_norms, 1)), 0)


def _check_semantic(bank: PatchBank, synth_map: Optional[SynthesisMap],
                    num_p: int) -> None:
  if synth_map is None:
    return
  if bank.map_patches is None or bank.labels is None:
    raise ValueError("a SynthesisMap was given but the bank has no semantic "
                     "maps (build_bank(..., semantic_maps=...))")
  if synth_map.patches.ndim != 2 or synth_map.patches.shape[0] != num_p:
    raise ValueError(f"the SynthesisMap has patches {synth_map.patches.shape}"
                     f", expected [{num_p}, Dm] for {num_p} synthesis patches")
  if synth_map.patches.shape[1] != bank.map_patches.shape[1]:
    raise ValueError(f"map patch length mismatch: synthesis Dm="
                     f"{synth_map.patches.shape[1]}, bank Dm="
                     f"{bank.map_patches.shape[1]} (maps with different "
                     "label counts?)")


def _finish_semantic(best, best_index, patches, bank):
  """The combined scan's result as `_finish`'s: indices, and the feature
  NCC of the chosen patch (so that scores, thresholds and mean NCC mean
  what they mean without maps); all-zero synthesis patches are
  unmatched."""
  inv_p = _inv_norms(jnp.sum(jnp.square(patches), axis=1))
  chosen = jnp.take(bank.patches, best_index, axis=0).astype(patches.dtype)
  ncc = (jnp.sum(chosen * patches, axis=1) * inv_p *
         jnp.take(bank.inv_norms, best_index).astype(patches.dtype))
  matched = (inv_p > 0) & (best > -jnp.inf)
  return (jnp.where(matched, best_index, 0),
          jnp.where(matched, ncc, -jnp.inf))


def match(patches: jnp.ndarray, bank: PatchBank, *,
          chunk_size: int = DEFAULT_CHUNK_SIZE, compute_dtype=None,
          synth_map: Optional[SynthesisMap] = None
          ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Nearest style patch by normalised cross-correlation (Eq. 3).

  Scans over chunks of `chunk_size` bank patches keeping a running max and
  argmax, so memory grows with chunk_size * P, not M * P. Ties go to the
  lowest bank index, as np.argmax; the result does not depend on
  chunk_size.

  Args:
    patches: [P, D] synthesis patches.
    bank: PatchBank with patches [M, D].
    chunk_size: bank patches scored per step.
    compute_dtype: dtype of the dot products' operands (None: the patches'
      dtype); they accumulate in the patches' dtype. bfloat16 halves the
      traffic on accelerators (and ran 2x faster on an AVX512-BF16 CPU), at
      the cost of near-ties going either way.
    synth_map: None, or the synthesis patches' `SynthesisMap` (the bank
      then needs its map part): the argmax is over feature NCC plus map
      NCC times sqrt(w); the scores returned are still the feature NCC of
      the chosen patch.

  Returns:
    indices [P] int32 into the bank and scores [P] (the NCC, in the patches'
    dtype). A synthesis patch that is all zero, or that meets only all-zero
    bank patches, is unmatched: score -inf and index 0.
  """
  _check_bank(patches, bank)
  _check_chunk_size(chunk_size)
  _check_compute_dtype(compute_dtype)
  _check_semantic(bank, synth_map, patches.shape[0])
  dtype = jnp.result_type(patches.dtype, bank.patches.dtype)
  patches = patches.astype(dtype)
  operand = patches.astype(compute_dtype or dtype)

  def dots_of(block, start):
    del start
    return lax.dot_general(block.astype(operand.dtype), operand,
                           (((1,), (1,)), ((), ())),
                           preferred_element_type=dtype)

  if synth_map is not None:
    semantic = (_inv_norms(jnp.sum(jnp.square(patches), axis=1)),
                synth_map.patches)
    best, best_index = _scan_bank(dots_of, bank, patches.shape[0],
                                  chunk_size, dtype, semantic)
    return _finish_semantic(best, best_index, patches, bank)
  best, best_index = _scan_bank(dots_of, bank, patches.shape[0], chunk_size,
                                dtype)
  return _finish(best, best_index, jnp.sum(jnp.square(patches), axis=1))


MATCHINGS = ("matmul", "conv", "winograd")


def _grid_conv(features, filters, patch_size, stride, dtype):
  """Correlations of every filter with the patches on the stride-plus-tail
  grid of features [H, W, C]: filters [k, k, C, c] -> [P, c].

  One strided VALID convolution covers the regular grid; the tail row, the
  tail column and their corner (when the stride skips them) are three
  narrow convolutions, so nothing is computed off the grid.
  """
  height, width, _ = features.shape
  k = patch_size

  def conv(x, strides):
    return lax.conv_general_dilated(
        x[None], filters, strides, "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=dtype)[0]

  row_tail = (height - k) % stride != 0
  col_tail = (width - k) % stride != 0
  out = conv(features, (stride, stride))
  if col_tail:
    out = jnp.concatenate(
        [out, conv(features[:, width - k:], (stride, 1))], axis=1)
  if row_tail:
    bottom = conv(features[height - k:], (1, stride))
    if col_tail:
      bottom = jnp.concatenate(
          [bottom, conv(features[height - k:, width - k:], (1, 1))], axis=1)
    out = jnp.concatenate([out, bottom], axis=0)
  return out.reshape(-1, out.shape[-1])


def match_map(features: jnp.ndarray, bank: PatchBank, *, patch_size: int = 3,
              stride: int = 2, chunk_size: int = DEFAULT_CHUNK_SIZE,
              method: str = "matmul", compute_dtype=None,
              synth_map: Optional[SynthesisMap] = None
              ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """`match` of every patch on the stride-plus-tail grid of a feature map.

  Two formulations of the same scores:
    matmul: extract the [P, D] synthesis patches once, then a [chunk, D] x
      [D, P] product per chunk. On XLA:CPU it ran 2.6-4x faster than conv
      (benchmarks/bench_synthesis.py --matching compares them in
      the whole iteration), so it is the default.
    conv: the chunk's patches as k x k filters over the map at the grid
      positions only, no [P, D] copy of the map; cuDNN-style convolutions
      may win on accelerators.
    winograd: the regular grid's dots by polyphase Winograd
      (grid_winograd: 0.69 of the flops at stride 2, patch 3), the tail
      row and column as matmul; the scores come [P, c], reduced along c.
  All give the same indices up to rounding of near-ties.

  Args:
    features: [H, W, C] synthesis features.
    bank: PatchBank of [M, k*k*C] patches.
    method: 'matmul', 'conv' or 'winograd'.
    compute_dtype: see `match`.
    synth_map: see `match`: a `SynthesisMap` on this grid, or None.

  Returns:
    (indices [P] int32, scores [P]) as `match`, P = num_patches(H, W, ...).
  """
  _check_map(features)
  if method not in MATCHINGS:
    raise ValueError(f"--matching: unknown method {method!r}; expected one "
                     f"of {MATCHINGS}")
  if method == "matmul":
    synth = extract_patches(features, patch_size=patch_size, stride=stride)
    return match(synth, bank, chunk_size=chunk_size,
                 compute_dtype=compute_dtype, synth_map=synth_map)
  height, width, channels = features.shape
  num_p = num_patches(height, width, patch_size, stride)
  _check_bank(np.empty((0, patch_size * patch_size * channels)), bank)
  _check_chunk_size(chunk_size)
  _check_compute_dtype(compute_dtype)
  _check_semantic(bank, synth_map, num_p)
  dtype = jnp.result_type(features.dtype, bank.patches.dtype)
  features = features.astype(dtype)
  operand = features.astype(compute_dtype or dtype)

  if method == "winograd":
    dots_of, axis = _winograd_dots(operand, patch_size, stride, dtype), 1
  else:
    def dots_of(block, start):
      del start
      filters = block.astype(operand.dtype).reshape(
          -1, patch_size, patch_size, channels).transpose(1, 2, 3, 0)
      return _grid_conv(operand, filters, patch_size, stride, dtype).T
    axis = 0

  # |p|^2 of each grid patch from the channel sums of squares, a [H, W, 1]
  # map: the patches themselves are never extracted.
  sq_map = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  sq_norms = jnp.sum(extract_patches(sq_map, patch_size=patch_size,
                                     stride=stride), axis=1)
  if synth_map is not None:
    best, best_index = _scan_bank(dots_of, bank, num_p, chunk_size, dtype,
                                  (_inv_norms(sq_norms), synth_map.patches),
                                  axis)
    # The chosen patches' feature NCC needs the synthesis patches once.
    return _finish_semantic(best, best_index, extract_patches(
        features, patch_size=patch_size, stride=stride), bank)
  best, best_index = _scan_bank(dots_of, bank, num_p, chunk_size, dtype,
                                axis=axis)
  return _finish(best, best_index, sq_norms)


def _winograd_dots(operand, patch_size, stride, dtype):
  """dots_of for match_map's winograd form: block [c, D] -> [P, c].

  The regular grid by grid_winograd (the map transformed once, here, not
  per chunk); the tail column and row (grid_positions) as plain products
  with their [n, D] patches, taken once.
  """
  height, width, channels = operand.shape
  transformed = grid_winograd.transform_map(operand, patch_size=patch_size,
                                            stride=stride)
  regular_rows = (height - patch_size) // stride + 1
  col_tail = len(grid_positions(width, patch_size, stride)) > (
      (width - patch_size) // stride + 1)
  row_tail = len(grid_positions(height, patch_size, stride)) > regular_rows
  # [regular rows, D]: the last column's patches; [all columns, D]: the
  # last row's (its corner included).
  col_patches = (extract_patches(operand[:, width - patch_size:],
                                 patch_size=patch_size, stride=stride)
                 [:regular_rows] if col_tail else None)
  row_patches = (extract_patches(operand[height - patch_size:],
                                 patch_size=patch_size, stride=stride)
                 if row_tail else None)

  def tail_dots(tail, block):
    return lax.dot_general(tail, block, (((1,), (1,)), ((), ())),
                           preferred_element_type=dtype)

  def dots_of(block, start):
    del start
    block = block.astype(operand.dtype)
    dots = grid_winograd.grid_dots(
        transformed, block.reshape(-1, patch_size, patch_size, channels),
        height=height, width=width, stride=stride, dtype=dtype)
    if col_tail:                                      # [R, Cc + 1, c]
      dots = jnp.concatenate(
          [dots, tail_dots(col_patches, block)[:, None]], axis=1)
    if row_tail:                                      # [R + 1, Cc', c]
      dots = jnp.concatenate(
          [dots, tail_dots(row_patches, block)[None]], axis=0)
    return dots.reshape(-1, block.shape[0])

  return dots_of


# ----------------------------------------------------------------------------
# Approximate matching: PatchMatch (Barnes et al., SIGGRAPH 2009).

# The approximate matching, beside the exact scans of MATCHINGS: a
# nearest-neighbour field carried from one evaluation to the next.
PATCHMATCH = "patchmatch"
# The default --matching: the exact scan in the form `scan_method` picks.
EXACT = "exact"
# Every --matching: the exact scans, exact, patchmatch, and auto (the plan
# picks an exact scan or patchmatch per level, plan.choose_matching).
MATCHING_CHOICES = MATCHINGS + (EXACT, PATCHMATCH, "auto")


def scan_method(matching: str, *, patch_size: int, stride: int,
                backend: Optional[str] = None) -> str:
  """The form of match_map an exact scan runs for --matching: the one it
  names, or (exact, auto's exact levels, patchmatch's scans) winograd on
  CPU where the grid allows it (grid_winograd.supports), matmul otherwise.

  On a 2-core AVX2 CPU a whole CNNMRF iteration with winograd's scan took
  0.86-0.98 of matmul's time at 384-512 px and 1.02-1.06 at 256 px, the
  gain growing with the bank (README, Speed and memory; the scan alone
  1.16x at relu3_1, benchmarks/bench_matching.py --methods): its many
  small batched products run below the large matmul's rate. On
  accelerators the single large matmul is what their libraries run best;
  winograd is not measured there.
  """
  if matching in MATCHINGS:
    return matching
  backend = backend or jax.default_backend()
  if backend == "cpu" and grid_winograd.supports(patch_size, stride):
    return "winograd"
  return "matmul"
