"""Tests for exact tiled evaluation (cnnmrf_jax.tiling and its hooks in vgg,
patches, losses, terms, plan, memory): tiled and whole agree to float
rounding in value, gradient and the MRF target, with and without semantic
maps (then the matches and label agreement too); the plan tiles when it
must.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from cnnmrf_jax import augment
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import losses
from cnnmrf_jax import memory
from cnnmrf_jax import patches
from cnnmrf_jax import plan
from cnnmrf_jax import semantic
from cnnmrf_jax import synthesize
from cnnmrf_jax import terms
from cnnmrf_jax import tiling
from cnnmrf_jax import vgg

# Receptive field sides and total strides of VGG19 (3x3 convolutions with
# padding 1, 2x2 stride-2 pools), as tabulated for the network.
_FIELDS = {"relu1_1": (3, 1), "relu1_2": (5, 1), "pool1": (6, 2),
           "relu2_1": (10, 2), "relu2_2": (14, 2), "pool2": (16, 4),
           "relu3_1": (24, 4), "relu3_4": (48, 4), "pool3": (52, 8),
           "relu4_1": (68, 8), "relu4_2": (84, 8), "relu4_4": (116, 8),
           "pool4": (124, 16), "relu5_1": (156, 16)}


def _config(**changes):
  return config_lib.Config(content_image="c.png", style_image=("s.png",),
                           **changes)


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(jnp.asarray, vgg.init_params("vgg19", seed=0))


def test_receptive_fields_follow_the_layer_list():
  for layer, (side, stride) in _FIELDS.items():
    before, after, step = vgg.receptive_field(layer)
    assert (before + after + 1, step) == (side, stride), layer


def test_receptive_field_is_what_a_feature_depends_on(params):
  # The gradient of one relu3_1 feature is nonzero exactly on its field.
  model = vgg.VGG()
  x = jnp.asarray(np.random.default_rng(0).normal(
      0, 50, (1, 64, 64, 3)).astype(np.float32))
  q = 7
  grad = jax.jit(jax.grad(lambda x: jnp.sum(model.apply(
      {"params": params}, x, outputs=["relu3_1"])["relu3_1"][0, q, q])))(x)
  rows = np.nonzero(np.abs(np.asarray(grad[0])).sum(axis=(1, 2)))[0]
  before, after, stride = vgg.receptive_field("relu3_1")
  assert (rows.min(), rows.max()) == (stride * q - before, stride * q + after)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_a_window_gives_the_whole_images_features(params, pooling):
  model = vgg.VGG(pooling=pooling)
  height, width = 45, 37  # odd: ceil-mode pools at the border
  x = jnp.asarray(np.random.default_rng(1).normal(
      0, 50, (height, width, 3)).astype(np.float32))
  layers = ["relu3_1", "relu4_1", "relu4_2"]
  whole = model.apply({"params": params}, x[None], outputs=layers)
  before, after, _ = vgg.receptive_field("relu4_2")
  crop = 64
  padded = jnp.pad(x, ((64, 64), (64, 64), (0, 0)))
  checked = 0
  for top, left in [(-16, -24), (8, 0), (16, -8), (-40, 8)]:
    piece = padded[64 + top:64 + top + crop, 64 + left:64 + left + crop]
    got = model.apply({"params": params}, piece[None], outputs=layers,
                      window=(top, left, height, width))
    for layer in layers:
      b, a, s = vgg.receptive_field(layer)
      h, w = vgg.map_size(height, width, layer)
      # Float rounding relative to the map's scale (the crop's convolutions
      # may sum in another order; on some CPUs a 4e0 value differed by
      # 2e-4 in a map reaching 2e2).
      atol = 1e-6 * float(jnp.abs(whole[layer]).max())
      # Map positions whose field lies in the crop (or outside the image).
      for q in range(h):
        for r in range(w):
          # The field's part inside the image lies in the crop.
          inside = (max(s * q - b, 0) >= top and
                    min(s * q + a, height - 1) < top + crop and
                    max(s * r - b, 0) >= left and
                    min(s * r + a, width - 1) < left + crop)
          if not inside:
            continue
          np.testing.assert_allclose(
              got[layer][0, q - top // s, r - left // s],
              whole[layer][0, q, r], rtol=1e-5, atol=max(atol, 1e-4),
              err_msg=f"{layer} {(q, r)} crop at {(top, left)}")
          checked += 1
  assert checked > 50


def test_extract_and_fold_at_match_the_grid_forms():
  rng = np.random.default_rng(2)
  f = jnp.asarray(rng.normal(size=(11, 9, 4)).astype(np.float32))
  rows = patches.grid_positions(11, 3, 2)
  cols = patches.grid_positions(9, 3, 2)
  got = patches.extract_at(f, jnp.asarray(rows), jnp.asarray(cols))
  want = patches.extract_patches(f, patch_size=3, stride=2)
  np.testing.assert_array_equal(got, want)
  mask = jnp.asarray(rng.random(len(rows) * len(cols)) > 0.3)
  summed, count = patches.fold_at(want, jnp.asarray(rows), jnp.asarray(cols),
                                  height=11, width=9, mask=mask)
  want_sum, want_count = jax.jit(lambda p, m: patches.fold(
      p, height=11, width=9, channels=4, patch_size=3, stride=2, mask=m))(
          want, mask)
  np.testing.assert_allclose(summed, want_sum, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(count, want_count)


def test_grid_tables_cover_every_overlapping_patch_once_owned():
  local, valid, owned = tiling.grid_tables(13, 3, 5, 4, 3, 2)
  grid = patches.grid_positions(13, 3, 2)
  owners = np.zeros(len(grid), int)
  for t in range(3):
    corners = local[t][valid[t]] + t * 5 - 4
    for g in grid:  # every patch meeting the core is there
      if g + 3 > t * 5 and g < (t + 1) * 5:
        assert g in corners
    for g in (local[t][owned[t]] + t * 5 - 4):
      owners[list(grid).index(g)] += 1
  np.testing.assert_array_equal(owners, 1)


def test_grid_index_tables_name_each_corners_grid_position():
  local, valid, _ = tiling.grid_tables(29, 4, 8, 6, 3, 2)
  index = tiling.grid_index_tables(29, 4, 8, 6, 3, 2)
  grid = patches.grid_positions(29, 3, 2)
  for t in range(4):
    np.testing.assert_array_equal(grid[index[t]][valid[t]],
                                  local[t][valid[t]] + t * 8 - 6)


def _blocky_labels(rng, size, num_labels=3, block=16):
  """One-hot [H, W, L] of random labels on blocks of `block` px: regions
  a patch may lie inside or across."""
  height, width = size
  coarse = rng.integers(0, num_labels, (height // block + 1,
                                        width // block + 1))
  labels = np.kron(coarse, np.ones((block, block), int))[:height, :width]
  return np.eye(num_labels, dtype=np.float32)[labels]


def _targets(config, params, size, rng, num_rotations=0):
  """Random-weight targets of a pair: a style bank of (rotated) copies and
  a content map; with config.semantic_weight > 0 also random blocky label
  maps of the style (rotated with it) and of the synthesis, as
  terms._mrf_build makes them."""
  model = vgg.VGG()
  layers = config.feature_layers()
  style = rng.uniform(0, 1, (48, 44, 3)).astype(np.float32)
  copies = augment.augment_style(style, num_rotations=num_rotations,
                                 num_scales=0)
  with_maps = config.semantic_weight > 0
  if with_maps:
    label_copies = semantic.style_copies(
        _blocky_labels(rng, (48, 44)), (48, 44),
        num_rotations=num_rotations, num_scales=0)
  maps = {l: [] for l in config.mrf_layers}
  label_maps = {l: [] for l in config.mrf_layers}
  for index, copy in enumerate(copies):
    features = model.apply({"params": params},
                           vgg.preprocess(jnp.asarray(copy))[None],
                           outputs=layers)
    for l in config.mrf_layers:
      maps[l].append(features[l][0])
      if with_maps:
        label_maps[l].append(semantic.layer_map(label_copies[index], l))
  banks = {l: patches.build_bank(
      maps[l], patch_size=3, stride=2,
      semantic_maps=label_maps[l] if with_maps else None)
           for l in config.mrf_layers}
  if with_maps:
    canvas = _blocky_labels(rng, size)
    banks["synthesis_maps"] = {
        l: patches.synthesis_map(semantic.layer_map(canvas, l),
                                 weight=config.semantic_weight)
        for l in config.mrf_layers}
  content = jnp.asarray(rng.normal(0, 50, size + (3,)).astype(np.float32))
  content_features = model.apply({"params": params}, content[None],
                                 outputs=config.content_layers)
  return {"mrf": banks,
          "content": {l: content_features[l][0]
                      for l in config.content_layers},
          "tv": {}, "weights": terms.loss_weights(config)}, len(copies)


@pytest.mark.parametrize(
    "size,tile_size,num_rotations,threshold,semantic_weight", [
        # odd sides, 24 divides neither; a threshold
        ((75, 61), 24, 0, 0.5, 0.0),
        # tiles that divide; rotated style copies
        ((64, 64), 32, 1, 0.0, 0.0),
        # semantic maps (rotated with their copies); tiles that divide
        # neither side
        ((75, 61), 24, 1, 0.0, 10.0),
    ])
def test_tiled_objective_equals_the_whole(params, size, tile_size,
                                          num_rotations, threshold,
                                          semantic_weight):
  config = _config(confidence_threshold=threshold,
                   semantic_weight=semantic_weight)
  rng = np.random.default_rng(3)
  targets, num_copies = _targets(config, params, size, rng, num_rotations)
  assert num_copies == 2 * num_rotations + 1
  model = vgg.VGG()
  x = jnp.asarray(rng.normal(0, 50, size + (3,)).astype(np.float32))
  tiles = tiling.make(config, size, tile_size)
  assert tiles.num_tiles > 1
  whole = terms.make_objective(config, model)
  tiled = terms.make_objective(config, model, tiling_of=lambda s: tiles)
  (v0, aux0), g0 = jax.jit(jax.value_and_grad(whole, has_aux=True))(
      x, params, targets)
  (v1, aux1), g1 = jax.jit(jax.value_and_grad(tiled, has_aux=True))(
      x, params, targets)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  assert list(aux1["terms"]) == list(aux0["terms"])
  for name in aux0["terms"]:
    np.testing.assert_allclose(aux1["terms"][name], aux0["terms"][name],
                               rtol=1e-5, err_msg=name)
  assert sorted(aux1["stats"]) == sorted(aux0["stats"])
  for name in aux0["stats"]:
    np.testing.assert_allclose(aux1["stats"][name], aux0["stats"][name],
                               rtol=1e-5, err_msg=name)
    if not name.startswith("mean_ncc"):  # counts: the same matches
      assert aux1["stats"][name] == aux0["stats"][name], name
  assert aux0["stats"]["num_matched_relu3_1"] > 0
  if semantic_weight:
    for layer in config.mrf_layers:
      agreement = aux0["stats"][f"label_agreement_{layer}"]
      assert 0.5 < agreement <= 1, (layer, agreement)
  scale = float(jnp.max(jnp.abs(g0)))
  np.testing.assert_allclose(g1 / scale, g0 / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("semantic_weight", [0.0, 10.0])
def test_tiled_mrf_target_is_the_whole_maps(params, semantic_weight):
  config = _config(semantic_weight=semantic_weight)
  size, tile_size = (75, 61), 24
  rng = np.random.default_rng(4)
  targets, _ = _targets(config, params, size, rng)
  model = vgg.VGG()
  x = jnp.asarray(rng.normal(0, 50, size + (3,)).astype(np.float32))
  layer = "relu3_1"
  whole = model.apply({"params": params}, x[None], outputs=[layer])[layer][0]
  bank = targets["mrf"][layer]
  synth_map = targets["mrf"].get("synthesis_maps", {}).get(layer)
  indices, scores = patches.match_map(whole, bank, synth_map=synth_map)
  keep = scores > -jnp.inf
  summed, count = patches.fold(jnp.take(bank.patches, indices, axis=0),
                               height=whole.shape[0], width=whole.shape[1],
                               channels=whole.shape[2], patch_size=3,
                               stride=2, mask=keep)
  want = np.asarray(jnp.where(count > 0, summed / jnp.maximum(count, 1), 0))
  grid_rows, grid_cols = (patches.grid_positions(n, 3, 2)
                          for n in whole.shape[:2])
  # The whole map's match of every grid patch, [rows, cols].
  want_indices = np.asarray(indices).reshape(len(grid_rows), len(grid_cols))
  tiles = tiling.make(config, size, tile_size)
  got = np.full_like(want, np.nan)
  matched = 0
  halo = tiles.halo
  padded = jnp.pad(x, ((halo, halo + 96), (halo, halo + 96), (0, 0)))
  for row in range(tiles.grid[0]):
    for col in range(tiles.grid[1]):
      tile = tiling.Tile(tiles, size, (row, col))
      view = tile.layer(layer)
      top, left = row * tile_size, col * tile_size
      piece = padded[top:top + tiles.crop, left:left + tiles.crop]
      crop_features = model.apply(
          {"params": params}, piece[None], outputs=[layer],
          window=(top - halo, left - halo, *size))[layer][0]
      tables = [tiling.grid_tables(view.map_size[a], tiles.grid[a],
                                   view.core, view.halo, 3, 2)
                for a in (0, 1)]
      (rows, row_valid, _), (cols, col_valid, _) = [
          [t[i] for t in table] for table, i in zip(tables, (row, col))]
      row_index, col_index = [tiling.grid_index_tables(
          view.map_size[a], tiles.grid[a], view.core, view.halo, 3, 2)[i]
                              for a, i in zip((0, 1), (row, col))]
      tile_map = None
      if synth_map is not None:
        flat = (row_index[:, None] * len(grid_cols) +
                col_index[None, :]).reshape(-1)
        tile_map = patches.SynthesisMap(synth_map.patches[flat],
                                        synth_map.labels[flat])
      mask = (row_valid[:, None] & col_valid[None, :]).reshape(-1)
      tbar, _, tile_indices, _, _ = losses.mrf_target_tile(
          crop_features, bank, rows=jnp.asarray(rows),
          cols=jnp.asarray(cols), patch_mask=jnp.asarray(mask),
          synth_map=tile_map)
      # Every valid patch of the tile took the whole map's match.
      np.testing.assert_array_equal(
          np.asarray(tile_indices)[mask],
          want_indices[row_index[:, None], col_index[None, :]].reshape(-1)[
              mask])
      matched += int(mask.sum())
      core = np.asarray(tbar)[view.halo:view.halo + view.core,
                              view.halo:view.halo + view.core]
      r0, c0 = view.origin
      h = min(view.core, want.shape[0] - r0)
      w = min(view.core, want.shape[1] - c0)
      got[r0:r0 + h, c0:c0 + w] = core[:h, :w]
  assert not np.isnan(got).any()
  assert matched >= want_indices.size
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if synth_map is not None:  # the maps steered the matches
    plain, _ = patches.match_map(whole, bank)
    assert np.any(np.asarray(plain) != np.asarray(indices))


def test_halo_is_the_deepest_reach_plus_the_patch_margin():
  # relu4_1 MRF: 37 after + 2 positions of stride 8 = 53 -> 56; relu4_2
  # content: 45 after -> 48; relu3_1 MRF: 13 + 2 * 4 = 21.
  assert tiling.stride_and_halo(_config()) == (8, 56)
  assert tiling.stride_and_halo(_config(mrf_layers=("relu3_1",),
                                        content_layers=("relu4_2",))) == (
                                            8, 48)
  # Doodle: no content term, the MRF layers' patch margin all the same.
  doodle = config_lib.Config(mode="doodle", content_map="m.png",
                             style_image=("s.png",))
  assert tiling.stride_and_halo(doodle) == (8, 56)


def test_tile_size_flag_is_checked():
  with pytest.raises(config_lib.ConfigError, match="--tile_size"):
    _config(tile_size="big").validate()
  with pytest.raises(config_lib.ConfigError, match="multiple of 8.*try 104"):
    _config(tile_size="100").validate()
  _config(tile_size="96").validate()
  _config(tile_size="0").validate()


_INPUTS = [plan.InputSizes((1365, 2048), ((1024, 1024),))]


def test_auto_tiles_only_when_the_whole_level_does_not_fit():
  config = _config(max_size=2048)
  whole = plan.make(_config(max_size=2048, tile_size="0"), _INPUTS)
  roomy = plan.make(config, _INPUTS, limit_bytes=whole.memory_bytes)
  assert all(l.tiling is None for l in roomy.levels)
  assert roomy.memory_bytes == whole.memory_bytes
  # Room for a tiled finest level but not for the whole one.
  limit = plan.make(_config(max_size=2048, tile_size="512"),
                    _INPUTS).memory_bytes
  assert limit < whole.memory_bytes
  tight = plan.make(config, _INPUTS, limit_bytes=limit)
  finest = tight.levels[-1]
  assert finest.tiling is not None
  assert tight.levels[0].tiling is None  # the coarse level fits whole
  assert tight.memory_bytes <= limit
  assert "tiled" in tight.table()
  plan.check_memory(config, tight, limit_bytes=limit)


def test_tiled_estimate_is_smaller_and_shrinks_with_the_tile():
  sizes = [plan.make(_config(max_size=2048, tile_size=t), _INPUTS)
           .levels[-1].memory_bytes for t in ("0", "1024", "512", "256")]
  assert sizes == sorted(sizes, reverse=True)
  assert sizes[-1] < 0.6 * sizes[0]  # the style side and L-BFGS stay


def test_a_run_too_big_even_tiled_names_the_size_that_fits():
  config = _config(max_size=2048)
  limit = 2 * memory.GIB
  run_plan = plan.make(config, _INPUTS, limit_bytes=limit)
  with pytest.raises(config_lib.ConfigError) as error:
    plan.check_memory(config, run_plan, limit_bytes=limit)
  message = str(error.value)
  assert "\n" not in message
  assert "even tiled" in message
  fits = int(message.split("a --max_size of ")[1].split()[0])
  assert 0 < fits < 2048
  smaller = plan.make(config_lib.replace(config, max_size=fits), _INPUTS,
                      limit_bytes=limit)
  assert smaller.memory_bytes <= limit


def test_gatys_is_not_tiled():
  config = _config(mode="gatys", max_size=2048)
  run_plan = plan.make(config, _INPUTS, limit_bytes=memory.GIB)
  assert all(l.tiling is None for l in run_plan.levels)
  with pytest.raises(config_lib.ConfigError, match="--tile_size.*gram"):
    plan.make(config_lib.replace(config, tile_size="256"), _INPUTS)


def _save_halves(path, size, vertical, colours=((255, 0, 0), (0, 0, 255))):
  """A two-colour map PNG of `size`, split left/right or top/bottom."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rows, cols = np.mgrid[:size[0], :size[1]]
  half = (cols >= size[1] // 2) if vertical else (rows >= size[0] // 2)
  Image.fromarray(np.asarray(colours, np.uint8)[half.astype(int)]).save(path)
  return str(path)


@pytest.mark.parametrize("with_maps", [False, True])
def test_a_tiled_run_gives_the_whole_runs_result(tiny_images, random_vgg19,
                                                 tmp_path, with_maps):
  # One level, two Adam iterations: L-BFGS's second step is scaled by
  # y.s / y.y of a first step so small that y = g1 - g0 cancels, which
  # amplifies the float rounding in which the two runs differ (summation
  # order) to 4e-4 of the loss on some CPUs; Adam's steps are not.
  params, convention = random_vgg19
  base = dict(content_image=tiny_images["content"],
              style_image=(tiny_images["style"],), max_size=48, num_res=1,
              num_iter=(2,), print_every=2, optimizer="adam",
              learning_rate=2.0,
              # winograd's tile transforms round differently on a crop
              # than on the whole image; the tiling itself is the point.
              conv="xla")
  if with_maps:  # content 40x48, style 44x40
    base.update(content_map=_save_halves(tmp_path / "c.png", (40, 48), False),
                style_map=(_save_halves(tmp_path / "s.png", (44, 40), True),),
                semantic_weight=30.0)
  whole = synthesize.run(config_lib.Config(tile_size="0", **base),
                         params=params, convention=convention)
  tiled = synthesize.run(config_lib.Config(tile_size="24", **base),
                         params=params, convention=convention)
  assert len(tiled.history) == 3
  assert whole.history[-1]["loss"][0] < 0.99 * whole.history[0]["loss"][0]
  for a, b in zip(whole.history, tiled.history):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    assert b["num_matched_relu3_1"] == a["num_matched_relu3_1"]
    if with_maps:
      for layer in ("relu3_1", "relu4_1"):
        key = f"label_agreement_{layer}"
        assert b[key] == a[key], key
        assert a[key][0] > 0.9, (key, a[key])
  np.testing.assert_allclose(tiled.images, whole.images, atol=1e-4)
