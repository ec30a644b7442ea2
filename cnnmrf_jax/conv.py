"""3x3 stride-1 pad-1 convolutions of VGG, in forms XLA runs fast.

Every VGG convolution is a 3x3 kernel, stride 1, zero padding 1, on NHWC
activations with HWIO kernels ([3, 3, C_in, C_out]). `conv3x3` computes it
by one of `CONVS`:

  - 'xla': lax.conv_general_dilated, differentiated by JAX. On GPU and TPU
    this is cuDNN's / the TPU's convolution.
  - 'matmul': the direct convolution as large matrix products (GEMM calls
    on XLA:CPU, no convolution kernel): the three horizontal shifts of the
    padded input are
    stacked on the channel axis ([N, H + 2, W, 3 C_in], a 3x copy instead
    of im2col's 9x), and each kernel row is one [N H W, 3 C_in] x
    [3 C_in, C_out] product of a row-shifted view, accumulated. XLA:CPU's
    own convolution already packs its operands into GEMMs, and does so
    without the copies, so this form is slower than 'xla' there; it is the
    plain-matmul reference of the custom VJP.
  - 'winograd': Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray,
    "Fast Algorithms for Convolutional Neural Networks", CVPR 2016, eq. 8:
    Y = A^T [(G g G^T) . (B^T d B)] A). The kernel is transformed to
    (m + 2)^2 frequencies, the input is cut into (m + 2)^2 tiles overlapping
    by 2 (stride m), transformed, and each frequency is one
    [tiles, C_in] x [C_in, C_out] matmul, batched over frequencies; the
    output transform folds each tile back to m x m pixels. F(4x4, 3x3)
    does 4x fewer multiplications than the direct form, F(2x2, 3x3) 2.25x
    with smaller rounding error (its transforms hold only 0, +-1, +-1/2).
    In the VGG (`layer_method`) only the layers from 128 -> 256 channels
    on run as Winograd, the shallow wide ones as 'xla'.
  - 'auto': `resolve` picks one of the above for the backend.

The kernel's forms (flipped, Winograd-transformed) are made by
`prepare_kernel`; computed once outside the optimisation loop
(vgg.prepare_params) they are not re-made at every call.

'matmul' and 'winograd' carry a custom VJP for the input only: the input
gradient of a 3x3 stride-1 pad-1 convolution is the same convolution of the
output cotangent with the kernel flipped in both spatial axes and its
in/out channels swapped (dx = conv(dy, K[::-1, ::-1].T_io)), so the backward
pass runs at the forward's rate. The kernel and bias get zero cotangents:
the image is the only thing this package optimises, and the kernel MUST NOT
be differentiated through these methods (use 'xla' for that).
"""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

CONVS = ("xla", "matmul", "winograd", "auto")
# Winograd output tile side m of F(m x m, 3 x 3).
WINOGRAD_TILES = (2, 4)
# 'auto' on CPU. The pick is fixed, not measured at run time, so results do
# not depend on the machine's load (benchmarks/bench_peers.py measures the
# methods against each other and against torch).
CPU_AUTO = "winograd"
# The layers layer_method runs as Winograd: from these channel counts on
# (VGG's conv2_2 and blocks 3 to 5) a layer's forward and input gradient
# measured faster as F(4x4, 3x3) than as 'xla' on CPU (conv2_2, 128 -> 128:
# 20-27 % at 256-512 px); conv2_1 (64 -> 128) measured even, conv1_2
# (64 -> 64) slower.
WINOGRAD_MIN_IN = 128
WINOGRAD_MIN_OUT = 128

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


class ConvError(ValueError):
  """An unknown convolution method or a malformed convolution input."""


def check_method(method: str) -> None:
  """Raises ConvError naming --conv unless `method` is one of CONVS."""
  if method not in CONVS:
    raise ConvError(f"--conv: unknown convolution {method!r}; expected one "
                    f"of {CONVS}")


