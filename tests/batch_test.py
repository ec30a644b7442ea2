"""Tests of batched synthesis (cnnmrf_jax.batch and the batch axis of
synthesize): a batch equals its pairs run alone, compiles once, and shards
over forced host devices; plus the layout and pairs-file helpers.

Everything runs on random VGG19 weights at toy size (one level, a few
iterations); the sharded test runs in a fresh process, since the device
count must be set before JAX initialises.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest

from absl import flags

from cnnmrf_jax import batch
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import image_io
from cnnmrf_jax import main
from cnnmrf_jax import synthesize
from cnnmrf_jax import workdir as workdir_lib
from cnnmrf_jax import weights

REPO = pathlib.Path(__file__).resolve().parent.parent


def write_image(path, height, width, seed):
  """A smooth random RGB image with some fine noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (height // 4 + 2, width // 4 + 2, 3))
  image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height),
                                                          Image.BILINEAR)
  pixels = np.asarray(image, np.int32) + rng.integers(-20, 20,
                                                      (height, width, 3))
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
  return str(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  """Four (content, style) pairs of one size: contents 40x48, styles
  44x40."""
  root = tmp_path_factory.mktemp("pairs")
  return [(write_image(root / f"content{n}.png", 40, 48, n),
           (write_image(root / f"style{n}.png", 44, 40, 10 + n),))
          for n in range(4)]


def tiny_config(pairs, **changes):
  """One level of 3 iterations at 40x48 px; the VGG cut at relu3_1, which
  halves the compile time and changes nothing about batching."""
  base = config_lib.Config(
      content_image=pairs[0][0], style_image=pairs[0][1], max_size=48,
      num_res=1, num_iter=(3,), print_every=3, mrf_layers=("relu3_1",),
      content_layers=("relu3_1",),
      # Not the point here (tests/conv_test.py): 'xla' compiles 2-4x
      # faster than auto's Winograd on CPU.
      conv="xla")
  return config_lib.replace(base, **changes)


# ----------------------------------------------------------------------------
# Equivalence and compilation.


def test_batch_of_three_equals_three_single_runs(pairs, random_vgg19,
                                                 tmp_path):
  """Through the command line: --pairs with three pairs, one compile."""
  params, convention = random_vgg19
  path = tmp_path / "pairs.txt"
  path.write_text("# content style\n" + "".join(
      f"{c} {','.join(s)}\n" for c, s in pairs[:3]))
  npz = weights.save_npz(tmp_path / "random.npz", params, network="vgg19",
                         convention=convention)
  out = tmp_path / "out"
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["main", f"--pairs={path}", f"--weights={npz}",
               f"--workdir={out}", "--max_size=48", "--num_res=1",
               "--num_iter=3", "--print_every=3", "--mrf_layers=relu3_1",
               "--content_layers=relu3_1", "--conv=xla"])
  synthesize.TRACE_COUNTS.clear()
  try:
    main.main(["main"])
  finally:
    flags.FLAGS.unparse_flags()
  # One level: the batched step was traced (so compiled) exactly once.
  assert synthesize.TRACE_COUNTS["update"] == 1
  assert sorted(p.name for p in out.glob("result*.png")) == [
      "result_0.png", "result_1.png", "result_2.png"]
  log = [json.loads(line) for line in
         (out / workdir_lib.LOG_NAME).read_text().splitlines()]
  assert [len(r["loss"]) for r in log] == [3] * 4  # iterations 0..3

  config = tiny_config(pairs)
  single = synthesize.Synthesizer(config, params, convention)
  for n, (content, styles) in enumerate(pairs[:3]):
    alone = single.run(synthesize.load_inputs(config_lib.replace(
        config, content_image=content, style_image=styles)))
    for got, want in zip(log, alone.history):
      # Float rounding only: a batch of 3 and of 1 run the winograd
      # convolutions (--conv=auto on CPU) in other orders.
      np.testing.assert_allclose(got["loss"][n], want["loss"][0], rtol=1e-3)
    with Image.open(out / f"result_{n}.png") as image:
      written = np.asarray(image, np.int32)
    expected = image_io.to_uint8(alone.images[0]).astype(np.int32)
    assert np.abs(written - expected).max() <= 1  # PNG rounding at most
  # The three singles shared one compiled step (same shapes).
  assert synthesize.TRACE_COUNTS["update"] == 2


