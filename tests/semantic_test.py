"""Tests for semantic maps (cnnmrf_jax/semantic.py and the map part of
patches.py, losses.py and the MRF term): map channels per layer against a
numpy average-pool, the combined matching against brute force, weight 0
giving exactly the plain matching, label agreement on a synthetic
two-texture case, the gradient with maps, bad maps, doodle and batched
runs end to end.
"""

import jax
import jax.numpy as jnp
from jax import test_util
import numpy as np
from PIL import Image
import pytest

from cnnmrf_jax import augment
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import image_io
from cnnmrf_jax import losses
from cnnmrf_jax import patches
from cnnmrf_jax import plan as plan_lib
from cnnmrf_jax import semantic
from cnnmrf_jax import synthesize
from cnnmrf_jax import targets as targets_lib

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _save_map(path, labels, palette):
  """labels [H, W] int -> an RGB PNG of palette colours."""
  colours = np.asarray(palette, np.uint8)[labels]
  Image.fromarray(colours).save(path)
  return str(path)


def _halves(height, width, vertical):
  """[H, W] labels: 0 on the left (top) half, 1 on the right (bottom)."""
  rows, cols = np.mgrid[:height, :width]
  return ((cols if vertical else rows) >= (width if vertical else height)
          // 2).astype(np.int64)


# ----------------------------------------------------------------------------
# Map channels per layer.


def _reference_layer_map(label_map, stride):
  """Loops: each cell the mean of the pixels [i*s, (i+1)*s) it covers."""
  height, width, channels = label_map.shape
  rows, cols = -(-height // stride), -(-width // stride)
  out = np.zeros((rows, cols, channels))
  for i in range(rows):
    for j in range(cols):
      out[i, j] = label_map[i * stride:(i + 1) * stride,
                            j * stride:(j + 1) * stride].mean(axis=(0, 1))
  return out


@pytest.mark.parametrize("layer,stride", [("relu1_1", 1), ("relu2_1", 2),
                                          ("relu3_1", 4), ("relu4_1", 8)])
def test_layer_map_is_the_average_over_covered_pixels(layer, stride):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (37, 29))
  onehot = np.eye(3, dtype=np.float32)[labels]
  got = semantic.layer_map(onehot, layer)
  np.testing.assert_allclose(got, _reference_layer_map(onehot, stride),
                             atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1, atol=1e-6)


def test_labels_merge_edge_colours_and_warn_about_missing_ones():
  content = np.zeros((40, 40, 3), np.uint8)
  content[:, :20] = RED
  content[:, 20:] = GREEN
  content[0, 0] = (250, 5, 5)  # one anti-aliased pixel: not a label
  style = np.zeros((30, 30, 3), np.uint8)
  style[:15] = RED
  style[15:] = BLUE
  onehots, palette, warnings = semantic.to_labels(
      [content, style], ["content_map", "style_map"])
  assert sorted(map(tuple, palette.tolist())) == sorted([RED, GREEN, BLUE])
  red = [tuple(c) for c in palette.tolist()].index(RED)
  assert onehots[0][0, 0].argmax() == red  # merged into the nearest
  assert onehots[0].shape == (40, 40, 3) and onehots[1].shape == (30, 30, 3)
  np.testing.assert_array_equal(onehots[0].sum(-1), 1)
  assert len(warnings) == 1 and "#00ff00" in warnings[0]
  assert "--content_map" in warnings[0]


def test_style_map_copies_keep_labels_and_the_image_copies_sizes():
  labels = _halves(45, 38, vertical=True)
  onehot = np.eye(2, dtype=np.float32)[labels]
  image = np.random.default_rng(0).uniform(size=(45, 38, 3)).astype(
      np.float32)
  copies = semantic.style_copies(onehot, (45, 38), num_rotations=1,
                                 num_scales=1)
  images = augment.augment_style(image, num_rotations=1, num_scales=1)
  assert [c.shape[:2] for c in copies] == [c.shape[:2] for c in images]
  for copy in copies:  # nearest neighbour: still one-hot everywhere
    assert set(np.unique(copy).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(copy.sum(-1), 1)


# ----------------------------------------------------------------------------
# The matching.


def _unit(rows):
  norms = np.linalg.norm(rows, axis=1, keepdims=True)
  return np.where(norms > 0, rows / np.where(norms > 0, norms, 1), 0)


@pytest.mark.parametrize("method", patches.MATCHINGS)
def test_semantic_match_is_the_argmax_of_feature_plus_map_ncc(method):
  rng = np.random.default_rng(1)
  style = [rng.uniform(size=(9, 11, 5)).astype(np.float32),
           rng.uniform(size=(8, 7, 5)).astype(np.float32)]
  style_labels = [np.eye(3, dtype=np.float32)[rng.integers(0, 3, s.shape[:2])]
                  for s in style]
  synth = rng.uniform(size=(10, 9, 5)).astype(np.float32)
  synth_labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (10, 9))]
  weight = 10.0
  bank = patches.build_bank([jnp.asarray(s) for s in style], patch_size=3,
                            stride=2, semantic_maps=style_labels)
  synth_map = patches.synthesis_map(synth_labels, weight=weight,
                                    patch_size=3, stride=2)
  indices, scores = patches.match_map(jnp.asarray(synth), bank, chunk_size=7,
                                      method=method, synth_map=synth_map)
  p = np.asarray(patches.extract_patches(synth, patch_size=3, stride=2))
  t = np.concatenate([np.asarray(patches.extract_patches(
      s, patch_size=3, stride=2)) for s in style])
  m = np.asarray(patches.extract_patches(synth_labels, patch_size=3,
                                         stride=2))
  n = np.concatenate([np.asarray(patches.extract_patches(
      s, patch_size=3, stride=2)) for s in style_labels])
  feature_ncc = _unit(t) @ _unit(p).T
  combined = feature_ncc + np.sqrt(weight) * (_unit(n) @ _unit(m).T)
  expected = combined.argmax(axis=0)
  np.testing.assert_array_equal(np.asarray(indices), expected)
  np.testing.assert_allclose(np.asarray(scores),
                             feature_ncc[expected, np.arange(len(p))],
                             rtol=1e-5)


