"""Tests of --matching=patchmatch and auto wired into the synthesis.

The PatchMatch field (patchmatch_lib.patchmatch, Barnes et al. 2009) is the MRF
term's carried state (terms.CARRY): these check that the objective with the
exact argmax as its field is the exact objective, that evaluations only
improve the field, that runs in both modes fall in loss, that a batch
equals its pairs alone, that a killed run resumes to the same pixels, that
a coarser level's field carries to the next, and --matching=auto's choice.
Random VGG19 weights, 40-64 px images, one or two levels of a few
iterations, the VGG cut at relu3_1 where the test allows.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import losses
from cnnmrf_jax import memory
from cnnmrf_jax import patches
from cnnmrf_jax import patchmatch as patchmatch_lib
from cnnmrf_jax import plan as plan_lib
from cnnmrf_jax import solve
from cnnmrf_jax import synthesize
from cnnmrf_jax import targets as targets_lib
from cnnmrf_jax import terms
from cnnmrf_jax import tiling
from cnnmrf_jax import vgg
from cnnmrf_jax import workdir as workdir_lib


def _config(tiny_images, **changes):
  """One level of 40x48 px with the VGG cut at relu3_1 (MRF and content)."""
  base = config_lib.Config(
      content_image=tiny_images["content"], style_image=(
          tiny_images["style"],), max_size=48, num_res=1, num_iter=(4,),
      print_every=4, mrf_layers=("relu3_1",), content_layers=("relu3_1",),
      matching="patchmatch", conv="xla")
  return config_lib.replace(base, **changes)


def _level(config, params):
  """(synthesizer, plan, the finest level's targets of pair 0, x0)."""
  synthesizer = synthesize.Synthesizer(config, *params)
  inputs = synthesize.load_inputs(config)
  run_plan = plan_lib.make(config, inputs.sizes())
  level = run_plan.levels[-1]
  targets = targets_lib.level_targets(config, run_plan, level, inputs,
                                      synthesizer.features)
  x = targets_lib.initial_images(config, inputs, level.size,
                                 synthesizer.convention)
  return synthesizer, level, jax.tree.map(lambda a: a[0], targets), x[0]


def _exact_fields(synthesizer, x, targets, config):
  features = synthesizer._features(synthesizer.params, x[None])
  return {layer: patches.match_map(
      features[layer][0], targets["mrf"][layer], stride=config.synth_stride)
          for layer in config.mrf_layers}


def _exact_field_and_scan(targets, exact):
  """(the targets with the exact matches as PatchMatch's field, the
  targets of the exact scan: no field, no search)."""
  with_field = terms.with_carry(targets, {"mrf": dict(
      targets["mrf"][terms.CARRY],
      fields={l: m[0] for l, m in exact.items()})})
  scan = dict(targets, mrf={k: v for k, v in targets["mrf"].items()
                            if k not in (terms.CARRY, "patchmatch")})
  return with_field, scan


def test_with_the_exact_argmax_as_field_the_objective_is_the_exact_one(
    tiny_images, random_vgg19):
  config = _config(tiny_images, mrf_layers=("relu3_1", "relu2_1"))
  synthesizer, level, targets, x = _level(config, random_vgg19)
  assert level.matching == "patchmatch"
  assert set(targets["mrf"]) >= {terms.CARRY, "patchmatch"}
  exact = _exact_fields(synthesizer, x, targets, config)
  with_field, scan = _exact_field_and_scan(targets, exact)
  grad_fn = jax.jit(jax.value_and_grad(synthesizer.objective, has_aux=True))
  (value, aux), grad = grad_fn(x, synthesizer.params, with_field)
  (want, want_aux), want_grad = grad_fn(x, synthesizer.params, scan)
  assert want_aux["carry"] == {}
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5,
                             atol=1e-6 * float(jnp.abs(want_grad).max()))
  for layer, (indices, _) in exact.items():
    # PatchMatch keeps a field that is already the argmax.
    np.testing.assert_array_equal(aux["carry"]["mrf"]["fields"][layer],
                                  indices)
    np.testing.assert_allclose(aux["stats"][f"mean_ncc_{layer}"],
                               want_aux["stats"][f"mean_ncc_{layer}"],
                               rtol=1e-5)


