"""Tests of workdir.claim and fileio's directory lock: one process per
workdir (or sweep point), no stale lock after kill -9, leftover temporary
files removed, an unwritable workdir named before any work.

Other processes are real: small Python children that take the lock (or are
killed with SIGKILL in the middle of an atomic write) import only fileio,
so they start in a fraction of a second.
"""

import errno
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys

from absl import flags
import pytest

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import fileio
from cnnmrf_jax import sweep
from cnnmrf_jax import weights
from cnnmrf_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parent.parent

# Holds DIRECTORY's workdir lock until its stdin closes.
_HOLDER = ("import sys\n"
           "from cnnmrf_jax import fileio\n"
           "lock = fileio.DirectoryLock(sys.argv[1], sys.argv[2])\n"
           "lock.acquire()\n"
           "print('held', flush=True)\n"
           "sys.stdin.read()\n")

# Starts an atomic write of PATH, writes some bytes, says so, and sleeps
# (until it is killed).
_WRITER = ("import sys, time\n"
           "from cnnmrf_jax import fileio\n"
           "with fileio.atomic_open(sys.argv[1]) as f:\n"
           "  f.write(b'x' * 100000)\n"
           "  f.flush()\n"
           "  print('writing', flush=True)\n"
           "  time.sleep(600)\n")


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


@pytest.fixture
def holder():
  """holder(directory) -> a child process holding directory's lock."""
  children = []

  def start(directory):
    directory.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory),
         workdir_lib.LOCK_NAME], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, cwd=REPO, env=_env(), text=True)
    children.append(child)
    assert child.stdout.readline().strip() == "held"
    return child

  yield start
  for child in children:
    child.kill()
    child.wait()


def test_a_held_workdir_names_the_holder_and_a_killed_one_is_free(
    tmp_path, holder):
  workdir = tmp_path / "run"
  child = holder(workdir)
  with pytest.raises(workdir_lib.WorkdirBusyError) as error:
    with workdir_lib.claim(workdir):
      pass
  assert str(error.value) == (
      f"--workdir: {workdir} is in use by another run (pid {child.pid}); "
      "wait for it to end or choose another --workdir")
  assert error.value.pid == child.pid
  assert isinstance(error.value, config_lib.ConfigError)  # exit 2
  assert workdir_lib.is_claimed(workdir)
  # kill -9 leaves the lock file, but no lock: the next run takes it.
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert (workdir / workdir_lib.LOCK_NAME).exists()
  assert not workdir_lib.is_claimed(workdir)
  with workdir_lib.claim(workdir):
    assert workdir_lib.is_claimed(workdir)
    assert (workdir / workdir_lib.LOCK_NAME).read_text() == f"{os.getpid()}\n"
  assert not (workdir / workdir_lib.LOCK_NAME).exists()  # no litter
  assert not workdir_lib.is_claimed(workdir)


def test_a_claim_nests_in_its_process_and_leaves_nothing(tmp_path):
  workdir = tmp_path / "new" / "run"
  with workdir_lib.claim(workdir):
    with workdir_lib.claim(workdir):  # main.py, then synthesize()
      assert workdir_lib.is_claimed(workdir)
    assert workdir_lib.is_claimed(workdir)  # the outer claim still holds
  # Made by the claim and nothing written: removed, parents too.
  assert not (tmp_path / "new").exists()
  with workdir_lib.claim(workdir):
    (workdir / "result.png").write_bytes(b"a result")
  assert sorted(p.name for p in workdir.iterdir()) == ["result.png"]


