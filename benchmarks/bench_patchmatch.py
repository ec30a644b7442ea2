"""Quality and speed of PatchMatch (patches.patchmatch) against the exact scan.

With the real VGG19 weights, the content image at --size (long side) and
the style at the same size, at each --layers: the exact nearest neighbours
(patches.match) and a PatchMatch field from a random start after 1, 2, 5,
10 and 20 passes, on fixed synthesis features (in a run the features move
between evaluations and the field is carried over, one pass each; this is
the field's convergence alone). Printed: the share of patches whose match
is the exact argmax (to 1e-5 in NCC), the mean NCC relative to the exact
one, the MRF energy (sum over positions of (F - Tbar)^2, the loss without
its weight) relative to the exact one, and seconds of one exact match and
of one pass, timed round-robin.

    python benchmarks/bench_patchmatch.py --size 512 --layers relu3_1 relu4_1

Figures go to stdout, one per line with its unit.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnnmrf_jax import image_io
from cnnmrf_jax import patches
from cnnmrf_jax import plan
from cnnmrf_jax import vgg
from cnnmrf_jax import weights as weights_lib


def _energy(features, bank, indices, scores):
  height, width, channels = features.shape
  keep = scores > -jnp.inf
  summed, count = patches.fold(jnp.take(bank.patches, indices, axis=0),
                               height=height, width=width, channels=channels,
                               patch_size=3, stride=2, mask=keep)
  covered = count > 0
  tbar = jnp.where(covered, summed / jnp.maximum(count, 1), 0)
  return jnp.sum(jnp.where(covered, features - tbar, 0) ** 2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--layers", nargs="+", default=["relu3_1", "relu4_1"])
  parser.add_argument("--content", default="example:astronaut")
  parser.add_argument("--style", default="example:coffee")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  params, convention = weights_lib.load_params(None, network="vgg19")
  model = vgg.VGG()

  def features_of(name):
    image, _ = image_io.read_image(name)
    h, w = plan.fit_long_side(*image.shape[:2], args.size)
    image = np.asarray(image_io.resize(image, h, w, method="torch"))
    x = vgg.preprocess(jnp.asarray(image, jnp.float32), convention)
    out = jax.jit(lambda x: model.apply({"params": params}, x[None],
                                        outputs=args.layers))(x)
    return {k: v[0] for k, v in out.items()}

  content, style = features_of(args.content), features_of(args.style)
  for layer in args.layers:
    synth_map, style_map = content[layer], style[layer]
    bank = patches.build_bank([style_map])
    grid = patches.bank_grid([style_map.shape])
    synth = patches.extract_patches(synth_map, patch_size=3, stride=2)
    synth_grid = (len(patches.grid_positions(synth_map.shape[0], 3, 2)),
                  len(patches.grid_positions(synth_map.shape[1], 3, 2)))
    exact_fn = jax.jit(lambda p: patches.match(p, bank))
    pass_fn = jax.jit(lambda p, f, k: patches.patchmatch(
        p, bank, grid, f, k, synth_grid=synth_grid))
    exact, exact_scores = jax.block_until_ready(exact_fn(synth))
    exact_energy = float(_energy(synth_map, bank, exact, exact_scores))
    name = (f"{layer} at {args.size} px (P={synth.shape[0]}, "
            f"M={bank.patches.shape[0]})")
    key = jax.random.PRNGKey(0)
    field = jax.random.randint(key, (synth.shape[0],), 0,
                               bank.patches.shape[0], jnp.int32)
    jax.block_until_ready(pass_fn(synth, field, key))  # compile
    done = 0
    for passes in (1, 2, 5, 10, 20):
      while done < passes:
        key, step = jax.random.split(key)
        field, scores = pass_fn(synth, field, step)
        done += 1
      scores = np.asarray(scores)
      share = np.mean(scores >= np.asarray(exact_scores) - 1e-5)
      ncc = float(np.mean(scores) / np.mean(np.asarray(exact_scores)))
      energy = float(_energy(synth_map, bank, field, jnp.asarray(scores)))
      print(f"{name}: after {passes} passes: exact argmax {share:.3f}, "
            f"mean NCC {ncc:.4f} of exact, MRF energy "
            f"{energy / exact_energy:.4f} of exact")
    exact_times, pass_times = [], []
    for _ in range(args.rounds):  # round-robin
      t0 = time.perf_counter()
      jax.block_until_ready(exact_fn(synth))
      exact_times.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      jax.block_until_ready(pass_fn(synth, field, key))
      pass_times.append(time.perf_counter() - t0)
    e, p = statistics.median(exact_times), statistics.median(pass_times)
    print(f"{name}: exact match {e:.3f} s, one PatchMatch pass {p:.3f} s "
          f"({e / p:.1f}x)")


if __name__ == "__main__":
  main()
