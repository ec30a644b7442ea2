"""Flax (linen) VGG19 and VGG16 that return a dict of named activations.

Layer names follow the VGG paper and the Caffe model: `conv1_1`, `relu1_1`,
..., `pool1`, ...; parameters live under the conv layer's name
(`params['conv1_1']['kernel']` HWIO `[3, 3, C_in, C_out]`, `['bias']`
`[C_out]`). Inputs are NHWC images already preprocessed for the weights'
convention (`preprocess` below); only the layers up to the deepest one asked
for are computed.

Pooling is 2x2, stride 2, in Caffe's ceil mode: an odd side of n gives
ceil(n / 2) outputs, the last window covering only the valid border pixels.

`receptive_field` gives the pixels a feature depends on, and `VGG(...,
window=...)` runs the network on a crop of a larger image so that the crop's
features equal the whole image's wherever the crop holds their receptive
field (exact tiling, tiling.py).
"""

import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from cnnmrf_jax import conv as conv_lib

# Convolutions per block and channels per block.
_BLOCKS = {
    "vgg19": ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512)),
    "vgg16": ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
}
NETWORKS = tuple(_BLOCKS)
POOLINGS = ("max", "avg")
# 'relu3_1' -> block 3, 'pool5' -> block 5.
_BLOCK_RE = re.compile(r"(?:conv|relu|pool)(\d+)")

# Preprocessing conventions. Caffe: BGR, x256 (the reference code uses 256,
# not 255), minus the BGR channel means. Torchvision: RGB in [0, 1],
# ImageNet mean / std.
CONVENTIONS = ("caffe", "torchvision")
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
CAFFE_SCALE = 256.0
TORCHVISION_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCHVISION_STD = np.array([0.229, 0.224, 0.225], np.float32)


def layer_names(network: str = "vgg19") -> List[str]:
  """All layer names of `network` in forward order (conv, relu, ..., pool)."""
  _check_network(network)
  names = []
  for block, (num_convs, _) in enumerate(_BLOCKS[network], start=1):
    for i in range(1, num_convs + 1):
      names += [f"conv{block}_{i}", f"relu{block}_{i}"]
    names.append(f"pool{block}")
  return names


def conv_shapes(
    network: str = "vgg19") -> Dict[str, Dict[str, Tuple[int, ...]]]:
  """Parameter shapes: {'conv1_1': {'kernel': (3,3,3,64), 'bias': (64,)}}."""
  _check_network(network)
  shapes = {}
  in_channels = 3
  for block, (num_convs, channels) in enumerate(_BLOCKS[network], start=1):
    for i in range(1, num_convs + 1):
      shapes[f"conv{block}_{i}"] = {
          "kernel": (3, 3, in_channels, channels),
          "bias": (channels,),
      }
      in_channels = channels
  return shapes


def channels_of(layer: str, network: str = "vgg19") -> int:
  """Number of channels of the activation named `layer`."""
  check_layers([layer], network, flag="layer")
  block = int(_BLOCK_RE.match(layer).group(1))
  return _BLOCKS[network][block - 1][1]


def downsampling_of(layer: str, network: str = "vgg19") -> int:
  """Total stride of `layer` relative to the input (1, 2, 4, 8, 16 or 32).

  A pooling layer counts its own stride: pool1 -> 2, pool5 -> 32.
  """
  names = layer_names(network)
  check_layers([layer], network, flag="layer")
  upto = names[:names.index(layer) + 1]
  return 2 ** sum(1 for n in upto if n.startswith("pool"))