def resolve(method: str, backend: str | None = None) -> str:
  """The concrete method 'auto' stands for on `backend` (default: JAX's).

  GPU and TPU: 'xla' (lax.conv_general_dilated lowers to cuDNN / the TPU's
  convolution units, faster than any matmul rewrite). CPU: CPU_AUTO, the
  fastest in benchmarks/bench_peers.py. Other methods are returned as is.
  """
  check_method(method)
  if method != "auto":
    return method
  if backend is None:
    backend = jax.default_backend()
  return CPU_AUTO if backend == "cpu" else "xla"


def flip_kernel(kernel: jnp.ndarray) -> jnp.ndarray:
  """[3, 3, C_in, C_out] -> [3, 3, C_out, C_in], the kernel of the input
  gradient: spatially flipped, in/out channels swapped."""
  return jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))


def layer_method(method: str, c_in: int, c_out: int,
                 backend: str | None = None) -> str:
  """The form a VGG layer with `c_in` -> `c_out` channels runs in.

  `method` resolved for `backend`; 'winograd' keeps only layers with at
  least WINOGRAD_MIN_IN input and WINOGRAD_MIN_OUT output channels (VGG's
  conv2_2 on) and runs the others as 'xla': on the wide, shallow layers the
  transforms of the large activations cost more memory traffic than the
  multiplications they save, and the per-frequency matmuls are thin
  ([tiles, 64] x [64, 64]).
  """
  method = resolve(method, backend)
  if method == "winograd" and (c_in < WINOGRAD_MIN_IN or
                               c_out < WINOGRAD_MIN_OUT):
    return "xla"
  return method


def prepare_kernel(kernel: jnp.ndarray, method: str, winograd_tile: int = 4
                   ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """(forward, backward) kernel forms of `method` for `kernel` [3, 3, C, O].

  'matmul': the kernel and flip_kernel(kernel), [3, 3, C, O] and
  [3, 3, O, C]. 'winograd': their Winograd transforms G g G^T,
  [a * a, C, O] and [a * a, O, C], a = winograd_tile + 2. Computing them
  once outside the optimisation loop and passing them to conv3x3(prepared=)
  saves re-transforming the weights at every call. 'xla' needs none: ().
  """
  method = resolve(method)
  if method == "xla":
    return ()
  _check_tile(winograd_tile)
  flipped = flip_kernel(kernel)
  if method == "matmul":
    return kernel, flipped
  return (_winograd_kernel(kernel, winograd_tile),
          _winograd_kernel(flipped, winograd_tile))


def _check_tile(winograd_tile: int) -> None:
  if winograd_tile not in WINOGRAD_TILES:
    raise ConvError(f"--winograd_tile: expected one of {WINOGRAD_TILES}, got "
                    f"{winograd_tile}")


def conv3x3(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray | None
            = None, *, method: str = "xla", winograd_tile: int = 4,
            prepared: Tuple[jnp.ndarray, ...] | None = None) -> jnp.ndarray:
  """3x3, stride 1, zero pad 1 convolution (+ bias), [N, H, W, C_in] ->
  [N, H, W, C_out].

  Args:
    x: [N, H, W, C_in] input.
    kernel: [3, 3, C_in, C_out] (HWIO). Never differentiated by 'matmul'
      and 'winograd' (their VJP gives it a zero cotangent).
    bias: [C_out] or None.
    method: one of CONVS ('auto' is resolved for JAX's default backend).
    winograd_tile: m of F(m x m, 3 x 3) for 'winograd', 2 or 4.
    prepared: prepare_kernel(kernel, method, winograd_tile), precomputed;
      None computes it here.
  """
  if x.ndim != 4 or kernel.shape[:2] != (3, 3) or (
      kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]):
    raise ConvError(f"conv3x3 expects x [N, H, W, C] and kernel [3, 3, C, "
                    f"C_out], got {x.shape} and {kernel.shape}")
  _check_tile(winograd_tile)
  method = resolve(method)
  kernel = kernel.astype(x.dtype)
  if bias is None:
    bias = jnp.zeros(kernel.shape[-1:], x.dtype)
  bias = bias.astype(x.dtype)
  if method == "xla":
    return lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=_DIMENSION_NUMBERS) + bias
  if prepared is None:
    prepared = prepare_kernel(kernel, method, winograd_tile)
  forward, backward = (k.astype(x.dtype) for k in prepared)
  return _conv_input_vjp(x, forward, backward, bias, method, winograd_tile)