def _field_ncc(synthesizer, x, targets, fields, config):
  """Per-patch NCC of each layer's field at x."""
  features = synthesizer._features(synthesizer.params, x[None])
  out = {}
  for layer, field in fields.items():
    bank = targets["mrf"][layer]
    synth = patches.extract_patches(features[layer][0],
                                    stride=config.synth_stride)
    chosen = bank.patches[field]
    out[layer] = np.asarray(
        jnp.sum(synth * chosen, axis=1) * bank.inv_norms[field] /
        jnp.linalg.norm(synth, axis=1))
  return out


def test_evaluations_only_improve_the_field(tiny_images, random_vgg19):
  config = _config(tiny_images, mrf_layers=("relu3_1", "relu2_1"),
                   confidence_threshold=-1.0)
  synthesizer, _, targets, x = _level(config, random_vgg19)
  objective = jax.jit(synthesizer.objective)
  exact = _exact_fields(synthesizer, x, targets, config)
  previous = _field_ncc(synthesizer, x, targets,
                        targets["mrf"][terms.CARRY]["fields"], config)
  means = [{l: float(v.mean()) for l, v in previous.items()}]  # random
  for _ in range(8):
    _, aux = objective(x, synthesizer.params, targets)
    targets = terms.with_carry(targets, aux["carry"])
    ncc = _field_ncc(synthesizer, x, targets, aux["carry"]["mrf"]["fields"],
                     config)
    for layer in ncc:
      assert np.all(ncc[layer] >= previous[layer] - 1e-6), layer
      np.testing.assert_allclose(aux["stats"][f"mean_ncc_{layer}"],
                                 ncc[layer].mean(), rtol=1e-5)
    means.append({l: float(v.mean()) for l, v in ncc.items()})
    previous = ncc
  for layer, (_, scores) in exact.items():
    assert means[1][layer] > means[0][layer]
    # From a random start, the first evaluation's passes and 7 more on a
    # ~20x24 grid with ~20x22 style patches.
    assert means[-1][layer] >= 0.99 * float(np.mean(scores)), layer


def test_shared_candidates_grow_with_the_square_root_of_the_copies():
  assert terms.patchmatch_shared(1) == terms.PATCHMATCH_SHARED
  assert terms.patchmatch_shared(9) == 3 * terms.PATCHMATCH_SHARED
  assert terms.patchmatch_shared(25) == 5 * terms.PATCHMATCH_SHARED
  two = terms.patchmatch_shared(2)
  assert two % 64 == 0
  assert terms.PATCHMATCH_SHARED < two < 2 * terms.PATCHMATCH_SHARED


def test_the_objective_shares_candidates_for_its_copies(
    tiny_images, random_vgg19, monkeypatch):
  seen = []
  real = patchmatch_lib.patchmatch

  def spy(*args, **kwargs):
    seen.append((kwargs["num_shared"], int(np.shape(args[2].starts)[-1])))
    return real(*args, **kwargs)

  monkeypatch.setattr(patchmatch_lib, "patchmatch", spy)
  config = _config(tiny_images, num_rotations=1, num_scales=1)
  synthesizer, _, targets, x = _level(config, random_vgg19)
  synthesizer.objective(x, synthesizer.params, targets)
  assert seen == [(terms.patchmatch_shared(9), 9)]