def map_size(height: int, width: int, layer: str,
             network: str = "vgg19") -> Tuple[int, int]:
  """(h, w) of `layer`'s map for a height x width input. Each 2x2 pool in
  ceil mode halves a side rounding up, so a total stride s gives
  ceil(side / s)."""
  stride = downsampling_of(layer, network)
  return -(-height // stride), -(-width // stride)


def receptive_field(layer: str, network: str = "vgg19"
                    ) -> Tuple[int, int, int]:
  """(before, after, stride): the feature at map position q of `layer`
  depends on the input pixels [stride * q - before, stride * q + after].

  Walked through the layer list: a 3x3 convolution with padding 1 on a map
  of total stride s widens the field by s on both sides; a 2x2 stride-2 pool
  adds the second pixel of its window (s more after) and doubles s. The
  side before + after + 1 is the receptive field: 3 at relu1_1, 6 at pool1
  (stride 2), 16 at pool2 (4), 24 at relu3_1, 52 at pool3 (8), 68 at
  relu4_1, 84 at relu4_2 (38 before, 45 after), 124 at pool4 (16), 156 at
  relu5_1. The field is not centred: pools look forward.
  """
  check_layers([layer], network, flag="layer")
  before = after = 0
  stride = 1
  for name in layer_names(network):
    if name.startswith("conv"):
      before, after = before + stride, after + stride
    elif name.startswith("pool"):
      after += stride
      stride *= 2
    if name == layer:
      return before, after, stride
  raise AssertionError(layer)


def check_layers(layers: Iterable[str], network: str = "vgg19", *,
                 flag: str = "layers") -> None:
  """Raises ValueError naming `flag` if any layer is not in `network`."""
  known = layer_names(network)
  unknown = [l for l in layers if l not in known]
  if unknown:
    raise ValueError(
        f"--{flag}: unknown layer(s) {unknown} for {network}; expected names "
        f"like relu3_1 from: {', '.join(known)}")


def _check_network(network: str) -> None:
  if network not in _BLOCKS:
    raise ValueError(f"--network: unknown network {network!r}; expected one "
                     f"of {NETWORKS}")


def _pool_windows(x: jnp.ndarray, pad_value: float = -jnp.inf
                  ) -> jnp.ndarray:
  """[N, H, W, C] -> [N, ceil(H/2), 2, ceil(W/2), 2, C], odd sides padded
  with pad_value (-inf never wins a max)."""
  n, h, w, c = x.shape
  ph, pw = h % 2, w % 2
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)),
                constant_values=pad_value)
  return x.reshape(n, (h + ph) // 2, 2, (w + pw) // 2, 2, c)


@jax.custom_jvp
def _max_pool2x2(x: jnp.ndarray) -> jnp.ndarray:
  """Max over 2x2 windows, [N, H, W, C] -> [N, ceil(H/2), ceil(W/2), C].

  Why not lax.reduce_window: on XLA:CPU its derivative becomes a variadic
  reduce-window over (value, index) pairs plus iota and scatter kernels,
  ~20 % of a whole CNNMRF iteration at 384 px (profiled); this reshape form
  and its JVP are plain fused elementwise loops, and compile twice as fast.
  """
  return jnp.max(_pool_windows(x), axis=(2, 4))


@_max_pool2x2.defjvp
def _max_pool2x2_jvp(primals, tangents):
  # The tangent flows through the first maximal element of each window in
  # row-major order, as Caffe, torch and XLA's select-and-scatter route the
  # gradient; jnp.max's own rule would split it among ties. Linear in the
  # tangent, so reverse mode is its transpose (a masked scatter).
  (x,), (t,) = primals, tangents
  windows = _pool_windows(x)
  y = jnp.max(windows, axis=(2, 4))
  t_windows = _pool_windows(t, 0.0)  # linear in t: pad with zeros
  taken = None
  out = None
  for i in range(2):
    for j in range(2):
      first = windows[:, :, i, :, j] == y
      if taken is not None:
        first = first & ~taken
      taken = first if taken is None else taken | first
      term = jnp.where(first, t_windows[:, :, i, :, j], 0)
      out = term if out is None else out + term
  return y, out


def pool2x2_ceil(x: jnp.ndarray, kind: str = "max") -> jnp.ndarray:
  """2x2 stride-2 pooling in Caffe's ceil mode. x: [N, H, W, C].

  Returns [N, ceil(H/2), ceil(W/2), C]; windows that hang over an odd border
  see only valid pixels (max ignores the pad; avg divides by the valid count,
  as Caffe does when pad = 0).
  """
  pad = ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0))
  window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
  if kind == "max":
    return _max_pool2x2(x)
  if kind == "avg":
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = lax.reduce_window(ones, 0.0, lax.add, window, strides, pad)
    return total / count
  raise ValueError(f"--pooling: unknown pooling {kind!r}; expected one of "
                   f"{POOLINGS}")


# Names of prepare_params' precomputed kernel forms inside a conv layer's
# parameters (conv.prepare_kernel: forward and input-gradient kernels).
PREPARED = ("prepared_forward", "prepared_backward")


