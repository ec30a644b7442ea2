"""Wall time and peak memory of one whole run of the command-line tool.

Runs `python -m cnnmrf_jax.main` as a child process with the flags after
`--` (a fresh --workdir under --out unless the flags name one), waits for
it, and prints one figure per line: the wall time, the child's peak
resident memory (the kernel's maxrss of the child, as /usr/bin/time -v
reports it), each level's size, tiling, matching and median seconds per
iteration (from the run's log.jsonl), and the final losses. With --crop it
also writes, beside the result, a full-resolution crop of the result and
the whole result scaled down (the pictures the README shows for big runs).

The big-images figures (README "Speed and memory"):

    # 4096 px long side, 3:2 content, the reference settings, 1 style copy
    python benchmarks/bench_big.py --crop 1024 -- \\
        --flagfile=configs/transfer.flags --content_image=example:chelsea \\
        --style_image=example:coffee --max_size=4096 --num_iter=2 \\
        --num_rotations=0 --num_scales=0
    # 2048 px, the whole reference run, PatchMatch where the scan dominates
    python benchmarks/bench_big.py -- --flagfile=configs/transfer.flags \\
        --content_image=example:astronaut --style_image=example:coffee \\
        --max_size=2048 --matching=auto
    # iterations with and without huge pages (cnnmrf_jax/huge_pages.py)
    python benchmarks/bench_big.py --compare_huge_pages 2 -- \\
        --flagfile=configs/transfer.flags --content_image=example:astronaut \\
        --style_image=example:coffee --max_size=1024 --matching=patchmatch \\
        --num_iter=1,1,12 --print_every=1
"""

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="bench_out/big",
                      help="parent of the run's workdir (when the flags "
                      "name no --workdir)")
  parser.add_argument("--crop", type=int, default=0,
                      help="also write a crop of this many pixels square "
                      "at full resolution and the whole result with this "
                      "long side (0: none)")
  parser.add_argument("--compare_huge_pages", type=int, default=0,
                      metavar="ROUNDS",
                      help="instead: run the command ROUNDS times without "
                      "and with huge pages (CNNMRF_HUGE_PAGES=0, then "
                      "unset; cnnmrf_jax/huge_pages.py), alternating, and "
                      "print the finest level's seconds per iteration of "
                      "each")
  parser.add_argument("flags", nargs=argparse.REMAINDER,
                      help="-- then the flags of python -m cnnmrf_jax.main")
  args = parser.parse_args(argv)
  if args.flags[:1] == ["--"]:
    args.flags = args.flags[1:]
  if not args.flags:
    parser.error("expected -- and the flags of python -m cnnmrf_jax.main")
  return args


def _workdir(args) -> pathlib.Path:
  for flag in args.flags:
    if flag.startswith("--workdir="):
      return pathlib.Path(flag.split("=", 1)[1])
  stamp = time.strftime("%Y%m%d-%H%M%S")
  workdir = pathlib.Path(args.out) / stamp
  args.flags.append(f"--workdir={workdir}")
  return workdir


def _run(flags, env=None):
  """(wall seconds, peak RSS bytes, exit status) of the tool's run."""
  command = [sys.executable, "-m", "cnnmrf_jax.main"] + flags
  start = time.perf_counter()
  child = subprocess.Popen(command, cwd=_ROOT, env=env)
  # wait4 gives the child's own rusage: its maxrss (KiB on Linux) is the
  # peak resident memory of the run, JAX runtime and compiles included.
  _, status, usage = os.wait4(child.pid, 0)
  child.returncode = os.waitstatus_to_exitcode(status)
  return time.perf_counter() - start, usage.ru_maxrss * 1024, child.returncode


