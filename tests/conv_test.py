"""Tests for cnnmrf_jax.conv and the VGG's `conv` option.

Every method's forward values and input gradient (a VJP with a random
cotangent) are compared with lax.conv_general_dilated differentiated by JAX,
on single convolutions and through the whole VGG19 trunk to relu5_1 at an
odd image size (37 x 45: ceil-mode pooling and Winograd's tile padding on
every level; the trunk's gradient in float64, see VGGConvOptionTest). The
custom VJP is checked against finite differences in
float64, and the kernel and bias must get exactly zero cotangents.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax import lax
import jax.test_util
import numpy as np

from cnnmrf_jax import conv
from cnnmrf_jax import vgg

# (method, winograd_tile, relative tolerance): max |ours - ref| <= tol *
# max |ref|. F(4x4, 3x3)'s transforms hold entries up to 8 (A^T) and 1/24
# (G), so its float32 rounding is about ten times the direct form's.
_METHODS = (("matmul", 4, 1e-5), ("winograd", 2, 1e-5),
            ("winograd", 4, 1e-4))


def _reference_conv(x, kernel, bias):
  """The 3x3 stride-1 pad-1 convolution as XLA defines it, NHWC/HWIO."""
  y = lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               precision=lax.Precision.HIGHEST)
  return y + bias


def _random(shape, seed, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) *
                     scale, jnp.float32)


def _max_relative_error(ours, ref):
  return float(jnp.max(jnp.abs(ours - ref)) / jnp.max(jnp.abs(ref)))


class Conv3x3Test(parameterized.TestCase):

  @parameterized.product(
      method=_METHODS,
      shape=((1, 13, 11, 3, 16), (2, 9, 7, 32, 48), (1, 1, 1, 16, 8)))
  def test_values_and_input_gradient_match_lax(self, method, shape):
    name, tile, tol = method
    n, h, w, c_in, c_out = shape
    x = _random((n, h, w, c_in), 0)
    kernel = _random((3, 3, c_in, c_out), 1, 1 / np.sqrt(9 * c_in))
    bias = _random((c_out,), 2)
    cotangent = _random((n, h, w, c_out), 3)
    ref, ref_vjp = jax.vjp(lambda x: _reference_conv(x, kernel, bias), x)
    ours, our_vjp = jax.vjp(
        lambda x: conv.conv3x3(x, kernel, bias, method=name,
                               winograd_tile=tile), x)
    self.assertEqual(ours.shape, (n, h, w, c_out))
    self.assertLess(_max_relative_error(ours, ref), tol)
    self.assertLess(_max_relative_error(our_vjp(cotangent)[0],
                                        ref_vjp(cotangent)[0]), tol)

  @parameterized.parameters(("matmul", 4), ("winograd", 2), ("winograd", 4))
  def test_custom_vjp_matches_finite_differences(self, method, tile):
    with jax.enable_x64(True):
      rng = np.random.default_rng(4)
      x = jnp.asarray(rng.standard_normal((1, 5, 7, 16)))
      kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 4)))
      bias = jnp.asarray(rng.standard_normal((4,)))
      jax.test_util.check_grads(
          lambda x: conv.conv3x3(x, kernel, bias, method=method,
                                 winograd_tile=tile),
          (x,), order=1, modes=("rev",))

  @parameterized.parameters(("matmul", 4), ("winograd", 2), ("winograd", 4))
  def test_kernel_and_bias_get_zero_cotangents(self, method, tile):
    x = _random((1, 6, 5, 16), 5)
    kernel = _random((3, 3, 16, 8), 6)
    bias = _random((8,), 7)
    grad_kernel, grad_bias = jax.grad(
        lambda k, b: jnp.sum(conv.conv3x3(x, k, b, method=method,
                                          winograd_tile=tile) ** 2),
        argnums=(0, 1))(kernel, bias)
    np.testing.assert_array_equal(grad_kernel, 0)
    np.testing.assert_array_equal(grad_bias, 0)
    # Sanity: the true kernel gradient is not zero.
    true_grad = jax.grad(
        lambda k: jnp.sum(_reference_conv(x, k, bias) ** 2))(kernel)
    self.assertGreater(float(jnp.max(jnp.abs(true_grad))), 0)

  def test_flip_kernel_swaps_channels_and_flips_space(self):
    kernel = _random((3, 3, 4, 5), 8)
    flipped = conv.flip_kernel(kernel)
    self.assertEqual(flipped.shape, (3, 3, 5, 4))
    np.testing.assert_array_equal(flipped[0, 2, 1, 3], kernel[2, 0, 3, 1])

  @parameterized.parameters(("matmul", 4), ("winograd", 2), ("winograd", 4))
  def test_prepared_kernel_gives_the_same_values_and_gradient(self, method,
                                                              tile):
    x = _random((1, 7, 9, 16), 11)
    kernel = _random((3, 3, 16, 8), 12, 0.1)
    cotangent = _random((1, 7, 9, 8), 13)
    prepared = conv.prepare_kernel(kernel, method, tile)
    outputs = [jax.vjp(lambda x, p=p: conv.conv3x3(
        x, kernel, method=method, winograd_tile=tile, prepared=p), x)
               for p in (None, prepared)]
    np.testing.assert_allclose(outputs[0][0], outputs[1][0], rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(outputs[0][1](cotangent)[0],
                               outputs[1][1](cotangent)[0], rtol=1e-6,
                               atol=1e-6)
    self.assertEqual(conv.prepare_kernel(kernel, "xla"), ())

  def test_layer_method_keeps_winograd_for_deep_layers_only(self):
    self.assertEqual(conv.layer_method("winograd", 64, 64), "xla")
    self.assertEqual(conv.layer_method("winograd", 64, 128), "xla")
    self.assertEqual(conv.layer_method("winograd", 128, 128), "winograd")
    self.assertEqual(conv.layer_method("winograd", 128, 256), "winograd")
    self.assertEqual(conv.layer_method("winograd", 512, 512), "winograd")
    self.assertEqual(conv.layer_method("matmul", 3, 64), "matmul")
    self.assertEqual(conv.layer_method("auto", 512, 512, "gpu"), "xla")

  def test_resolve(self):
    self.assertEqual(conv.resolve("auto", "gpu"), "xla")
    self.assertEqual(conv.resolve("auto", "tpu"), "xla")
    self.assertEqual(conv.resolve("auto", "cpu"), conv.CPU_AUTO)
    self.assertIn(conv.CPU_AUTO, conv.CONVS)
    for method in ("xla", "matmul", "winograd"):
      self.assertEqual(conv.resolve(method, "gpu"), method)
    with self.assertRaisesRegex(conv.ConvError, "--conv"):
      conv.resolve("fft", "cpu")

  def test_bad_inputs_name_the_problem(self):
    x = jnp.zeros((1, 4, 4, 3))
    with self.assertRaisesRegex(ValueError, "kernel"):
      conv.conv3x3(x, jnp.zeros((3, 3, 4, 8)))
    with self.assertRaisesRegex(ValueError, "--winograd_tile"):
      conv.conv3x3(x, jnp.zeros((3, 3, 3, 8)), winograd_tile=3)


class VGGConvOptionTest(parameterized.TestCase):
  """Every layer to relu5_1 of VGG19, each method against conv='xla'.

  Features are compared in float32. The image gradient through the whole
  trunk is compared in float64: in float32 the methods' different rounding
  can flip a ReLU mask or a max-pool winner where a pre-activation lies
  within rounding of a tie, which changes the gradient over that unit's
  whole receptive field (a discontinuity, not an error of the method).
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.params = jax.tree.map(jnp.asarray, vgg.init_params("vgg19"))
    names = vgg.layer_names("vgg19")
    cls.outputs = names[:names.index("relu5_1") + 1]
    cls.image = _random((1, 37, 45, 3), 9, 50.0)
    cls.ref = cls._features("xla", cls.image)

  @classmethod
  def _features(cls, method, image, dtype=jnp.float32):
    return vgg.VGG(conv=method, dtype=dtype).apply(
        {"params": cls.params}, image, outputs=cls.outputs)

  @parameterized.parameters(("matmul", True), ("winograd", False),
                            ("winograd", True), ("auto", False))
  def test_features_match_xla(self, method, prepared):
    params = (vgg.prepare_params(self.params, method) if prepared
              else self.params)
    ours = jax.jit(lambda p, x: vgg.VGG(conv=method).apply(
        {"params": p}, x, outputs=self.outputs))(params, self.image)
    tol = 1e-4 if conv.resolve(method) == "winograd" else 1e-5
    for name in self.outputs:
      self.assertEqual(ours[name].shape, self.ref[name].shape, name)
      self.assertLess(_max_relative_error(ours[name], self.ref[name]), tol,
                      name)

  @parameterized.parameters("matmul", "winograd")
  def test_image_gradient_matches_xla(self, method):
    with jax.enable_x64(True):
      image = self.image.astype(jnp.float64)
      features = functools.partial(self._features, dtype=jnp.float64)
      # One compiled program per method (op-by-op dispatch compiles every
      # Winograd stage on its own, many times slower).
      @functools.partial(jax.jit, static_argnums=0)
      def value_and_vjp(method, image, cotangents):
        values, vjp = jax.vjp(lambda x: features(method, x), image)
        return values, vjp(cotangents)[0]

      shapes = jax.eval_shape(lambda x: features("xla", x), image)
      cotangents = {
          name: _random(value.shape, 10 + i).astype(jnp.float64)
          for i, (name, value) in enumerate(sorted(shapes.items()))}
      ref, ref_grad = value_and_vjp("xla", image, cotangents)
      ours, our_grad = value_and_vjp(method, image, cotangents)
      self.assertLess(_max_relative_error(ours["relu5_1"], ref["relu5_1"]),
                      1e-9)
      self.assertLess(_max_relative_error(our_grad, ref_grad), 1e-9)

  def test_prepare_params_stops_at_the_deepest_layer(self):
    params = vgg.prepare_params(self.params, "winograd", layers=["relu4_2"])
    self.assertIn(vgg.PREPARED[0], params["conv4_2"])
    self.assertNotIn(vgg.PREPARED[0], params["conv4_3"])
    self.assertIn(vgg.PREPARED[0], params["conv2_2"])  # 128 -> 128
    self.assertNotIn(vgg.PREPARED[0], params["conv2_1"])  # runs as 'xla'
    self.assertEqual(params["conv4_2"][vgg.PREPARED[1]].shape, (36, 512, 512))
    self.assertNotIn(vgg.PREPARED[0], self.params["conv4_2"])  # a copy

  def test_ceil_mode_pooling_shapes(self):
    # 37 x 45 -> 19 x 23 -> 10 x 12 -> 5 x 6 -> 3 x 3 (ceil(n / 2) each).
    sides = [self.ref[f"pool{b}"].shape[1:3] for b in range(1, 5)]
    self.assertEqual(sides, [(19, 23), (10, 12), (5, 6), (3, 3)])

  def test_parameters_have_the_same_tree_for_every_method(self):
    image = jnp.zeros((1, 8, 8, 3))
    shapes = {
        method: jax.eval_shape(functools.partial(
            vgg.VGG(conv=method).init, outputs=["relu2_1"]),
                               jax.random.key(0), image)
        for method in ("xla", "matmul", "winograd")}
    self.assertEqual(shapes["matmul"], shapes["xla"])
    self.assertEqual(shapes["winograd"], shapes["xla"])

  def test_unknown_method_names_the_flag(self):
    with self.assertRaisesRegex(ValueError, "--conv"):
      vgg.VGG(conv="fft").apply({"params": self.params}, self.image,
                                outputs=["relu1_1"])


if __name__ == "__main__":
  absltest.main()
