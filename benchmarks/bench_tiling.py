"""Seconds per iteration and peak memory of whole against tiled evaluation.

For each --sizes (long side, one pyramid level, the reference transfer
settings and real weights) and each --tile_size, a run of --iterations
L-BFGS iterations through synthesize.run in its own subprocess (so peaks do
not leak): median seconds per iteration after the first (which compiles),
the loss after the last iteration, peak resident memory and the plan's
estimate. Tiled and whole losses should agree to float rounding.

    python benchmarks/bench_tiling.py --sizes 1024 --tile_size 0 512
    python benchmarks/bench_tiling.py --sizes 1024 --tile_size 512 \
        --round_robin 3     # the objective alone, alternately, one process

Figures go to stdout, one per line with its unit.
"""

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, statistics, sys, time
from absl import logging
logging.set_verbosity(logging.WARNING)
from cnnmrf_jax import config as config_lib, plan, synthesize
args = json.loads(sys.argv[1])
config = config_lib.Config(
    content_image=args["content"], style_image=(args["style"],),
    max_size=args["size"], num_res=1, num_iter=(args["iterations"],),
    print_every=1, tile_size=args["tile_size"], check_memory=False)
run_plan = plan.make(config, synthesize.load_inputs(config).sizes())
t0 = time.perf_counter()
result = synthesize.run(config)
wall = time.perf_counter() - t0
seconds = [r["seconds_per_iter"] for r in result.history if r["iter"] > 1]
level = run_plan.levels[-1]
print(json.dumps({
    "size": list(level.size),
    "tiling": None if level.tiling is None else [level.tiling.tile_size,
                                                 *level.tiling.grid],
    "s_per_iter": statistics.median(seconds) if seconds else None,
    "wall_s": wall,
    "loss": float(result.history[-1]["loss"][0]),
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                    / 2 ** 20,
    "estimate_gib": run_plan.memory_bytes / 2 ** 30}))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", type=int, default=[1024])
  parser.add_argument("--tile_size", nargs="+", default=["0", "512"])
  parser.add_argument("--iterations", type=int, default=3)
  parser.add_argument("--content", default="example:astronaut")
  parser.add_argument("--style", default="example:coffee")
  parser.add_argument("--round_robin", type=int, default=0,
                      help="instead: time the objective alone, whole and "
                      "tiled at --tile_size[-1], this many rounds")
  args = parser.parse_args()
  if args.round_robin:
    for size in args.sizes:
      round_robin(size, int(args.tile_size[-1]), args.round_robin,
                  args.content, args.style)
    return
  for size in args.sizes:
    for tile_size in args.tile_size:
      child = json.dumps({"size": size, "tile_size": tile_size,
                          "iterations": args.iterations,
                          "content": args.content, "style": args.style})
      out = subprocess.run([sys.executable, "-c", _CHILD, child],
                           capture_output=True, text=True, check=False)
      if out.returncode:
        print(f"size {size} tile_size {tile_size}: failed\n{out.stderr[-2000:]}")
        continue
      figures = json.loads(out.stdout.strip().splitlines()[-1])
      name = f"size {size} tile_size {tile_size}"
      print(f"{name}: level {figures['size'][0]}x{figures['size'][1]} px, "
            f"tiling {figures['tiling']}")
      print(f"{name}: {figures['s_per_iter']:.2f} s/iter")
      print(f"{name}: {figures['wall_s']:.1f} s wall (compile included)")
      print(f"{name}: loss {figures['loss']:.6g}")
      print(f"{name}: peak RSS {figures['peak_rss_gib']:.2f} GiB "
            f"(estimate {figures['estimate_gib']:.2f} GiB)")
      sys.stdout.flush()


def round_robin(size: int, tile_size: int, rounds: int, content: str,
                style: str) -> None:
  """The objective's value and gradient alone, whole and tiled, timed
  alternately in one process (real weights, one level at `size`)."""
  import statistics  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import plan, synthesize, targets as targets_lib, terms, tiling  # pylint: disable=g-import-not-at-top,g-multiple-import
  config = config_lib.Config(content_image=content, style_image=(style,),
                             max_size=size, num_res=1, tile_size="0")
  inputs = synthesize.load_inputs(config)
  run_plan = plan.make(config, inputs.sizes())
  level = run_plan.levels[-1]
  synth = synthesize.Synthesizer(config)
  targets = targets_lib.level_targets(config, run_plan, level, inputs,
                                      synth.features)
  targets = jax.tree.map(lambda t: t[0], targets)
  x = targets_lib.initial_images(config, inputs, level.size,
                                 synth.convention)[0]
  tiles = tiling.make(config, level.size, tile_size)
  functions = {
      "whole": terms.make_objective(config, synth.model),
      f"tiled {tile_size}": terms.make_objective(
          config, synth.model, tiling_of=lambda s: tiles)}
  compiled = {name: jax.jit(jax.value_and_grad(f, has_aux=True))
              for name, f in functions.items()}
  times = {name: [] for name in compiled}
  losses = {}
  for name, f in compiled.items():
    losses[name] = float(jax.block_until_ready(f(x, synth.params,
                                                 targets))[0][0])
  for _ in range(rounds):
    for name, f in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(x, synth.params, targets))
      times[name].append(time.perf_counter() - t0)
  whole = statistics.median(times["whole"])
  for name in compiled:
    median = statistics.median(times[name])
    print(f"objective at {level.size[0]}x{level.size[1]} px, {name}: "
          f"{median:.2f} s per value and gradient ({median / whole:.2f}x "
          f"whole), loss {losses[name]:.7g}")


if __name__ == "__main__":
  main()
