"""Tests for cnnmrf_jax.vgg.

The Flax forward pass is checked against an independent float64 numpy
reference written here: NCHW activations, OIHW kernels, a 'same' 3x3
cross-correlation, ReLU, and Caffe's ceil-mode 2x2 pooling (ceil(n / 2)
outputs, the last window clipped to the border; 'avg' divides by the number
of valid pixels). The layer schedule is spelled out here too rather than
taken from vgg.layer_names, so naming and ordering are checked as well.
"""

import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from cnnmrf_jax import vgg

# Channels per conv, 'M' for a pool: torchvision's cfg 'E' (VGG19) and
# 'D' (VGG16), i.e. Simonyan & Zisserman table 1, columns E and D.
_CFG = {
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"),
}

# Activation-relative tolerance: max |flax - ref| <= _RTOL * max |ref|.
_RTOL = 1e-4


def _ref_schedule(network):
  """[(name, kind, channels)] in forward order, built from _CFG."""
  schedule, block, conv = [], 1, 1
  for item in _CFG[network]:
    if item == "M":
      schedule.append((f"pool{block}", "pool", None))
      block, conv = block + 1, 1
    else:
      schedule.append((f"conv{block}_{conv}", "conv", item))
      schedule.append((f"relu{block}_{conv}", "relu", None))
      conv += 1
  return schedule


def _ref_conv3x3(x, kernel_hwio, bias):
  """'Same' 3x3 cross-correlation. x: [N, C, H, W]; returns [N, O, H, W]."""
  w = np.asarray(kernel_hwio, np.float64).transpose(3, 2, 0, 1)  # OIHW.
  _, _, h, wd = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  out = 0.0
  for dy in range(3):
    for dx in range(3):
      window = xp[:, :, dy:dy + h, dx:dx + wd]  # [N, C, H, W]
      # [O, C] x [N, C, H, W] -> [O, N, H, W].
      out = out + np.tensordot(w[:, :, dy, dx], window, axes=([1], [1]))
  return out.transpose(1, 0, 2, 3) + np.asarray(bias)[None, :, None, None]


def _ref_pool(x, kind):
  """Caffe ceil-mode 2x2 stride-2 pooling. x: [N, C, H, W]."""
  n, c, h, w = x.shape
  out = np.empty((n, c, math.ceil(h / 2), math.ceil(w / 2)), x.dtype)
  for i in range(out.shape[2]):
    for j in range(out.shape[3]):
      # Numpy slicing clips the last window to the border, as Caffe does.
      window = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
      if kind == "max":
        out[:, :, i, j] = window.max(axis=(2, 3))
      else:
        out[:, :, i, j] = window.sum(axis=(2, 3)) / window[0, 0].size
  return out


def _ref_forward(params, images_nhwc, network, pooling, last):
  """Float64 reference activations {name: [N, H, W, C]} up to `last`."""
  x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)
  acts = {}
  for name, kind, _ in _ref_schedule(network):
    if kind == "conv":
      x = _ref_conv3x3(x, params[name]["kernel"], params[name]["bias"])
    elif kind == "relu":
      x = np.maximum(x, 0.0)
    else:
      x = _ref_pool(x, pooling)
    acts[name] = x.transpose(0, 2, 3, 1)
    if name == last:
      break
  return acts


def _images(shape, seed=0):
  """Caffe-preprocessed random RGB images of `shape` [N, H, W, 3]."""
  rgb = np.random.default_rng(seed).uniform(size=shape).astype(np.float32)
  return np.asarray(vgg.preprocess(rgb, "caffe"), np.float32)


def _assert_close_to_scale(test, actual, expected, name, rtol=_RTOL):
  actual = np.asarray(actual, np.float64)
  test.assertEqual(actual.shape, expected.shape, name)
  scale = np.abs(expected).max()
  err = np.abs(actual - expected).max()
  test.assertLessEqual(err, rtol * scale + 1e-6,
                       f"{name}: max err {err:.3g} vs scale {scale:.3g}")


def _apply_fn(model, outputs):
  """Jitted model.apply with static `outputs`."""
  return jax.jit(functools.partial(model.apply, outputs=outputs))


