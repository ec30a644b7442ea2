"""Tests of cnnmrf_jax.sweep: expansion and naming of points, task slices
that cover a sweep exactly once, resuming, failures that stay local, batched
points equal to unbatched ones, the summary, and the configs/ sweep file.

Points run in-process on random VGG19 weights (written to an npz and given
as --weights, as a user would) at toy size; the VGG is cut at relu3_1.
"""

import csv
import json
import os
import pathlib
import socket
import subprocess
import sys

from absl import flags
import numpy as np
from PIL import Image
import pytest

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import sweep
from cnnmrf_jax import synthesize
from cnnmrf_jax import workdir as workdir_lib
from cnnmrf_jax import weights

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_images, random_vgg19):
  """Common synthesis flags of a toy sweep, with random weights on disk."""
  root = tmp_path_factory.mktemp("sweep_weights")
  path = weights.save_npz(root / "random_vgg19.npz", random_vgg19[0],
                          network="vgg19", convention=random_vgg19[1])
  common = [f"--content_image={tiny_images['content']}", "--max_size=48",
            "--num_res=1", "--num_iter=2", "--print_every=2",
            "--mrf_layers=relu3_1", "--content_layers=relu3_1",
            # XLA's own convolution: Winograd's matmuls (--conv=auto on
            # CPU) block a batch of 2 otherwise than a batch of 1, which
            # moves results by float rounding that the MRF's argmax can
            # amplify; tests/conv_test.py checks the methods themselves.
            "--conv=xla", f"--weights={path}"]
  return common, tiny_images


def run_sweep(argv):
  """Runs the sweep as `python -m cnnmrf_jax.sweep ARGV` would, in-process."""
  flags.FLAGS.unparse_flags()
  rest = flags.FLAGS(["sweep"] + list(argv))
  try:
    return sweep.sweep_from_flags(rest[1:])
  finally:
    flags.FLAGS.unparse_flags()


def by_status(outcomes):
  out = {}
  for outcome in outcomes:
    out.setdefault(outcome.status, set()).add(outcome.name)
  return out


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def split_sweep(setup, tmp_path_factory):
  """A sweep of 4 points (2 content weights x 2 style images, one of them
  missing) run as two tasks: (root, argv, outcomes of task 0 and 1,
  update traces of task 0)."""
  common, images = setup
  tmp_path = tmp_path_factory.mktemp("split_sweep")
  missing = str(tmp_path / "missing.png")
  argv = common + [f"--workdir={tmp_path / 'sweep'}",
                   "--grid=content_weight=10,40",
                   f"--grid=style_image={images['style']},{missing}"]
  synthesize.TRACE_COUNTS.clear()
  first = run_sweep(argv + ["--task_index=0", "--num_tasks=2"])
  traces = synthesize.TRACE_COUNTS["update"]
  second = run_sweep(argv + ["--task_index=1", "--num_tasks=2"])
  return tmp_path / "sweep", argv, first, second, traces


def test_two_tasks_cover_the_sweep_once_rerun_skips_failures_stay_local(
    split_sweep):
  root, argv, first, second, traces = split_sweep
  # Task 0's two points share a shape: one compiled step serves both.
  assert traces == 1
  names = [o.name for o in first + second]
  assert len(names) == 4 and len(set(names)) == 4  # each point once
  assert {o.name for o in first}.isdisjoint({o.name for o in second})
  statuses = by_status(first + second)
  assert statuses["done"] == {"content_weight=10__style_image=style",
                              "content_weight=40__style_image=style"}
  assert statuses["failed"] == {"content_weight=10__style_image=missing",
                                "content_weight=40__style_image=missing"}
  for name in names:
    state = json.loads((root / name / sweep.POINT_FILE).read_text())
    ran_by = 0 if name in {o.name for o in first} else 1
    assert state["task"] == [ran_by, 2]
    if state["status"] == "done":
      assert (root / name / workdir_lib.RESULT_NAME).is_file()
      assert (root / name / workdir_lib.LOG_NAME).is_file()
      assert np.isfinite(state["final"]["loss"])
    else:
      assert "missing.png" in state["error"]

  # The done points' flags.txt reproduces them through main.py's flags.
  flag_lines = (root / "content_weight=40__style_image=style" /
                workdir_lib.FLAGS_NAME).read_text().split()
  assert "--content_weight=40.0" in flag_lines

  # A rerun (one task, as after a kill) skips what is done and retries the
  # failed points, which fail again without stopping anything.
  synthesize.TRACE_COUNTS.clear()
  again = by_status(run_sweep(argv))
  assert again["skipped"] == statuses["done"]
  assert again["failed"] == statuses["failed"]
  assert synthesize.TRACE_COUNTS["update"] == 0

  # The summary lists every point, failed ones with their error.
  rows = {r["name"]: r for r in read_csv(root / sweep.SUMMARY_CSV)}
  assert set(rows) == set(names)
  for name in statuses["done"]:
    assert rows[name]["status"] == "done"
    assert float(rows[name]["final_loss"]) > 0
    assert float(rows[name]["seconds"]) > 0
  for name in statuses["failed"]:
    assert rows[name]["status"] == "failed"
    assert "missing.png" in rows[name]["error"]
  assert {rows[n]["flag_content_weight"] for n in names} == {"10.0", "40.0"}
  assert "flag_mrf_layers" in rows[names[0]]
  # The contact sheet has four cells (2 x 2 of 256 px), none left empty.
  sheet = np.asarray(Image.open(root / sweep.CONTACT_SHEET))
  pitch = 256 + 8
  assert sheet.shape[1] == 2 * pitch + 8
  for row in range(2):
    for col in range(2):
      y = 8 + row * (sheet.shape[0] - 8) // 2
      cell = sheet[y:y + 200, 8 + col * pitch:8 + col * pitch + 256]
      assert cell.mean() < 250, (row, col)  # an image or a grey blank


