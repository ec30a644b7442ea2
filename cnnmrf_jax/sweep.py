"""Sweeps: many synthesis runs from flag files and grids, across machines.

    python -m cnnmrf_jax.sweep [POINT.flags | DIR | 'GLOB' ...] \\
        [--grid=FLAG=V1,V2,...]... [SYNTHESIS FLAGS] --workdir=ROOT \\
        [--batch_size=K] [--task_index=I --num_tasks=T] \\
        [--summary_only] [--dry_run]

Points. Each positional argument is a flag file of `cnnmrf_jax.main` (one
point), a directory (its `*.flags`, sorted) or a quoted glob. Each `--grid`
is an axis `FLAG=V1,V2,...`; the points are every point file (or one empty
point when none is given) crossed with every grid axis, in that order. In a
grid value `+` stands for the comma of a list flag
(`--grid=mrf_weight=1e-4+2e-4,2e-4+4e-4` gives two points with two layer
weights each). A point's flags are, later ones winning: the synthesis flags
given to the sweep itself (on its command line or in its `--flagfile`, e.g.
a base like `--flagfile=configs/transfer.flags`), then its point file, then
its grid values. A one-value grid axis therefore overrides every point file.

Workdirs. A point's workdir is ROOT/NAME, NAME made of its point file's stem
(when there are several point files, or no grid) and the values of its grid
axes of more than one value, paths by their stem
(`portrait__content_weight=10__style_image=starry`). It holds result.png,
log.jsonl, flags.txt (`python -m cnnmrf_jax.main
--flagfile=ROOT/NAME/flags.txt` reproduces the point alone), versions.json
and point.json (status, error, final losses, seconds).

Tasks. `--task_index`/`--num_tasks` run the points with index % T == I, a
disjoint slice. Left out, they come from a SLURM array job
(SLURM_ARRAY_TASK_ID, _MIN, _COUNT), a Kubernetes indexed job
(JOB_COMPLETION_INDEX, with --num_tasks given), or a multi-process JAX run
(`--distributed`, which calls `jax.distributed.initialize`: the processes
divide their task's slice, each solving its points on its own devices and
none waiting on another until the summary); else one task. So the same
command runs as an array job with nothing else.

Resuming. A point whose point.json says done, with the same resolved flags,
and whose result exists is skipped (unless --overwrite), so a killed sweep
continues by running the same command again; failed and unfinished points
run again. Points are the unit: sweeps write no checkpoints or --save_every
intermediates, and a point killed midway starts over.

Batching. With --batch_size=K (0: as many as local devices), up to K points
that differ only in images, seed, init or loss weights
(`batch.PER_PAIR_FIELDS`) and give the same sizes run as one compiled batch
sharded over the local devices (`batch.batch_mesh`). The results equal
separate runs to float rounding. If a batch fails (a pair's loss turns
non-finite stops the whole batch), its points run again one by one, so only
the failing one is reported.

Failures. A point that fails (a bad flag, a missing file, a non-finite
loss) is recorded with its error in point.json and the summary; the others
go on. The exit status is 1 if any point of this task failed; 2 for a bad
sweep flag (one line).

One process per point. A point's workdir is held (`workdir.claim`, an OS
file lock that dies with its process) while it runs, so two tasks given
overlapping slices by mistake never run one point at once: a point another
live process holds is skipped with a log line and reported as busy; a
point found done once its lock is taken is skipped. In the summary a point
whose point.json says running but which no live process holds is shown as
interrupted.

Summary. ROOT/summary.csv (every point: name, status, error, seconds,
final losses, every flag) and ROOT/contact_sheet.png (every result,
labelled by the flags that differ between points; failed or pending points
as grey cells), written at the end of every task (by process 0 once all
processes are done) and by --summary_only. A task of an array job
summarises what is finished when it ends; run --summary_only after the
last for the complete one.
"""

import contextlib
import csv
import dataclasses
import glob
import io
import itertools
import json
import os
import pathlib
import platform
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import numpy as np

from cnnmrf_jax import cli
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import fileio
from cnnmrf_jax import huge_pages

# Every synthesis flag is a sweep flag too.
cli.define_flags()

_GRID = flags.DEFINE_multi_string(
    "grid", [], "A sweep axis FLAG=V1,V2,... (repeatable; axes are crossed). "
    "'+' inside a value stands for a list flag's comma.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 1, "Points of one shape solved together in one compiled "
    "batch, sharded over the local devices; 0: the number of local devices.",
    lower_bound=0)
