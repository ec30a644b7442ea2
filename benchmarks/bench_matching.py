"""Speed and memory of the exact NCC patch matching on this machine.

For the relu3_1 and relu4_1 maps of a 256, 384 and 512 px image (sides /4
and /8, 256 and 512 channels), with 1 and 9 style copies, and several chunk
sizes: compile seconds, median seconds per match after compilation, the
rate in GFLOP/s (2 * P * M * D multiply-adds of the direct form) and peak
resident memory. --methods times several forms of the scan
(`patches.match_map`'s matmul, conv, winograd) round-robin in one process
and prints each one's speed-up over the first.

Each configuration runs in its own subprocess, so peaks do not leak from one
to the next. `inputs` is the resident memory once the bank and synthesis
patches are built (JAX runtime ~250 MiB included); the peak is then reset
(/proc/self/clear_refs), so `peak` is the highest resident memory during
compilation and matching: the inputs plus the match's working set.
The maps are random with ReLU-like sparsity (~70 % zeros), the synthesis map
the same size as the style map; 9 copies are approximated by 9 maps of the
same size (real augmented copies differ in size by a few percent).

    python benchmarks/bench_matching.py            # all, ~5-10 min on 2 cores
    python benchmarks/bench_matching.py --quick    # a small subset, ~1 min
    python benchmarks/bench_matching.py --sizes 384 --copies 9 --chunks 512
    python benchmarks/bench_matching.py --sizes 384 512 --copies 1 9 \\
        --chunks 512 --methods matmul winograd --repeats 5

Figures go to stdout, one per line, and to --out as JSON. Timings on a
shared CPU drift up to 2x within minutes: compare chunk sizes within a run.
"""

import argparse
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time

_LAYERS = {"relu3_1": (4, 256), "relu4_1": (8, 512)}  # downsampling, C


def _status_mib(field):
  """A field of /proc/self/status ('VmHWM', 'VmRSS') in MiB, or None."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def _reset_peak():
  """Resets VmHWM to the current RSS (Linux >= 4.0); False if impossible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _worker(config):
  """Runs one configuration in this process; returns a dict of figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import patches  # pylint: disable=g-import-not-at-top

  down, channels = _LAYERS[config["layer"]]
  side = -(-config["size"] // down)  # ceil, as VGG's ceil-mode pooling
  rng = np.random.default_rng(0)

  def relu_map():
    x = rng.standard_normal((side, side, channels), dtype=np.float32)
    return np.maximum(x - 0.5, 0)

  build = jax.jit(lambda maps: patches.build_bank(maps, patch_size=3,
                                                  stride=2))
  bank = build([jnp.asarray(relu_map()) for _ in range(config["copies"])])
  features = jnp.asarray(relu_map())
  jax.block_until_ready((bank, features))
  num_p = patches.num_patches(side, side, 3, 2)
  m, d = bank.patches.shape

  inputs_mib = _status_mib("VmRSS")
  reset = _reset_peak()
  compiled, compile_s = {}, {}
  for method in config["methods"]:
    match = jax.jit(lambda f, b, method=method: patches.match_map(
        f, b, stride=2, chunk_size=config["chunk"], method=method))
    start = time.perf_counter()
    compiled[method] = match.lower(features, bank).compile()
    compile_s[method] = time.perf_counter() - start
    jax.block_until_ready(compiled[method](features, bank))  # warm-up
  # Round-robin: the methods share the machine's drift.
  times = {method: [] for method in config["methods"]}
  for _ in range(config["repeats"]):
    for method, program in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(program(features, bank))
      times[method].append(time.perf_counter() - start)
  seconds = {method: statistics.median(t) for method, t in times.items()}
  first = config["methods"][0]
  return dict(config, map_side=side, channels=channels, P=num_p, M=m, D=d,
              compile_s=compile_s[first], s_per_match=seconds[first],
              times_s=times[first],
              gflops=2.0 * num_p * m * d / seconds[first] / 1e9,
              methods_s=seconds, methods_compile_s=compile_s,
              score_block_mib=min(config["chunk"], m) * num_p * 4 / 2**20,
              bank_mib=m * d * 4 / 2**20, inputs_rss_mib=inputs_mib,
              peak_rss_mib=_status_mib("VmHWM"),
              peak_is_match_only=reset)


def _configs(args):
  for layer in args.layers:
    for size in args.sizes:
      for copies in args.copies:
        for chunk in args.chunks:
          yield dict(layer=layer, size=size, copies=copies, chunk=chunk,
                     repeats=args.repeats, methods=args.methods)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="bench_out/bench_matching.json",
                      help="JSON file for all figures")
  parser.add_argument("--quick", action="store_true",
                      help="384 px, relu3_1 and relu4_1, 1 and 9 copies, "
                      "chunks 512 and 2048, 2 repeats")
  parser.add_argument("--layers", nargs="+", default=list(_LAYERS),
                      choices=list(_LAYERS))
  parser.add_argument("--sizes", nargs="+", type=int, default=[256, 384, 512])
  parser.add_argument("--copies", nargs="+", type=int, default=[1, 9])
  parser.add_argument("--chunks", nargs="+", type=int,
                      default=[256, 512, 1024, 2048])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--methods", nargs="+", default=["matmul"],
                      choices=["matmul", "conv", "winograd"],
                      help="forms of the exact scan, timed round-robin; "
                      "speed-ups are over the first")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    print(json.dumps(_worker(json.loads(args.worker))))
    return 0

  if args.quick:
    args.sizes, args.chunks, args.repeats = [384], [512, 2048], 2
  print("command:", shlex.join([sys.executable] + sys.argv), flush=True)
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  results = []
  for config in _configs(args):
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)],
        capture_output=True, text=True, env=env, check=False)
    name = (f"{config['layer']} {config['size']}px copies={config['copies']}"
            f" chunk={config['chunk']}")
    if proc.returncode != 0:
      print(f"{name}: FAILED (exit {proc.returncode}): "
            f"{proc.stderr.strip().splitlines()[-1:]}", flush=True)
      results.append(dict(config, error=proc.stderr[-2000:]))
      continue
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    results.append(r)
    print(f"{name}: {config['methods'][0]}: {r['s_per_match']:.3f} s/match, "
          f"{r['gflops']:.0f} "
          f"GFLOP/s, compile {r['compile_s']:.2f} s, peak "
          f"{r['peak_rss_mib']:.0f} MiB (inputs {r['inputs_rss_mib']:.0f} "
          f"MiB; P={r['P']} M={r['M']} D={r['D']})", flush=True)
    for method in config["methods"][1:]:
      print(f"{name}: {method}: {r['methods_s'][method]:.3f} s/match, "
            f"{r['s_per_match'] / r['methods_s'][method]:.2f}x "
            f"{config['methods'][0]}'s speed, compile "
            f"{r['methods_compile_s'][method]:.2f} s", flush=True)

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  out.write_text(json.dumps(dict(
      command=shlex.join([sys.executable] + sys.argv),
      jax=jax.__version__, machine=platform.machine(),
      cpus=os.cpu_count(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
      results=results), indent=1))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
