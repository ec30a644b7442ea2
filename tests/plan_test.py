"""Tests for cnnmrf_jax.plan: every size of a run, and its size rules."""

import json

import numpy as np
import pytest

from cnnmrf_jax import augment
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import memory
from cnnmrf_jax import patches
from cnnmrf_jax import plan
from cnnmrf_jax import vgg


def _config(**changes):
  return config_lib.Config(content_image="c.png", style_image=("s.png",),
                           **changes)


def test_fit_long_side():
  # torch image.scale(img, 384), as the reference resizes its inputs:
  # each side * 384 / long side, truncated (600x512 -> 384x327).
  assert plan.fit_long_side(512, 512, 384) == (384, 384)
  assert plan.fit_long_side(600, 512, 384) == (384, 327)  # 327.68
  assert plan.fit_long_side(383, 511, 384) == (287, 384)  # 287.8
  assert plan.fit_long_side(100, 300, 384) == (128, 384)  # Exact.
  assert plan.fit_long_side(1, 1001, 384) == (1, 384)
  assert plan.fit_long_side(7, 5, 1000) == (1000, 714)  # Upscale, 714.3
  with pytest.raises(ValueError):
    plan.fit_long_side(0, 5, 10)


def test_pyramid_sizes():
  assert plan.pyramid_sizes(384, 328, 3) == [(96, 82), (192, 164),
                                                  (384, 328)]
  assert plan.pyramid_sizes(383, 511, 3) == [(96, 128), (192, 256),
                                                  (383, 511)]
  assert plan.pyramid_sizes(5, 3, 4) == [(1, 1), (2, 1), (3, 2), (5, 3)]
  assert plan.pyramid_sizes(10, 20, 1) == [(10, 20)]
  with pytest.raises(ValueError):
    plan.pyramid_sizes(10, 20, 0)


def test_plan_sizes_match_the_reference_rules():
  config = _config(num_rotations=1, num_scales=1)
  run_plan = plan.make(config, [plan.InputSizes((600, 512), ((480, 640),))])
  assert run_plan.output_size == (384, 327)
  assert [l.size for l in run_plan.levels] == [(96, 82), (192, 164),
                                               (384, 327)]
  finest = plan.fit_long_side(480, 640, 384)
  for level, scale in zip(run_plan.levels, (0.25, 0.5, 1.0)):
    style = level.styles[0][0]
    # The reference: ceil(side * 0.5^k) of the finest style, side by side.
    assert style == tuple(int(np.ceil(s * scale)) for s in finest)
    assert level.copies[0] == tuple(augment.copy_sizes(
        *style, num_rotations=1, num_scales=1))
    assert len(level.copies[0]) == 9
    for mrf in level.mrf:
      maps = [vgg.map_size(h, w, mrf.layer) for h, w in level.copies[0]]
      assert mrf.bank_size == patches.bank_size(maps, 3, 2)
      synth = vgg.map_size(*level.size, mrf.layer)
      assert mrf.num_patches == patches.num_patches(*synth, 3, 2)
    names = [l.name for l in level.layers]
    assert names == ["relu3_1", "relu4_1", "relu4_2"]
  assert run_plan.memory_bytes == max(
      l.memory_bytes for l in run_plan.levels) + memory.fixed_bytes(
          config, 600 * 512 + 480 * 640)
  assert json.loads(run_plan.to_json())["levels"][2]["size"] == [384, 327]
  assert "level 3: 384x327 px, 100 iterations, 9 style copies" in (
      run_plan.table())


def test_texture_output_is_scaler_times_the_exemplar():
  config = config_lib.Config(mode="texture", style_image=("s.png",),
                             max_size=256, num_res=2)
  run_plan = plan.make(config, [plan.InputSizes(None, ((300, 400),))])
  assert run_plan.output_size == (192, 256)
  assert run_plan.levels[-1].styles[0][0] == (96, 128)
  # syn_CNNMRF_wrapper.lua: the exemplar to floor(max_size / scaler).
  odd = config_lib.replace(config, max_size=255)
  odd_plan = plan.make(odd, [plan.InputSizes(None, ((300, 400),))])
  assert odd_plan.levels[-1].styles[0][0] == (95, 127)


def test_pairs_with_other_style_sizes_get_one_padded_bank():
  config = _config(max_size=64, num_res=1)
  run_plan = plan.make(config, [plan.InputSizes((64, 64), ((64, 64),)),
                                plan.InputSizes((64, 64), ((32, 64),))])
  for mrf in run_plan.levels[0].mrf:
    assert mrf.bank_size == max(mrf.bank_sizes)
    assert mrf.bank_sizes[0] > mrf.bank_sizes[1]
  plan.check_batch(run_plan)


def test_pairs_of_other_output_sizes_fail_naming_both():
  config = _config(max_size=64, num_res=1)
  run_plan = plan.make(config, [plan.InputSizes((64, 64), ((64, 64),)),
                                plan.InputSizes((32, 64), ((64, 64),))])
  with pytest.raises(config_lib.ConfigError,
                     match=r"--pairs: pair 1 gives a \(32, 64\) output, pair "
                     r"0 \(64, 64\)"):
    plan.check_batch(run_plan)


def test_too_small_names_the_flag():
  config = _config(num_res=3)
  ok = plan.make(config, [plan.InputSizes((384, 384), ((384, 384),))])
  plan.check_sizes(config, ok)  # relu4_1 at the coarsest level is 12x12
  small = plan.make(_config(num_res=3, max_size=160),
                    [plan.InputSizes((64, 160), ((160, 160),))])
  with pytest.raises(config_lib.ConfigError,
                     match="--content_image.*relu4_1 is 2x5.*lower --num_res"):
    plan.check_sizes(_config(num_res=3, max_size=160), small)


def test_too_small_style_copy_says_the_augmentation_is_why():
  config = _config(max_size=128, num_res=2, num_rotations=4, num_scales=3)
  run_plan = plan.make(config, [plan.InputSizes((128, 128), ((40, 128),))])
  with pytest.raises(config_lib.ConfigError,
                     match="--style_image.*rotated or scaled copy"):
    plan.check_sizes(config, run_plan)


def test_a_thin_image_blames_the_aspect_ratio():
  config = _config(num_res=3)
  run_plan = plan.make(config, [plan.InputSizes((1, 10000), ((384, 384),))])
  with pytest.raises(config_lib.ConfigError,
                     match="--content_image.*aspect ratio.*no --max_size"):
    plan.check_sizes(config, run_plan)