def test_the_memory_estimate_counts_the_shared_candidates(tiny_images,
                                                         monkeypatch):
  config = _config(tiny_images, num_rotations=1, num_scales=1)
  level = plan_lib.make(config, synthesize.load_inputs(config).sizes()
                        ).levels[-1]
  asked = []

  def estimate(shared):
    monkeypatch.setattr(terms, "patchmatch_shared",
                        lambda num_copies: asked.append(num_copies) or shared)
    return memory.level_bytes(config, level, 1)

  # Counts large enough that the solve, not the targets' build, is the
  # level's larger phase.
  more = estimate(2000) - estimate(1000)
  (mrf,) = level.mrf
  depth = config.patch_size ** 2 * vgg.channels_of(mrf.layer, config.network)
  # 4 bytes a value: the rows [K, D] and the scores [K, P].
  assert more == 4 * 1000 * (depth + mrf.num_patches)
  assert asked == [9, 9]


@pytest.mark.parametrize("mode", ["transfer", "texture"])
def test_a_patchmatch_run_falls_and_makes_a_picture(mode, tiny_images,
                                                    random_vgg19):
  """Two levels (the second starts from the first's field, upsampled), two
  MRF layers, at 48 px (texture: 64 px from a 32 px exemplar)."""
  changes = dict(num_res=2, num_iter=(6,), print_every=6,
                 mrf_layers=("relu3_1", "relu2_1"))
  if mode == "texture":
    changes.update(mode="texture", init="noise", content_image="",
                   max_size=64)
  config = _config(tiny_images, **changes)
  result = synthesize.run(config, None, params=random_vgg19[0],
                          convention=random_vgg19[1])
  for level in (0, 1):
    losses = [r["loss"][0] for r in result.history if r["level"] == level]
    assert losses[-1] < losses[0], (level, losses)
  image = result.images[0]
  assert np.all(np.isfinite(image))
  assert float(image.std()) > 0.02  # not flat
  assert float(np.abs(np.diff(image, axis=0)).mean()) > 1e-3


def test_auto_runs_exact_where_the_scan_is_cheap(tiny_images, random_vgg19):
  config = _config(tiny_images, matching="auto", num_iter=(2,),
                   print_every=2)
  run_plan = plan_lib.make(config, synthesize.load_inputs(config).sizes())
  assert [l.matching for l in run_plan.levels] == ["exact"]
  auto = synthesize.run(config, None, params=random_vgg19[0],
                        convention=random_vgg19[1])
  exact = synthesize.run(config_lib.replace(config, matching="exact"), None,
                         params=random_vgg19[0], convention=random_vgg19[1])
  np.testing.assert_array_equal(auto.images, exact.images)


def test_auto_switches_to_patchmatch_from_the_exact_level_below(
    tiny_images, random_vgg19, monkeypatch):
  """Where the plan puts the exact scan below a PatchMatch level, the
  exact level's matches start the PatchMatch field."""
  config = _config(tiny_images, matching="auto", num_res=2, num_iter=(3,),
                   print_every=3, mrf_layers=("relu2_1",),
                   content_layers=("relu2_1",))
  inputs = synthesize.load_inputs(config)
  ratios = [l.scan_flops / l.vgg_flops
            for l in plan_lib.make(config, inputs.sizes()).levels]
  monkeypatch.setattr(plan_lib, "AUTO_SCAN_RATIO", sum(ratios) / 2)
  run_plan = plan_lib.make(config, inputs.sizes())
  assert [l.matching for l in run_plan.levels] == ["exact", "patchmatch"]
  assert "matching patchmatch" in run_plan.table()
  synthesizer = synthesize.Synthesizer(config, *random_vgg19)
  built = []
  level_targets = targets_lib.level_targets

  def spy(*args, **kwargs):
    built.append((kwargs.get("carried"), level_targets(*args, **kwargs)))
    return built[-1][1]

  monkeypatch.setattr(targets_lib, "level_targets", spy)
  result = synthesizer.run(inputs, run_plan=run_plan)
  (carried_1, coarse), (carried_2, fine) = built
  assert not carried_1 and "patchmatch" not in coarse["mrf"]
  assert terms.CARRY in coarse["mrf"]  # the exact level keeps its matches
  assert "patchmatch" in fine["mrf"]
  # Level 2 started from level 1's last exact matches, upsampled.
  level_1, level_2 = run_plan.levels
  maps = lambda level: [terms.vgg.map_size(h, w, "relu2_1")
                        for h, w in level.copies[0]]
  want = patchmatch_lib.upsample_field(
      np.asarray(carried_2["mrf"]["fields"]["relu2_1"][0]),
      synth_from=terms.vgg.map_size(*level_1.size, "relu2_1"),
      synth_to=terms.vgg.map_size(*level_2.size, "relu2_1"),
      copies_from=maps(level_1), copies_to=maps(level_2))
  np.testing.assert_array_equal(
      fine["mrf"][terms.CARRY]["fields"]["relu2_1"][0], want)
  losses = [r["loss"][0] for r in result.history if r["level"] == 1]
  assert losses[-1] < losses[0]


