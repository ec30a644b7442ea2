"""The workdir of a run: the files that reproduce, log and resume it.

    WORKDIR/result.png      the result (result_{n}.png for --pairs)
    WORKDIR/log.jsonl       one record per iteration: every loss term, the
                            matching statistics, seconds per iteration
    WORKDIR/flags.txt       the resolved flags (--flagfile reproduces the run)
    WORKDIR/plan.json       every size of the run (plan.py)
    WORKDIR/versions.json   the software that made it
    WORKDIR/checkpoint.npz  the position of an unfinished run (--resume)
    WORKDIR/interrupted.png the image when a run was interrupted

`Writer` writes all of them, each atomically (fileio.py), refuses to replace
a result without --overwrite, and reads a checkpoint back for --resume,
checking that it was written by a run of the same flags.

One run per workdir: `claim` holds an exclusive OS file lock on
WORKDIR/.cnnmrf_jax.workdir.lock for a run's whole life (the command line
takes it before reading any input). It dies with its process, so a killed
run never leaves a stale lock; a second run on a held workdir fails at once
with one line naming the holder's pid. Whoever takes the lock removes the
temporary files that a writer killed mid-write left (fileio names them
`.NAME.<random>.tmp`: a checkpoint's is as large as the checkpoint), and
says so in the log. Before that, the directory is checked: a directory,
creatable, writable.
"""

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import cnnmrf_jax
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import fileio
from cnnmrf_jax import image_io

RESULT_NAME = "result.png"
LOG_NAME = "log.jsonl"
FLAGS_NAME = "flags.txt"
PLAN_NAME = "plan.json"
VERSIONS_NAME = "versions.json"
CHECKPOINT_NAME = "checkpoint.npz"
CURRENT_NAME = "interrupted.png"  # the image at Ctrl-C / SIGTERM
LOCK_NAME = ".cnnmrf_jax.workdir.lock"  # held by the run that owns it

# Every file a run writes in its workdir, as regular expressions: the
# temporary files of these (and of nothing else) are removed by `claim`.
_OWN_FILES = (r"result(?:_\d+)?\.png", r"interrupted(?:_\d+)?\.png",
              r"iter_level\d+_\d+(?:_\d+)?\.png", r"log\.jsonl",
              r"flags\.txt", r"plan\.json", r"versions\.json",
              r"checkpoint\.npz")


def result_names(num_pairs: int) -> List[str]:
  return ([RESULT_NAME] if num_pairs == 1 else
          [f"result_{n}.png" for n in range(num_pairs)])


@dataclasses.dataclass
class Checkpoint:
  """A run's position: after `iteration` updates of level `level`.

  x: [N, H, W, 3] preprocessed image; state_leaves: the optimiser state
  flattened (restored onto the structure the solver's `state_like` gives);
  history: every log record so far; carry: the terms' carried state
  ({term name: nested dict of [N, ...] arrays}, `terms.CARRY`; also inside
  the optimiser state, and kept apart so that a checkpoint at the end of a
  level can start the next level's field without that level's state).
  """
  level: int
  iteration: int
  x: np.ndarray
  state_leaves: List[np.ndarray]
  history: List[Dict[str, Any]]
  carry: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def restore_state(self, like):
    leaves, treedef = jax.tree.flatten(like)
    if len(leaves) != len(self.state_leaves) or any(
        tuple(a.shape) != tuple(b.shape)
        for a, b in zip(leaves, self.state_leaves)):
      raise ValueError("--resume: the checkpoint's optimiser state does not "
                       "fit this run (different --optimizer or sizes?)")
    return jax.tree.unflatten(
        treedef, [jnp.asarray(v, a.dtype)
                  for v, a in zip(self.state_leaves, leaves)])


