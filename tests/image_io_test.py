"""Tests for cnnmrf_jax.image_io: every input file is generated in tmp_path."""

import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest

from cnnmrf_jax import fileio
from cnnmrf_jax import image_io
from cnnmrf_jax import vgg


def _rgb_blocks(height=32, width=48):
  """[H, W, 3] uint8 with four flat colour quadrants (survives JPEG)."""
  image = np.zeros((height, width, 3), np.uint8)
  image[:height // 2, :width // 2] = (200, 30, 30)
  image[:height // 2, width // 2:] = (30, 200, 30)
  image[height // 2:, :width // 2] = (30, 30, 200)
  image[height // 2:, width // 2:] = (220, 220, 40)
  return image


def _save(path, array, mode=None, **options):
  Image.fromarray(array, mode=mode).save(path, **options)
  return str(path)


# ----------------------------------------------------------------------------
# Bad inputs: each raises ImageError naming the flag and the file.


def _expect_error(path_or_name, *fragments, flag="style_image"):
  with pytest.raises(image_io.ImageError) as info:
    image_io.read_image(path_or_name, flag=flag)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"{flag} {path_or_name}: "), message
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_missing_file(tmp_path):
  _expect_error(str(tmp_path / "nope.png"), "file not found", "example:NAME")


def test_directory(tmp_path):
  _expect_error(str(tmp_path), "is a directory")


def test_text_file_named_png(tmp_path):
  path = tmp_path / "notes.png"
  path.write_text("this is not an image\n")
  _expect_error(str(path), "not an image file")


def test_empty_file(tmp_path):
  path = tmp_path / "empty.jpg"
  path.write_bytes(b"")
  _expect_error(str(path), "not an image file")


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated(tmp_path, suffix):
  full = _save(tmp_path / f"full.{suffix}",
               np.random.RandomState(0).randint(0, 255, (64, 64, 3),
                                                np.uint8))
  data = pathlib.Path(full).read_bytes()
  path = tmp_path / f"cut.{suffix}"
  path.write_bytes(data[:len(data) // 2])
  _expect_error(str(path), "truncated or corrupt")
  # The size is in the header, so image_size still answers.
  assert image_io.image_size(str(path)) == (64, 64)


def test_truncated_even_if_pil_told_to_accept(tmp_path, monkeypatch):
  full = _save(tmp_path / "full.png",
               np.random.RandomState(0).randint(0, 255, (64, 64, 3),
                                                np.uint8))
  path = tmp_path / "cut.png"
  path.write_bytes(pathlib.Path(full).read_bytes()[:2000])
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  _expect_error(str(path), "truncated or corrupt")
  assert ImageFile.LOAD_TRUNCATED_IMAGES  # Restored afterwards.


def test_unreadable_file(tmp_path, monkeypatch):
  # Simulated: tests may run as root, for whom chmod 0 does not deny reads.
  path = _save(tmp_path / "secret.png", _rgb_blocks())

  def denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied", path)

  monkeypatch.setattr(Image, "open", denied)
  _expect_error(path, "cannot be read (Permission denied)")


def test_float_image_out_of_range(tmp_path):
  path = tmp_path / "hdr.tif"
  Image.fromarray(np.full((4, 5), 3.5, np.float32), mode="F").save(path)
  _expect_error(str(path), "expected values in [0, 1]")


def test_unknown_example():
  message = _expect_error("example:mona_lisa", "unknown example")
  for name in image_io.example_names():
    assert name in message
  _expect_error("example:", "no example name given; known: astronaut")


def test_example_package_missing(monkeypatch):
  real_find_spec = importlib.util.find_spec

  def find_spec(name, *args, **kwargs):
    if name == "matplotlib":
      return None
    return real_find_spec(name, *args, **kwargs)

  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  _expect_error("example:grace_hopper", "pip install cnnmrf_jax[examples]",
                "matplotlib")


def test_message_without_flag(tmp_path):
  path = str(tmp_path / "nope.png")
  with pytest.raises(image_io.ImageError, match="^" + path):
    image_io.read_image(path, flag=None)


# ----------------------------------------------------------------------------
# Conversions, each with a note.


def _read(path, flag="content_image"):
  image, notes = image_io.read_image(path, flag=flag)
  assert image.dtype == np.float32 and image.ndim == 3
  assert image.shape[-1] == 3
  assert image.min() >= 0 and image.max() <= 1
  return image, notes


def test_rgb_png_exact(tmp_path):
  pixels = _rgb_blocks()
  image, notes = _read(_save(tmp_path / "a.png", pixels))
  np.testing.assert_array_equal(image, pixels.astype(np.float32) / 255)
  assert not notes


def test_greyscale(tmp_path):
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  image, notes = _read(_save(tmp_path / "g.png", grey))
  assert image.shape == (3, 4, 3)
  for c in range(3):
    np.testing.assert_array_equal(image[..., c], grey / np.float32(255))
  assert any("greyscale" in n for n in notes)


def test_rgba_composited_over_white(tmp_path):
  rgba = np.zeros((2, 3, 4), np.uint8)
  rgba[...] = (255, 0, 0, 128)
  rgba[0, 0] = (0, 0, 255, 255)
  image, notes = _read(_save(tmp_path / "a.png", rgba), flag="style_image")
  np.testing.assert_allclose(image[1, 1], [1, 127 / 255, 127 / 255],
                             atol=1e-6)
  np.testing.assert_allclose(image[0, 0], [0, 0, 1], atol=1e-6)
  assert f"style_image {tmp_path / 'a.png'}: RGBA, alpha composited over " \
         "white" in notes


def test_opaque_rgba_has_no_note(tmp_path):
  rgba = np.full((2, 3, 4), 255, np.uint8)
  _, notes = _read(_save(tmp_path / "a.png", rgba))
  assert not notes


def test_la(tmp_path):
  la = np.zeros((2, 2, 2), np.uint8)
  la[..., 1] = 64
  image, notes = _read(_save(tmp_path / "la.png", la, mode="LA"))
  np.testing.assert_allclose(image, 1 - 64 / 255, atol=1e-6)
  assert any("LA, alpha composited" in n for n in notes)


def test_palette(tmp_path):
  pixels = _rgb_blocks()
  path = tmp_path / "p.png"
  Image.fromarray(pixels).quantize(colors=4).save(path)
  assert Image.open(path).mode == "P"
  image, notes = _read(str(path))
  np.testing.assert_array_equal(image, pixels / np.float32(255))
  assert any("palette" in n for n in notes)


def test_palette_with_transparency(tmp_path):
  path = tmp_path / "pt.png"
  img = Image.fromarray(_rgb_blocks()).quantize(colors=4)
  index = img.getpixel((0, 0))
  img.save(path, transparency=index)
  image, notes = _read(str(path))
  np.testing.assert_allclose(image[0, 0], [1, 1, 1])  # Transparent -> white.
  assert any("alpha composited" in n for n in notes)


def test_16_bit_png_scaled_not_clipped(tmp_path):
  values = np.array([[0, 32768, 65535, 1000]], np.uint16)
  path = _save(tmp_path / "g16.png", values)
  assert Image.open(path).mode.startswith("I;16")
  image, notes = _read(path)
  np.testing.assert_allclose(image[0, :, 0],
                             [0, 32768 / 65535, 1.0, 1000 / 65535],
                             rtol=1e-6)
  assert abs(image[0, 1, 0] - 0.5) < 1e-4
  assert any("16-bit" in n for n in notes)


def test_32_bit_integer_with_16_bit_values(tmp_path):
  path = tmp_path / "i.tif"
  Image.fromarray(np.array([[0, 65535]], np.int32), mode="I").save(path)
  assert Image.open(path).mode == "I"
  image, _ = _read(str(path))
  np.testing.assert_allclose(image[0, :, 1], [0, 1])


def test_exif_rotated_jpeg(tmp_path):
  # Stored 32 x 64, left half red, right half blue; orientation 6 means a
  # viewer turns it 90 degrees clockwise: 64 x 32, red on top.
  stored = np.zeros((32, 64, 3), np.uint8)
  stored[:, :32] = (255, 0, 0)
  stored[:, 32:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6
  path = tmp_path / "phone.jpg"
  Image.fromarray(stored).save(path, exif=exif, quality=95)
  assert image_io.image_size(str(path)) == (64, 32)
  image, notes = _read(str(path))
  assert image.shape == (64, 32, 3)
  np.testing.assert_allclose(image[5:27].mean(axis=(0, 1)), [1, 0, 0],
                             atol=0.05)
  np.testing.assert_allclose(image[37:59].mean(axis=(0, 1)), [0, 0, 1],
                             atol=0.05)
  assert any("EXIF orientation 6" in n for n in notes)


def test_cmyk_jpeg(tmp_path):
  pixels = _rgb_blocks(64, 64)
  path = tmp_path / "print.jpg"
  Image.fromarray(pixels).convert("CMYK").save(path, quality=95)
  assert Image.open(path).mode == "CMYK"
  image, notes = _read(str(path))
  np.testing.assert_allclose(image[8:24, 8:24].mean(axis=(0, 1)),
                             pixels[0, 0] / 255, atol=0.05)
  assert any("CMYK" in n for n in notes)


def test_animated_gif_first_frame(tmp_path):
  frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (0, 255)]
  path = tmp_path / "anim.gif"
  frames[0].save(path, save_all=True, append_images=frames[1:])
  image, notes = _read(str(path))
  np.testing.assert_allclose(image, 0)
  assert any("2 frames, using the first" in n for n in notes)


def test_image_size_matches_read(tmp_path):
  path = _save(tmp_path / "a.png", _rgb_blocks(31, 47))
  assert image_io.image_size(path) == (31, 47)
  assert image_io.image_size(pathlib.Path(path)) == (31, 47)


# ----------------------------------------------------------------------------
# Examples.


def test_example_astronaut():
  image, notes = image_io.read_image("example:astronaut")
  assert image.shape == (512, 512, 3) and image.dtype == np.float32
  assert not notes
  assert image_io.image_size("example:astronaut") == (512, 512)


@pytest.mark.parametrize("name", image_io.example_names())
def test_every_example_is_found(name):
  assert image_io.example_path(name).is_file()
  assert image_io.example_path("example:" + name.upper()).is_file()


def test_example_greyscale_texture_and_portrait():
  image, notes = image_io.read_image("example:brick", flag="style_image")
  assert image.shape == (512, 512, 3)
  assert notes == ["style_image example:brick: greyscale, replicated to 3 "
                   "channels"]
  assert image_io.image_size("example:grace_hopper") == (600, 512)


# ----------------------------------------------------------------------------
# Resize.


def _torch_scale_axis(src, dst_len):
  """Plain loop transcription of Torch7 image.scale 'bilinear' on axis 0."""
  src_len = len(src)
  out = np.zeros((dst_len,) + src.shape[1:])
  if dst_len == src_len:
    return src.astype(np.float64)
  if dst_len > src_len:
    scale = (src_len - 1) / (dst_len - 1)
    for d in range(dst_len - 1):
      pos = d * scale
      i = int(pos)
      f = pos - i
      out[d] = (1 - f) * src[i] + (f * src[i + 1] if f else 0)
    out[-1] = src[-1]
    return out
  scale = src_len / dst_len
  i0, f0 = 0, 0.0
  for d in range(dst_len):
    pos = (d + 1) * scale
    i1 = int(pos)
    f1 = pos - i1
    acc, n = (1 - f0) * src[i0], 1 - f0
    for s in range(i0 + 1, i1):
      acc, n = acc + src[s], n + 1
    if i1 < src_len:
      acc, n = acc + f1 * src[i1], n + f1
    out[d] = acc / n
    i0, f0 = i1, f1
  return out


def test_resize_torch_matches_loop_reference():
  rng = np.random.RandomState(0)
  image = rng.rand(13, 10, 2).astype(np.float32)
  for height, width in [(26, 20), (5, 4), (7, 17), (13, 3), (4, 10)]:
    expected = _torch_scale_axis(image, height)
    expected = _torch_scale_axis(expected.transpose(1, 0, 2), width)
    got = image_io.resize(image, height, width, method="torch")
    np.testing.assert_allclose(got, expected.transpose(1, 0, 2), atol=1e-5)
  # Known values: shrinking averages, enlarging aligns the corners.
  row = np.array([0, 1, 2, 3], np.float32)[None, :, None]
  np.testing.assert_allclose(
      image_io.resize(row, 1, 2, method="torch")[0, :, 0], [0.5, 2.5])
  np.testing.assert_allclose(
      image_io.resize(row[:, :2], 1, 3, method="torch")[0, :, 0],
      [0, 0.5, 1])


@pytest.mark.parametrize("method,antialias", [("linear", False),
                                              ("linear", True),
                                              ("torch", False)])
def test_resize_constant_stays_constant(method, antialias):
  image = np.full((17, 9, 3), 0.37, np.float32)
  for height, width in [(5, 4), (40, 23), (17, 9)]:
    out = image_io.resize(image, height, width, method=method,
                          antialias=antialias)
    assert isinstance(out, np.ndarray) and out.shape == (height, width, 3)
    np.testing.assert_allclose(out, 0.37, atol=1e-6)


@pytest.mark.parametrize("method", image_io.RESIZE_METHODS)
def test_resize_numpy_jax_jit_batched_agree(method):
  rng = np.random.RandomState(1)
  image = rng.rand(2, 11, 14, 3).astype(np.float32)
  expected = image_io.resize(image, 6, 21, method=method)
  assert isinstance(expected, np.ndarray) and expected.shape == (2, 6, 21, 3)
  got = image_io.resize(jnp.asarray(image), 6, 21, method=method)
  assert isinstance(got, jax.Array)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  jitted = jax.jit(lambda x: image_io.resize(x, 6, 21, method=method))
  np.testing.assert_allclose(jitted(jnp.asarray(image)), expected, atol=1e-6)
  single = image_io.resize(image[1], 6, 21, method=method)
  np.testing.assert_allclose(single, expected[1], atol=1e-6)


def test_resize_linear_identity_and_bad_args():
  image = np.random.RandomState(2).rand(5, 6, 3).astype(np.float32)
  np.testing.assert_allclose(image_io.resize(image, 5, 6), image, atol=1e-6)
  with pytest.raises(ValueError):
    image_io.resize(image, 3, 3, method="cubic")
  with pytest.raises(ValueError):
    image_io.resize(image, 3, 3, method="torch", antialias=True)
  with pytest.raises(ValueError):
    image_io.resize(image[0], 3, 3)


# ----------------------------------------------------------------------------
# to_uint8 and write_image.


def test_to_uint8_stretch_and_clip():
  x = np.array([[[0.25, 0.375, 0.75]]], np.float32)
  np.testing.assert_array_equal(image_io.to_uint8(x), [[[0, 64, 255]]])
  y = np.array([[[-0.5, 0.5, 1.5]]], np.float32)
  np.testing.assert_array_equal(image_io.to_uint8(y, mode="clip"),
                                [[[0, 128, 255]]])
  constant = np.full((2, 2, 3), 0.3, np.float32)
  np.testing.assert_array_equal(image_io.to_uint8(constant),
                                image_io.to_uint8(constant, mode="clip"))
  assert image_io.to_uint8(jnp.asarray(y)).dtype == np.uint8
  with pytest.raises(ValueError):
    image_io.to_uint8(np.array([np.nan]))
  with pytest.raises(ValueError):
    image_io.to_uint8(x, mode="round")


def test_write_png_round_trip(tmp_path):
  image = np.random.RandomState(3).rand(9, 13, 3).astype(np.float32)
  path = image_io.write_image(tmp_path / "sub" / "out.png", image,
                              mode="clip")
  assert path == tmp_path / "sub" / "out.png"
  back, notes = image_io.read_image(str(path))
  np.testing.assert_array_equal(
      back, image_io.to_uint8(image, mode="clip") / np.float32(255))
  assert not notes


def test_write_jpeg_round_trip(tmp_path):
  pixels = _rgb_blocks(64, 64)
  path = image_io.write_image(str(tmp_path / "out.JPG"), pixels / 255.0,
                              mode="clip")
  back, _ = image_io.read_image(str(path))
  assert Image.open(path).format == "JPEG"
  np.testing.assert_allclose(back[8:24, 8:24].mean(axis=(0, 1)),
                             pixels[0, 0] / 255, atol=0.02)


def test_write_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "out.png"
  image_io.write_image(path, np.zeros((4, 4, 3)), mode="clip")
  before = path.read_bytes()

  def failing_save(self, fp, *args, **kwargs):
    fp.write(b"\x89PNG half written")
    raise RuntimeError("disk full")

  monkeypatch.setattr(Image.Image, "save", failing_save)
  with pytest.raises(RuntimeError, match="disk full"):
    image_io.write_image(path, np.ones((4, 4, 3)), mode="clip")
  assert path.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["out.png"]


def test_write_overwrite_false(tmp_path):
  path = tmp_path / "out.png"
  image_io.write_image(path, np.zeros((4, 4, 3)))
  before = path.read_bytes()
  with pytest.raises(fileio.ExistsError):
    image_io.write_image(path, np.ones((4, 4, 3)), overwrite=False)
  assert path.read_bytes() == before
  image_io.write_image(tmp_path / "new.png", np.zeros((4, 4, 3)),
                       overwrite=False)


@pytest.mark.parametrize("name,image,fragment", [
    ("out.bmp", np.zeros((4, 4, 3)), "unsupported output extension '.bmp'"),
    ("out", np.zeros((4, 4, 3)), "unsupported output extension '(none)'"),
    ("out.png", np.full((4, 4, 3), np.nan), "NaN or infinite"),
    ("out.png", np.zeros((4, 4)), "expected [H, W, 3]"),
])
def test_write_bad_inputs(tmp_path, name, image, fragment):
  path = tmp_path / name
  with pytest.raises(image_io.ImageError) as info:
    image_io.write_image(path, image)
  assert str(info.value).startswith(f"{path}: ")
  assert fragment in str(info.value)
  assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------
# Colour.


def test_yuv_round_trip_numpy_and_jax():
  rgb = np.random.RandomState(4).rand(5, 7, 3).astype(np.float32)
  for x in (rgb, jnp.asarray(rgb)):
    yuv = image_io.rgb_to_yuv(x)
    assert isinstance(yuv, jax.Array) == isinstance(x, jax.Array)
    np.testing.assert_allclose(image_io.yuv_to_rgb(yuv), rgb, atol=1e-4)
  grey = image_io.rgb_to_yuv(np.full((1, 1, 3), 0.5, np.float32))
  np.testing.assert_allclose(grey[0, 0], [0.5, 0, 0], atol=1e-4)


def test_match_luminance_keeps_content_chroma():
  rng = np.random.RandomState(5)
  generated = rng.rand(6, 8, 3).astype(np.float32)
  content = rng.rand(6, 8, 3).astype(np.float32)
  for g, c in ((generated, content),
               (jnp.asarray(generated), jnp.asarray(content))):
    out = image_io.match_luminance(g, c)
    yuv = image_io.rgb_to_yuv(out)
    np.testing.assert_allclose(yuv[..., 1:],
                               image_io.rgb_to_yuv(content)[..., 1:],
                               atol=1e-4)
    np.testing.assert_allclose(yuv[..., 0],
                               image_io.rgb_to_yuv(generated)[..., 0],
                               atol=1e-4)
  jitted = jax.jit(image_io.match_luminance)
  np.testing.assert_allclose(jitted(jnp.asarray(generated),
                                    jnp.asarray(content)),
                             image_io.match_luminance(generated, content),
                             atol=1e-5)
  with pytest.raises(ValueError):
    image_io.match_luminance(generated, content[:3])


# ----------------------------------------------------------------------------
# Contact sheet.


def test_contact_sheet():
  images = [np.zeros((40, 80, 3), np.float32),
            np.full((64, 32, 3), 200, np.uint8),
            np.full((10, 10), 0.5, np.float32),
            np.ones((50, 50, 3), np.float32),
            np.zeros((7, 9, 3), np.float32)]
  labels = ["a", "b\nsecond line", "c", "a very long label " * 10, ""]
  sheet = image_io.contact_sheet(images, labels, columns=3, cell=64)
  assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[-1] == 3
  pad = 4
  assert sheet.shape[1] == 3 * (64 + pad) + pad
  assert sheet.shape[0] > 2 * (64 + pad)
  # First image (black, 40 x 80 fitted to 32 x 64) centred in its cell.
  np.testing.assert_array_equal(sheet[pad + 32, pad + 32], [0, 0, 0])
  np.testing.assert_array_equal(sheet[pad + 2, pad + 32], [255, 255, 255])
  # Some dark label pixels under the first cell.
  assert sheet[pad + 64:pad + 64 + 20, pad:pad + 64].min() < 128
  default = image_io.contact_sheet(images[:4], labels[:4], cell=32)
  assert default.shape[1] == 2 * (32 + 4) + 4
  with pytest.raises(ValueError):
    image_io.contact_sheet(images, labels[:2])


# ----------------------------------------------------------------------------
# flat_image_warning.

HINT = "--num_iter=100 at the coarsest level"


def test_flat_warning_on_the_stalled_noise_start():
  """The stalled texture run: noise of std 1e-3 in the Caffe 0-255 space
  around the mean colour, which the stretch would turn into (255, 166, 0)."""
  noise = 1e-3 * jax.random.normal(jax.random.key(0), (64, 64, 3))
  rgb = np.asarray(vgg.deprocess(noise, "caffe"))
  warning = image_io.flat_image_warning(rgb, flag_hint=HINT)
  assert warning is not None and "flat colour" in warning
  assert warning.endswith("try " + HINT) and "\n" not in warning
  np.testing.assert_array_equal(
      np.unique(image_io.to_uint8(rgb).reshape(-1, 3), axis=0),
      [[255, 166, 0]])


def test_flat_warning_ignores_a_few_stray_pixels():
  rgb = np.full((64, 64, 3), 0.3)
  rgb[0, :5] = 1.0  # 5 of 4096 pixels
  assert image_io.flat_image_warning(rgb, flag_hint=HINT) is not None


@pytest.mark.parametrize("amplitude", [2.0 / 255, 0.2])
def test_no_flat_warning_for_structure_in_one_channel(amplitude):
  """A low-contrast image (two 8-bit levels in blue only) is not flat."""
  rgb = np.full((32, 48, 3), 0.5)
  rgb[..., 2] += amplitude * np.sin(np.arange(48) / 3.0)
  assert image_io.flat_image_warning(rgb, flag_hint=HINT) is None


def test_flat_warning_threshold_is_one_level():
  ramp = np.linspace(0.0, 1.0, 32 * 32).reshape(32, 32, 1)
  steps = 0.5 + np.repeat(ramp, 3, axis=-1)  # spread ~0.98 * span
  assert image_io.flat_image_warning(
      0.5 * steps / 255.0, flag_hint=HINT) is not None
  assert image_io.flat_image_warning(
      1.5 * steps / 255.0, flag_hint=HINT) is None
  uint8 = np.full((8, 8, 3), 128, np.uint8)  # read as v / 255
  assert image_io.flat_image_warning(uint8, flag_hint=HINT) is not None
  uint8[::2, :, 0] = 140
  assert image_io.flat_image_warning(uint8, flag_hint=HINT) is None


def test_flat_warning_rejects_bad_images():
  with pytest.raises(ValueError, match="shape"):
    image_io.flat_image_warning(np.zeros((8, 8)), flag_hint=HINT)
  with pytest.raises(ValueError, match="NaN"):
    image_io.flat_image_warning(np.full((8, 8, 3), np.nan), flag_hint=HINT)