def test_batched_points_equal_unbatched_points(setup, split_sweep,
                                               tmp_path):
  common, images = setup
  unbatched_root = split_sweep[0]
  synthesize.TRACE_COUNTS.clear()
  batched = run_sweep(common + [
      f"--style_image={images['style']}", "--grid=content_weight=10,40",
      f"--workdir={tmp_path}", "--batch_size=2"])
  assert synthesize.TRACE_COUNTS["update"] == 1  # both in one program
  assert by_status(batched)["done"] == {"content_weight=10",
                                        "content_weight=40"}
  losses = []
  for weight in (10, 40):
    one = json.loads((unbatched_root / f"content_weight={weight}__"
                      "style_image=style" / sweep.POINT_FILE).read_text())
    two = json.loads((tmp_path / f"content_weight={weight}" /
                      sweep.POINT_FILE).read_text())
    assert two["batch_size"] == 2 and one["batch_size"] == 1
    for key, value in one["final"].items():
      np.testing.assert_allclose(two["final"][key], value, rtol=1e-4)
    losses.append(two["final"]["loss"])
  assert losses[0] != losses[1]


def test_point_files_dirs_globs_and_bad_flags(setup, tmp_path):
  common, images = setup
  points_dir = tmp_path / "points"
  points_dir.mkdir()
  (points_dir / "a.flags").write_text(
      f"# a point\n--style_image={images['style']}\n--content_weight=5\n")
  (points_dir / "b.flags").write_text("--no_such_flag=1\n")
  (tmp_path / "c.flags").write_text(f"--style_image={images['style2']}\n")

  sources = sweep.expand_sources([str(points_dir),
                                  str(tmp_path / "c*.flags")])
  points = sweep.expand(sources,
                        sweep.parse_grid(["mrf_weight=1e-4+2e-4,3e-4"]))
  assert [p.name for p in points] == [
      "a__mrf_weight=1e-4+2e-4", "a__mrf_weight=3e-4",
      "b__mrf_weight=1e-4+2e-4", "b__mrf_weight=3e-4",
      "c__mrf_weight=1e-4+2e-4", "c__mrf_weight=3e-4"]
  config = sweep.parse_point(common + points[0].argv +
                             ["--mrf_layers=relu3_1,relu4_1"])
  assert config.content_weight == 5.0
  assert config.mrf_weight == (1e-4, 2e-4)
  with pytest.raises(config_lib.ConfigError, match="no_such_flag"):
    sweep.parse_point(points[2].argv)
  with pytest.raises(sweep.SweepError, match="not a synthesis flag"):
    sweep.parse_grid(["batch_size=1,2"])
  with pytest.raises(sweep.SweepError, match="does not exist"):
    sweep.expand_sources([str(tmp_path / "nope.flags")])

  # A sweep whose only point has a bad flag: recorded, summarised, no run.
  outcomes = run_sweep(common + [f"--workdir={tmp_path / 'bad'}",
                                 str(points_dir / "b.flags")])
  assert [(o.name, o.status) for o in outcomes] == [("b", "failed")]
  rows = read_csv(tmp_path / "bad" / sweep.SUMMARY_CSV)
  assert rows[0]["status"] == "failed"
  assert "no_such_flag" in rows[0]["error"]