def test_per_pair_weights_and_seeds_equal_runs_with_own_configs(
    pairs, random_vgg19):
  """A sweep's batch: pairs that differ in loss weights and seed, each with
  its own config, give what each config gives alone (texture: the noise
  each seed draws alone)."""
  params, convention = random_vgg19
  base = tiny_config(pairs, mode="texture", max_size=40, num_iter=(2,),
                     mrf_layers=("relu3_1",))
  configs = [config_lib.replace(base, style_image=pairs[n][1], seed=n,
                                mrf_weight=(w,), tv_weight=t)
             for n, (w, t) in enumerate([(1e-4, 1e-3), (3e-4, 2e-3)])]
  inputs = batch.concat([synthesize.load_inputs(c) for c in configs])
  inputs.configs = configs
  synthesizer = synthesize.Synthesizer(base, params, convention)
  together = synthesizer.run(inputs)
  # Pair 1 differs from the batch's config in seed and both weights.
  alone = synthesize.Synthesizer(configs[1], params, convention).run(
      synthesize.load_inputs(configs[1]))
  # From noise of std 1e-3 (of 255) two iterations move pixels by ~1e-4:
  # compare the images tightly and the losses, which differ by pair.
  np.testing.assert_allclose(together.images[1], alone.images[0], atol=1e-6)
  for got, want in zip(together.history, alone.history):
    np.testing.assert_allclose(got["loss"][1], want["loss"][0], rtol=1e-5)
    assert abs(got["loss"][0] - got["loss"][1]) > 1e-2 * got["loss"][1]


def test_pairs_that_cannot_share_a_program_are_refused(pairs, random_vgg19):
  params, convention = random_vgg19
  config = tiny_config(pairs)
  inputs = batch.concat([synthesize.load_inputs(config)] * 2)
  inputs.configs = [config, config_lib.replace(config, num_iter=(5,))]
  with pytest.raises(config_lib.ConfigError, match="num_iter"):
    synthesize.Synthesizer(config, params, convention).run(inputs)


# ----------------------------------------------------------------------------
# Sharding over forced host devices (a fresh process).

_SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from cnnmrf_jax import batch, config as config_lib, solve, synthesize, vgg

    pairs = json.loads(sys.argv[1])
    params = vgg.init_params("vgg19", seed=0)
    config = config_lib.Config(
        content_image=pairs[0][0], style_image=tuple(pairs[0][1]),
        max_size=48, num_res=1, num_iter=(3,), print_every=3,
        mrf_layers=("relu3_1",), content_layers=("relu3_1",),
        chunk_size=8,  # several chunks: the matching's loop runs sharded
        conv="xla")  # layout is the point: no winograd batch-order rounding
    inputs = batch.concat([synthesize.load_inputs(config_lib.replace(
        config, content_image=c, style_image=tuple(s))) for c, s in pairs])

    def run(mesh, inputs=inputs):
      synthesizer = synthesize.Synthesizer(config, params, "caffe",
                                           mesh=mesh)
      seen = {}
      solve_level = solve.solve_level
      def spy(stepper, x, targets, **kwargs):
        x_out, state, history = solve_level(stepper, x, targets, **kwargs)
        seen.update(x=x, targets=targets, x_out=x_out, state=state)
        return x_out, state, history
      solve.solve_level = spy
      try:
        return synthesizer.run(inputs), seen
      finally:
        solve.solve_level = solve_level

    def layout(array):
      return {"spec": str(tuple(array.sharding.spec)),
              "devices": len(array.sharding.device_set),
              "shard": list(array.addressable_shards[0].data.shape)}

    mesh = batch.batch_mesh(4)
    sharded, seen = run(mesh)
    plain, _ = run(None)
    three = synthesize.Inputs(inputs.contents[:3], inputs.styles[:3],
                              inputs.init_images[:3])  # on 2 devices
    padded, _ = run(batch.batch_mesh(3, jax.devices()[:2]), three)
    print(json.dumps({
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "x": layout(seen["x"]), "x_out": layout(seen["x_out"]),
        "targets": [layout(a) for a in jax.tree.leaves(seen["targets"])],
        "state": [layout(a) for a in jax.tree.leaves(seen["state"])],
        "diff": float(np.abs(sharded.images - plain.images).max()),
        "loss_sharded": [r["loss"] for r in sharded.history],
        "loss_plain": [r["loss"] for r in plain.history],
        "padded_shape": list(padded.images.shape),
        "padded_loss_len": len(padded.history[-1]["loss"]),
        "padded_diff": float(np.abs(padded.images[:3] -
                                    sharded.images[:3]).max()),
    }))
