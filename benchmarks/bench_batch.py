"""Images per second of batched synthesis, for batch sizes 1, 2 and 4.

One pyramid level of a transfer at 128 px (the defaults: relu3_1 + relu4_1
MRF, relu4_2 content, fixed-step L-BFGS), N distinct random (content, style)
pairs solved together by one `synthesize.Synthesizer`. Each batch size is
compiled by a warm-up run first; then the sizes are timed round-robin
(absolute times on a shared CPU drift up to 2x within minutes, so the
ratios within one run are what to compare), and the median is reported:

  seconds per run (targets + solve), the solve's seconds per iteration,
  images/s = N / seconds per run, and the scaling: images/s relative to
  the smallest batch (N would be linear scaling).

    python benchmarks/bench_batch.py                      # 1, 2, 4 at 128 px
    python benchmarks/bench_batch.py --sizes 1 2 4 8 --num_iter 10
    python benchmarks/bench_batch.py --host_devices 2     # shard over 2 CPU
                                                          # "devices"
    python benchmarks/bench_batch.py --weights vgg19.npz  # real weights

Random VGG19 weights by default: the work per iteration does not depend on
the weights' values. --host_devices sets
XLA_FLAGS=--xla_force_host_platform_device_count before JAX starts, so the
batch is sharded over that many CPU devices (`batch.batch_mesh`).
"""

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4],
                      help="batch sizes")
  parser.add_argument("--image_size", type=int, default=128,
                      help="long side in pixels")
  parser.add_argument("--num_iter", type=int, default=20,
                      help="L-BFGS iterations per run")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed runs per batch size (round-robin)")
  parser.add_argument("--host_devices", type=int, default=0,
                      help="force this many CPU devices and shard over them")
  parser.add_argument("--weights", default="",
                      help="a weights file; default random VGG19 weights")
  return parser.parse_args(argv)


def main(argv=None):
  args = _parse_args(argv)
  if args.host_devices:
    # Must be set before JAX initialises its backends.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={args.host_devices}")
  # Runnable from a checkout without installing the package.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import batch  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import synthesize  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import vgg  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import weights  # pylint: disable=g-import-not-at-top

  side = args.image_size
  config = config_lib.Config(
      content_image="memory", style_image=("memory",), max_size=side,
      num_res=1, num_iter=(args.num_iter,), print_every=args.num_iter,
      weights=args.weights)
  if args.weights:
    params, convention = weights.load_params(args.weights)
  else:
    params, convention = vgg.init_params("vgg19", seed=0), "caffe"

  rng = np.random.default_rng(0)

  def smooth_image(height, width):
    """Random [H, W, 3] in [0, 1] with structure at every VGG scale."""
    coarse = rng.uniform(0, 1, (height // 8 + 2, width // 8 + 2, 3))
    image = np.asarray(jax.image.resize(coarse, (height, width, 3),
                                        "linear"))
    return np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1).astype(
        np.float32)

  biggest = max(args.sizes)
  contents = [smooth_image(side, side * 3 // 4) for _ in range(biggest)]
  styles = [smooth_image(side, side) for _ in range(biggest)]
  runs = {}
  for n in args.sizes:
    mesh = batch.batch_mesh(n)
    synthesizer = synthesize.Synthesizer(config, params, convention,
                                         mesh=mesh)
    inputs = synthesize.Inputs(contents=contents[:n],
                               styles=[[s] for s in styles[:n]],
                               init_images=[None] * n)
    t0 = time.perf_counter()
    synthesizer.run(inputs)  # compiles
    runs[n] = (synthesizer, inputs, time.perf_counter() - t0, [])

  for _ in range(args.repeats):
    for n in args.sizes:
      synthesizer, inputs, _, times = runs[n]
      t0 = time.perf_counter()
      result = synthesizer.run(inputs)
      # One log block per run: its seconds_per_iter is the solve alone.
      times.append((time.perf_counter() - t0,
                    result.history[-1]["seconds_per_iter"]))

  print(f"# {platform.node()}: {jax.device_count()} {jax.default_backend()} "
        f"device(s), {os.cpu_count()} CPU cores, jax {jax.__version__}")
  print(f"# transfer, {side} px ({side}x{side * 3 // 4}), 1 level x "
        f"{args.num_iter} iterations, median of {args.repeats} runs "
        f"(round-robin), {args.weights or 'random weights'}")
  smallest = min(args.sizes)
  median = lambda n, k: statistics.median(t[k] for t in runs[n][3])
  rates = {n: n / median(n, 0) for n in args.sizes}
  print("batch  devices  first_run_s  run_s  solve_s_per_iter  images_per_s"
        f"  speedup_vs_{smallest} (linear)")
  for n in args.sizes:
    synthesizer, _, first_run, _ = runs[n]
    devices = synthesizer.mesh.size if synthesizer.mesh is not None else 1
    print(f"{n:5d}  {devices:7d}  {first_run:11.1f}  {median(n, 0):5.2f}  "
          f"{median(n, 1):16.3f}  {rates[n]:12.3f}  "
          f"{rates[n] / rates[smallest]:.2f}x ({n / smallest:.0f}x)")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
