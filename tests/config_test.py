"""Tests for cnnmrf_jax.config: defaults, checks naming the flag, flag files."""

import math

import pytest

from cnnmrf_jax import config as config_lib


def base(**changes):
  return config_lib.replace(
      config_lib.Config(content_image="c.png", style_image=("s.png",)),
      **changes)


def test_defaults_are_the_reference():
  c = base()
  assert c.mode == "transfer" and c.max_size == 384 and c.num_res == 3
  assert c.iterations_per_level() == (100, 100, 100)
  assert c.mrf_layers == ("relu3_1", "relu4_1")
  assert c.mrf_weights_per_layer() == (1e-4, 1e-4)
  assert c.content_layers == ("relu4_2",) and c.content_weight == 20
  assert c.tv_weight == 1e-3 and c.history_size == 25
  assert c.resolved_init == "content"
  assert base(mode="texture").resolved_init == "noise"
  c.validate()


@pytest.mark.parametrize("changes, flag", [
    (dict(num_iter=(10, 20)), "num_iter"),
    (dict(mrf_layers=("relu3_1", "relu9_9")), "mrf_layers"),
    (dict(content_layers=("conv_bogus",)), "content_layers"),
    (dict(mrf_weight=(1.0, 2.0, 3.0)), "mrf_weight"),
    (dict(content_weight=math.nan), "content_weight"),
    (dict(tv_weight=-1.0), "tv_weight"),
    (dict(mrf_weight=(math.inf,)), "mrf_weight"),
    (dict(style_image=()), "style_image"),
    (dict(content_image=""), "content_image"),
    (dict(mode="bogus"), "mode"),
    (dict(mode="texture", init="content"), "init"),
    (dict(style_blend_weights=(1.0, 2.0)), "style_blend_weights"),
    (dict(confidence_threshold=2.0), "confidence_threshold"),
    (dict(patch_size=0), "patch_size"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(resume=True, overwrite=True), "resume"),
])
def test_bad_values_name_the_flag(changes, flag):
  with pytest.raises(config_lib.ConfigError, match=f"--{flag}"):
    base(**changes).validate()


def test_flag_lines_round_trip_values():
  c = base(num_iter=(5, 6, 7), mrf_weight=(1e-4, 2e-4), original_colors=True)
  lines = c.to_flag_lines()
  assert "--num_iter=5,6,7" in lines
  assert "--mrf_weight=0.0001,0.0002" in lines
  assert "--original_colors" in lines
  assert not any(l.startswith(("--resume", "--overwrite")) for l in lines)
