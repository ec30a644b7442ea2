"""Speed and memory of a whole CNNMRF synthesis on this machine.

For the reference transfer settings (configs/transfer.flags: relu3_1 and
relu4_1 MRF at 1e-4, relu4_2 content at 20, TV 1e-3, L-BFGS with history
25, 3 levels) at each --sizes and --copies (1: no augmentation; 9: one
rotation and one scale step each way, the reference's portrait run):

  - seconds per L-BFGS iteration at the finest level, median of chained
    iterations after compilation;
  - compile seconds per level (the solver's init and update programs) and
    the seconds to build each level's targets;
  - the share of an iteration in the VGG (value and gradient through the
    network alone), the MRF matching (matching, gathering, folding and the
    MRF losses' gradient, given the features; with --matching patchmatch
    the PatchMatch pass from the level's starting field) and the solver
    (the update
    minus the objective's value and gradient); the rest is content and TV
    losses and glue. Each part is compiled on its own and timed round-robin
    with the update;
  - flops per iteration by XLA's cost analysis of the compiled update (it
    counts a loop body once, so the matching loop is corrected by the
    difference between the matching lowered with one chunk and with the
    run's chunks), the rate they run at, and that rate as a fraction of
    this machine's attainable matmul rate, a float32 jnp.dot of two
    --probe_size square matrices timed round-robin with the update;
  - peak resident memory of the process (targets, compiles of all levels
    and the finest level's iterations; JAX runtime included) next to
    cnnmrf_jax.memory's estimate when that module exists.

Then the full reference run at --full_size (3 levels x --full_iters, 1
copy, through synthesize.run as the CLI runs it): wall time and peak memory.
And with --max_size, large runs (default settings, 3 levels, --large_iters
iterations per level): wall time, seconds per iteration per level and peak
memory; a size whose memory estimate exceeds the available memory is
reported and skipped before it starts.

Every measurement runs in its own subprocess so peaks do not leak from one
to the next. Timings on a shared CPU drift up to 2x within minutes; ratios
taken round-robin inside one process (shares, fraction of the matmul rate)
are the figures to compare across machines and runs.

    python benchmarks/bench_synthesis.py            # all, ~30 min on 2 cores
    python benchmarks/bench_synthesis.py --quick    # a smoke run, ~2 min
    python benchmarks/bench_synthesis.py --sizes 384 --copies 1 \\
        --matching matmul conv                       # compare formulations
    python benchmarks/bench_synthesis.py --sizes --nofull_run \\
        --max_size 1024 2048                         # large images only
    python benchmarks/bench_synthesis.py --sizes 1024 2048 --copies 1 9 \\
        --matching matmul patchmatch --nofull_run    # exact vs PatchMatch

Figures go to stdout, one per line with its unit, and to --out as JSON.
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
import tempfile
import time

# Run from a checkout without installing: the repository root on the path,
# here and in the worker processes.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import patches
from cnnmrf_jax import patchmatch as patchmatch_lib
from cnnmrf_jax import plan
from cnnmrf_jax import synthesize
from cnnmrf_jax import targets as targets_lib
from cnnmrf_jax import terms
# pylint: enable=g-import-not-at-top,wrong-import-position

GIB = 2.0 ** 30


def _status_bytes(field):
  """A field of /proc/self/status ('VmHWM', 'VmRSS') in bytes, or None."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _available_bytes():
  """MemAvailable of /proc/meminfo in bytes, or None."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


# --------------------------------------------------------------------------
# Worker side: each measurement runs in a fresh process (`--worker`).


def _reference_config(spec):
  """configs/transfer.flags at spec's size, copies, iterations and options."""
  augment = {1: 0, 9: 1, 25: 2, 49: 3}[spec["copies"]]
  extra = {}
  if "check_memory" in config_lib.Config.__dataclass_fields__:
    extra["check_memory"] = False  # the driver checks, and reports, first
  return config_lib.Config(
      mode="transfer", content_image=spec["content"],
      style_image=(spec["style"],), max_size=spec["size"], num_res=3,
      num_iter=tuple(spec["iters"]), mrf_layers=("relu3_1", "relu4_1"),
      mrf_weight=(1e-4,), patch_size=3, style_stride=2, synth_stride=2,
      num_rotations=augment, num_scales=augment, content_layers=("relu4_2",),
      content_weight=20.0, tv_weight=1e-3, optimizer="lbfgs",
      matching=spec["matching"], dtype=spec["dtype"],
      chunk_size=spec.get("chunk_size", 0),
      print_every=spec.get("print_every", 10), **extra)