def test_a_batch_equals_its_pairs_alone(tiny_images, random_vgg19, tmp_path):
  config = _config(tiny_images, num_iter=(3,), print_every=3)
  params, convention = random_vgg19
  pairs = [(tiny_images["content"], (tiny_images["style"],)),
           (tiny_images["content"], (tiny_images["style2"],))]
  together = synthesize.run(config, None, params=params,
                            convention=convention, pairs=pairs)
  synthesizer = synthesize.Synthesizer(config, params, convention)
  for n, (content, styles) in enumerate(pairs):
    alone = synthesizer.run(synthesize.load_inputs(config_lib.replace(
        config, content_image=content, style_image=styles)))
    np.testing.assert_allclose(together.images[n], alone.images[0],
                               atol=1e-5)
    for got, want in zip(together.history, alone.history):
      np.testing.assert_allclose(got["loss"][n], want["loss"][0], rtol=1e-5)
      assert got["mean_ncc_relu3_1"][n] == pytest.approx(
          want["mean_ncc_relu3_1"][0], rel=1e-5)


class _Interrupt:
  """Synthesizer.update that raises KeyboardInterrupt on its n-th call."""

  def __init__(self, update, at):
    self.update, self.at, self.calls = update, at, 0

  def __call__(self, *args):
    self.calls += 1
    if self.calls == self.at:
      raise KeyboardInterrupt
    return self.update(*args)


def test_a_killed_run_resumes_to_the_same_pixels(tiny_images, random_vgg19,
                                                 tmp_path, monkeypatch):
  """Two levels: killed mid-level 1 and resumed; killed while building
  level 2 (so resumed from level 1's end, whose field starts level 2)."""
  params, convention = random_vgg19
  config = _config(tiny_images, max_size=48, num_res=2, num_iter=(4,),
                   print_every=2, mrf_layers=("relu2_1",),
                   content_layers=("relu2_1",),
                   compilation_cache=str(tmp_path / "cache"))

  def run(workdir, **changes):
    synthesizer = synthesize.Synthesizer(
        config_lib.replace(config, **changes), params, convention)
    return synthesizer, synthesizer.run(
        synthesize.load_inputs(config), workdir)

  _, straight = run(tmp_path / "straight")
  # Mid-level: the third update of level 1 is interrupted.
  synthesizer = synthesize.Synthesizer(
      config_lib.replace(config, checkpoint_every=1), params, convention)
  synthesizer.update = _Interrupt(synthesizer.update, 3)
  with pytest.raises(solve.Interrupted):
    synthesizer.run(synthesize.load_inputs(config), tmp_path / "mid")
  with np.load(tmp_path / "mid" / workdir_lib.CHECKPOINT_NAME) as saved:
    meta = json.loads(saved["meta"].tobytes().decode())
    assert (meta["level"], meta["iteration"]) == (0, 2)
    assert saved["carry.mrf.fields.relu2_1"].dtype == np.int32
  _, resumed = run(tmp_path / "mid", resume=True)
  np.testing.assert_array_equal(resumed.images, straight.images)
  assert [r["loss"] for r in resumed.history] == [
      r["loss"] for r in straight.history]

  # Between levels: Ctrl-C while level 2's targets are built.
  level_targets = targets_lib.level_targets
  calls = []

  def interrupted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return level_targets(*args, **kwargs)

  monkeypatch.setattr(targets_lib, "level_targets", interrupted)
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "between")
  monkeypatch.setattr(targets_lib, "level_targets", level_targets)
  checkpoint = workdir_lib.Writer(
      tmp_path / "between", config_lib.replace(config, resume=True),
      ["result.png"]).load_checkpoint()
  assert (checkpoint.level, checkpoint.iteration) == (0, 4)
  assert checkpoint.carry["mrf"]["fields"]["relu2_1"].shape[0] == 1
  _, resumed = run(tmp_path / "between", resume=True)
  np.testing.assert_array_equal(resumed.images, straight.images)