def test_a_killed_atomic_write_is_cleaned_by_the_next_claim(tmp_path,
                                                            caplog):
  workdir = tmp_path / "run"
  workdir.mkdir()
  writer = subprocess.Popen(
      [sys.executable, "-c", _WRITER,
       str(workdir / workdir_lib.CHECKPOINT_NAME)],
      stdout=subprocess.PIPE, cwd=REPO, env=_env(), text=True)
  assert writer.stdout.readline().strip() == "writing"
  writer.send_signal(signal.SIGKILL)
  writer.wait()
  left = [p.name for p in workdir.iterdir()]
  assert len(left) == 1 and re.fullmatch(
      r"\.checkpoint\.npz\.[a-z0-9_]{8}\.tmp", left[0]), left
  # Files of the user's that look alike are not the project's: kept.
  keep = [".notes.txt.abcd1234.tmp", "result.png.tmp", ".result.png.tmp",
          ".result.png.abc.tmp"]
  for name in keep:
    (workdir / name).write_text("mine")
  (workdir / ".log.jsonl.zz_9abcd.tmp").write_text("{")  # a killed log write
  caplog.set_level(logging.INFO, logger="absl")
  with workdir_lib.claim(workdir):
    assert sorted(workdir_lib.removed_temp_files(workdir)) == sorted(
        [left[0], ".log.jsonl.zz_9abcd.tmp"])
  assert sorted(p.name for p in workdir.iterdir()) == sorted(keep)
  lines = [r.getMessage() for r in caplog.records
           if "temporary file" in r.getMessage()]
  assert lines == [f"removed 2 temporary file(s) that a killed run left in "
                   f"{workdir}: {left[0]}, .log.jsonl.zz_9abcd.tmp"]


def test_resume_after_a_killed_first_checkpoint_says_so(tmp_path,
                                                        random_vgg19):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / ".checkpoint.npz.a1b2c3d4.tmp").write_bytes(b"PK\x03\x04")
  config = config_lib.Config(content_image="c.png", style_image=("s.png",),
                             resume=True)
  with workdir_lib.claim(workdir):
    writer = workdir_lib.Writer(workdir, config, ["result.png"])
    with pytest.raises(config_lib.ConfigError) as error:
      writer.load_checkpoint()
  assert str(error.value) == (
      f"--resume: no checkpoint in {workdir} to resume from (the run was "
      "killed while writing its first checkpoint, which was incomplete and "
      "is removed)")
  assert not (workdir / ".checkpoint.npz.a1b2c3d4.tmp").exists()