def test_task_slices_are_disjoint_and_come_from_the_scheduler():
  points = sweep.expand([], sweep.parse_grid(["seed=0,1,2,3,4,5,6"]))
  slices = [sweep.task_slice(points, i, 3) for i in range(3)]
  assert sorted(p.index for s in slices for p in s) == list(range(7))
  assert sweep.task_of({}) == (0, 1)
  assert sweep.task_of({}, 1, 3) == (1, 3)
  slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10",
           "SLURM_ARRAY_TASK_COUNT": "4"}
  assert sweep.task_of(slurm) == (2, 4)
  assert sweep.task_of(slurm, 0, 1) == (0, 1)  # flags win
  # The processes of a multi-process JAX run split their task's slice.
  assert sweep.task_of(slurm, process=(1, 2)) == (5, 8)
  assert sweep.task_of({"JOB_COMPLETION_INDEX": "1"}, None, 2) == (1, 2)
  with pytest.raises(sweep.SweepError, match="--num_tasks"):
    sweep.task_of({"JOB_COMPLETION_INDEX": "1"})
  with pytest.raises(sweep.SweepError, match="--task_index"):
    sweep.task_of({}, 2, 2)


def test_content_weight_sweep_file_runs(setup, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # the file names configs/transfer.flags
  path = REPO / "configs" / "sweep_content_weight.sweep"
  text = path.read_text()
  assert text.startswith("#") and "python -m cnnmrf_jax.sweep" in text
  common, images = setup
  # The file's flags, then toy-size overrides (later flags win).
  outcomes = run_sweep(
      [f"--flagfile={path}"] + common + [
          f"--style_image={images['style']}", "--num_rotations=0",
          "--num_scales=0", f"--workdir={tmp_path}", "--batch_size=3"])
  assert by_status(outcomes)["done"] == {
      "content_weight=10", "content_weight=20", "content_weight=40"}
  rows = read_csv(tmp_path / sweep.SUMMARY_CSV)
  assert [r["flag_content_weight"] for r in rows] == ["10.0", "20.0", "40.0"]
  assert {r["batch_size"] for r in rows} == {"3"}
  assert (tmp_path / sweep.CONTACT_SHEET).is_file()


def test_processes_of_a_distributed_run_take_slices(setup, tmp_path):
  """Two JAX processes (jax.distributed on CPU): each runs its own slice,
  process 0 writes the summary after both. The points fail at once (missing
  images), so nothing compiles; what is tested is the division of work."""
  common, _ = setup
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(REPO), os.environ.get("PYTHONPATH", "")]))
  grid = ",".join(str(tmp_path / f"missing{k}.png") for k in range(3))
  procs = [subprocess.Popen(
      [sys.executable, "-m", "cnnmrf_jax.sweep", *common,
       f"--grid=style_image={grid}", f"--workdir={tmp_path / 'root'}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={k}"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for k in range(2)]
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [1, 1], outputs  # points failed
  rows = read_csv(tmp_path / "root" / sweep.SUMMARY_CSV)
  assert [r["status"] for r in rows] == ["failed"] * 3
  tasks = [json.loads((tmp_path / "root" / r["name"] / sweep.POINT_FILE
                       ).read_text())["task"] for r in rows]
  assert tasks == [[0, 2], [1, 2], [0, 2]]


_HOLDER = """
import json, pathlib, sys, time
from cnnmrf_jax import workdir
point = pathlib.Path(sys.argv[1])
with workdir.claim(point):
  # What a sweep task writes when it starts a point (sweep._write_state).
  (point / "point.json").write_text(json.dumps({"status": "running"}))
  print("held", flush=True)
  time.sleep(600)
"""


def test_a_held_point_is_busy_and_a_killed_one_interrupted(setup, tmp_path):
  """A point whose workdir another live process holds is skipped as busy
  (not run twice at once); once that process is killed (-9, mid-run), the
  summary shows the point as interrupted, not running forever."""
  common, images = setup
  root = tmp_path / "sweep"
  argv = common + [f"--workdir={root}", f"--style_image={images['style']}",
                   "--grid=content_weight=10,40"]
  points = sweep.expand([], sweep.parse_grid(["content_weight=10,40"]),
                        ["--content_weight=20"])
  held, free = (p.name for p in points)
  holder = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, str(root / held)],
      stdout=subprocess.PIPE, text=True, cwd=REPO,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  try:
    assert holder.stdout.readline().strip() == "held"
    outcomes = by_status(run_sweep(argv))
    assert outcomes == {"busy": {held}, "done": {free}}, outcomes
    assert not (root / held / "result.png").exists()
  finally:
    holder.kill()
    holder.wait()
  run_sweep(argv + ["--summary_only"])
  statuses = {row["name"]: row["status"]
              for row in read_csv(root / "summary.csv")}
  assert statuses == {held: "interrupted", free: "done"}, statuses
