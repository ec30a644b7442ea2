"""PatchMatch on the device: an approximate nearest-neighbour field.

PatchMatch (Barnes et al., SIGGRAPH 2009) keeps a nearest-neighbour field,
one bank index per synthesis patch, and improves it by propagation
(neighbours' matches, shifted on the style copy's own grid, `BankGrid`) and
random search, always scoring candidates by the exact NCC of patches.py
(feature NCC, plus the map NCC with semantic maps), so its cost grows with
synthesis patches times a fixed number of candidates instead of times the
bank. The field is carried from one evaluation to the next and from a
coarser level to a finer one (`upsample_field`); terms.py keeps it in the
level's targets. `--matching=patchmatch` (patches.PATCHMATCH) selects it.
"""

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from cnnmrf_jax import patches as patch_ops


class BankGrid(NamedTuple):
  """Where each bank patch lies on its copy's grid.

  starts [S]: first bank index of each copy's map; rows [S], cols [S]: its
  stride-plus-tail grid. `bank_grid` makes it (numpy) from the maps'
  shapes, in `build_bank`'s order; a driver may stack the grids of several
  pairs (jnp, traced) and vmap `patchmatch` over them, padding pairs with
  fewer copies by `pad_grid`.
  """
  starts: np.ndarray
  rows: np.ndarray
  cols: np.ndarray


def bank_grid(shapes: Sequence[Sequence[int]], patch_size: int = 3,
              stride: int = 2) -> BankGrid:
  """The `BankGrid` of `build_bank` over maps of these (H, W[, C])."""
  rows = [len(patch_ops.grid_positions(int(s[0]), patch_size, stride)) for s in shapes]
  cols = [len(patch_ops.grid_positions(int(s[1]), patch_size, stride)) for s in shapes]
  sizes = np.asarray(rows) * np.asarray(cols)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  return BankGrid(starts.astype(np.int32), np.asarray(rows, np.int32),
                  np.asarray(cols, np.int32))


def pad_grid(grid: BankGrid, num_copies: int, bank_size: int) -> BankGrid:
  """The grid with copies appended up to `num_copies` that hold no bank
  index (they start at `bank_size`, past every index), so pairs with fewer
  style copies share one batch."""
  missing = num_copies - len(grid.starts)
  if missing < 0:
    raise ValueError(f"pad_grid: the grid has {len(grid.starts)} copies, "
                     f"more than {num_copies}")
  pad = lambda a, value: np.concatenate(
      [np.asarray(a, np.int32), np.full((missing,), value, np.int32)])
  return BankGrid(pad(grid.starts, bank_size), pad(grid.rows, 1),
                  pad(grid.cols, 1))


def search_radii(grid: BankGrid) -> np.ndarray:
  """Random search radii R, R/2, ..., 1 (int32 [n]), R the largest grid
  side of any copy (Barnes et al. 2009, section 3.2, alpha = 1/2)."""
  largest = int(max(np.max(grid.rows), np.max(grid.cols)))
  radii = []
  radius = largest
  while radius >= 1:
    radii.append(radius)
    radius //= 2
  return np.asarray(radii, np.int32)


def _grid_coords(index, grid: BankGrid):
  """Bank indices -> (copy, row, col) on that copy's grid."""
  starts = jnp.asarray(grid.starts)
  # compare_all: S (copies) is small, and the default scan method compiles
  # to a loop.
  copy = jnp.searchsorted(starts, index, side="right",
                          method="compare_all").astype(jnp.int32) - 1
  copy = jnp.maximum(copy, 0)
  local = index - starts[copy]
  cols = jnp.asarray(grid.cols)[copy]
  return copy, local // cols, local % cols


def _grid_index(copy, row, col, grid: BankGrid):
  """(copy, row, col), clamped into the copy's grid -> bank index."""
  rows = jnp.asarray(grid.rows)[copy]
  cols = jnp.asarray(grid.cols)[copy]
  row = jnp.clip(row, 0, rows - 1)
  col = jnp.clip(col, 0, cols - 1)
  return jnp.asarray(grid.starts)[copy] + row * cols + col


# The random search's randomness: a counter-based hash rather than
# jax.random. Every jax.random call compiles to its own threefry kernel,
# 0.4-0.8 s of XLA:CPU compile time apiece (measured on a 2-core CPU), and
# the solver's programs hold one per MRF layer; the hash compiles in 0.1 s.
# Random search needs draws that are uniform and independent of the patch
# position, not cryptographic ones. A key is a uint32 [2] (a raw
# jax.random.PRNGKey works as one); results are the same under vmap, jit and
# on any backend (integer arithmetic only).