class Writer:
  """Writes the workdir: flags, versions, log, intermediates, results and
  checkpoints, every file atomically."""

  def __init__(self, workdir: pathlib.Path, config: config_lib.Config,
               names: Sequence[str]):
    self.workdir = pathlib.Path(workdir)
    self.config = config
    self.names = list(names)
    prepare(self.workdir)
    if not config.overwrite:
      for name in self.names:
        if (self.workdir / name).exists():
          raise fileio.ExistsError(
              f"--workdir: {self.workdir / name} exists; pass --overwrite "
              "to replace it or choose another --workdir")
    if not (config.resume or config.overwrite) and (
        self.workdir / CHECKPOINT_NAME).exists():
      raise fileio.ExistsError(
          f"--workdir: {self.workdir} holds an unfinished run; pass --resume "
          "to continue it or --overwrite to start again")
    self.flag_lines = config.to_flag_lines()
    if not config.resume:
      fileio.atomic_write_bytes(self.workdir / FLAGS_NAME,
                                ("\n".join(self.flag_lines) + "\n").encode())
    fileio.atomic_write_bytes(
        self.workdir / VERSIONS_NAME,
        json.dumps(software_versions(), indent=2).encode())
    self.records: List[Dict[str, Any]] = []

  def write_plan(self, plan_json: str):
    fileio.atomic_write_bytes(self.workdir / PLAN_NAME, plan_json.encode())

  def write_log(self):
    text = "".join(json.dumps(r) + "\n" for r in self.records)
    fileio.atomic_write_bytes(self.workdir / LOG_NAME, text.encode())

  def save_image(self, name, rgb):
    if len(self.names) == 1:
      return [image_io.write_image(self.workdir / name, rgb[0],
                                   mode=self.config.output_mode)]
    stem, suffix = pathlib.Path(name).stem, pathlib.Path(name).suffix
    return [image_io.write_image(self.workdir / f"{stem}_{n}{suffix}",
                                 rgb[n], mode=self.config.output_mode)
            for n in range(len(self.names))]

  def block(self, records, rgb, level, iteration):
    self.records += records
    self.write_log()
    every = self.config.save_every
    if every and iteration % every == 0:
      self.save_image(f"iter_level{level + 1}_{iteration:04d}.png", rgb)

  def save_checkpoint(self, level, iteration, x, state, carry=None):
    leaves = jax.device_get(jax.tree.leaves(state))
    arrays = {f"state_{i:03d}": np.asarray(v) for i, v in enumerate(leaves)}
    arrays.update(_flatten_carry(jax.device_get(carry or {})))
    meta = {"level": level, "iteration": iteration,
            "flags": self.flag_lines, "history": self.records}
    def write(f):
      np.savez(f, x=np.asarray(jax.device_get(x)),
               meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
               **arrays)
    fileio.atomic_write(self.workdir / CHECKPOINT_NAME, write)

  def load_checkpoint(self) -> Checkpoint:
    path = self.workdir / CHECKPOINT_NAME
    if not path.exists():
      killed = any(name.startswith(f".{CHECKPOINT_NAME}.")
                   for name in removed_temp_files(self.workdir))
      raise config_lib.ConfigError(
          f"--resume: no checkpoint in {self.workdir} to resume from" + (
              " (the run was killed while writing its first checkpoint, "
              "which was incomplete and is removed)" if killed else ""))
    try:
      with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        x = data["x"]
        leaves = [data[k] for k in sorted(data.files)
                  if k.startswith("state_")]
        carry = _unflatten_carry({k: data[k] for k in data.files
                                  if k.startswith(_CARRY_PREFIX)})
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"--resume: cannot read the checkpoint {path}: "
                       f"{e}") from None
    ignored = ("--print_every", "--save_every", "--checkpoint_every")
    keep = lambda lines: [l for l in lines if not l.startswith(ignored)]
    if keep(meta["flags"]) != keep(self.flag_lines):
      changed = sorted(set(keep(self.flag_lines)) ^ set(keep(meta["flags"])))
      raise config_lib.ConfigError(
          f"--resume: the flags differ from the checkpointed run's in "
          f"{changed}; resume with the same flags (--flagfile="
          f"{self.workdir / FLAGS_NAME})")
    self.records = list(meta["history"])
    return Checkpoint(meta["level"], meta["iteration"], x, leaves,
                      meta["history"], carry)

  def final(self, rgb) -> List[pathlib.Path]:
    self.write_log()
    paths = []
    for n, name in enumerate(self.names):
      paths.append(image_io.write_image(self.workdir / name, rgb[n],
                                        mode=self.config.output_mode))
    for name in (CHECKPOINT_NAME, CURRENT_NAME):
      if (self.workdir / name).exists():
        (self.workdir / name).unlink()
    return paths


# A checkpoint's carried state is stored as arrays named
# carry.TERM.KEY.KEY... (nested dicts; keys are term, layer and field names,
# which hold no dots).
_CARRY_PREFIX = "carry."


