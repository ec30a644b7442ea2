"""Dot products of bank patches with every patch on a strided grid, by
polyphase Winograd: `--matching=winograd`, the exact scan's fast form on CPU.

The exact matching (patches.match_map) needs, per chunk of c bank patches
t_j [k, k, C] and every synthesis patch on the stride-s grid of the
features f [H, W, C], the dots

    Y[j, u, v] = sum_{a, b < k} <f[s u + a, s v + b], t_j[a, b]>,

that is a stride-s correlation of the map with c filters: 2 k^2 C flops per
(patch, filter) as a matmul ([c, D] x [D, P], D = k^2 C). Split each axis
by the phase of the tap, a = s i + q: the taps of phase q see only the
rows s (u + i) + q, a subsampled map X_q [ceil(H / s), ...], through a
stride-1 correlation with the k_q = len(range(q, k, s)) taps of that phase.
So Y is the sum over the s^2 phase pairs of stride-1 correlations with
small kernels (for the reference k = 3, s = 2: 2 x 2, 2 x 1, 1 x 2 and 1 x 1
taps), and a stride-1 correlation with r taps is what Winograd's minimal
filtering F(m, r) does in m + r - 1 multiplications per m outputs instead
of m r (Lavin & Gray, CVPR 2016). Per axis the reference's 3 taps cost
(m + 1) + m = 2 m + 1 products per m outputs instead of 3 m; over both axes
((2 m + 1) / 3 m)^2 of the direct flops: 0.69 with m = 2, 0.60 with m = 3,
0.56 with m = 4. The transforms of F(m, 2) (interpolation points 0, 1, -1,
infinity, and 2 for m = 4) have coefficients 0, +-1, +-1/2 and small
integers; near-ties in the argmax can go either way as with any change of
summation order.

The products are one batched matmul per phase pair, [points, c, C] x
[points, rows, C]; the synthesis side's transform is done once per
evaluation (`transform_map`), the bank's per chunk (cheap: c k^2 C adds).
The stride-plus-tail grid's tail row and column (patches.grid_positions)
are scored directly.
"""

import functools
from typing import List, NamedTuple, Tuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnmrf_jax import conv

# Outputs per tile along each axis (m of F(m, r)); see the module docstring
# for the flops. With m = 2 every transform coefficient is 0 or +-1. Of 2, 3
# and 4 on relu3_1 and relu4_1 maps at 384 px (chunks of 512 bank patches,
# a 2-core AVX2 CPU), 2 was the fastest on relu4_1 and within noise of 3 on
# relu3_1: the larger tiles leave fewer rows per matmul.
DEFAULT_TILE = 2
TILES = (2, 3, 4)
# Finite interpolation points, in order of use (then infinity).
_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5)