# --- direct form as matmuls -------------------------------------------------


def _conv_matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """The 3x3 pad-1 convolution as three [N H W, 3 C] x [3 C, C_out] matmuls.

  x: [N, H, W, C]; kernel [3, 3, C, C_out]. The padded input's three
  horizontal shifts are stacked on channels, [N, H + 2, W, 3 C] ordered
  (dx, c) as kernel[dy].reshape(3 C, C_out) is; kernel row dy then reads
  rows dy .. dy + H - 1 of it.
  """
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifted = jnp.concatenate([padded[:, :, dx:dx + w] for dx in range(3)],
                            axis=-1)                    # [N, H + 2, W, 3 C]
  rows = kernel.reshape(3, 3 * c, kernel.shape[-1])     # [dy, (dx, c), out]
  out = None
  for dy in range(3):
    term = jnp.einsum("nhwk,ko->nhwo", shifted[:, dy:dy + h], rows[dy],
                      precision=lax.Precision.HIGHEST)
    out = term if out is None else out + term
  return out


# --- Winograd F(m x m, 3 x 3) -----------------------------------------------


@functools.lru_cache(maxsize=None)
def _winograd_matrices(m: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(B^T [a, a], G [a, 3], A^T [m, a]) of F(m, 3), a = m + 2.

  F(2, 3) and F(4, 3) with interpolation points 0, +-1 (and +-2) and
  infinity, as in Lavin & Gray (2016), eq. 7 and section 4.2.
  """
  if m == 2:
    bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    g = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
    at = [[1, 1, 1, 0], [0, 1, -1, -1]]
  elif m == 4:
    bt = [[4, 0, -5, 0, 1, 0],
          [0, -4, -4, 1, 1, 0],
          [0, 4, -4, -1, 1, 0],
          [0, -2, -1, 2, 1, 0],
          [0, 2, -1, -2, 1, 0],
          [0, 4, 0, -5, 0, 1]]
    g = [[1 / 4, 0, 0],
         [-1 / 6, -1 / 6, -1 / 6],
         [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6],
         [0, 0, 1]]
    at = [[1, 1, 1, 1, 1, 0],
          [0, 1, -1, 2, -2, 0],
          [0, 1, 1, 4, 4, 0],
          [0, 1, -1, 8, -8, 1]]
  else:
    raise ConvError(f"--winograd_tile: expected one of {WINOGRAD_TILES}, got "
                    f"{m}")
  return tuple(np.asarray(a, np.float64) for a in (bt, g, at))


def combine(coefficients: np.ndarray, terms):
  """sum_j coefficients[i, j] * terms[j] for each row i, skipping zeros
  (the transforms are sparse small-integer matrices; written out as adds,
  XLA fuses each row into one elementwise loop)."""
  rows = []
  for row in coefficients:
    total = None
    for coefficient, term in zip(row, terms):
      if coefficient == 0:
        continue
      # A Python float is weakly typed: the product keeps term's dtype.
      scaled = term if coefficient == 1 else (
          -term if coefficient == -1 else term * float(coefficient))
      total = scaled if total is None else total + scaled
    rows.append(total)
  return rows


def _winograd_kernel(kernel: jnp.ndarray, m: int) -> jnp.ndarray:
  """G g G^T per (c_in, c_out): [3, 3, C, O] -> [a * a, C, O].

  Written as sums of scaled [C, O] slices (an einsum over the 3 x 3 axes
  becomes transposes around a tiny matmul on XLA:CPU, many times slower).
  """
  _, g, _ = _winograd_matrices(m)
  rows = combine(g, [kernel[i] for i in range(3)])         # a x [3, C, O]
  return jnp.stack([f for r in rows
                    for f in combine(g, [r[j] for j in range(3)])])


def _conv_winograd(x: jnp.ndarray, u: jnp.ndarray, m: int
                   ) -> jnp.ndarray:
  """Winograd F(m x m, 3 x 3) of x [N, H, W, C] with the transformed kernel
  u = _winograd_kernel(kernel, m), [(m + 2)^2, C, O].

  The output is computed in tiles_h x tiles_w tiles of m x m pixels; input
  tile (t, s) covers padded rows t m .. t m + m + 1 and columns s m ..
  s m + m + 1, so the padded input is zero-extended to tiles m + 2 rows
  and columns and the output cropped back to H x W.
  """
  n, h, w, c = x.shape
  o = u.shape[-1]
  a = m + 2
  tiles_h, tiles_w = -(-h // m), -(-w // m)
  bt, _, at = _winograd_matrices(m)
  padded = jnp.pad(x, ((0, 0), (1, tiles_h * m + 1 - h),
                       (1, tiles_w * m + 1 - w), (0, 0)))
  # B^T d B, separably. Rows: element i of every tile row is the strided
  # slice padded[:, i::m] ([N, tiles_h, W_pad, C]).
  row_slices = [padded[:, i:i + m * tiles_h:m] for i in range(a)]
  # Each stage is materialised once (optimization_barrier): left to itself
  # XLA:CPU fuses the first stage into each of the a x a consumers of the
  # second, and the transforms into the matmul's operand, both slower.
  row_freq = lax.optimization_barrier(
      jnp.stack(combine(bt, row_slices)))            # [a, N, Th, Wp, C]
  freq = []
  for i in range(a):
    col_slices = [row_freq[i, :, :, j:j + m * tiles_w:m] for j in range(a)]
    freq += combine(bt, col_slices)                  # a x [N, Th, Tw, C]
  v = lax.optimization_barrier(
      jnp.stack(freq).reshape(a * a, n * tiles_h * tiles_w, c))
  # One matmul per frequency, batched: [a a, P, C] x [a a, C, O].
  prod = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))),
                         precision=lax.Precision.HIGHEST)
  prod = lax.optimization_barrier(
      prod.reshape(a, a, n, tiles_h, tiles_w, o))
  # A^T M A: rows first (over the first frequency axis), then columns.
  out_rows = lax.optimization_barrier(jnp.stack(
      combine(at, [prod[i] for i in range(a)])))      # [m, a, N, Th, Tw, O]
  out = jnp.stack([jnp.stack(combine(at, [r[j] for j in range(a)]))
                   for r in out_rows])                 # [m, m, N, Th, Tw, O]
  out = jnp.transpose(out, (2, 3, 0, 4, 1, 5)).reshape(
      n, tiles_h * m, tiles_w * m, o)
  return out[:, :h, :w]


def _conv_forward(x, kernel_form, method, winograd_tile):
  if method == "matmul":
    return _conv_matmul(x, kernel_form)
  if method == "winograd":
    return _conv_winograd(x, kernel_form, winograd_tile)
  raise ConvError(f"--conv: no custom-VJP form for {method!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _conv_input_vjp(x, forward, backward, bias, method, winograd_tile):
  """3x3 pad-1 convolution plus bias whose VJP is the flipped-kernel
  convolution for x and zero for the kernel forms and bias (never
  differentiate them here). forward / backward: prepare_kernel's forms."""
  del backward  # used by the VJP only
  return _conv_forward(x, forward, method, winograd_tile) + bias


def _conv_input_vjp_fwd(x, forward, backward, bias, method, winograd_tile):
  y = _conv_forward(x, forward, method, winograd_tile) + bias
  return y, (forward, backward, bias)


def _conv_input_vjp_bwd(method, winograd_tile, residuals, cotangent):
  forward, backward, bias = residuals
  # dL/dx = conv(dL/dy, flipped kernel): each input pixel feeds output pixel
  # p - (dy - 1, dx - 1) through kernel[dy, dx]; the correlation over those
  # outputs is a convolution with kernel[2 - dy, 2 - dx] transposed.
  grad_x = _conv_forward(cotangent, backward, method, winograd_tile)
  return (grad_x, jnp.zeros_like(forward), jnp.zeros_like(backward),
          jnp.zeros_like(bias))


_conv_input_vjp.defvjp(_conv_input_vjp_fwd, _conv_input_vjp_bwd)