def _memory_estimate(config, inputs):
  """The plan's memory estimate in bytes (cnnmrf_jax/memory.py)."""
  return plan.make(config, inputs.sizes()).memory_bytes


def _flops(lowered):
  """XLA's flop count of a lowered or compiled program."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


class _Probe:
  """The attainable matmul rate: jnp.dot of two [n, n] float32 matrices."""

  def __init__(self, n):
    self.n = n
    a = jnp.asarray(np.random.default_rng(0).standard_normal(
        (n, n), dtype=np.float32))
    self.args = (a, a)
    self.fn = jax.jit(jnp.dot).lower(*self.args).compile()
    jax.block_until_ready(self.fn(*self.args))

  def __call__(self):
    return self.fn(*self.args)

  @property
  def flops(self):
    return 2.0 * self.n ** 3


def _time(fn, args=()):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _level_worker(spec):
  """Per-iteration figures of one (size, copies) configuration."""
  # The benchmark times the Synthesizer's own jitted init and update.
  # pylint: disable=protected-access
  config = _reference_config(dict(spec, iters=[spec["iterations"]]))
  inputs = synthesize.load_inputs(config)
  synth = synthesize.Synthesizer(config)
  params = synth.params
  run_plan = plan.make(config, inputs.sizes())
  height, width = run_plan.output_size
  out = dict(spec, height=height, width=width, levels=[])

  # Every level's targets and programs, as a run builds them; the compiled
  # programs of the finest level are then timed.
  for level_plan in run_plan.levels:
    level, size = level_plan.index, level_plan.size
    start = time.perf_counter()
    targets = jax.block_until_ready(targets_lib.level_targets(
        config, run_plan, level_plan, inputs, synth.features))
    targets_s = time.perf_counter() - start
    x = targets_lib.initial_images(config, inputs, size, synth.convention)
    start = time.perf_counter()
    init = synth._init.lower(x, params, targets).compile()
    init_s = time.perf_counter() - start
    state_shape = jax.eval_shape(synth._init, x, params, targets)
    start = time.perf_counter()
    lowered_update = synth._update.lower(x, state_shape, params, targets)
    update = lowered_update.compile()
    update_s = time.perf_counter() - start
    out["levels"].append(dict(level=level + 1, height=size[0], width=size[1],
                              targets_s=targets_s, init_compile_s=init_s,
                              update_compile_s=update_s,
                              compile_s=init_s + update_s))

  state = jax.block_until_ready(init(x, params, targets))
  x, state = jax.block_until_ready(update(x, state, params, targets))
  chained = []
  for _ in range(spec["iterations"]):
    start = time.perf_counter()
    x, state = jax.block_until_ready(update(x, state, params, targets))
    chained.append(time.perf_counter() - start)
  out["chained_s"] = chained
  out["s_per_iter"] = statistics.median(chained)
  out["peak_rss_bytes"] = _status_bytes("VmHWM")
  # The estimate of the plan that ran: planned again now, with this
  # process's own memory in use, auto tiling would choose tiles.
  out["estimate_bytes"] = run_plan.memory_bytes

  # Flops: the matching's chunk loop is counted once by the cost analysis;
  # add what the same matching costs lowered as a single chunk (no loop).
  # PatchMatch's candidate loop likewise: add the other candidates' gathered
  # dot products, 2 D flops each.
  features = synth._features(params, x)
  match_kwargs = dict(patch_size=config.patch_size, stride=config.synth_stride,
                      chunk_size=config.chunk_size
                      or patches.DEFAULT_CHUNK_SIZE,
                      method=terms.chunk_kwargs(config)["matching"],
                      compute_dtype=terms.chunk_kwargs(config)[
                          "compute_dtype"])
  loop_correction = 0.0
  search = targets["mrf"].get("patchmatch")
  for layer in config.mrf_layers:
    bank = targets["mrf"][layer]
    if search is not None:
      steps = patchmatch_lib.candidates_per_pass(
          search[layer]["grid"].starts.shape[-1],
          search[layer]["radii"].shape[-1],
          samples=terms.PATCHMATCH_SAMPLES,
          num_random=terms.PATCHMATCH_RANDOM,
          num_hops=terms.PATCHMATCH_HOPS)
      num_p, depth = patches.extract_patches(
          features[layer][0], stride=config.synth_stride).shape
      # XLA's flop count sees one candidate step and one shared block of
      # the pass loop; the rest is added here.
      shared = terms.patchmatch_shared(
          search[layer]["grid"].starts.shape[-1])
      counted = 1 + shared
      total = config.patchmatch_passes * (steps + shared)
      loop_correction += ((total - counted) * 2.0 * num_p * depth *
                          x.shape[0])
      continue
    def matcher(chunk):
      kw = dict(match_kwargs, chunk_size=chunk)
      return jax.jit(jax.vmap(lambda f, b: patches.match_map(f, b, **kw)))
    chunked = _flops(matcher(match_kwargs["chunk_size"]).lower(
        features[layer], bank))
    single = _flops(matcher(bank.patches.shape[1]).lower(features[layer],
                                                         bank))
    loop_correction += max(0.0, single - chunked)
  out["flops_cost_analysis"] = _flops(update)
  out["flops_loop_correction"] = loop_correction
  out["flops_per_iter"] = out["flops_cost_analysis"] + loop_correction

  # The parts, each its own program at the finest level's shapes.
  rng = np.random.default_rng(0)
  cotangents = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype)
                for k, v in features.items()}

  def vgg_only(x, params, cotangents):
    maps = synth.model.apply({"params": params}, x, outputs=synth.layers)
    return sum(jnp.vdot(maps[k].astype(jnp.float32), c)
               for k, c in cotangents.items())

  def mrf_only(features, targets):
    def one(features, targets):
      # The MRF term as the objective runs it (exact or PatchMatch).
      values = terms.MRF.loss(config, None, features, targets["mrf"],
                              targets["weights"]["mrf"])[0]
      return sum(values.values())
    return jnp.sum(jax.vmap(one)(features, targets))

  objective = jax.vmap(jax.value_and_grad(synth.objective, has_aux=True),
                       in_axes=(0, None, 0))
  if search is not None:
    # The parts at a steady evaluation's pass count, not the level's first.
    carry = targets["mrf"][terms.CARRY]
    targets = terms.with_carry(targets, {"mrf": dict(
        carry, passes=jnp.full_like(carry["passes"],
                                    config.patchmatch_passes))})
  probe = _Probe(spec["probe_size"])
  # The round robin calls the update on one state again and again, which
  # the run's update (it donates the state it reads) cannot: the same
  # program without the donation.
  kept_update = jax.jit(synth._update_impl).lower(
      x, state, params, targets).compile()
  parts = {
      "probe": (probe.fn, probe.args),
      "update": (kept_update, (x, state, params, targets)),
      "objective": (jax.jit(objective).lower(x, params, targets).compile(),
                    (x, params, targets)),
      "vgg": (jax.jit(jax.value_and_grad(vgg_only)).lower(
          x, params, cotangents).compile(), (x, params, cotangents)),
      "matching": (jax.jit(jax.value_and_grad(mrf_only)).lower(
          features, targets).compile(), (features, targets)),
  }
  for fn, args in parts.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in parts}
  for _ in range(spec["rounds"]):
    for name, (fn, args) in parts.items():
      times[name].append(_time(fn, args))
  median = {name: statistics.median(t) for name, t in times.items()}
  out["round_robin_s"] = times
  out["round_robin_median_s"] = median
  probe_rate = probe.flops / median["probe"]
  rate = out["flops_per_iter"] / median["update"]
  out["probe_gflops"] = probe_rate / 1e9
  out["synthesis_gflops"] = rate / 1e9
  out["fraction_of_probe"] = rate / probe_rate
  # Per round, so that a burst of load hits numerator and denominator alike.
  out["fraction_of_probe_per_round"] = statistics.median(
      (out["flops_per_iter"] / u) / (probe.flops / p)
      for u, p in zip(times["update"], times["probe"]))
  t_update = median["update"]
  out["share"] = {
      "vgg": median["vgg"] / t_update,
      "matching": median["matching"] / t_update,
      "solver": max(0.0, t_update - median["objective"]) / t_update,
  }
  out["share"]["rest"] = 1.0 - sum(out["share"].values())
  return out


def _run_worker(spec):
  """A whole run through synthesize.run: wall time, per-level s/iter, peak."""
  config = _reference_config(spec)
  inputs = synthesize.load_inputs(config)
  height, width = plan.make(config, inputs.sizes()).output_size
  estimate = _memory_estimate(config, inputs)
  probe = _Probe(spec["probe_size"])
  before = [_time(probe) for _ in range(3)]
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    result = synthesize.run(config, workdir)
  wall = time.perf_counter() - start
  peak = _status_bytes("VmHWM")
  after = [_time(probe) for _ in range(3)]
  levels = []
  for level in range(config.num_res):
    blocks = {}  # block -> its seconds per iteration (one per log block)
    for r in result.history:
      if r["level"] == level and r["iter"] > 0:
        blocks.setdefault((r["iter"] - 1) // config.print_every,
                          r["seconds_per_iter"])
    seconds = [blocks[b] for b in sorted(blocks)]
    # The first block's seconds include compiling the update.
    steady = seconds[1:] or seconds
    levels.append(dict(level=level + 1, iterations=config.num_iter[level],
                       s_per_iter=statistics.median(steady) if steady
                       else None, includes_compile=len(seconds) == 1))
  final = [r for r in result.history if r["level"] == config.num_res - 1]
  return dict(spec, height=height, width=width, wall_s=wall,
              peak_rss_bytes=peak, estimate_bytes=estimate, levels=levels,
              probe_gflops_before=probe.flops / statistics.median(before) / 1e9,
              probe_gflops_after=probe.flops / statistics.median(after) / 1e9,
              final_loss=float(np.sum(final[-1]["loss"])),
              finite=bool(np.all(np.isfinite(result.images))),
              jax=jax.__version__)


# --------------------------------------------------------------------------
# Driver side.


def _spawn(kind, spec, env, timeout):
  """Runs a worker in a fresh process; returns (dict or None, error)."""
  try:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
        timeout=timeout)
  except subprocess.TimeoutExpired:
    return None, f"timed out after {timeout} s"
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-3:]
    return None, f"exit {proc.returncode}: {' | '.join(tail)}"
  return json.loads(proc.stdout.strip().splitlines()[-1]), None


def _gib(value):
  return "n/a" if value is None else f"{value / GIB:.2f} GiB"


def _print_level(r):
  name = (f"{r['size']}px {r['copies']} cop{'y' if r['copies'] == 1 else 'ies'}"
          f" {r['matching']} {r['dtype']}")
  fine = f"{r['height']}x{r['width']}"
  lines = [
      f"{name}: seconds per iteration at {fine}: {r['s_per_iter']:.3f} s",
      f"{name}: flops per iteration: {r['flops_per_iter'] / 1e9:.1f} GFLOP "
      f"(cost analysis {r['flops_cost_analysis'] / 1e9:.1f} + matching loop "
      f"{r['flops_loop_correction'] / 1e9:.1f})",
      f"{name}: synthesis rate: {r['synthesis_gflops']:.0f} GFLOP/s",
      f"{name}: matmul probe: {r['probe_gflops']:.0f} GFLOP/s",
      f"{name}: fraction of the matmul rate: "
      f"{100 * r['fraction_of_probe']:.0f} % (per-round median "
      f"{100 * r['fraction_of_probe_per_round']:.0f} %)",
  ]
  for part in ("vgg", "matching", "solver", "rest"):
    lines.append(f"{name}: share in {part}: {100 * r['share'][part]:.0f} %")
  for lv in r["levels"]:
    lines.append(
        f"{name}: compile level {lv['level']} ({lv['height']}x{lv['width']})"
        f": {lv['compile_s']:.1f} s (init {lv['init_compile_s']:.1f} s, "
        f"update {lv['update_compile_s']:.1f} s)")
    lines.append(f"{name}: targets level {lv['level']}: "
                 f"{lv['targets_s']:.1f} s")
  lines.append(f"{name}: peak RSS: {_gib(r['peak_rss_bytes'])}")
  if r.get("estimate_bytes"):
    lines.append(f"{name}: memory.py estimate: {_gib(r['estimate_bytes'])} "
                 f"({r['estimate_bytes'] / r['peak_rss_bytes']:.2f}x the "
                 "measured peak)")
  return lines


def _print_run(r, what):
  name = (f"{what} {r['size']}px ({r['height']}x{r['width']}, "
          f"{','.join(map(str, r['iters']))} iterations)")
  lines = [f"{name}: wall time: {r['wall_s']:.1f} s"]
  for lv in r["levels"]:
    if lv["s_per_iter"] is not None:
      note = " (one block: includes compiling)" if lv["includes_compile"] \
          else ""
      lines.append(f"{name}: seconds per iteration level {lv['level']}: "
                   f"{lv['s_per_iter']:.3f} s{note}")
  lines.append(f"{name}: peak RSS: {_gib(r['peak_rss_bytes'])}")
  if r.get("estimate_bytes"):
    lines.append(f"{name}: memory.py estimate: {_gib(r['estimate_bytes'])} "
                 f"({r['estimate_bytes'] / r['peak_rss_bytes']:.2f}x the "
                 "measured peak)")
  lines.append(f"{name}: matmul probe before / after: "
               f"{r['probe_gflops_before']:.0f} / "
               f"{r['probe_gflops_after']:.0f} GFLOP/s")
  return lines


def _estimate_worker(spec):
  """cnnmrf_jax.memory's estimate of a run, before anything is built."""
  config = _reference_config(spec)
  return dict(estimate_bytes=_memory_estimate(
      config, synthesize.load_inputs(config)))