@functools.lru_cache(maxsize=None)
def toom_cook(m: int, r: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(B^T [n, n], G [n, r], A^T [m, n]) of the correlation F(m, r),
  n = m + r - 1: y = A^T [(G g) * (B^T d)] for d [n], g [r], y [m] with
  y_i = sum_j g_j d_{i + j}.

  Built from the Toom-Cook linear convolution s = g * h (h of length m):
  g and h evaluated at n - 1 points and infinity (G, H: Vandermonde rows,
  the infinity row picks the leading coefficient), s interpolated from the
  n products (C = inverse of s's evaluation matrix); the correlation is
  that convolution's transpose, so B^T = C^T and A^T = H^T.
  """
  n = m + r - 1
  if r == 1:
    return np.eye(m), np.ones((m, 1)), np.eye(m)
  if n - 1 > len(_POINTS):
    raise ValueError(f"F({m}, {r}) needs {n - 1} finite points; at most "
                     f"{len(_POINTS)} are defined")
  points = _POINTS[:n - 1]

  def evaluation(length):
    rows = [[p ** j for j in range(length)] for p in points]
    rows.append([0.0] * (length - 1) + [1.0])
    return np.asarray(rows)

  g_matrix, h_matrix = evaluation(r), evaluation(m)
  interpolation = np.linalg.inv(evaluation(n))
  # The matrices hold small dyadic or sixth fractions; rounding the inverse
  # keeps exact zeros exact (so conv.combine skips them).
  interpolation = np.round(interpolation * 720) / 720
  return interpolation.T, g_matrix, h_matrix.T


def max_taps(tile: int = DEFAULT_TILE) -> int:
  """The most taps a phase may have: F(tile, taps) needs tile + taps - 2
  finite interpolation points."""
  return len(_POINTS) + 2 - tile


def supports(patch_size: int, stride: int, tile: int = DEFAULT_TILE) -> bool:
  """Whether F(tile, taps) is defined for every phase of a patch_size,
  stride grid (a phase sees ceil(patch_size / stride) taps at most)."""
  return -(-patch_size // stride) <= max(1, max_taps(tile))


def products_per_output(patch_size: int, stride: int,
                        tile: int = DEFAULT_TILE) -> float:
  """Winograd products per grid patch and bank patch, over both axes:
  (sum over an axis's phases of points per output)^2, 6.25 for the
  reference's patch 3, stride 2, tile 2 (the direct form: 1 dot of
  k^2 C). The transformed map and one chunk's products hold this many
  values per patch (times C, times the chunk)."""
  per_axis = sum((tile + taps - 1) / tile if taps > 1 else 1.0
                 for taps in (len(range(q, patch_size, stride))
                              for q in range(min(stride, patch_size))))
  return per_axis * per_axis


class _Axis(NamedTuple):
  """One phase of one axis: taps q, q + s, ... of the patch (`taps` of
  them) seen by the map's rows q, q + s, ...; `tile` outputs per tile
  (1 for a single tap: no transform), `tiles` tiles cover `outputs`."""
  phase: int
  taps: int
  tile: int
  tiles: int
  outputs: int


def _axis_phases(size: int, patch_size: int, stride: int, tile: int
                 ) -> List[_Axis]:
  outputs = (size - patch_size) // stride + 1     # the regular grid
  phases = []
  for phase in range(min(stride, patch_size)):
    taps = len(range(phase, patch_size, stride))
    m = tile if taps > 1 else 1
    phases.append(_Axis(phase, taps, m, -(-outputs // m), outputs))
  return phases


def _axis_windows(x: jnp.ndarray, axis: int, phase: _Axis, stride: int
                  ) -> List[jnp.ndarray]:
  """The n = tile + taps - 1 window elements of every tile along `axis`:
  element i of tile t is the map's row stride (t tile + i) + phase, zero
  past the map. Returns n arrays with `tiles` along `axis`."""
  n = phase.tile + phase.taps - 1
  step = stride * phase.tile
  # The highest row read: stride ((tiles - 1) tile + n - 1) + phase.
  needed = stride * ((phase.tiles - 1) * phase.tile + n - 1) + phase.phase + 1
  size = x.shape[axis]
  if needed > size:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, needed - size)
    x = jnp.pad(x, pad)
  return [lax.slice_in_dim(x, stride * i + phase.phase,
                           stride * i + phase.phase +
                           step * (phase.tiles - 1) + 1, step, axis)
          for i in range(n)]


class TransformedMap(NamedTuple):
  """The synthesis side of every phase pair: [points, rows, C] each."""
  data: Tuple[jnp.ndarray, ...]


def _phase_pairs(height, width, patch_size, stride, tile):
  return [(rows, cols)
          for rows in _axis_phases(height, patch_size, stride, tile)
          for cols in _axis_phases(width, patch_size, stride, tile)]


def transform_map(features: jnp.ndarray, *, patch_size: int, stride: int,
                  tile: int = DEFAULT_TILE) -> TransformedMap:
  """B^T d B of every tile of every phase pair of features [H, W, C]."""
  height, width, channels = features.shape
  data = []
  for rows, cols in _phase_pairs(height, width, patch_size, stride, tile):
    bt_rows = toom_cook(rows.tile, rows.taps)[0]
    bt_cols = toom_cook(cols.tile, cols.taps)[0]
    # Rows first: n_r arrays [tiles_r, W, C], then columns of each.
    row_freq = conv.combine(bt_rows,
                            _axis_windows(features, 0, rows, stride))
    freq = []
    for part in row_freq:
      freq += conv.combine(bt_cols, _axis_windows(part, 1, cols, stride))
    data.append(jnp.stack(freq).reshape(len(freq), -1, channels))
  return TransformedMap(tuple(data))


def grid_dots(transformed: TransformedMap, filters: jnp.ndarray, *,
              height: int, width: int, stride: int,
              tile: int = DEFAULT_TILE, dtype=None) -> jnp.ndarray:
  """The regular grid's dots of filters [c, k, k, C] with the map that
  `transformed` holds: [R, Cc, c] (R, Cc the regular grid positions, no
  tail), accumulated in `dtype` (default the filters')."""
  count, patch_size, _, channels = filters.shape
  dtype = dtype or filters.dtype
  total = None
  for (rows, cols), data in zip(
      _phase_pairs(height, width, patch_size, stride, tile),
      transformed.data):
    _, g_rows, at_rows = toom_cook(rows.tile, rows.taps)
    _, g_cols, at_cols = toom_cook(cols.tile, cols.taps)
    taps = filters[:, rows.phase::stride, cols.phase::stride]
    # G g G^T: [c, taps_r, taps_c, C] -> n_r n_c x [c, C].
    kernel_rows = conv.combine(g_rows,
                               [taps[:, i] for i in range(rows.taps)])
    kernel = jnp.stack([f for part in kernel_rows for f in conv.combine(
        g_cols, [part[:, j] for j in range(cols.taps)])])
    # [points, rows, C] x [points, c, C] -> [points, tiles_r tiles_c, c].
    prod = lax.dot_general(data, kernel.astype(data.dtype),
                           (((2,), (2,)), ((0,), (0,))),
                           preferred_element_type=dtype)
    n_rows, n_cols = at_rows.shape[1], at_cols.shape[1]
    # The products and the row stage are materialised once, as in
    # conv._conv_winograd, so that XLA does not fuse the stages into each
    # of their consumers (here within noise of leaving it to XLA).
    prod = lax.optimization_barrier(
        prod.reshape(n_rows, n_cols, rows.tiles, cols.tiles, count))
    # A^T M A, rows then columns: [m_r, m_c, tiles_r, tiles_c, c].
    out_rows = lax.optimization_barrier(jnp.stack(
        conv.combine(at_rows, [prod[i] for i in range(n_rows)])))
    out = jnp.stack([jnp.stack(conv.combine(at_cols, [r[j] for j in
                                                  range(n_cols)]))
                     for r in out_rows])
    out = jnp.transpose(out, (2, 0, 3, 1, 4)).reshape(
        rows.tiles * rows.tile, cols.tiles * cols.tile, count)
    out = out[:rows.outputs, :cols.outputs]
    total = out if total is None else total + out
  return total