def _flatten_carry(tree, prefix=_CARRY_PREFIX) -> Dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    if "." in str(key):
      raise ValueError(f"a carried state's key holds a dot: {key!r}")
    if isinstance(value, dict):
      out.update(_flatten_carry(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = np.asarray(value)
  return out


def _unflatten_carry(arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for name, value in arrays.items():
    *path, last = name[len(_CARRY_PREFIX):].split(".")
    node = tree
    for key in path:
      node = node.setdefault(key, {})
    node[last] = value
  return tree


class WorkdirBusyError(config_lib.ConfigError):
  """Another live process holds the workdir's lock (pid: its pid, or
  None when unknown)."""

  def __init__(self, message: str, pid: Optional[int]):
    super().__init__(message)
    self.pid = pid


def _not_writable(workdir: pathlib.Path, reason: str
                  ) -> config_lib.ConfigError:
  return config_lib.ConfigError(
      f"--workdir: cannot write in the directory {workdir} ({reason}); "
      "choose another --workdir")


def prepare(workdir: pathlib.Path) -> List[pathlib.Path]:
  """Checks that `workdir` is (or can be made) a writable directory and
  makes it; returns the directories it made, deepest first. Raises
  ConfigError naming --workdir and the directory."""
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise config_lib.ConfigError(
        f"--workdir: {workdir} is a file, not a directory; choose "
        "another --workdir")
  made, missing = [], workdir
  while not missing.exists() and missing.parent != missing:
    made.append(missing)
    missing = missing.parent
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a file in the way, no permission, ...
    raise config_lib.ConfigError(
        f"--workdir: cannot create the directory {workdir} "
        f"({e.strerror or e})") from None
  # Writing a file needs write and search permission on the directory
  # (root has both whatever the mode bits, but not on a read-only mount).
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise _not_writable(workdir, "read-only file system" if _read_only_mount(
        workdir) else "no write permission")
  return made


def _read_only_mount(directory: pathlib.Path) -> bool:
  try:
    return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
  except (OSError, AttributeError):  # AttributeError: not POSIX
    return False


# Workdirs this process has claimed: {real path: nesting depth}. A run
# claims its workdir in main.py and again in synthesize(); a sweep point
# that falls back from a batch to a run alone is claimed again.
_CLAIMED: Dict[str, int] = {}
# The temporary files each claimed workdir's claim removed, by real path.
_REMOVED: Dict[str, List[str]] = {}


@contextlib.contextmanager
def claim(workdir, *, own_files: Sequence[str] = ()
          ) -> Iterator[pathlib.Path]:
  """Holds `workdir` for this process: checked, made, locked, cleaned.

  The workdir is checked and made (`prepare`), its lock taken (already
  held by this process: held once more), and the temporary files of its
  own files (and of `own_files`, regular expressions of more names) that a
  killed writer left are removed, with one log line. On exit the lock is
  released, and directories it made are removed if nothing was written in
  them.

  Raises:
    WorkdirBusyError: another live process holds the lock.
    config.ConfigError: not a directory, cannot be made or written.
  """
  workdir = pathlib.Path(workdir)
  key = os.path.realpath(workdir)
  if key in _CLAIMED:
    _CLAIMED[key] += 1
    try:
      yield workdir
    finally:
      _CLAIMED[key] -= 1
    return
  made = prepare(workdir)
  lock = fileio.DirectoryLock(workdir, LOCK_NAME)
  try:
    lock.acquire()
  except fileio.LockHeldError as e:
    pid = "pid unknown" if e.pid is None else f"pid {e.pid}"
    raise WorkdirBusyError(
        f"--workdir: {workdir} is in use by another run ({pid}); wait "
        "for it to end or choose another --workdir", e.pid) from None
  except OSError as e:  # the lock file cannot be made: not writable
    _remove_empty(made)
    raise _not_writable(workdir, e.strerror or str(e)) from None
  _CLAIMED[key] = 1
  try:
    removed = fileio.remove_temp_files(
        workdir, fileio.temp_file_pattern(_OWN_FILES + tuple(own_files)))
    if removed:
      logging.info("removed %d temporary file(s) that a killed run left in "
                   "%s: %s", len(removed), workdir, ", ".join(removed))
    _REMOVED[key] = removed
    yield workdir
  finally:
    del _CLAIMED[key]
    _REMOVED.pop(key, None)
    lock.release()
    _remove_empty(made)


def _remove_empty(directories: Sequence[pathlib.Path]) -> None:
  """Removes each of `directories` (deepest first) that is empty."""
  for directory in directories:
    try:
      directory.rmdir()
    except OSError:  # not empty (or gone): it and its parents stay
      return


def removed_temp_files(workdir) -> List[str]:
  """The temporary files this process's claim of `workdir` removed."""
  return list(_REMOVED.get(os.path.realpath(workdir), []))


def is_claimed(workdir) -> bool:
  """Whether a live process (this one included) holds `workdir`."""
  return fileio.is_locked(workdir, LOCK_NAME)


def software_versions() -> Dict[str, str]:
  """Versions of everything that shapes a result, for the workdir."""
  versions = {"python": sys.version.split()[0],
              "platform": platform.platform(),
              "backend": jax.default_backend(),
              "devices": ", ".join(str(d) for d in jax.devices())}
  for package in ("cnnmrf_jax", "jax", "jaxlib", "flax", "optax", "jaxopt",
                  "numpy", "pillow"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = "not installed"
  versions["cnnmrf_jax"] = cnnmrf_jax.__version__
  # glibc.malloc.hugetlb=1 when the CLI re-executed itself (huge_pages.py).
  versions["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
  return versions