_TASK_INDEX = flags.DEFINE_integer(
    "task_index", None, "This task's index in [0, --num_tasks); default from "
    "SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX, else 0. The processes of "
    "a --distributed run divide their task's points.", lower_bound=0)
_NUM_TASKS = flags.DEFINE_integer(
    "num_tasks", None, "How many tasks share the sweep; default from "
    "SLURM_ARRAY_TASK_COUNT, else 1.", lower_bound=1)
_SUMMARY_ONLY = flags.DEFINE_boolean(
    "summary_only", False, "Only write ROOT/summary.csv and "
    "ROOT/contact_sheet.png from the points done so far.")
_DRY_RUN = flags.DEFINE_boolean(
    "dry_run", False, "List this task's points and their flags; run nothing.")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Call jax.distributed.initialize() (it detects "
    "SLURM, Open MPI and TPU pods; or give --coordinator_address, "
    "--num_processes and --process_id). Each process runs its own slice.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "jax.distributed: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "jax.distributed: number of processes.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "jax.distributed: this process's id.")

POINT_FILE = "point.json"
SUMMARY_CSV = "summary.csv"
CONTACT_SHEET = "contact_sheet.png"

# Flags of main.py that are about how a run is started, not what it computes:
# the sweep decides them (--workdir is ROOT/NAME; --overwrite is the sweep's).
_STARTUP_FLAGS = ("workdir", "overwrite", "resume")


class SweepError(ValueError):
  """The sweep itself is ill-specified (not one of its points)."""


# ----------------------------------------------------------------------------
# Points.


@dataclasses.dataclass
class Point:
  """One run of a sweep.

  argv: its synthesis flags in the order they apply (common flags, then
  `--flagfile=SOURCE`, then the grid values). grid: {flag: value} of the
  axes with more than one value (what names it).
  """
  index: int
  name: str
  argv: List[str]
  grid: Dict[str, str]
  source: str = ""


def _point_flag_names() -> List[str]:
  """The synthesis flags a point may set (--workdir is ignored)."""
  return [n for n in cli.flag_names() if n != "pairs"]


def common_argv() -> List[str]:
  """The synthesis flags given to the sweep itself, as flag strings."""
  return [flags.FLAGS[n].serialize() for n in _point_flag_names()
          if flags.FLAGS[n].present and n not in _STARTUP_FLAGS]


def _short(value: str) -> str:
  """A value as it appears in a point's name: paths by their stem."""
  parts = []
  for part in value.split("+"):
    if part.startswith("example:"):
      part = part[len("example:"):]
    elif "/" in part or os.sep in part or re.search(r"\.[A-Za-z]{3,4}$",
                                                    part):
      part = pathlib.Path(part).stem
    parts.append(re.sub(r"[^A-Za-z0-9._=-]+", "-", part))
  return "+".join(parts)


def expand_sources(args: Sequence[str]) -> List[str]:
  """Point flag files named by files, directories and globs, in order."""
  files = []
  for arg in args:
    path = pathlib.Path(arg).expanduser()
    if path.is_dir():
      matches = sorted(str(p) for p in path.glob("*.flags"))
    elif glob.has_magic(arg):
      matches = sorted(glob.glob(os.path.expanduser(arg)))
    elif path.is_file():
      matches = [str(path)]
    else:
      raise SweepError(f"point file {arg} does not exist")
    if not matches:
      raise SweepError(f"{arg} names no point flag files")
    files += matches
  return files


def parse_grid(specs: Sequence[str]) -> List[Tuple[str, List[str]]]:
  """['FLAG=V1,V2', ...] -> [(FLAG, [V1, V2]), ...]; '+' -> ','."""
  known = set(_point_flag_names()) - set(_STARTUP_FLAGS)
  axes = []
  for spec in specs:
    name, sep, values = spec.partition("=")
    name = name.strip().lstrip("-")
    if not sep or not values:
      raise SweepError(f"--grid: expected FLAG=V1,V2,..., got {spec!r}")
    if name not in known:
      raise SweepError(f"--grid: {name!r} is not a synthesis flag")
    if name in (a[0] for a in axes):
      raise SweepError(f"--grid: {name} is given twice; list its values "
                       "in one axis")
    axes.append((name, [v.replace("+", ",") for v in values.split(",")]))
  return axes


def expand(sources: Sequence[str], grid: Sequence[Tuple[str, List[str]]],
           common: Sequence[str] = ()) -> List[Point]:
  """Every point: each source file (or none) crossed with the grid axes."""
  points = []
  for k, combo in enumerate(itertools.product(
      list(sources) or [""], *[values for _, values in grid])):
    source, values = combo[0], combo[1:]
    argv = list(common) + ([f"--flagfile={source}"] if source else [])
    argv += [f"--{name}={value}" for (name, _), value in zip(grid, values)]
    named = {name: value for (name, axis), value in zip(grid, values)
             if len(axis) > 1}
    parts = ([pathlib.Path(source).stem] if len(sources) > 1 or (
        source and not named) else [])
    parts += [f"{n}={_short(v.replace(',', '+'))}" for n, v in named.items()]
    points.append(Point(k, "__".join(parts) or "point", argv, named, source))
  seen: Dict[str, int] = {}
  for point in points:  # deterministic, so every task names points alike
    count = seen.get(point.name, 0) + 1
    seen[point.name] = count
    if count > 1:
      point.name = f"{point.name}_{count}"
  return points


def task_slice(points: Sequence[Point], task_index: int,
               num_tasks: int) -> List[Point]:
  """The points of task `task_index` of `num_tasks`: disjoint, covering."""
  if not 0 <= task_index < num_tasks:
    raise SweepError(f"--task_index={task_index} is not in [0, "
                     f"--num_tasks={num_tasks})")
  return [p for p in points if p.index % num_tasks == task_index]


def parse_point(argv: Sequence[str]) -> config_lib.Config:
  """A point's flags -> its validated Config, parsed exactly as main.py
  parses them (into flags of its own, so the sweep's own stay)."""
  return cli.parse_config(argv, overwrite=False, resume=False)


# ----------------------------------------------------------------------------
# Point state on disk.


def read_state(root: pathlib.Path, point: Point) -> Optional[Dict[str, Any]]:
  """The point's point.json, or None if it has none (or half of one)."""
  try:
    return json.loads((root / point.name / POINT_FILE).read_text())
  except (OSError, ValueError):
    return None


def is_done(root: pathlib.Path, point: Point) -> bool:
  """Whether the point finished and its result is still there."""
  state = read_state(root, point)
  return bool(state and state.get("status") == "done" and
              (root / point.name / state.get("result", "")).is_file())


def _write_state(root: pathlib.Path, point: Point, **state) -> None:
  record = {"name": point.name, "source": point.source, "grid": point.grid,
            "argv": point.argv, "host": platform.node(), "time": time.time()}
  record.update(state)
  fileio.atomic_write_bytes(root / point.name / POINT_FILE,
                            json.dumps(record, indent=1).encode())


def _final_values(history: Sequence[Dict[str, Any]]) -> Dict[str, float]:
  """The last record's loss terms and statistics (one pair's)."""
  if not history:
    return {}
  skip = ("level", "iter", "seconds_per_iter")
  return {k: v for k, v in history[-1].items()
          if k not in skip and isinstance(v, (int, float))}


# ----------------------------------------------------------------------------
# Running.


@dataclasses.dataclass
class Outcome:
  """What happened to one point in this task."""
  name: str
  status: str  # done, failed, skipped, busy (another process runs it)
  error: str = ""


class _Runner:
  """Runs points through the library, batching those of one shape."""

  def __init__(self, root: pathlib.Path, *, batch_size: int,
               task: Tuple[int, int], params: Optional[Tuple[Any, str]]):
    # Imported here so that --help and flag errors answer without JAX.
    # pylint: disable=g-import-not-at-top
    import jax
    from cnnmrf_jax import batch
    from cnnmrf_jax import image_io
    from cnnmrf_jax import plan
    from cnnmrf_jax import synthesize
    from cnnmrf_jax import weights
    from cnnmrf_jax import workdir
    # pylint: enable=g-import-not-at-top
    self.batch, self.image_io, self.plan = batch, image_io, plan
    self.synthesize, self.weights = synthesize, weights
    self.workdir = workdir
    self.root = root
    self.batch_size = batch_size or jax.local_device_count()
    self.task = task
    self.fixed_params = params
    self.params: Dict[Tuple[str, str], Tuple[Any, str]] = {}
    self.outcomes: List[Outcome] = []
    self.overwrite = False

  def _fail(self, point: Point, error: BaseException, config=None) -> None:
    message = f"{type(error).__name__}: {error}".splitlines()[0]
    logging.error("point %s failed: %s", point.name, message)
    self.outcomes.append(Outcome(point.name, "failed", message))
    try:
      _write_state(self.root, point, status="failed", error=message,
                   flags=config.to_flag_lines() if config else None,
                   task=list(self.task))
    except OSError as e:  # an unwritable workdir: the summary still says it
      logging.error("point %s: cannot record the failure (%s)", point.name,
                    e)

  def _done_already(self, point: Point, config) -> bool:
    """Whether the point is done with these flags (and --overwrite is not
    given): then it is skipped."""
    if self.overwrite or not is_done(self.root, point):
      return False
    if read_state(self.root, point)["flags"] == config.to_flag_lines():
      logging.info("point %s is done; skipping", point.name)
      self.outcomes.append(Outcome(point.name, "skipped"))
      return True
    logging.warning("point %s is done but with other flags; running it "
                    "again", point.name)
    return False

  def _claim(self, point: Point, config, held: contextlib.ExitStack
             ) -> bool:
    """Holds the point's workdir in `held`; False (and the point skipped
    or failed) if another process holds it, it cannot be written, or it
    was finished meanwhile."""
    try:
      held.enter_context(self.workdir.claim(
          self.root / point.name, own_files=[re.escape(POINT_FILE)]))
    except self.workdir.WorkdirBusyError as e:
      pid = "unknown" if e.pid is None else e.pid
      logging.warning("point %s is being run by another process (pid %s); "
                      "skipping it", point.name, pid)
      self.outcomes.append(Outcome(point.name, "busy",
                                   f"run by another process (pid {pid})"))
      return False
    except Exception as e:  # pylint: disable=broad-except
      self._fail(point, e, config)
      return False
    # Another task may have finished it while this one decided to run it.
    return not self._done_already(point, config)

  def _weights(self, config):
    """(params, convention), loaded once per weights file."""
    if self.fixed_params is not None:
      return self.fixed_params
    key = (config.weights, config.network)
    if key not in self.params:
      self.params[key] = self.weights.load_params(config.weights or None,
                                                  network=config.network)
    return self.params[key]

  def _shape_key(self, config) -> Tuple[Any, ...]:
    """Points with equal keys can share a compiled batch: the config minus
    per-pair fields and the output size of its plan (from the image
    headers: nothing is decoded until a point runs). Style sizes may
    differ: smaller banks are padded."""
    image_io = self.image_io
    size = lambda path, flag: image_io.image_size(path, flag=flag)
    sizes = self.plan.InputSizes(
        None if config.mode == "texture" else size(config.content_image,
                                                   "content_image"),
        tuple(size(s, "style_image") for s in config.style_image))
    return (self.batch.batch_key(config),
            self.plan.output_size(config, sizes))

  def run(self, points: Sequence[Point], overwrite: bool) -> None:
    self.overwrite = overwrite
    groups: Dict[Tuple[Any, ...], List[Tuple[Point, Any]]] = {}
    for point in points:
      config = None
      try:
        config = parse_point(point.argv)
        if self._done_already(point, config):
          continue
        key = self._shape_key(config)
      except Exception as e:  # pylint: disable=broad-except
        self._fail(point, e, config)
        continue
      groups.setdefault(key, []).append((point, config))
    for members in groups.values():
      synthesizers = {}  # per batch size: compiled once for the group
      for start in range(0, len(members), self.batch_size):
        self._run_chunk(members[start:start + self.batch_size],
                        synthesizers)

  def _synthesizer(self, config, count, synthesizers):
    if count not in synthesizers:
      params, convention = self._weights(config)
      synthesizers[count] = self.synthesize.Synthesizer(
          config, params, convention, mesh=self.batch.batch_mesh(count))
    return synthesizers[count]

  def _run_chunk(self, members, synthesizers) -> None:
    """Solves up to batch_size points of one group as one batch, each
    point's workdir held; points another process holds are skipped."""
    with contextlib.ExitStack() as held:
      self._solve_chunk([(point, config) for point, config in members
                         if self._claim(point, config, held)], synthesizers)

  def _solve_chunk(self, members, synthesizers) -> None:
    """Solves points whose workdirs are held as one batch; if the batch
    fails, each of its points alone."""
    loaded = []
    for point, config in members:
      try:
        inputs = self.synthesize.load_inputs(config)
      except Exception as e:  # pylint: disable=broad-except
        self._fail(point, e, config)
        continue
      inputs.configs = [config]
      loaded.append((point, config, inputs))
      _write_state(self.root, point, status="running",
                   flags=config.to_flag_lines(), task=list(self.task))
    if not loaded:
      return
    names = ", ".join(p.name for p, _, _ in loaded)
    logging.info("running %d point(s): %s", len(loaded), names)
    try:
      inputs = self.batch.concat([i for _, _, i in loaded])
      # Pairs with semantic maps: one label count for the batch.
      from cnnmrf_jax import semantic  # pylint: disable=g-import-not-at-top
      semantic.equalize_labels(inputs.extras)
      # A batch that breaks a size rule or would not fit in memory fails
      # here, before any work, and falls back to its points one by one.
      run_plan = self.plan.make(loaded[0][1], inputs.sizes())
      self.plan.check(loaded[0][1], run_plan)
      synthesizer = self._synthesizer(loaded[0][1], len(loaded),
                                      synthesizers)
      t0 = time.perf_counter()
      result = synthesizer.run(inputs, run_plan=run_plan)
      seconds = time.perf_counter() - t0
    except Exception as e:  # pylint: disable=broad-except
      if len(loaded) == 1:
        self._fail(loaded[0][0], e, loaded[0][1])
        return
      logging.warning("the batch of %s failed (%s); running its points one "
                      "by one", names, e)
      for point, config, _ in loaded:
        self._solve_chunk([(point, config)], synthesizers)
      return
    for n, (point, config, _) in enumerate(loaded):
      try:
        self._write_point(point, config, result, n, seconds, len(loaded))
      except Exception as e:  # pylint: disable=broad-except
        self._fail(point, e, config)

  def _write_point(self, point, config, result, n, seconds, count) -> None:
    """Pair n of a batch's result into the point's workdir."""
    files = self.workdir
    workdir = self.root / point.name
    history = [{k: (v[n] if isinstance(v, list) else v)
                for k, v in record.items()} for record in result.history]
    fileio.atomic_write_bytes(workdir / files.FLAGS_NAME, (
        "\n".join(config.to_flag_lines()) + "\n").encode())
    fileio.atomic_write_bytes(
        workdir / files.VERSIONS_NAME,
        json.dumps(files.software_versions(), indent=2).encode())
    fileio.atomic_write_bytes(
        workdir / files.LOG_NAME,
        "".join(json.dumps(r) + "\n" for r in history).encode())
    self.image_io.write_image(workdir / files.RESULT_NAME,
                              result.images[n], mode=config.output_mode)
    iters = [r["seconds_per_iter"] for r in history if r["iter"] > 0]
    _write_state(self.root, point, status="done", error="",
                 flags=config.to_flag_lines(), result=files.RESULT_NAME,
                 final=_final_values(history), seconds=seconds / count,
                 batch_seconds=seconds, batch_size=count,
                 seconds_per_iter=float(np.mean(iters)) if iters else None,
                 task=list(self.task))
    self.outcomes.append(Outcome(point.name, "done"))
    logging.info("point %s done: loss %s", point.name,
                 history[-1]["loss"] if history else None)


def run_points(points: Sequence[Point], root: pathlib.Path, *,
               batch_size: int = 1, overwrite: bool = False,
               task: Tuple[int, int] = (0, 1),
               params: Optional[Tuple[Any, str]] = None) -> List[Outcome]:
  """Runs `points` (skipping done ones) into root/NAME; returns outcomes.

  params: (params, convention) to use for every point instead of loading
  each point's --weights.
  """
  runner = _Runner(pathlib.Path(root), batch_size=batch_size, task=task,
                   params=params)
  runner.run(points, overwrite)
  return runner.outcomes


# ----------------------------------------------------------------------------
# Summary.


def _flag_dict(lines: Sequence[str]) -> Dict[str, str]:
  """['--name=value', '--flag', '--noflag'] -> {name: value}."""
  out = {}
  for line in lines:
    name, sep, value = line.lstrip("-").partition("=")
    if not sep and name.startswith("no") and name[2:] in flags.FLAGS:
      name, value = name[2:], "false"
    elif not sep:
      value = "true"
    out[name] = value
  return out


def _point_flags(point: Point, state: Optional[Dict[str, Any]]
                 ) -> Dict[str, str]:
  """A point's resolved flags (from its run, or parsed now, or raw)."""
  if state and state.get("flags"):
    return _flag_dict(state["flags"])
  try:
    return _flag_dict(parse_point(point.argv).to_flag_lines())
  except Exception:  # pylint: disable=broad-except
    return _flag_dict([a for a in point.argv
                       if not a.startswith("--flagfile")])


def summarize(points: Sequence[Point], root: pathlib.Path
              ) -> Tuple[pathlib.Path, pathlib.Path]:
  """Writes ROOT/summary.csv and ROOT/contact_sheet.png over all points."""
  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import image_io
  from cnnmrf_jax import workdir as workdir_lib
  # pylint: enable=g-import-not-at-top
  root = pathlib.Path(root)
  rows, point_flags, images, statuses = [], [], [], []
  for point in points:
    state = read_state(root, point) or {}
    status = state.get("status", "pending")
    if status == "done" and not is_done(root, point):
      status = "pending"  # its result went missing
    elif status == "running" and not workdir_lib.is_claimed(
        root / point.name):
      status = "interrupted"  # killed: no live process holds it
    point_flags.append(_point_flags(point, state))
    statuses.append((status, state.get("error", "")))
    rows.append({"name": point.name, "status": status,
                 "error": state.get("error", ""),
                 "seconds": state.get("seconds", ""),
                 "seconds_per_iter": state.get("seconds_per_iter", ""),
                 "batch_size": state.get("batch_size", ""),
                 **{f"final_{k}": v
                    for k, v in (state.get("final") or {}).items()}})
    image = None
    if status == "done":
      try:
        image, _ = image_io.read_image(
            root / point.name / state["result"], flag=None)
      except image_io.ImageError:
        pass
    images.append(image)

  flag_names = [n for n in _point_flag_names() if n not in _STARTUP_FLAGS]
  flag_names += sorted({k for d in point_flags for k in d} - set(flag_names))
  finals = sorted({k for r in rows for k in r if k.startswith("final_")},
                  key=lambda k: (k != "final_loss", k))
  columns = ["name", "status", "error", "seconds", "seconds_per_iter",
             "batch_size"] + finals + [f"flag_{n}" for n in flag_names]
  text = io.StringIO()
  writer = csv.DictWriter(text, columns, restval="")
  writer.writeheader()
  for row, values in zip(rows, point_flags):
    writer.writerow({**row, **{f"flag_{n}": values.get(n, "")
                               for n in flag_names}})
  csv_path = fileio.atomic_write_bytes(root / SUMMARY_CSV,
                                       text.getvalue().encode())

  differing = [n for n in flag_names
               if len({d.get(n) for d in point_flags}) > 1]
  labels = []
  for point, values, (status, error) in zip(points, point_flags, statuses):
    lines = [f"{n}={_short(values.get(n, '').replace(',', '+'))}"
             for n in differing] or [point.name]
    if status != "done":
      lines.append(f"{status.upper()}: {error}" if error else status.upper())
    labels.append("\n".join(lines))
  shapes = [i.shape for i in images if i is not None]
  blank = np.full(shapes[0] if shapes else (64, 64, 3), 0.8, np.float32)
  # Smaller cells for big sweeps keep the sheet a viewable size.
  sheet = image_io.contact_sheet(
      [blank if i is None else i for i in images], labels,
      cell=256 if len(images) <= 64 else 128)
  sheet_path = image_io.write_image(root / CONTACT_SHEET, sheet)
  return csv_path, sheet_path


# ----------------------------------------------------------------------------
# Command line.


def task_of(env: Dict[str, str], task_index: Optional[int] = None,
            num_tasks: Optional[int] = None,
            process: Tuple[int, int] = (0, 1)) -> Tuple[int, int]:
  """(task_index, num_tasks) of this process.

  From the flags where given, else from a SLURM array job or a Kubernetes
  indexed job in `env`, else (0, 1). process: (index, count) of this
  process in a multi-process JAX run, whose processes divide their task's
  slice among themselves.
  """
  index, count = task_index, num_tasks
  if index is None and "SLURM_ARRAY_TASK_ID" in env:
    index = (int(env["SLURM_ARRAY_TASK_ID"]) -
             int(env.get("SLURM_ARRAY_TASK_MIN", 0)))
    if count is None and "SLURM_ARRAY_TASK_COUNT" in env:
      count = int(env["SLURM_ARRAY_TASK_COUNT"])
  elif index is None and "JOB_COMPLETION_INDEX" in env:
    index = int(env["JOB_COMPLETION_INDEX"])
    if count is None:
      raise SweepError("--num_tasks: a Kubernetes indexed job does not say "
                       "how many completions it has; pass "
                       "--num_tasks=COMPLETIONS")
  index = 0 if index is None else index
  count = 1 if count is None else count
  if not 0 <= index < count:
    raise SweepError(f"--task_index={index} is not in [0, --num_tasks="
                     f"{count})")
  return index * process[1] + process[0], count * process[1]


def sweep_from_flags(args: Sequence[str]) -> List[Outcome]:
  """The sweep the parsed flags and positional `args` describe."""
  root = flags.FLAGS["workdir"].value
  if not root:
    raise SweepError("--workdir is required (the sweep's root directory)")
  if flags.FLAGS["resume"].present:
    raise SweepError("--resume: a sweep resumes by itself; run the same "
                     "command again (completed points are skipped)")
  if flags.FLAGS["pairs"].present:
    raise SweepError("--pairs: not for sweeps; use --grid over "
                     "--content_image/--style_image and --batch_size")
  root = pathlib.Path(root).expanduser()
  points = expand(expand_sources(args), parse_grid(_GRID.value),
                  common_argv())
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value or _COORDINATOR_ADDRESS.value:
    jax.distributed.initialize(_COORDINATOR_ADDRESS.value,
                               _NUM_PROCESSES.value, _PROCESS_ID.value)
  task = task_of(os.environ, _TASK_INDEX.value, _NUM_TASKS.value,
                 (jax.process_index(), jax.process_count()))
  mine = task_slice(points, *task)
  if _DRY_RUN.value:
    for point in mine:
      print(f"{point.name}\t{' '.join(point.argv)}")
    print(f"task {task[0]} of {task[1]}: {len(mine)} of {len(points)} "
          f"points")
    return []
  outcomes = []
  if not _SUMMARY_ONLY.value:
    logging.info("task %d of %d: %d of %d points", task[0], task[1],
                 len(mine), len(points))
    outcomes = run_points(mine, root, batch_size=_BATCH_SIZE.value,
                          overwrite=flags.FLAGS["overwrite"].value,
                          task=task)
  if jax.process_count() > 1:
    # Every process finishes its points before process 0 summarises.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("cnnmrf_jax.sweep: points done")
  if jax.process_index() == 0:
    csv_path, sheet_path = summarize(points, root)
    print(f"summary: {csv_path}\ncontact sheet: {sheet_path}")
  for status in ("done", "skipped", "busy", "failed"):
    names = [o.name for o in outcomes if o.status == status]
    if names:
      print(f"{status}: {len(names)}: {', '.join(names)}")
  for outcome in outcomes:
    if outcome.status == "failed":
      print(f"  {outcome.name}: {outcome.error}", file=sys.stderr)
  return outcomes


def main(argv):
  logging.set_verbosity(logging.INFO)
  try:
    outcomes = sweep_from_flags(argv[1:])
  except (SweepError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if any(o.status == "failed" for o in outcomes):
    sys.exit(1)


USAGE = """Sweeps of cnnmrf_jax synthesis runs, from flag files and grids.

usage: python -m cnnmrf_jax.sweep [POINT.flags | DIR | 'GLOB' ...] \\
           [--grid=FLAG=V1,V2,...]... [SYNTHESIS FLAGS] --workdir=ROOT"""


def run_main():
  """`python -m cnnmrf_jax.sweep`: flags parsed as main.py parses them
  (--help exits 0; a bad flag is one line, exit 2)."""
  huge_pages.reexec_with_huge_pages()
  # The module absl filed this file's flags under (the script's path when
  # it runs as __main__), so that --help lists them.
  module = flags.FLAGS.find_module_defining_flag("grid")
  app.run(main, flags_parser=lambda argv: cli.parse_argv(
      argv, USAGE, modules=[module] if module else []))


if __name__ == "__main__":
  run_main()