def test_a_coarser_field_upsampled_keeps_its_matches():
  """Synthesis = a style copy at both levels: the coarse identity field
  maps to (nearly) the fine identity field, into the right copy."""
  k, stride = 3, 2
  copies_coarse = [(9, 11), (10, 9)]
  copies_fine = [(18, 22), (20, 18)]
  coarse = patchmatch_lib.bank_grid(copies_coarse, k, stride)
  fine = patchmatch_lib.bank_grid(copies_fine, k, stride)
  for copy in (0, 1):
    count = int(coarse.rows[copy] * coarse.cols[copy])
    field = coarse.starts[copy] + np.arange(count)
    out = patchmatch_lib.upsample_field(
        field, synth_from=copies_coarse[copy], synth_to=copies_fine[copy],
        copies_from=copies_coarse, copies_to=copies_fine, patch_size=k,
        synth_stride=stride, style_stride=stride)
    fine_count = int(fine.rows[copy] * fine.cols[copy])
    assert out.shape == (fine_count,) and out.dtype == np.int32
    identity = fine.starts[copy] + np.arange(fine_count)
    assert np.mean(out == identity) > 0.9
    rows, cols = np.divmod(out - fine.starts[copy], fine.cols[copy])
    want_rows, want_cols = np.divmod(np.arange(fine_count), fine.cols[copy])
    assert np.abs(rows - want_rows).max() <= 1
    assert np.abs(cols - want_cols).max() <= 1
  # Any field, padding indices included, maps into the fine bank.
  rng = np.random.default_rng(0)
  out = patchmatch_lib.upsample_field(
      rng.integers(0, 10 ** 4, 60), synth_from=(13, 13), synth_to=(26, 25),
      copies_from=copies_coarse, copies_to=copies_fine)
  size = int(fine.starts[-1] + fine.rows[-1] * fine.cols[-1])
  assert out.min() >= 0 and out.max() < size
  assert out.shape == (patches.num_patches(26, 25, 3, 2),)