""")


def test_batch_of_four_is_sharded_over_four_devices(pairs, tmp_path):
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [str(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT,
       json.dumps([[c, list(s)] for c, s in pairs])],
      capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4 and out["mesh"] == {"batch": 4}
  # x [4, 40, 48, 3], every target and every solver-state leaf: split on
  # the batch axis, one pair per device.
  for layout in [out["x"], out["x_out"]] + out["targets"] + out["state"]:
    assert layout["spec"] == "('batch',)", layout
    assert layout["devices"] == 4 and layout["shard"][0] == 1, layout
  assert out["x"]["shard"] == [1, 40, 48, 3]
  # Equal to the unsharded batch to float rounding (the per-device batch of
  # one and the batch of four take differently blocked convolutions).
  np.testing.assert_allclose(out["loss_sharded"], out["loss_plain"],
                             rtol=1e-5)
  assert out["diff"] < 1e-3
  # 3 pairs on 2 devices: padded to 4, the copy dropped from the results.
  assert out["padded_shape"] == [3, 40, 48, 3]
  assert out["padded_loss_len"] == 3
  assert out["padded_diff"] < 1e-3


# ----------------------------------------------------------------------------
# Helpers.


@pytest.mark.parametrize("num_pairs, num_devices, expected", [
    (1, 8, (1, 1)), (3, 8, (3, 3)), (8, 8, (8, 8)), (10, 8, (5, 10)),
    (11, 8, (6, 12)), (17, 8, (6, 18)), (5, 1, (1, 5)), (4, 4, (4, 4)),
])
def test_plan_uses_fewest_devices_at_least_padding(num_pairs, num_devices,
                                                   expected):
  used, padded = batch.plan(num_pairs, num_devices)
  assert (used, padded) == expected
  per_device = -(-num_pairs // num_devices)
  assert padded == used * per_device and padded >= num_pairs


def test_one_device_gives_no_mesh():
  import jax  # pylint: disable=g-import-not-at-top
  assert batch.batch_mesh(1) is None
  assert batch.batch_mesh(4, jax.devices()[:1]) is None


def test_pad_repeats_the_last_pair_and_concat_joins():
  a = synthesize.Inputs(contents=[1], styles=[[2]], init_images=[None])
  b = synthesize.Inputs(contents=[3], styles=[[4]], init_images=[None])
  joined = batch.concat([a, b])
  assert joined.contents == [1, 3] and joined.configs is None
  padded = batch.pad(joined, 4)
  assert padded.contents == [1, 3, 3, 3] and padded.styles[-1] == [4]
  with pytest.raises(ValueError, match="some pairs"):
    batch.concat([a, synthesize.Inputs([3], [[4]], [None], configs=["c"])])


def test_batch_key_ignores_per_pair_fields_only():
  config = config_lib.Config(content_image="a.png", style_image=("b.png",))
  same = config_lib.replace(config, content_image="c.png", seed=3,
                            content_weight=40.0, mrf_weight=(2e-4,),
                            tv_weight=5e-3, style_image=("d.png",))
  assert batch.batch_key(same) == batch.batch_key(config)
  for change in [dict(max_size=256), dict(num_iter=(50,)),
                 dict(content_weight=0.0), dict(tv_weight=0.0),
                 dict(num_rotations=1)]:
    assert (batch.batch_key(config_lib.replace(config, **change)) !=
            batch.batch_key(config)), change


def test_read_pairs(tmp_path):
  path = tmp_path / "pairs.txt"
  path.write_text("# content style\n"
                  "a.png b.png\n\n"
                  "'with space.png' c.png,d.png  # two styles\n")
  assert batch.read_pairs(str(path)) == [
      ("a.png", ("b.png",)), ("with space.png", ("c.png", "d.png"))]
  path.write_text("a.png\n")
  assert batch.read_pairs(str(path), mode="texture") == [("", ("a.png",))]
  with pytest.raises(config_lib.ConfigError, match=r"--pairs: .*:1: "):
    batch.read_pairs(str(path), mode="transfer")
  with pytest.raises(config_lib.ConfigError, match="--pairs: cannot read"):
    batch.read_pairs(str(tmp_path / "missing.txt"))