class _Conv3x3(nn.Module):
  """A 3x3 stride-1 pad-1 convolution computed by conv.conv3x3(method).

  Parameters as nn.Conv names and shapes them ('kernel' [3, 3, C_in,
  C_out], 'bias' [C_out]), so weights load the same for every method; if
  prepare_params added the PREPARED kernel forms they are used instead of
  transforming the kernel at every call. The 'matmul' and 'winograd'
  methods give the kernel no gradient.
  """
  features: int
  method: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    prepared = None
    if all(self.has_variable("params", name) for name in PREPARED):
      prepared = tuple(self.get_variable("params", name)
                       for name in PREPARED)
    return conv_lib.conv3x3(x, kernel.astype(self.dtype),
                            bias.astype(self.dtype), method=self.method,
                            prepared=prepared)


class VGG(nn.Module):
  """VGG19 / VGG16 convolutional trunk returning named features.

  Attributes:
    network: 'vgg19' or 'vgg16'.
    pooling: 'max' (Caffe ceil mode, the reference) or 'avg'.
    dtype: computation dtype (float32; bfloat16 on accelerators).
    conv: how the 3x3 convolutions run, one of conv.CONVS: 'xla'
      (flax's nn.Conv, lax.conv_general_dilated), 'matmul' or 'winograd'
      (matmul forms with an input-only custom VJP: the weights get no
      gradient; 'winograd' only on the layers conv.layer_method gives it,
      'xla' on the others), 'auto' (conv.resolve's pick for the backend).
      vgg.prepare_params(params, conv) precomputes the kernels' forms.
  """
  network: str = "vgg19"
  pooling: str = "max"
  dtype: Any = jnp.float32
  conv: str = "xla"

  @nn.compact
  def __call__(self, images: jnp.ndarray,
               outputs: Optional[Sequence[str]] = None,
               window: Optional[Tuple[Any, Any, int, int]] = None
               ) -> Dict[str, jnp.ndarray]:
    """images: [N, H, W, 3] preprocessed. Returns {name: [N, h, w, c]}.

    `outputs` (default: every layer) selects the returned activations; the
    forward pass stops at the deepest of them.

    window: (top, left, height, width) when `images` is a crop of a larger
    [height, width] image whose pixel (0, 0) lies at (top, left) of it (top
    and left may be traced and negative, and must be multiples of the total
    stride of the deepest output, so pooling windows line up). Every map's
    positions outside the image are zeroed before each convolution and
    pool: the whole image's zero padding, wherever the crop's border lies.
    Max pools read ReLU outputs (>= 0) so a zero never beats a pixel
    inside, and a window never straddles the top or left border, so even
    ties route the gradient as on the whole image; avg pools divide by the
    count of positions inside, as the ceil mode does. The crop's sides must
    be multiples of that stride too.
    """
    names = layer_names(self.network)
    if self.pooling not in POOLINGS:
      raise ValueError(f"--pooling: unknown pooling {self.pooling!r}; "
                       f"expected one of {POOLINGS}")
    if outputs is None:
      outputs = names
    if not outputs:
      raise ValueError("--outputs: no layers asked for")
    check_layers(outputs, self.network, flag="outputs")
    conv_lib.check_method(self.conv)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"VGG expects images of shape [N, H, W, 3], got "
                       f"{images.shape}")
    deepest = max(names.index(n) for n in outputs)
    wanted = set(outputs)
    features = {}
    x = images.astype(self.dtype)
    stride = 1
    for name in names[:deepest + 1]:
      if name.startswith("conv"):
        if window is not None:
          x = _mask_outside(x, window, stride)
        channels = conv_shapes(self.network)[name]["kernel"][-1]
        c_in = conv_shapes(self.network)[name]["kernel"][2]
        if conv_lib.layer_method(self.conv, c_in, channels) == "xla":
          x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)),
                      dtype=self.dtype, name=name)(x)
        else:
          x = _Conv3x3(channels, conv_lib.layer_method(self.conv, c_in,
                                                       channels),
                       dtype=self.dtype,
                       name=name)(x)
      elif name.startswith("relu"):
        x = nn.relu(x)
      elif window is None:
        x = pool2x2_ceil(x, self.pooling)
      else:
        x = _window_pool(x, window, stride, self.pooling)
        stride *= 2
      if name in wanted:
        features[name] = x
    return features