def _smooth(rng, height, width, channels):
  coarse = rng.normal(size=(height // 4 + 2, width // 4 + 2, channels))
  rows = np.linspace(0, coarse.shape[0] - 1.001, height)
  cols = np.linspace(0, coarse.shape[1] - 1.001, width)
  r0, c0 = rows.astype(int), cols.astype(int)
  fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
  image = ((1 - fr) * (1 - fc) * coarse[r0][:, c0] +
           fr * (1 - fc) * coarse[r0 + 1][:, c0] +
           (1 - fr) * fc * coarse[r0][:, c0 + 1] +
           fr * fc * coarse[r0 + 1][:, c0 + 1])
  return np.maximum(image, 0).astype(np.float32)


def test_an_upsampled_field_finds_the_finer_matches():
  """The synthesis is a crop of the style's map (shifted by an even
  offset, so that the coarser maps, 2x2 means, are crops too): the coarse
  exact field, upsampled, is the fine exact field nearly everywhere, and
  far better than a random start."""
  rng = np.random.default_rng(3)
  big = _smooth(rng, 40, 40, 8)
  style_fine, synth_fine = big[:32, :32], big[8:32, 4:30]
  down = lambda a: a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2,
                             -1).mean(axis=(1, 3))
  style_coarse, synth_coarse = down(style_fine), down(synth_fine)
  coarse_bank = patches.build_bank([jnp.asarray(style_coarse)])
  fine_bank = patches.build_bank([jnp.asarray(style_fine)])
  field, _ = patches.match_map(jnp.asarray(synth_coarse), coarse_bank)
  fine_field = patchmatch_lib.upsample_field(
      np.asarray(field), synth_from=synth_coarse.shape[:2],
      synth_to=synth_fine.shape[:2], copies_from=[style_coarse.shape[:2]],
      copies_to=[style_fine.shape[:2]])
  synth = patches.extract_patches(jnp.asarray(synth_fine), stride=2)
  exact, exact_scores = patches.match(synth, fine_bank)

  def mean_ncc(f):
    return float(jnp.mean(
        jnp.sum(synth * fine_bank.patches[f], axis=1) *
        fine_bank.inv_norms[f] / jnp.linalg.norm(synth, axis=1)))

  random = patchmatch_lib.random_field(jax.random.PRNGKey(0), synth.shape[0],
                                fine_bank.patches.shape[0])
  exact_mean = float(jnp.mean(exact_scores))
  # Every synthesis patch but the tail column (stride plus tail) is a style
  # patch.
  assert exact_mean > 0.99
  assert np.mean(np.asarray(fine_field) == np.asarray(exact)) > 0.8
  assert mean_ncc(fine_field) > 0.98 * exact_mean
  assert mean_ncc(random) < 0.9 * exact_mean


# ----------------------------------------------------------------------------
# PatchMatch under tiling (--tile_size): the field over the whole grid,
# each tile improving the patches it owns.


def _tiled(synthesizer, level, tile_size):
  """The synthesizer's objective with the level cut in tile_size cores."""
  tiles = tiling.make(synthesizer.config, level.size, tile_size)
  assert tiles is not None and tiles.num_tiles > 1
  return terms.make_objective(synthesizer.config, synthesizer.model,
                              tiling_of=lambda size: tiles)


def test_tiled_patchmatch_folds_the_field_it_returns(tiny_images,
                                                     random_vgg19):
  """Every patch has one match wherever it is folded (its owner's), so
  the tiled MRF values are mrf_loss's with the returned field as matches,
  and evaluations only improve the field's NCC, to near the exact one."""
  config = _config(tiny_images, mrf_layers=("relu3_1", "relu2_1"),
                   confidence_threshold=-1.0)
  synthesizer, level, targets, x = _level(config, random_vgg19)
  objective = jax.jit(_tiled(synthesizer, level, 16))
  exact = _exact_fields(synthesizer, x, targets, config)
  features = synthesizer._features(synthesizer.params, x[None])
  previous = _field_ncc(synthesizer, x, targets,
                        targets["mrf"][terms.CARRY]["fields"], config)
  for _ in range(8):
    _, aux = objective(x, synthesizer.params, targets)
    fields = aux["carry"]["mrf"]["fields"]
    ncc = _field_ncc(synthesizer, x, targets, fields, config)
    for layer in config.mrf_layers:
      assert np.all(ncc[layer] >= previous[layer] - 1e-5), layer
      want, _ = losses.mrf_loss(
          features[layer][0], targets["mrf"][layer],
          weight=targets["weights"]["mrf"][layer],
          stride=config.synth_stride, threshold=-1.0,
          matches=(fields[layer], jnp.asarray(ncc[layer])))
      np.testing.assert_allclose(aux["terms"][f"mrf_{layer}"], want,
                                 rtol=1e-5)
      np.testing.assert_allclose(aux["stats"][f"mean_ncc_{layer}"],
                                 ncc[layer].mean(), rtol=1e-5)
    targets = terms.with_carry(targets, aux["carry"])
    previous = ncc
  for layer, (_, scores) in exact.items():
    assert previous[layer].mean() >= 0.99 * float(np.mean(scores)), layer


def test_tiled_patchmatch_keeps_an_exact_field_and_its_objective(
    tiny_images, random_vgg19):
  """From the exact argmax, tiled PatchMatch keeps it, and its value and
  gradient are the exact tiled (and whole) objective's."""
  config = _config(tiny_images, mrf_layers=("relu3_1", "relu2_1"))
  synthesizer, level, targets, x = _level(config, random_vgg19)
  exact = _exact_fields(synthesizer, x, targets, config)
  with_field, scan = _exact_field_and_scan(targets, exact)
  tiled = _tiled(synthesizer, level, 16)
  grad_of = lambda f: jax.jit(jax.value_and_grad(f, has_aux=True))
  (value, aux), grad = grad_of(tiled)(x, synthesizer.params, with_field)
  (want, _), want_grad = grad_of(synthesizer.objective)(
      x, synthesizer.params, scan)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=0,
                             atol=1e-5 * float(jnp.abs(want_grad).max()))
  for layer, (indices, _) in exact.items():
    np.testing.assert_array_equal(aux["carry"]["mrf"]["fields"][layer],
                                  indices)