def _mix32(x: jnp.ndarray) -> jnp.ndarray:
  """lowbias32, an invertible 32-bit integer hash (C. Wellons, "Prospecting
  for hash functions", 2018; hash-prospector), on uint32 arrays."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _key_words(key: jnp.ndarray) -> jnp.ndarray:
  """A key as uint32 [2] (a typed jax.random key's data)."""
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return key.astype(jnp.uint32).reshape(-1)


def _hash_bits(key: jnp.ndarray, count: int) -> jnp.ndarray:
  """count uint32 hashes of the counters 0..count-1 under key uint32 [2]."""
  key = _key_words(key)
  counter = jnp.arange(count, dtype=jnp.uint32)
  return _mix32(_mix32(counter ^ key[0]) + key[1] * jnp.uint32(0x9E3779B9))


def hash_uniform(key: jnp.ndarray, shape: Sequence[int]) -> jnp.ndarray:
  """float32 draws uniform in [0, 1) (24 bits) of the given shape."""
  bits = _hash_bits(key, math.prod(shape))
  return ((bits >> 8).astype(jnp.float32) *
          np.float32(1.0 / (1 << 24))).reshape(tuple(shape))


def fold_key(key: jnp.ndarray, data) -> jnp.ndarray:
  """A new key uint32 [2] from a key and an integer (traced or not)."""
  key = _key_words(key)
  data = jnp.asarray(data).astype(jnp.uint32)
  return jnp.stack([
      _mix32(key[0] ^ _mix32(data + jnp.uint32(0x632BE5AB))),
      _mix32(key[1] + _mix32(data * jnp.uint32(0x9E3779B9) +
                             jnp.uint32(0x85157AF5)))])


def split_key(key: jnp.ndarray, num: int) -> jnp.ndarray:
  """num new keys uint32 [num, 2] from one, for `hash_uniform`."""
  # Counters past any that hash_uniform uses directly under key would
  # alias it; the extra mixing with a constant keeps the streams apart.
  return _mix32(_hash_bits(key, 2 * num) ^ jnp.uint32(0x68E31DA4)).reshape(
      num, 2)


def _candidate_scores(patches, inv_p, bank: patch_ops.PatchBank, index, synth_map):
  """The score that ranks bank patch index(i) for synthesis patch i ([P]).

  Without maps <p_i, t> / |t| (|p_i| is common to every candidate of
  patch i, so it is left out, as in `patch_ops._scan_bank`); with maps the feature
  NCC plus the map part, as `patch_ops._semantic_scores`. Invalid bank rows score
  -inf, so they never win.
  """
  # Row-wise dot products as an einsum (a dot_general with a batch
  # dimension): written as sum(a * b, axis=1), under vmap (a [N, P, D]
  # product reduced over its minor axis) inside the candidate loop XLA:CPU
  # ran it 15x slower. Indices are in bounds (`_grid_index` clamps).
  take = lambda table: jnp.take(table, index, axis=0, mode="clip")
  targets = take(bank.patches).astype(patches.dtype)
  score = jnp.einsum("pd,pd->p", patches, targets,
                     precision=lax.Precision.HIGHEST) * take(
      bank.inv_norms).astype(patches.dtype)
  if synth_map is not None:
    maps = take(bank.map_patches).astype(patches.dtype)
    score = score * inv_p + jnp.einsum(
        "pd,pd->p", synth_map.patches.astype(patches.dtype), maps,
        precision=lax.Precision.HIGHEST)
  return jnp.where(take(bank.valid), score, -jnp.inf)


def patchmatch(patches: jnp.ndarray, bank: patch_ops.PatchBank, grid: BankGrid,
               field: jnp.ndarray, key: jnp.ndarray, *,
               synth_grid: Tuple[int, int], num_passes: int = 1,
               jumps: Sequence[int] = (4, 2, 1),
               radii: Optional[jnp.ndarray] = None, samples: int = 1,
               num_random: int = 1, num_hops: int = 1,
               num_shared: int = 0,
               synth_stride: int = 2, style_stride: int = 2,
               synth_map: Optional[patch_ops.SynthesisMap] = None
               ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Improves a nearest-neighbour field by PatchMatch, scored by exact NCC.

  Each pass: propagation by jump flooding (Barnes et al. 2009 propagate
  from the left and upper neighbours and alternate; parallel versions
  flood with steps 2^k ... 1: for each step d in `jumps` and each of the
  four grid directions, the match of the neighbour d grid positions away,
  shifted by d on the style copy's own grid), random search (`samples`
  candidates uniform within radius min(r, copy's larger side) around the
  current match on its copy's grid for each r in `radii`), `num_random`
  uniformly random bank patches, and with several copies `num_hops` hops
  (the current match's relative position in a random other copy: the
  copies are rotations and scales of the same images). A candidate
  replaces the match only if its score is strictly higher, so a field
  never gets worse for fixed patches. Cost per pass: P x
  `candidates_per_pass` dot products of length D (gathered from the
  bank), not P x M.

  Args:
    patches: [P, D] synthesis patches on a synth_grid (rows, cols) grid.
    bank: the patch_ops.PatchBank [M, D]; grid: its `BankGrid` (numpy, or traced
      arrays under vmap).
    field: [P] int32 current matches (random, or carried over).
    key: the random search's key, uint32 [2] (`hash_uniform`; a raw
      jax.random.PRNGKey is one).
    radii: int32 [n] random search radii, largest first; None:
      `search_radii(grid)` (grid then numpy). Its length is static.
    samples: random search candidates per radius and pass.
    num_random: uniformly random bank patches per pass.
    num_hops: hops to another copy per pass (with several copies).
    num_shared: random bank patches per pass scored against every
      synthesis patch as one matrix product (0: none).
    num_passes: an int, or a traced int32 scalar.
    synth_stride, style_stride: the grids' strides; a neighbour d
      synthesis grid positions away has its match shifted by
      d * synth_stride / style_stride style grid positions.
    synth_map: None, or the synthesis patches' `patch_ops.SynthesisMap` (the bank
      then carries its map part): candidates are ranked by feature NCC
      plus map NCC times sqrt(w), as `match` does.

  Returns:
    (field [P] int32, scores [P]) as `match`: scores are the feature NCC;
    unmatched patches (all zero, or meeting only invalid bank rows) get
    score -inf and index 0.
  """
  patch_ops._check_bank(patches, bank)
  rows, cols = synth_grid
  if rows * cols != patches.shape[0]:
    raise ValueError(f"patchmatch: synth_grid {synth_grid} does not hold "
                     f"{patches.shape[0]} patches")
  patch_ops._check_semantic(bank, synth_map, patches.shape[0])
  if radii is None:
    radii = search_radii(grid)
  dtype = jnp.result_type(patches.dtype, bank.patches.dtype)
  patches = patches.astype(dtype)
  inv_p = patch_ops._inv_norms(jnp.sum(jnp.square(patches), axis=1))
  m = bank.patches.shape[0]
  field = jnp.clip(field.astype(jnp.int32), 0, m - 1)
  score_of = lambda index: _candidate_scores(patches, inv_p, bank, index,
                                             synth_map)
  best = score_of(field)
  sides = jnp.maximum(jnp.asarray(grid.rows), jnp.asarray(grid.cols))

  def consider(carry, candidate):
    field, best = carry
    score = score_of(candidate)
    better = score > best
    return jnp.where(better, candidate, field), jnp.where(better, score, best)

  # Every candidate of a pass is one step of one lax.scan with a single
  # scoring body (unrolled, the ~20 candidates per pass and MRF layer made
  # the solver's programs compile 3x slower than the exact scan's; one
  # scan per kind of candidate, 2x). Per step: the kind (0 propagation,
  # 1 random search, 2 a random bank patch, 3 a hop to another copy), the
  # propagation offset (dr, dc) and the search radius. Propagation, d in
  # jumps, in the four directions, first; then `samples` draws at each
  # radius, largest first; then the random patches; then, with several
  # copies, the hops (`candidates_per_pass` counts them).
  n = radii.shape[0]
  num_copies = np.shape(grid.starts)[0]
  # (kind, neighbour offset on the synthesis grid, the shift of its match
  # on the style grid: the same distance in feature-map units).
  shift = lambda d: int(round(d * synth_stride / style_stride))
  steps = [(0, d * sr, d * sc, shift(d * sr), shift(d * sc)) for d in jumps
           for sr, sc in ((1, 0), (-1, 0), (0, 1), (0, -1))]
  steps += [(1, 0, 0, 0, 0)] * (n * samples)
  steps += [(2, 0, 0, 0, 0)] * num_random
  steps += [(3, 0, 0, 0, 0)] * num_hops if num_copies > 1 else []
  columns = tuple(jnp.asarray(column, jnp.int32) for column in zip(*steps))
  step_radii = jnp.concatenate([
      jnp.zeros((4 * len(jumps),), jnp.int32),
      jnp.repeat(jnp.asarray(radii, jnp.int32), samples),
      jnp.zeros((len(steps) - 4 * len(jumps) - n * samples,), jnp.int32)])
  position = jnp.arange(rows * cols, dtype=jnp.int32)
  pos_r, pos_c = position // cols, position % cols
  starts = jnp.asarray(grid.starts)
  grid_rows, grid_cols = jnp.asarray(grid.rows), jnp.asarray(grid.cols)

  def step(carry, xs):
    field, _ = carry
    kind, nr, nc, dr, dc, radius, u = xs
    # Propagation: the neighbour at grid offset (-nr, -nc) (wrapping
    # around, as jnp.roll) suggests its match shifted by (dr, dc).
    neighbour = field[((pos_r - nr) % rows) * cols + (pos_c - nc) % cols]
    copy, r, c = _grid_coords(jnp.where(kind == 0, neighbour, field), grid)
    # Hop: the same relative position in a random copy (the copies are
    # rotations and scales of the same images, so the place that matched
    # in one is a fair guess in another); a padding copy (start m) or
    # kind != 3 keeps the match's copy and position.
    other = jnp.minimum(jnp.floor(u[0] * num_copies).astype(jnp.int32),
                        num_copies - 1)
    hop = (kind == 3) & (starts[other] < m)
    scale = lambda index, sizes: jnp.floor(
        (index + 0.5) * sizes[other] / sizes[copy]).astype(jnp.int32)
    r = jnp.where(hop, scale(r, grid_rows), r)
    c = jnp.where(hop, scale(c, grid_cols), c)
    copy = jnp.where(hop, other, copy)
    # Random search: uniform within the radius, capped at the match's
    # copy's larger side, around the match on its copy's grid.
    radius = jnp.minimum(radius, sides[copy])
    offsets = jnp.floor(u * (2 * radius + 1)).astype(jnp.int32) - radius
    candidate = _grid_index(copy, r + dr + offsets[0], c + dc + offsets[1],
                            grid)
    anywhere = jnp.minimum(jnp.floor(u[0] * m).astype(jnp.int32), m - 1)
    return consider(carry, jnp.where(kind == 2, anywhere, candidate)), None

  def shared(carry, pass_key):
    """num_shared random bank patches scored against every synthesis
    patch at once: a [K, D] x [D, P] product, as one chunk of the exact
    scan (`patch_ops._scan_bank`), and each patch's best of them as its
    candidate."""
    field, best = carry
    u = hash_uniform(pass_key, (num_shared,))
    picked = jnp.minimum(jnp.floor(u * m).astype(jnp.int32), m - 1)  # [K]
    take = lambda table: jnp.take(table, picked, axis=0, mode="clip")
    dots = lax.dot_general(take(bank.patches).astype(dtype), patches,
                           (((1,), (1,)), ((), ())),
                           precision=lax.Precision.HIGHEST,
                           preferred_element_type=dtype)  # [K, P]
    inv, valid = take(bank.inv_norms).astype(dtype), take(bank.valid)
    if synth_map is None:
      scores = patch_ops._normalise_scores(dots, inv, valid)
    else:
      scores = patch_ops._semantic_scores(
          dots, inv, valid, inv_p, take(bank.map_patches), synth_map.patches)
    score, index = patch_ops._block_best(scores)
    better = score > best
    return (jnp.where(better, picked[index], field),
            jnp.where(better, score, best))

  def one_pass(i, carry):
    pass_key = fold_key(key, i)
    if num_shared:
      carry = shared(carry, fold_key(pass_key, 1))
    # The pass's draws at once, from a counter hash (`hash_uniform`):
    # [steps, 2, P] (propagation steps draw too, and use radius 0).
    draws = hash_uniform(pass_key, (len(steps), 2, rows * cols))
    carry, _ = lax.scan(step, carry, columns + (step_radii, draws))
    return carry

  # num_passes may be traced (a while loop then), so that an evaluation
  # can run more passes than the next without another program.
  field, best = lax.fori_loop(0, num_passes, one_pass, (field, best))
  if synth_map is not None:
    return patch_ops._finish_semantic(best, field, patches, bank)
  return patch_ops._finish(best, field, jnp.sum(jnp.square(patches), axis=1))


def candidates_per_pass(num_copies: int, num_radii: int, *,
                        jumps: Sequence[int] = (4, 2, 1),
                        samples: int = 1, num_random: int = 1,
                        num_hops: int = 1) -> int:
  """How many candidates `patchmatch` scores per synthesis patch and pass
  (each a gathered bank row and a dot product of length D)."""
  return (4 * len(jumps) + samples * num_radii + num_random +
          (num_hops if num_copies > 1 else 0))


def random_field(key: jnp.ndarray, num_patches_: int, bank_size_: int
                 ) -> jnp.ndarray:
  """[num_patches_] int32 bank indices uniform in [0, bank_size_): a
  PatchMatch field's start where nothing better is known."""
  return jax.random.randint(key, (num_patches_,), 0, bank_size_, jnp.int32)


def _nearest(positions: np.ndarray, where: np.ndarray) -> np.ndarray:
  """Index of the entry of sorted `positions` nearest to each `where`."""
  right = np.clip(np.searchsorted(positions, where), 1, len(positions) - 1)
  left = right - 1
  if len(positions) == 1:
    return np.zeros(np.shape(where), np.int64)
  take_left = np.abs(where - positions[left]) <= np.abs(
      positions[right] - where)
  return np.where(take_left, left, right)


def upsample_field(field: np.ndarray, *, synth_from: Tuple[int, int],
                   synth_to: Tuple[int, int],
                   copies_from: Sequence[Tuple[int, int]],
                   copies_to: Sequence[Tuple[int, int]],
                   patch_size: int = 3, synth_stride: int = 2,
                   style_stride: int = 2) -> np.ndarray:
  """A coarser level's field carried to a finer level (host side, numpy).

  field [P_from] indexes the bank over style copies whose feature maps are
  `copies_from` ((h, w) each), for the synthesis patches of a synth_from
  (h, w) map. Each synthesis patch of the synth_to map takes the match of
  the nearest coarse patch (positions scaled by the maps' size ratio),
  moved on its copy's grid by the same scaled position plus the patch's
  offset from that coarse patch, then snapped to the nearest patch of the
  copy's finer grid (`copies_to`, same copies in the same order). Indices
  past the coarse bank's real patches (padding) are clipped into it.

  Returns [P_to] int32, valid indices of the finer bank.
  """
  if len(copies_from) != len(copies_to):
    raise ValueError(f"upsample_field: {len(copies_from)} coarse copies "
                     f"but {len(copies_to)} fine ones")
  k = patch_size
  coarse = bank_grid(copies_from, k, style_stride)
  fine = bank_grid(copies_to, k, style_stride)
  real = int(coarse.starts[-1] + coarse.rows[-1] * coarse.cols[-1])
  field = np.clip(np.asarray(field, np.int64), 0, real - 1)

  def axis_map(size_from, size_to):
    """Per fine grid entry: the nearest coarse entry and the offset (in
    fine map units) of the fine patch from it."""
    fine_pos = patch_ops.grid_positions(size_to, k, synth_stride).astype(np.float64)
    coarse_pos = patch_ops.grid_positions(size_from, k, synth_stride).astype(
        np.float64)
    scale = size_to / size_from
    nearest = _nearest(coarse_pos, fine_pos / scale)
    return nearest, fine_pos - coarse_pos[nearest] * scale

  row_of, row_offset = axis_map(synth_from[0], synth_to[0])
  col_of, col_offset = axis_map(synth_from[1], synth_to[1])
  coarse_cols = len(patch_ops.grid_positions(synth_from[1], k, synth_stride))
  source = (row_of[:, None] * coarse_cols + col_of[None, :]).reshape(-1)
  match = field[source]
  copy = np.searchsorted(coarse.starts, match, side="right") - 1
  local = match - coarse.starts[copy]
  row, col = local // coarse.cols[copy], local % coarse.cols[copy]
  out = np.empty(len(match), np.int64)
  d_row = np.repeat(row_offset, len(col_of))
  d_col = np.tile(col_offset, len(row_of))
  for s, (size_from, size_to) in enumerate(zip(copies_from, copies_to)):
    here = copy == s
    if not np.any(here):
      continue
    new_rc = []
    for axis, (index, offset) in enumerate(((row, d_row), (col, d_col))):
      from_pos = patch_ops.grid_positions(size_from[axis], k, style_stride)
      to_pos = patch_ops.grid_positions(size_to[axis], k, style_stride).astype(
          np.float64)
      scale = size_to[axis] / size_from[axis]
      target = from_pos[index[here]] * scale + offset[here]
      new_rc.append(_nearest(to_pos, target))
    out[here] = fine.starts[s] + new_rc[0] * fine.cols[s] + new_rc[1]
  return out.astype(np.int32)