def _count_convs(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


class ForwardTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("vgg19_max_37x29", "vgg19", "max", 37, 29),
      ("vgg19_max_33x33", "vgg19", "max", 33, 33),
      ("vgg19_avg_37x29", "vgg19", "avg", 37, 29),
      ("vgg16_max_33x33", "vgg16", "max", 33, 33),
  )
  def test_matches_reference_up_to_relu5_1(self, network, pooling, h, w):
    params = vgg.init_params(network, seed=1)
    images = _images((1, h, w, 3))
    names = [name for name, _, _ in _ref_schedule(network)]
    wanted = names[:names.index("relu5_1") + 1]
    model = vgg.VGG(network=network, pooling=pooling)
    got = _apply_fn(model, tuple(wanted))({"params": params}, images)
    want = _ref_forward(params, images, network, pooling, last="relu5_1")
    self.assertEqual(sorted(got), sorted(want))
    for name in wanted:
      _assert_close_to_scale(self, got[name], want[name], name)
    # relu5_1 of a 37x29 input: 37->19->10->5->3 by 29->15->8->4->2.
    self.assertEqual(got["relu5_1"].shape[1:3],
                     (math.ceil(h / 16), math.ceil(w / 16)))

  @parameterized.product(kind=("max", "avg"),
                         shape=((2, 5, 7, 3), (1, 4, 6, 2), (1, 1, 3, 1)))
  def test_pool2x2_ceil_matches_reference(self, kind, shape):
    # All-negative inputs: a max pool that pads with 0 would be caught here
    # (inside the network pooling only ever sees ReLU outputs >= 0).
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    x -= 10.0
    got = vgg.pool2x2_ceil(jnp.asarray(x), kind)
    want = _ref_pool(x.transpose(0, 3, 1, 2).astype(np.float64), kind)
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-6)

  @parameterized.parameters((2, 5, 7, 3), (1, 4, 6, 2), (1, 1, 3, 1))
  def test_max_pool_gradient_goes_to_the_first_maximum(self, *shape):
    # Small integers tie often; the gradient must go to the first maximal
    # element of each window (row-major), as XLA's select-and-scatter, Caffe
    # and torch route it. (The JVP of lax.reduce_window breaks ties its own
    # way, not always as its VJP does; ours is the VJP's transpose.)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.integers(0, 3, shape).astype(np.float32))
    g = jnp.asarray(rng.standard_normal(
        (shape[0], -(-shape[1] // 2), -(-shape[2] // 2), shape[3])),
                    jnp.float32)
    pad = ((0, 0), (0, shape[1] % 2), (0, shape[2] % 2), (0, 0))
    reference = lambda x: jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), pad)
    want = jax.vjp(reference, x)[1](g)[0]
    got = jax.vjp(vgg.pool2x2_ceil, x)[1](g)[0]
    np.testing.assert_array_equal(got, want)
    t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    tangent_out = jax.jvp(vgg.pool2x2_ceil, (x,), (t,))[1]
    np.testing.assert_allclose(jnp.vdot(tangent_out, g), jnp.vdot(t, got),
                               rtol=1e-5)

  def test_pool2x2_ceil_rejects_unknown_kind(self):
    with self.assertRaisesRegex(ValueError, r"--pooling.*'median'"):
      vgg.pool2x2_ceil(jnp.zeros((1, 4, 4, 1)), "median")

  def test_bfloat16_close_to_float32(self):
    params = vgg.init_params("vgg19")
    images = _images((1, 17, 15, 3))
    outputs = ("relu2_1",)
    f32 = _apply_fn(vgg.VGG(), outputs)({"params": params}, images)
    bf16 = _apply_fn(vgg.VGG(dtype=jnp.bfloat16), outputs)(
        {"params": params}, images)
    self.assertEqual(bf16["relu2_1"].dtype, jnp.bfloat16)
    _assert_close_to_scale(self, bf16["relu2_1"],
                           np.asarray(f32["relu2_1"], np.float64),
                           "relu2_1", rtol=5e-2)


class DeepestLayerTest(absltest.TestCase):

  def test_init_creates_only_needed_params(self):
    model = vgg.VGG()
    variables = jax.eval_shape(
        functools.partial(model.init, outputs=["relu2_1"]),
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    self.assertEqual(set(variables), {"params"})
    self.assertEqual(set(variables["params"]),
                     {"conv1_1", "conv1_2", "conv2_1"})

  def test_apply_needs_and_computes_only_needed_layers(self):
    all_params = vgg.init_params("vgg19")
    few = {"params": {k: all_params[k]
                      for k in ("conv1_1", "conv1_2", "conv2_1")}}
    images = _images((1, 12, 10, 3))
    model = vgg.VGG()
    fn = functools.partial(model.apply, outputs=["relu2_1"])
    got = fn(few, images)  # Would fail if a deeper conv were built.
    self.assertEqual(set(got), {"relu2_1"})
    self.assertEqual(got["relu2_1"].shape, (1, 6, 5, 128))
    self.assertEqual(_count_convs(fn, few, images), 3)
    full = functools.partial(model.apply, outputs=None)
    self.assertEqual(_count_convs(full, {"params": all_params}, images), 16)
    # Extra params are ignored; results agree with the full forward pass.
    want = model.apply({"params": all_params}, images)["relu2_1"]
    np.testing.assert_allclose(got["relu2_1"], want, rtol=1e-6, atol=1e-6)

  def test_returns_exactly_requested_keys(self):
    model = vgg.VGG(network="vgg16")
    variables = {"params": vgg.init_params("vgg16")}
    outputs = ["relu3_1", "conv1_1", "pool2"]
    got = jax.eval_shape(functools.partial(model.apply, outputs=outputs),
                         variables, jnp.zeros((1, 20, 20, 3)))
    self.assertEqual(set(got), set(outputs))
    self.assertEqual(got["pool2"].shape, (1, 5, 5, 128))

  def test_default_returns_every_layer(self):
    for network in vgg.NETWORKS:
      model = vgg.VGG(network=network)
      variables = {"params": vgg.init_params(network)}
      got = jax.eval_shape(model.apply, variables, jnp.zeros((1, 8, 8, 3)))
      want = [name for name, _, _ in _ref_schedule(network)]
      # eval_shape hands dicts back with sorted keys: compare as sets.
      self.assertEqual(set(got), set(want))
      self.assertEqual(vgg.layer_names(network), want)


class ParamsTest(parameterized.TestCase):

  @parameterized.parameters("vgg19", "vgg16")
  def test_init_matches_conv_shapes(self, network):
    model = vgg.VGG(network=network)
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               jnp.zeros((1, 32, 32, 3)))
    shapes = jax.tree.map(lambda a: tuple(a.shape), variables["params"])
    self.assertEqual(shapes, vgg.conv_shapes(network))

  @parameterized.parameters("vgg19", "vgg16")
  def test_conv_shapes_and_init_params(self, network):
    convs = [(n, c) for n, kind, c in _ref_schedule(network) if kind == "conv"]
    shapes = vgg.conv_shapes(network)
    self.assertEqual(list(shapes), [n for n, _ in convs])
    in_channels = 3
    for name, channels in convs:
      self.assertEqual(shapes[name], {"kernel": (3, 3, in_channels, channels),
                                      "bias": (channels,)})
      in_channels = channels
    params = vgg.init_params(network)
    self.assertEqual(jax.tree.map(np.shape, params), shapes)
    self.assertTrue(all(a.dtype == np.float32
                        for a in jax.tree.leaves(params)))


class LayerInfoTest(parameterized.TestCase):

  @parameterized.parameters(
      ("relu3_1", 256, 4), ("relu4_2", 512, 8), ("pool5", 512, 32),
      ("conv1_1", 64, 1), ("pool1", 64, 2), ("conv5_4", 512, 16))
  def test_channels_and_downsampling(self, layer, channels, downsampling):
    self.assertEqual(vgg.channels_of(layer), channels)
    self.assertEqual(vgg.downsampling_of(layer), downsampling)

  @parameterized.parameters("vgg19", "vgg16")
  def test_layer_info_matches_forward_shapes(self, network):
    h, w = 37, 29
    model = vgg.VGG(network=network)
    variables = {"params": vgg.init_params(network)}
    got = jax.eval_shape(model.apply, variables, jnp.zeros((1, h, w, 3)))
    for name, act in got.items():
      ds = vgg.downsampling_of(name, network)
      want = (1, math.ceil(h / ds), math.ceil(w / ds),
              vgg.channels_of(name, network))
      self.assertEqual(act.shape, want, name)

  def test_check_layers_names_flag_and_layer(self):
    vgg.check_layers(["relu1_1", "pool5", "conv5_4"], "vgg19")
    with self.assertRaisesRegex(ValueError, r"--style_layers.*'relu9_1'"):
      vgg.check_layers(["relu3_1", "relu9_1"], flag="style_layers")
    # conv3_4 exists in VGG19 only.
    with self.assertRaisesRegex(ValueError, r"--layers.*'conv3_4'.*vgg16"):
      vgg.check_layers(["conv3_4"], "vgg16")
    with self.assertRaisesRegex(ValueError, r"--layer\b.*'relu6_1'"):
      vgg.channels_of("relu6_1")
    with self.assertRaisesRegex(ValueError, r"--layer\b.*'relu3'"):
      vgg.downsampling_of("relu3")
    with self.assertRaisesRegex(ValueError, r"--network.*'vgg11'"):
      vgg.layer_names("vgg11")

  def test_model_rejects_bad_arguments(self):
    images = jnp.zeros((1, 8, 8, 3))
    key = jax.random.key(0)
    with self.assertRaisesRegex(ValueError, r"--outputs.*'relu1_3'"):
      vgg.VGG().init(key, images, outputs=["relu1_3"])
    with self.assertRaisesRegex(ValueError, r"--outputs"):
      vgg.VGG().init(key, images, outputs=[])
    with self.assertRaisesRegex(ValueError, r"--pooling.*'median'"):
      vgg.VGG(pooling="median").init(key, images, outputs=["relu1_1"])
    with self.assertRaisesRegex(ValueError, r"--network.*'vgg11'"):
      vgg.VGG(network="vgg11").init(key, images)
    with self.assertRaisesRegex(ValueError, r"\[N, H, W, 3\]"):
      vgg.VGG().init(key, jnp.zeros((1, 3, 8, 8)))


class PreprocessTest(parameterized.TestCase):

  @parameterized.parameters("caffe", "torchvision")
  def test_round_trip(self, convention):
    rgb = np.random.default_rng(3).uniform(size=(2, 4, 5, 3))
    rgb = jnp.asarray(rgb, jnp.float32)
    x = vgg.preprocess(rgb, convention)
    self.assertEqual(x.shape, rgb.shape)
    np.testing.assert_allclose(vgg.deprocess(x, convention), rgb, atol=1e-5)

  def test_caffe_is_bgr_times_256_minus_mean(self):
    red = np.array([1.0, 0.0, 0.0], np.float32)
    np.testing.assert_allclose(vgg.preprocess(red, "caffe"),
                               [-103.939, -116.779, 256.0 - 123.68],
                               rtol=0, atol=1e-4)
    blue = np.array([0.0, 0.0, 1.0], np.float32)
    np.testing.assert_allclose(vgg.preprocess(blue, "caffe"),
                               [256.0 - 103.939, -116.779, -123.68],
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(
        vgg.deprocess(np.array([-103.939, -116.779, 132.32]), "caffe"),
        [1.0, 0.0, 0.0], atol=1e-6)

  def test_torchvision_is_rgb_standardized(self):
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    np.testing.assert_allclose(vgg.preprocess(mean, "torchvision"), 0.0,
                               atol=1e-7)
    np.testing.assert_allclose(vgg.preprocess(np.ones(3), "torchvision"),
                               (1.0 - mean) / std, rtol=1e-6)

  def test_unknown_convention_raises(self):
    x = np.zeros((2, 2, 3), np.float32)
    with self.assertRaisesRegex(ValueError, r"'keras'"):
      vgg.preprocess(x, "keras")
    with self.assertRaisesRegex(ValueError, r"'keras'"):
      vgg.deprocess(x, "keras")


class JitBatchTest(absltest.TestCase):

  def test_batch_matches_single_examples(self):
    model = vgg.VGG()
    variables = {"params": vgg.init_params("vgg19", seed=4)}
    outputs = ("relu1_1", "relu3_1", "relu4_2")
    fn = _apply_fn(model, outputs)
    images = _images((2, 27, 21, 3), seed=5)
    batch = fn(variables, images)
    for i in range(2):
      single = fn(variables, images[i:i + 1])
      for name in outputs:
        self.assertEqual(batch[name].shape[0], 2)
        _assert_close_to_scale(self, batch[name][i:i + 1],
                               np.asarray(single[name], np.float64),
                               f"{name}[{i}]", rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