def test_a_tiled_patchmatch_run_falls_resumes_and_batches(
    tiny_images, random_vgg19, tmp_path):
  """Two levels tiled (the second from the first's field, upsampled):
  the loss falls, the picture is not flat, a run killed mid-level resumes
  to the same pixels, and a batch of two equals its pairs alone."""
  params, convention = random_vgg19
  config = _config(tiny_images, num_res=2, num_iter=(4,), print_every=2,
                   tile_size="16", mrf_layers=("relu3_1", "relu2_1"))
  run_plan = plan_lib.make(config, synthesize.load_inputs(config).sizes())
  assert all(l.tiling is not None and l.matching == "patchmatch"
             for l in run_plan.levels)
  synthesizer = synthesize.Synthesizer(config, params, convention)
  straight = synthesizer.run(synthesize.load_inputs(config),
                             tmp_path / "straight")
  for n in (0, 1):
    losses_ = [r["loss"][0] for r in straight.history if r["level"] == n]
    assert losses_[-1] < losses_[0], (n, losses_)
  image = straight.images[0]
  assert float(image.std()) > 0.02
  assert float(np.abs(np.diff(image, axis=0)).mean()) > 1e-3

  killed = synthesize.Synthesizer(
      config_lib.replace(config, checkpoint_every=1), params, convention)
  killed.update = _Interrupt(killed.update, 6)
  with pytest.raises(solve.Interrupted):
    killed.run(synthesize.load_inputs(config), tmp_path / "mid")
  resumed = synthesize.Synthesizer(config_lib.replace(config, resume=True),
                                   params, convention).run(
      synthesize.load_inputs(config), tmp_path / "mid")
  np.testing.assert_array_equal(resumed.images, straight.images)

  pairs = [(tiny_images["content"], (tiny_images["style"],)),
           (tiny_images["content"], (tiny_images["style2"],))]
  together = synthesize.run(config, None, params=params,
                            convention=convention, pairs=pairs)
  np.testing.assert_allclose(together.images[0], straight.images[0],
                             atol=1e-5)
  alone = synthesizer.run(synthesize.load_inputs(config_lib.replace(
      config, style_image=pairs[1][1])))
  np.testing.assert_allclose(together.images[1], alone.images[0], atol=1e-5)