def _levels(workdir: pathlib.Path):
  """Per level: the plan's size, tiling and matching, and the log's
  seconds per iteration (median over the log's blocks, the first block,
  which includes compiling, left out where there are others)."""
  plan = json.loads((workdir / "plan.json").read_text())
  records = [json.loads(line) for line in
             (workdir / "log.jsonl").read_text().splitlines() if line]
  rows = []
  for level in plan["levels"]:
    mine = [r for r in records if r.get("level") == level["index"] and
            "seconds_per_iter" in r]
    seconds = [r["seconds_per_iter"] for r in mine]
    steady = seconds[1:] or seconds
    rows.append(dict(level=level["index"], size=level["size"],
                     tiling=level.get("tiling"), matching=level.get(
                         "matching"),
                     seconds_per_iter=statistics.median(steady)
                     if steady else None,
                     loss=mine[-1].get("loss") if mine else None))
  return rows


def _pictures(workdir: pathlib.Path, side: int):
  """A side x side crop of the result at full resolution (from its
  centre) and the whole result scaled to long side `side`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  results = sorted(workdir.glob("result*.png")) or sorted(
      workdir.glob("*.png"))
  if not results:
    return []
  image = Image.open(results[0]).convert("RGB")
  w, h = image.size
  left, top = max(0, (w - side) // 2), max(0, (h - side) // 2)
  crop = image.crop((left, top, min(w, left + side), min(h, top + side)))
  whole = image.copy()
  whole.thumbnail((side, side), Image.LANCZOS)
  written = []
  for name, picture in (("crop", crop), ("whole", whole)):
    path = workdir / f"{results[0].stem}_{name}.jpg"
    picture.save(path, quality=90)
    written.append((path, picture.size))
  return written


def _compare_huge_pages(args, workdir: pathlib.Path) -> None:
  """Round-robin runs without and with huge pages, each in its own workdir
  (WORKDIR-off-R, WORKDIR-on-R): the finest level's s/iter of each, their
  medians and the ratio."""
  flags = [f for f in args.flags if not f.startswith("--workdir=")]
  base = {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", "CNNMRF_HUGE_PAGES")}
  seconds = {"off": [], "on": []}
  for round_ in range(1, args.compare_huge_pages + 1):
    for mode in ("off", "on"):
      env = dict(base, CNNMRF_HUGE_PAGES="0") if mode == "off" else base
      run_dir = workdir.parent / f"{workdir.name}-{mode}-{round_}"
      wall, peak, code = _run(flags + [f"--workdir={run_dir}"], env=env)
      if code != 0:
        sys.exit(code)
      finest = _levels(run_dir)[-1]["seconds_per_iter"]
      seconds[mode].append(finest)
      print(f"round {round_}, huge pages {mode}: finest level "
            f"{finest:.2f} s / iteration; wall {wall:.1f} s; peak "
            f"{peak / 2 ** 30:.2f} GiB", flush=True)
  off, on = (statistics.median(seconds[m]) for m in ("off", "on"))
  print(f"huge pages off: {off:.2f} s / iteration (median)")
  print(f"huge pages on: {on:.2f} s / iteration (median)")
  print(f"huge pages speed-up: {off / on:.2f}x")


def main(argv=None):
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  workdir = _workdir(args)
  print("command:", shlex.join([sys.executable] + sys.argv), flush=True)
  if args.compare_huge_pages:
    _compare_huge_pages(args, workdir)
    return
  wall, peak, code = _run(args.flags)
  print(f"exit status: {code}")
  print(f"wall time: {wall:.1f} s ({wall / 60:.1f} min)")
  print(f"peak resident memory: {peak / 2 ** 30:.2f} GiB")
  if code != 0:
    sys.exit(code)
  for row in _levels(workdir):
    size = "x".join(map(str, row["size"]))
    tiling = row["tiling"] or "untiled"
    # plan.json and log.jsonl number levels from 0, the log table from 1.
    print(f"level {row['level'] + 1}: {size} px, {tiling}, matching "
          f"{row['matching']}: {row['seconds_per_iter']:.2f} s / iteration;"
          f" last logged loss {row['loss']}")
  if args.crop:
    for path, (w, h) in _pictures(workdir, args.crop):
      print(f"picture: {path} ({w}x{h} px)")


if __name__ == "__main__":
  main()