def _large_fits(spec, env):
  """(fits, estimate bytes, available bytes); the estimate in a subprocess
  so that this process stays small."""
  r, _ = _spawn("estimate", spec, env, timeout=600)
  estimate = r["estimate_bytes"] if r else None
  available = _available_bytes()
  fits = estimate is None or available is None or estimate <= available
  return fits, estimate, available


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n", maxsplit=1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="bench_out/bench_synthesis.json",
                      help="JSON file for all figures")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 128 px, 1 copy, 2 iterations, a "
                      "3 x 3 iteration full run at 128 px")
  parser.add_argument("--sizes", nargs="*", type=int,
                      default=[128, 256, 384, 512],
                      help="long sides for the per-iteration figures")
  parser.add_argument("--copies", nargs="+", type=int, default=[1, 9],
                      choices=[1, 9, 25, 49], help="style copies")
  parser.add_argument("--matching", nargs="+", default=[patches.EXACT],
                      choices=patches.MATCHING_CHOICES)
  parser.add_argument("--dtype", nargs="+", default=["float32"],
                      choices=["float32", "bfloat16"])
  parser.add_argument("--iterations", type=int, default=5,
                      help="chained iterations timed per configuration")
  parser.add_argument("--rounds", type=int, default=5,
                      help="round-robin rounds for shares and flop rates")
  parser.add_argument("--probe_size", type=int, default=2048,
                      help="side of the matmul probe (2048 read highest of "
                      "1024-4096 on a 2-core AVX-512 CPU)")
  parser.add_argument("--nofull_run", dest="full_run", action="store_false",
                      help="skip the full reference run")
  parser.add_argument("--full_size", type=int, default=384)
  parser.add_argument("--full_iters", default="100",
                      help="iterations per level of the full run")
  parser.add_argument("--max_size", nargs="*", type=int, default=[],
                      help="large runs at these sizes (default settings)")
  parser.add_argument("--large_iters", default="5,5,2",
                      help="iterations per level of the large runs")
  parser.add_argument("--ignore_estimate", action="store_true",
                      help="start a large run even when memory.py's "
                      "estimate exceeds the available memory")
  parser.add_argument("--content", default="example:astronaut")
  parser.add_argument("--style", default="example:coffee")
  parser.add_argument("--timeout", type=int, default=4 * 3600,
                      help="seconds per measurement")
  parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:
    kind, spec = args.worker[0], json.loads(args.worker[1])
    worker = {"level": _level_worker, "run": _run_worker,
              "estimate": _estimate_worker}[kind]
    print(json.dumps(worker(spec)))
    return 0

  def iters(text):
    values = [int(v) for v in text.split(",")]
    return values * 3 if len(values) == 1 else values

  if args.quick:
    args.sizes, args.copies, args.iterations, args.rounds = [128], [1], 2, 2
    args.full_size, args.full_iters = 128, "3"
  command = shlex.join([sys.executable] + sys.argv)
  print("command:", command, flush=True)
  env = dict(os.environ)
  base = dict(content=args.content, style=args.style,
              probe_size=args.probe_size)
  results = {"levels": [], "full_run": None, "large": []}

  for size in args.sizes:
    for copies in args.copies:
      for matching in args.matching:
        for dtype in args.dtype:
          spec = dict(base, size=size, copies=copies, matching=matching,
                      dtype=dtype, iterations=args.iterations,
                      rounds=args.rounds)
          r, error = _spawn("level", spec, env, args.timeout)
          if error:
            print(f"{size}px {copies} copies {matching} {dtype}: FAILED "
                  f"({error})", flush=True)
            results["levels"].append(dict(spec, error=error))
            continue
          results["levels"].append(r)
          print("\n".join(_print_level(r)), flush=True)

  if args.full_run:
    spec = dict(base, size=args.full_size, copies=1, matching=patches.EXACT,
                dtype="float32", iters=iters(args.full_iters))
    r, error = _spawn("run", spec, env, args.timeout)
    if error:
      print(f"full run {args.full_size}px: FAILED ({error})", flush=True)
      results["full_run"] = dict(spec, error=error)
    else:
      results["full_run"] = r
      print("\n".join(_print_run(r, "full run")), flush=True)

  for size in args.max_size:
    spec = dict(base, size=size, copies=1, matching=patches.EXACT,
                dtype="float32", iters=iters(args.large_iters),
                print_every=1)
    fits, estimate, available = _large_fits(spec, env)
    if not fits and not args.ignore_estimate:
      print(f"large run {size}px: SKIPPED: memory.py estimates "
            f"{_gib(estimate)}, {_gib(available)} available", flush=True)
      results["large"].append(dict(spec, skipped=True,
                                   estimate_bytes=estimate,
                                   available_bytes=available))
      continue
    print(f"large run {size}px: starting (memory.py estimate "
          f"{_gib(estimate)}, {_gib(available)} available"
          f"{'' if fits else '; --ignore_estimate'})", flush=True)
    r, error = _spawn("run", spec, env, args.timeout)
    if error:
      print(f"large run {size}px: FAILED ({error})", flush=True)
      results["large"].append(dict(spec, error=error,
                                   estimate_bytes=estimate))
      continue
    results["large"].append(r)
    print("\n".join(_print_run(r, "large run")), flush=True)

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(
      command=command, jax=jax.__version__, machine=platform.machine(),
      processor=platform.processor(), cpus=os.cpu_count(),
      time=time.strftime("%Y-%m-%d %H:%M:%S"), **results), indent=1))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