def _inside(shape, window, stride):
  """[1, h, w, 1] bool: which positions of a crop's map of total stride
  `stride` lie inside the image (`VGG`'s window)."""
  top, left, height, width = window
  _, h, w, _ = shape
  rows = lax.broadcasted_iota(jnp.int32, (1, h, 1, 1), 1) + top // stride
  cols = lax.broadcasted_iota(jnp.int32, (1, 1, w, 1), 2) + left // stride
  return ((rows >= 0) & (rows < -(-height // stride)) &
          (cols >= 0) & (cols < -(-width // stride)))


def _mask_outside(x, window, stride):
  return jnp.where(_inside(x.shape, window, stride), x, 0).astype(x.dtype)


def _window_pool(x, window, stride, kind):
  """pool2x2_ceil of a crop's map as the whole image's pool would give it:
  x [N, h, w, C] with h, w even (the crop is stride-aligned)."""
  inside = _inside(x.shape, window, stride)
  x = jnp.where(inside, x, 0).astype(x.dtype)
  if kind == "max":
    return _max_pool2x2(x)
  if kind != "avg":
    raise ValueError(f"--pooling: unknown pooling {kind!r}; expected one "
                     f"of {POOLINGS}")
  total = jnp.sum(_pool_windows(x, 0.0), axis=(2, 4))
  count = jnp.sum(_pool_windows(inside.astype(x.dtype), 0.0), axis=(2, 4))
  return total / jnp.maximum(count, 1)


def init_params(network: str = "vgg19", seed: int = 0,
                scale: float = 1.0) -> Dict[str, Any]:
  """Random parameters {'conv1_1': {'kernel', 'bias'}, ...} (He-normal
  kernels times `scale`, small random biases) for tests and shape checks."""
  rng = np.random.default_rng(seed)
  params = {}
  for name, shapes in conv_shapes(network).items():
    fan_in = np.prod(shapes["kernel"][:3])
    params[name] = {
        "kernel": (rng.standard_normal(shapes["kernel"]) * scale *
                   np.sqrt(2.0 / fan_in)).astype(np.float32),
        "bias": (rng.standard_normal(shapes["bias"]) * 0.01).astype(np.float32),
    }
  return params


def prepare_params(params: Dict[str, Any], conv: str,
                   network: str = "vgg19",
                   layers: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """`params` plus, per conv layer, the kernel forms conv.prepare_kernel
  makes for `conv` (PREPARED names), so VGG(conv=conv) does not transform
  the weights at every call. Unchanged copy for 'xla' (it needs none).

  Winograd F(4x4, 3x3) forms hold 8x a kernel's floats (36 frequencies,
  forward and input gradient), so only the conv layers up to the deepest of
  `layers` (default: all) are prepared; deeper ones, if run, transform
  their kernel at each call. Call once, outside the optimisation loop; the
  result is valid only for the same `conv` method and weights.
  """
  names = layer_names(network)
  last = len(names)
  if layers is not None:
    check_layers(layers, network, flag="layers")
    last = max(names.index(l) for l in layers) + 1
  to_prepare = set(names[:last]) & set(conv_shapes(network))
  prepared = {}
  for name, layer in params.items():
    layer = dict(layer)
    if name in to_prepare:
      _, _, c_in, c_out = conv_shapes(network)[name]["kernel"]
      forms = conv_lib.prepare_kernel(
          jnp.asarray(layer["kernel"]),
          conv_lib.layer_method(conv, c_in, c_out))
      layer.update(zip(PREPARED, forms))
    prepared[name] = layer
  return prepared


def preprocess(rgb: jnp.ndarray, convention: str = "caffe") -> jnp.ndarray:
  """RGB in [0, 1], [..., 3] -> network input for `convention`."""
  if convention == "caffe":
    return rgb[..., ::-1] * CAFFE_SCALE - CAFFE_MEAN_BGR
  if convention == "torchvision":
    return (rgb - TORCHVISION_MEAN) / TORCHVISION_STD
  raise ValueError(f"unknown preprocessing convention {convention!r}; "
                   f"expected one of {CONVENTIONS}")


def deprocess(x: jnp.ndarray, convention: str = "caffe") -> jnp.ndarray:
  """Inverse of `preprocess`: network input -> RGB (unclipped), [..., 3]."""
  if convention == "caffe":
    return ((x + CAFFE_MEAN_BGR) / CAFFE_SCALE)[..., ::-1]
  if convention == "torchvision":
    return x * TORCHVISION_STD + TORCHVISION_MEAN
  raise ValueError(f"unknown preprocessing convention {convention!r}; "
                   f"expected one of {CONVENTIONS}")