def test_bank_map_part_does_not_change_the_plain_matching():
  rng = np.random.default_rng(2)
  style = jnp.asarray(rng.uniform(size=(12, 12, 4)).astype(np.float32))
  synth = jnp.asarray(rng.uniform(size=(10, 10, 4)).astype(np.float32))
  labels = np.eye(2, dtype=np.float32)[rng.integers(0, 2, (12, 12))]
  plain = patches.build_bank([style])
  with_maps = patches.build_bank([style], semantic_maps=[labels])
  for a, b in zip(patches.match_map(synth, plain),
                  patches.match_map(synth, with_maps)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------
# The MRF term with maps: weight 0, the two-texture case, the gradient.


def _two_texture_inputs(size=128):
  """A style whose left half is stripes and right half blobs, labelled by
  its map; a synthesis image and a content map split top/bottom."""
  rows, cols = np.mgrid[:size, :size]
  stripes = 0.5 + 0.5 * np.sin(rows * np.pi / 3)[..., None] * np.array(
      [1.0, 0.6, 0.2])
  rng = np.random.default_rng(3)
  blobs = np.asarray(Image.fromarray(rng.integers(
      0, 255, (size // 8, size // 8, 3)).astype(np.uint8)).resize(
          (size, size), Image.BICUBIC), np.float32) / 255
  style = np.where((cols >= size // 2)[..., None], blobs, stripes)
  content = np.asarray(Image.fromarray(rng.integers(
      0, 255, (size // 4, size // 4, 3)).astype(np.uint8)).resize(
          (size, size), Image.BILINEAR), np.float32) / 255
  palette = np.asarray([RED, BLUE], np.uint8)
  style_map = palette[_halves(size, size, vertical=True)]
  content_map = palette[_halves(size, size, vertical=False)]
  onehots, _, warnings = semantic.to_labels(
      [content_map, style_map], ["content_map", "style_map"])
  assert not warnings
  extras = {"content_map": onehots[0], "style_maps": [onehots[1]]}
  return content.astype(np.float32), style.astype(np.float32), extras


def _level_targets(config, content, style, extras, random_vgg19):
  synthesizer = synthesize.Synthesizer(config, *random_vgg19)
  inputs = targets_lib.Inputs(contents=[content], styles=[[style]],
                              init_images=[None],
                              extras=None if extras is None else [extras])
  run_plan = plan_lib.make(config, inputs.sizes())
  level = run_plan.levels[-1]
  stacked = targets_lib.level_targets(config, run_plan, level, inputs,
                                      synthesizer.features)
  return synthesizer, jax.tree.map(lambda a: a[0], stacked)


def _config(**changes):
  return config_lib.replace(config_lib.Config(
      content_image="unused.png", style_image=("unused.png",), max_size=128,
      num_res=1, num_iter=(1,),
      conv="xla"),  # compiles 2-4x faster than Winograd; not the point here
      **changes)


def test_weight_zero_targets_and_matches_are_exactly_todays(random_vgg19):
  content, style, extras = _two_texture_inputs(64)
  config = _config(max_size=64, semantic_weight=0.0)
  synthesizer, with_maps = _level_targets(config, content, style, extras,
                                          random_vgg19)
  _, without = _level_targets(config, content, style, None, random_vgg19)
  assert (jax.tree.structure(with_maps) == jax.tree.structure(without))
  for a, b in zip(jax.tree.leaves(with_maps), jax.tree.leaves(without)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = jnp.asarray(image_io.resize(content, 64, 64, method="torch"))
  x = jnp.asarray(synthesize.vgg.preprocess(x, "caffe"))
  _, aux_a = synthesizer.objective(x, synthesizer.params, with_maps)
  _, aux_b = synthesizer.objective(x, synthesizer.params, without)
  assert "label_agreement_relu3_1" not in aux_a["stats"]
  for key in aux_b["stats"]:
    np.testing.assert_array_equal(aux_a["stats"][key], aux_b["stats"][key])


def _agreement_without_maps(features, bank, synth_map):
  indices, scores = patches.match_map(features, bank)
  keep = np.asarray(scores > 0)
  agree = np.asarray(bank.labels)[np.asarray(indices)] == np.asarray(
      synth_map.labels)
  return float(np.mean(agree[keep]))


def test_label_agreement_two_textures(random_vgg19):
  content, style, extras = _two_texture_inputs(128)
  config = _config()
  synthesizer, targets = _level_targets(config, content, style, extras,
                                        random_vgg19)
  features = synthesizer.features(content)
  mrf = targets["mrf"]
  for layer in config.mrf_layers:
    _, stats = losses.mrf_loss(
        features[layer], mrf[layer], weight=1e-4,
        synth_map=mrf["synthesis_maps"][layer])
    assert float(stats["label_agreement"]) >= 0.99, layer
    chance = _agreement_without_maps(features[layer], mrf[layer],
                                     mrf["synthesis_maps"][layer])
    assert 0.25 <= chance <= 0.75, (layer, chance)


def test_gradient_with_maps_is_the_plain_gradient_of_its_matches():
  rng = np.random.default_rng(4)
  with jax.enable_x64():
    style = jnp.asarray(rng.uniform(size=(8, 8, 3)))
    features = jnp.asarray(rng.uniform(size=(7, 7, 3)))
    bank = patches.build_bank([style], semantic_maps=[
        np.eye(2)[rng.integers(0, 2, (8, 8))]])
    synth_map = patches.synthesis_map(np.eye(2)[rng.integers(0, 2, (7, 7))],
                                      weight=10.0)
    loss = lambda f: losses.mrf_loss(f, bank, weight=0.3,
                                     synth_map=synth_map)[0]
    test_util.check_grads(loss, (features,), order=1, modes=("rev",),
                          eps=1e-6)
    # The gradient: weight * (F - Tbar), Tbar from the semantic matches.
    indices, scores = patches.match_map(features, bank, synth_map=synth_map)
    keep = scores > -jnp.inf
    summed, count = patches.fold(jnp.take(bank.patches, indices, axis=0),
                                 height=7, width=7, channels=3,
                                 patch_size=3, stride=2, mask=keep)
    tbar = jnp.where(count > 0, summed / jnp.maximum(count, 1), 0)
    expected = jnp.where(count > 0, 0.3 * (features - tbar), 0)
    np.testing.assert_allclose(jax.grad(loss)(features), expected,
                               rtol=1e-10)
    # And the matches differ from the plain ones (the maps steered them).
    plain, _ = patches.match_map(features, bank)
    assert np.any(np.asarray(plain) != np.asarray(indices))


def test_the_memory_estimate_counts_map_channels():
  sizes = dict(content=(256, 256), styles=((256, 256),))
  config = _config(max_size=256)

  def estimate(num_labels, **changes):
    run_plan = plan_lib.make(config_lib.replace(config, **changes), [
        plan_lib.InputSizes(**sizes, num_labels=num_labels)])
    return run_plan.levels[-1], run_plan.memory_bytes

  level, mapped = estimate(4)
  _, plain = estimate(0)
  assert level.num_labels == 4
  # At least the bank's map patches (3 copies, float32), at most a fraction
  # of the rest: 4 labels are 36 values a patch against 2304 and 4608.
  bank_maps = sum(4 * 3 * m.bank_size * 9 * 4 for m in level.mrf)
  assert bank_maps <= mapped - plain < 0.2 * plain
  assert estimate(4, semantic_weight=0.0)[1] == estimate(0)[1]
  tiled = {n: estimate(n, tile_size="96")[1] for n in (0, 4)}
  assert tiled[4] - tiled[0] >= bank_maps
  # Inputs carry the label count of their maps into the plan.
  inputs = targets_lib.Inputs(
      contents=[np.zeros((8, 8, 3))], styles=[[np.zeros((8, 8, 3))]],
      init_images=[None], extras=[{"content_map": np.zeros((8, 8, 5)),
                                   "style_maps": [np.zeros((8, 8, 5))]}])
  assert inputs.sizes()[0].num_labels == 5


# ----------------------------------------------------------------------------
# Finding and reading maps; bad maps.


@pytest.fixture()
def mapped_images(tmp_path):
  """content.png/style.png with NAME_sem.png maps beside them."""
  from tests import conftest  # pylint: disable=g-import-not-at-top
  content = conftest.write_random_image(tmp_path / "content.png", 64, 48, 0)
  style = conftest.write_random_image(tmp_path / "style.png", 56, 64, 1)
  _save_map(tmp_path / "content_sem.png", _halves(64, 48, False),
            [RED, BLUE])
  _save_map(tmp_path / "style_sem.png", _halves(56, 64, True), [RED, BLUE])
  return tmp_path, content, style


def test_maps_beside_images_are_found_and_logged(mapped_images):
  root, content, style = mapped_images
  config = config_lib.Config(content_image=content, style_image=(style,))
  paths, notes = semantic.find(config)
  assert paths.content == str(root / "content_sem.png")
  assert paths.styles == (str(root / "style_sem.png"),)
  assert any("found beside" in n and "content_map" in n for n in notes)
  inputs = synthesize.load_inputs(config)
  assert inputs.extras[0]["content_map"].shape == (64, 48, 2)
  assert inputs.extras[0]["style_maps"][0].shape == (56, 64, 2)
  none, _ = semantic.find(config_lib.Config(
      content_image="example:astronaut", style_image=("example:coffee",)))
  assert none is None


def test_map_of_another_size_is_resized_if_the_aspect_matches(
    mapped_images):
  root, content, style = mapped_images
  _save_map(root / "small.png", _halves(32, 24, False), [RED, BLUE])
  config = config_lib.Config(content_image=content, style_image=(style,),
                             content_map=str(root / "small.png"))
  inputs = synthesize.load_inputs(config)
  assert inputs.extras[0]["content_map"].shape == (64, 48, 2)


def test_bad_maps_fail_in_one_line_naming_the_flag(mapped_images):
  root, content, style = mapped_images
  _save_map(root / "square.png", _halves(40, 40, True), [RED, BLUE])
  config = config_lib.Config(content_image=content, style_image=(style,),
                             style_map=(str(root / "square.png"),))
  with pytest.raises(config_lib.ConfigError,
                     match=r"^--style_map: .*aspect ratios differ"):
    synthesize.load_inputs(config)
  config = config_lib.Config(content_image=content, style_image=(style,),
                             content_map=str(root / "missing.png"))
  with pytest.raises(image_io.ImageError, match="content_map"):
    synthesize.load_inputs(config)
  with pytest.raises(config_lib.ConfigError, match="^--style_map: got 2"):
    config_lib.Config(content_image=content, style_image=(style,),
                      style_map=("a.png", "b.png")).validate()
  with pytest.raises(config_lib.ConfigError, match="^--content_map: "):
    config_lib.Config(mode="doodle", style_image=(style,)).validate()


def test_colour_missing_from_style_maps_is_a_warning(mapped_images,
                                                     caplog):
  root, content, style = mapped_images
  _save_map(root / "green.png", _halves(64, 48, False), [RED, GREEN])
  config = config_lib.Config(content_image=content, style_image=(style,),
                             content_map=str(root / "green.png"))
  with caplog.at_level("WARNING"):
    synthesize.load_inputs(config)
  assert any("#00ff00" in r.getMessage() and "no --style_map" in
             r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------
# End to end: doodle, and a batch of pairs with maps.


def test_doodle_runs_from_the_map_alone(mapped_images, random_vgg19):
  root, _, style = mapped_images
  config = config_lib.Config(
      mode="doodle", content_map=str(root / "content_sem.png"),
      style_image=(style,), max_size=64, num_res=1, num_iter=(2,),
      print_every=1)
  assert "content" not in [t.name for t in synthesize.terms_lib
                           .active_terms(config)]
  result = synthesize.run(config, None, params=random_vgg19[0],
                          convention="caffe")
  assert result.images.shape == (1, 64, 48, 3)
  record = result.history[-1]
  for layer in config.mrf_layers:
    assert 0 <= record[f"label_agreement_{layer}"][0] <= 1


def test_batch_of_pairs_with_maps(mapped_images, random_vgg19):
  root, content, style = mapped_images
  config = config_lib.Config(content_image=content, style_image=(style,),
                             max_size=64, num_res=1, num_iter=(2,),
                             print_every=1)
  result = synthesize.run(config, None, params=random_vgg19[0],
                          convention="caffe",
                          pairs=[(content, (style,)), (content, (style,))])
  assert result.images.shape[0] == 2
  np.testing.assert_allclose(result.images[0], result.images[1], atol=1e-5)
  assert len(result.history[-1]["label_agreement_relu4_1"]) == 2
  with pytest.raises(config_lib.ConfigError, match="^--pairs: pair 1"):
    synthesize.run(config, None, params=random_vgg19[0], convention="caffe",
                   pairs=[(content, (style,)),
                          ("example:astronaut", ("example:coffee",))])


def test_batched_pairs_with_maps_equal_each_pair_alone(mapped_images,
                                                      random_vgg19):
  """Pair 0 has two labels, pair 1 three (so the batch pads pair 0's label
  channels): each pair of the batch gives what it gives alone."""
  root, content, style = mapped_images
  from tests import conftest  # pylint: disable=g-import-not-at-top
  content2 = conftest.write_random_image(root / "content2.png", 64, 48, 2)
  style2 = conftest.write_random_image(root / "style2.png", 48, 64, 3)
  thirds = lambda h, w: np.minimum(np.mgrid[:h, :w][1] * 3 // w, 2)
  _save_map(root / "content2_sem.png", thirds(64, 48), [RED, GREEN, BLUE])
  _save_map(root / "style2_sem.png", thirds(48, 64), [BLUE, GREEN, RED])
  pairs = [(content, (style,)), (content2, (style2,))]
  config = config_lib.Config(
      content_image=content, style_image=(style,), max_size=48, num_res=1,
      num_iter=(2,), print_every=1, semantic_weight=30.0,
      # winograd rounds a batch of 2 and of 1 in other orders; XLA's own
      # convolution may too, on some CPUs, and L-BFGS's second step, scaled
      # by y.s / y.y of a tiny first step, amplifies that to 1e-3 of the
      # pixels: Adam's steps do not (batching is the point here).
      conv="xla", optimizer="adam", learning_rate=2.0)
  params = random_vgg19[0]
  together = synthesize.run(config, None, params=params, convention="caffe",
                            pairs=pairs)
  for n, (c, s) in enumerate(pairs):
    alone = synthesize.run(config_lib.replace(config, content_image=c,
                                              style_image=s),
                           None, params=params, convention="caffe")
    np.testing.assert_allclose(together.images[n], alone.images[0],
                               atol=1e-4)
    for got, want in zip(together.history, alone.history):
      np.testing.assert_allclose(got["loss"][n], want["loss"][0], rtol=1e-5)
      for layer in config.mrf_layers:
        key = f"label_agreement_{layer}"
        assert got[key][n] == want[key][0], (n, key)
      # (relu4_1's 6x5 map is too coarse for the thirds to agree.)
      assert want["label_agreement_relu3_1"][0] > 0.8, n