def test_an_unwritable_workdir_is_named_before_any_work(tmp_path,
                                                        monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()
  real_access = os.access
  # Root writes whatever the mode bits say: deny it in os.access.
  monkeypatch.setattr(workdir_lib.os, "access", lambda path, mode: (
      False if pathlib.Path(path) == workdir else real_access(path, mode)))
  expected = (f"--workdir: cannot write in the directory {workdir} (no "
              "write permission); choose another --workdir")
  with pytest.raises(config_lib.ConfigError) as error:
    with workdir_lib.claim(workdir):
      pytest.fail("claimed an unwritable workdir")
  assert str(error.value) == expected
  config = config_lib.Config(content_image="c.png", style_image=("s.png",))
  with pytest.raises(config_lib.ConfigError) as error:
    workdir_lib.Writer(workdir, config, ["result.png"])
  assert str(error.value) == expected
  assert not list(workdir.iterdir())  # nothing written


def test_a_lock_file_that_cannot_be_made_names_the_workdir(tmp_path,
                                                           monkeypatch):
  workdir = tmp_path / "run"
  real_open = os.open

  def read_only_mount(path, flag, *args):
    if str(path).endswith(workdir_lib.LOCK_NAME):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real_open(path, flag, *args)

  monkeypatch.setattr(fileio.os, "open", read_only_mount)
  with pytest.raises(config_lib.ConfigError) as error:
    with workdir_lib.claim(workdir):
      pass
  assert str(error.value) == (
      f"--workdir: cannot write in the directory {workdir} (Read-only file "
      "system); choose another --workdir")
  assert not workdir.exists()  # made by the claim, removed again


def test_a_read_only_workdir_as_a_user_fails_with_one_line(tmp_path_factory):
  """Without os.access faked: a real user, a real mode 0555 directory."""
  root = pathlib.Path(tmp_path_factory.mktemp("read_only"))
  user = {}
  if os.geteuid() == 0:  # root writes anywhere: run the child as nobody
    user = dict(user=65534, group=65534, extra_groups=[])
    try:
      probe = subprocess.run(
          [sys.executable, "-c", "import cnnmrf_jax.main"], cwd="/",
          env=_env(), capture_output=True, check=False, **user).returncode
    except OSError:  # cannot execute the interpreter
      probe = -1
    if probe != 0:
      pytest.skip("user nobody cannot run this checkout's Python")
    for directory in [root, *root.parents]:
      if not os.stat(directory).st_mode & 0o001:
        os.chmod(directory, os.stat(directory).st_mode | 0o005)
  workdir = root / "run"
  workdir.mkdir()
  os.chmod(workdir, 0o555)
  proc = subprocess.run(
      [sys.executable, "-m", "cnnmrf_jax.main", f"--workdir={workdir}",
       "--content_image=example:astronaut", "--style_image=example:coffee"],
      cwd="/", env=_env(), capture_output=True, text=True, timeout=300,
      check=False, **user)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.splitlines() == [
      f"error: --workdir: cannot write in the directory {workdir} (no write "
      "permission); choose another --workdir"]
  assert not list(workdir.iterdir())


# ----------------------------------------------------------------------------
# Sweep points.


def _run_sweep(argv):
  flags.FLAGS.unparse_flags()
  rest = flags.FLAGS(["sweep"] + list(argv))
  try:
    return sweep.sweep_from_flags(rest[1:])
  finally:
    flags.FLAGS.unparse_flags()


def _summary(root):
  with open(root / sweep.SUMMARY_CSV) as f:
    return {line.split(",")[0]: line.split(",")[1]
            for line in f.read().splitlines()[1:]}


def test_a_sweep_point_another_process_holds_is_skipped(
    tmp_path, tiny_images, random_vgg19, holder, capsys):
  path = weights.save_npz(tmp_path / "random_vgg19.npz", random_vgg19[0],
                          network="vgg19", convention=random_vgg19[1])
  root = tmp_path / "sweep"
  argv = [f"--content_image={tiny_images['content']}",
          f"--style_image={tiny_images['style']}", "--max_size=32",
          "--num_res=1", "--num_iter=1", "--mrf_layers=relu2_1",
          "--content_layers=relu2_1", f"--weights={path}",
          f"--workdir={root}", "--grid=content_weight=10,40"]
  busy = root / "content_weight=40"
  child = holder(busy)
  # What the holder would have written when it started the point.
  point = sweep.Point(1, busy.name, [], {})
  # pylint: disable-next=protected-access
  sweep._write_state(root, point, status="running")
  outcomes = _run_sweep(argv)
  assert {(o.name, o.status) for o in outcomes} == {
      ("content_weight=10", "done"), ("content_weight=40", "busy")}
  assert [o.error for o in outcomes if o.status == "busy"] == [
      f"run by another process (pid {child.pid})"]
  assert "busy: 1: content_weight=40" in capsys.readouterr().out
  assert not (busy / workdir_lib.RESULT_NAME).exists()  # not run
  assert json.loads((busy / sweep.POINT_FILE).read_text())["status"] == (
      "running")
  assert _summary(root)["content_weight=40"] == "running"  # it is live

  # Killed mid-run: the summary says so, and the next sweep runs it.
  child.send_signal(signal.SIGKILL)
  child.wait()
  _run_sweep(argv + ["--summary_only"])
  assert _summary(root) == {"content_weight=10": "done",
                            "content_weight=40": "interrupted"}
  outcomes = _run_sweep(argv)
  assert {(o.name, o.status) for o in outcomes} == {
      ("content_weight=10", "skipped"), ("content_weight=40", "done")}
  assert not (busy / workdir_lib.LOCK_NAME).exists()
