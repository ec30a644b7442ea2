"""How far a whole run with --conv=auto lands from the same run with xla.

The convolution forms of --conv (conv.py) compute the same features and
input gradients to float rounding; over a run of hundreds of L-BFGS steps
those rounding differences are amplified, as any change of summation order
would. This runs the reference transfer (configs/transfer.flags' settings,
1 style copy, real VGG19 weights) once per --convs at --size with
--num_iter iterations per level, in this process one after the other, and
prints, against the first of --convs: the largest and mean absolute pixel
difference of the results (0-255 units, before output clipping), the share
of pixels that differ by more than one level, and the final losses' relative
difference.

    python benchmarks/bench_conv_drift.py                    # 256 px, 3 x 100
    python benchmarks/bench_conv_drift.py --size 384 --convs xla winograd
"""

import argparse
import dataclasses
import pathlib
import shlex
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from benchmarks import bench_synthesis
from cnnmrf_jax import conv as conv_lib
from cnnmrf_jax import synthesize


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=256, help="long side, px")
  parser.add_argument("--num_iter", type=int, default=100,
                      help="iterations per level (3 levels)")
  parser.add_argument("--convs", nargs="+", default=["xla", "auto"],
                      choices=conv_lib.CONVS)
  parser.add_argument("--content", default="example:astronaut")
  parser.add_argument("--style", default="example:coffee")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  print("command:", shlex.join([sys.executable] + sys.argv), flush=True)
  spec = dict(content=args.content, style=args.style, size=args.size,
              copies=1, iters=[args.num_iter], matching="matmul",
              dtype="float32", print_every=args.num_iter)
  base = bench_synthesis._reference_config(spec)  # pylint: disable=protected-access
  results = {}
  for conv in args.convs:
    config = dataclasses.replace(base, conv=conv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
      result = synthesize.run(config, workdir)
    results[conv] = result
    print(f"--conv={conv} ({conv_lib.resolve(conv)}): "
          f"{time.perf_counter() - start:.1f} s, final loss "
          f"{result.history[-1]['loss'][0]:.6g}", flush=True)
  first = args.convs[0]
  for conv in args.convs[1:]:
    a = np.asarray(results[first].images, np.float64) * 255.0
    b = np.asarray(results[conv].images, np.float64) * 255.0
    diff = np.abs(a - b)
    loss_a = results[first].history[-1]["loss"][0]
    loss_b = results[conv].history[-1]["loss"][0]
    print(f"--conv={conv} vs {first}, {args.size} px, 3 x {args.num_iter}: "
          f"largest pixel difference {diff.max():.2f} / 255, mean "
          f"{diff.mean():.3f} / 255, {np.mean(diff > 1.0) * 100:.2f} % of "
          f"values differ by more than 1 / 255; final loss "
          f"{(loss_b - loss_a) / loss_a * 100:+.3f} %")


if __name__ == "__main__":
  main()
