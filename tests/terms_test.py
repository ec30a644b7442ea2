"""Tests for cnnmrf_jax.terms: the registry and the objective it builds.

A toy term is added the way a new loss term would be (a `Term` and
`register`, no edit to the driver or the solver) and must then show up in
the objective, its gradient, the log and the result.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import losses
from cnnmrf_jax import synthesize
from cnnmrf_jax import terms
from cnnmrf_jax import vgg


def _config(images, **changes):
  return config_lib.replace(config_lib.Config(
      content_image=images["content"], style_image=(images["style"],),
      max_size=32, num_res=1, num_iter=(3,), print_every=3,
      mrf_layers=("relu2_1",), content_layers=("relu2_1",)), **changes)


def _brightness_term(target_value: float) -> terms.Term:
  """A toy term: weight * (mean(x) - target)^2, its target built per level
  from the content image's mean (to exercise build) plus a constant."""
  def build(pair):
    return {"mean": np.float32(np.mean(pair.content) * 0 + target_value)}

  def loss(config, x, features, targets, weight):
    del config, features
    value = weight * jnp.square(jnp.mean(x) - targets["mean"])
    return {"": value}, {"brightness_mean": jnp.mean(x)}

  return terms.Term(name="brightness", active=lambda c: c.tv_weight > 0,
                    layers=lambda c: ("relu1_1",),
                    weights=lambda c: np.float32(10.0), build=build,
                    loss=loss)


def test_builtin_terms_follow_the_mode(tiny_images):
  names = lambda **c: [t.name for t in terms.active_terms(
      _config(tiny_images, **c))]
  assert names() == ["mrf", "content", "tv"]
  assert names(mode="texture") == ["mrf", "tv"]
  assert names(mode="gatys") == ["content", "gram", "tv"]
  assert names(tv_weight=0.0, content_weight=0.0) == ["mrf"]
  assert terms.feature_layers(_config(tiny_images)) == ("relu2_1",)


def test_objective_is_the_sum_of_its_terms(tiny_images, random_vgg19):
  config = _config(tiny_images)
  synthesizer = synthesize.Synthesizer(config, *random_vgg19)
  inputs = synthesize.load_inputs(config)
  from cnnmrf_jax import plan, targets  # pylint: disable=g-import-not-at-top
  run_plan = plan.make(config, inputs.sizes())
  level = run_plan.levels[0]
  stacked = targets.level_targets(config, run_plan, level, inputs,
                                  synthesizer.features)
  one = jax.tree.map(lambda a: a[0], stacked)
  x = targets.initial_images(config, inputs, level.size, "caffe")[0]
  total, aux = synthesizer.objective(x, synthesizer.params, one)
  np.testing.assert_allclose(total, sum(aux["terms"].values()), rtol=1e-6)
  assert set(aux["terms"]) == {"mrf_relu2_1", "content_relu2_1", "tv"}
  # Each term equals its loss function called directly.
  np.testing.assert_allclose(aux["terms"]["tv"],
                             losses.tv_loss(x, weight=config.tv_weight),
                             rtol=1e-6)


def test_a_registered_term_joins_the_objective_without_other_edits(
    tiny_images, random_vgg19):
  config = _config(tiny_images)
  params, convention = random_vgg19
  plain = synthesize.run(config, params=params, convention=convention)
  with terms.registered(_brightness_term(-50.0)):
    assert "relu1_1" in config.feature_layers()
    toy = synthesize.run(config, params=params, convention=convention)
  assert "brightness" not in plain.history[-1]
  record = toy.history[-1]
  assert "brightness" in record and "brightness_mean" in record
  others = sum(v[0] for k, v in record.items()
               if k in ("mrf_relu2_1", "content_relu2_1", "tv", "brightness"))
  np.testing.assert_allclose(record["loss"][0], others, rtol=1e-5)
  # Its gradient acts: the toy term pulls the mean pixel towards -50.
  mean = lambda r: np.mean(vgg.preprocess(r.images[0], convention))
  assert mean(toy) < mean(plain) - 1.0
  # Gone again outside the with block.
  assert "brightness" not in [t.name for t in terms.active_terms(config)]


def test_names_are_unique():
  with pytest.raises(ValueError, match="already registered"):
    terms.register(terms.Term("tv", lambda c: True, lambda c: (),
                              lambda c: 0.0, lambda p: {}, None))