def test_a_tiled_patchmatch_texture_falls_and_makes_a_picture(
    tiny_images, random_vgg19):
  config = _config(tiny_images, mode="texture", init="noise",
                   content_image="", max_size=64, num_iter=(6,),
                   print_every=6, tile_size="24")
  run_plan = plan_lib.make(config, synthesize.load_inputs(config).sizes())
  assert run_plan.levels[0].tiling.num_tiles > 1
  result = synthesize.run(config, None, params=random_vgg19[0],
                          convention=random_vgg19[1])
  losses_ = [r["loss"][0] for r in result.history]
  assert losses_[-1] < losses_[0], losses_
  image = result.images[0]
  assert float(image.std()) > 0.02
  assert float(np.abs(np.diff(image, axis=1)).mean()) > 1e-3


# --matching=auto and the flags.


def test_auto_follows_the_plans_flops():
  config = config_lib.Config(content_image="c.png", style_image=("s.png",),
                             matching="auto", tile_size="0")
  assert plan_lib.choose_matching(config, 10, 100) == "exact"
  assert plan_lib.choose_matching(config, 100, 100) == "exact"
  assert plan_lib.choose_matching(config, 101, 100) == "patchmatch"
  fixed = config_lib.replace(config, matching="conv")
  assert plan_lib.choose_matching(fixed, 10 ** 9, 1) == "conv"

  def levels(size, rotations, **changes):
    c = config_lib.replace(config, max_size=size, num_rotations=rotations,
                           num_scales=rotations, **changes)
    run_plan = plan_lib.make(c, [plan_lib.InputSizes((size, size),
                                                     ((size, size),))])
    for level in run_plan.levels:
      assert level.scan_flops == plan_lib.scan_flops(c, level.mrf)
      assert level.vgg_flops == plan_lib.vgg_flops(c, level.size)
    return run_plan

  small = levels(384, 0)
  assert [l.matching for l in small.levels] == ["exact"] * 3
  # 9 copies at 1024 px: the scan is 2.3x the VGG at level 2 and 9.3x at
  # level 3.
  big = levels(1024, 1)
  assert [l.matching for l in big.levels] == ["exact", "patchmatch",
                                              "patchmatch"]
  assert big.levels[2].scan_flops > 9 * big.levels[2].vgg_flops
  assert json.loads(big.to_json())["levels"][2]["matching"] == "patchmatch"
  assert "matching patchmatch (exact scan 9.3x the VGG's flops)" in (
      big.table())
  # The VGG to relu4_2 at 384x384: 2 x 2 x 9 x sum over its convolutions
  # of h w c_in c_out.
  convs = [(384, 3, 64), (384, 64, 64), (192, 64, 128), (192, 128, 128),
           (96, 128, 256)] + [(96, 256, 256)] * 3 + [(48, 256, 512),
                                                      (48, 512, 512)]
  assert small.levels[2].vgg_flops == 4 * 9 * sum(
      s * s * a * b for s, a, b in convs)
  # Where PatchMatch would not fit whole but tiles would, auto tiles it.
  tight = levels(1024, 1, tile_size="auto")
  limited = plan_lib.make(
      config_lib.replace(config, max_size=1024, tile_size="auto"),
      [plan_lib.InputSizes((1024, 1024), ((1024, 1024),))],
      limit_bytes=tight.levels[2].memory_bytes // 2)
  assert limited.levels[2].tiling is not None
  assert limited.levels[2].matching == "patchmatch"
  assert limited.levels[2].memory_bytes < tight.levels[2].memory_bytes


def test_patchmatch_flags_are_checked():
  config = config_lib.Config(content_image="c.png", style_image=("s.png",),
                             matching="patchmatch", tile_size="64")
  config.validate()  # PatchMatch runs tiled
  with pytest.raises(config_lib.ConfigError, match="--patchmatch_passes"):
    config_lib.replace(config, tile_size="0", patchmatch_passes=0).validate()
