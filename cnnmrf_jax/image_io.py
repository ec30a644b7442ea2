"""Reading, writing and resizing images; colour transfer; contact sheets;
a check for a flat result.

Images inside the library are float arrays in [0, 1], RGB, `[H, W, 3]`
(batched `[N, H, W, 3]` where stated). Reading and writing are host-side
(numpy and PIL); `resize`, `rgb_to_yuv`, `yuv_to_rgb` and `match_luminance`
also take jax arrays and can be jitted.

Inputs are either a file path or `example:NAME`, one of the images that ship
inside scikit-image and matplotlib (`example_names()`).
Reading is strict: a missing, unreadable, non-image or truncated file raises
`ImageError` with a one-line message naming the flag and the file. Whatever
is converted on the way (greyscale, alpha, palette, 16-bit, CMYK, EXIF
orientation, extra frames) is reported in the returned notes so the driver
can log it.

Every file written goes through `fileio.atomic_open`: a failing writer leaves
the previous file (or none) in place.
"""

import contextlib
import importlib.util
import math
import os
import pathlib
import threading
from typing import Any, List, Optional, Sequence, Tuple, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFile
from PIL import ImageFont
from PIL import ImageOps

from cnnmrf_jax import fileio

PathLike = Union[str, os.PathLike]
Array = Any  # np.ndarray or jax.Array

EXAMPLE_PREFIX = "example:"

# Example name -> (import name, pip name, path inside the package).
_EXAMPLES = {
    "astronaut": ("skimage", "scikit-image", "data/astronaut.png"),
    "brick": ("skimage", "scikit-image", "data/brick.png"),
    "chelsea": ("skimage", "scikit-image", "data/chelsea.png"),
    "coffee": ("skimage", "scikit-image", "data/coffee.png"),
    "grass": ("skimage", "scikit-image", "data/grass.png"),
    "hubble_deep_field": ("skimage", "scikit-image",
                          "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "scikit-image", "data/ihc.png"),
    "retina": ("skimage", "scikit-image", "data/retina.jpg"),
    "gravel": ("skimage", "scikit-image", "data/gravel.png"),
    "rocket": ("skimage", "scikit-image", "data/rocket.jpg"),
    "grace_hopper": ("matplotlib", "matplotlib",
                     "mpl-data/sample_data/grace_hopper.jpg"),
}

_WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_JPEG_QUALITY = 95

# EXIF orientation -> what a viewer does to the stored pixels.
_ORIENTATIONS = {
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "mirrored top-bottom",
    5: "transposed",
    6: "rotated 90 degrees clockwise",
    7: "transversed",
    8: "rotated 90 degrees counter-clockwise",
}
_EXIF_ORIENTATION_TAG = 0x0112

# BT.601 analog YUV, the constants of Torch's image.rgb2yuv / image.yuv2rgb
# that neural-style's -original_colors uses. The published inverse agrees
# with the exact matrix inverse to 2e-5; we keep the published pair so
# results match the reference.
_RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                        [-0.14713, -0.28886, 0.436],
                        [0.615, -0.51499, -0.10001]], np.float32)
_YUV_TO_RGB = np.array([[1.0, 0.0, 1.13983],
                        [1.0, -0.39465, -0.58060],
                        [1.0, 2.03211, 0.0]], np.float32)

# PIL's truncation switch is a module global; another library may have set
# it. We force it off while loading (stricter only) under a lock.
_TRUNCATION_LOCK = threading.Lock()


class ImageError(ValueError):
  """A bad image input or output; the message is one line naming the file."""


# ----------------------------------------------------------------------------
# Locating inputs.


def example_names() -> List[str]:
  """Names accepted as `example:NAME`, sorted."""
  return sorted(_EXAMPLES)


def _label(name: str, flag: Optional[str]) -> str:
  return f"{flag} {name}" if flag else name


def example_path(name: str, *, flag: Optional[str] = None) -> pathlib.Path:
  """The file of example image `name` (with or without `example:`).

  Names are case-insensitive. The package is located with
  importlib.util.find_spec, which does not import it (importing scikit-image
  takes seconds).
  """
  if name.startswith(EXAMPLE_PREFIX):
    name = name[len(EXAMPLE_PREFIX):]
  where = _label(EXAMPLE_PREFIX + name, flag)
  name = name.strip().lower()
  if not name:
    raise ImageError(f"{where}: no example name given; known: "
                     f"{', '.join(example_names())}")
  if name not in _EXAMPLES:
    raise ImageError(f"{where}: unknown example image; known: "
                     f"{', '.join(example_names())}")
  module, pip_name, relative = _EXAMPLES[name]
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise ImageError(f"{where}: needs the {pip_name} package, which is not "
                     "installed; pip install cnnmrf_jax[examples]")
  for root in spec.submodule_search_locations:
    path = pathlib.Path(root) / relative
    if path.is_file():
      return path
  raise ImageError(f"{where}: {relative} is missing from the installed "
                   f"{pip_name}; reinstall it with pip install "
                   "cnnmrf_jax[examples]")


def _resolve(path_or_name: PathLike, flag: Optional[str]
             ) -> Tuple[pathlib.Path, str]:
  """(file path, what to call it in messages) for a path or example name."""
  text = os.fspath(path_or_name)
  if isinstance(text, bytes):
    text = os.fsdecode(text)
  if text.startswith(EXAMPLE_PREFIX):
    return example_path(text, flag=flag), _label(text, flag)
  where = _label(text, flag)
  if not text:
    raise ImageError(f"{_label('(empty)', flag)}: no image given; expected a "
                     f"file path or example:NAME")
  path = pathlib.Path(text).expanduser()
  if not path.exists():
    raise ImageError(f"{where}: file not found (expected an image file or "
                     f"example:NAME, NAME one of {', '.join(example_names())})")
  if path.is_dir():
    raise ImageError(f"{where}: is a directory, expected an image file")
  return path, where


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _open(path: pathlib.Path, where: str) -> Image.Image:
  """Opens (reads the header of) an image, raising ImageError on failure."""
  try:
    return Image.open(path)
  except Image.UnidentifiedImageError:
    raise ImageError(f"{where}: not an image file PIL can read (expected "
                     "PNG, JPEG, TIFF, BMP, WebP, ...)") from None
  except Image.DecompressionBombError as e:
    raise ImageError(f"{where}: too many pixels to load safely "
                     f"({_one_line(e)})") from None
  except OSError as e:
    reason = e.strerror or _one_line(e)
    raise ImageError(f"{where}: cannot be read ({reason})") from None


def _header_orientation(img: Image.Image) -> int:
  """EXIF orientation (1-8) from the header only, without decoding pixels."""
  try:
    # PNG's getexif() decodes the whole image when the EXIF chunk is not
    # before the pixel data; the base class reads only what the header gave.
    exif = Image.Image.getexif(img)
    value = int(exif.get(_EXIF_ORIENTATION_TAG, 1))
  except Exception:  # pylint: disable=broad-except
    return 1  # Unreadable EXIF: PIL's exif_transpose ignores it too.
  return value if value in _ORIENTATIONS else 1


def image_size(path_or_name: PathLike, *, flag: Optional[str] = "content_image"
               ) -> Tuple[int, int]:
  """(height, width) as a viewer shows the image, from its header only.

  The EXIF orientation is applied (5-8 swap height and width). Cheap: no
  pixels are decoded, so a truncated file is only caught by `read_image`.
  (A PNG whose EXIF chunk follows the pixel data reports its stored size.)
  """
  path, where = _resolve(path_or_name, flag)
  with _open(path, where) as img:
    width, height = img.size
    if _header_orientation(img) in (5, 6, 7, 8):
      height, width = width, height
  return height, width


# ----------------------------------------------------------------------------
# Reading.


@contextlib.contextmanager
def _strict_truncation():
  with _TRUNCATION_LOCK:
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
      yield
    finally:
      ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _composite_over_white(rgba: np.ndarray) -> Tuple[np.ndarray, bool]:
  """[H, W, C+1] uint8 with alpha last -> ([H, W, C] float in [0, 1], used).

  `used` is False when every pixel is opaque (nothing to composite).
  """
  color = rgba[..., :-1].astype(np.float32) / 255.0
  alpha = rgba[..., -1:].astype(np.float32) / 255.0
  if np.all(rgba[..., -1] == 255):
    return color, False
  return color * alpha + (1.0 - alpha), True


def _sixteen_bit_colour(img: Image.Image) -> bool:
  """Whether an opened, not yet loaded, image stores 16 bits per colour
  channel (PNG RGB;16B, TIFF RGB;16L, ...). PIL opens these as 8-bit RGB
  or RGBA, keeping each sample's high byte; only the decoder's raw mode
  says so, and it is gone once the image is loaded."""
  for tile in getattr(img, "tile", None) or ():
    args = tile[-1]  # (codec, extents, offset, args); args: raw mode first
    raw_mode = args[0] if isinstance(args, tuple) and args else args
    if (isinstance(raw_mode, str) and raw_mode.startswith(("RGB", "RGBA"))
        and ";16" in raw_mode):
      return True
  return False


def _to_rgb_float(img: Image.Image, where: str, notes: List[str], *,
                  sixteen_bit_colour: bool = False) -> np.ndarray:
  """A loaded PIL image of any mode -> [H, W, 3] float32 in [0, 1].

  sixteen_bit_colour: the file stores 16 bits per colour channel
  (`_sixteen_bit_colour`), which PIL has reduced to 8.
  """
  mode = img.mode
  if sixteen_bit_colour and mode in ("RGB", "RGBA"):
    notes.append(f"{where}: 16-bit {mode}, read at 8 bits per channel")
  if mode == "1":
    img, mode = img.convert("L"), "L"
    notes.append(f"{where}: 1-bit, read as greyscale")
  if mode in ("P", "PA"):
    has_alpha = mode == "PA" or "transparency" in img.info
    img = img.convert("RGBA" if has_alpha else "RGB")
    notes.append(f"{where}: palette image, converted to RGB")
    mode = img.mode
  if mode in ("RGBa", "La"):  # Premultiplied alpha: undo it first.
    img = img.convert(mode[:-1] + "A")
    mode = img.mode
  if mode in ("RGBA", "LA"):
    rgb, composited = _composite_over_white(np.asarray(img))
    if composited:
      notes.append(f"{where}: {mode}, alpha composited over white")
    if mode == "LA":
      notes.append(f"{where}: greyscale, replicated to 3 channels")
    return np.broadcast_to(rgb, rgb.shape[:2] + (3,))
  if mode == "L":
    notes.append(f"{where}: greyscale, replicated to 3 channels")
    grey = np.asarray(img).astype(np.float32) / 255.0
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode.startswith("I;16"):
    # 16-bit PNG and TIFF greyscale: full range is 65535, not 255.
    grey = np.asarray(img).astype(np.float32) / 65535.0
    notes.append(f"{where}: 16-bit greyscale, scaled to [0, 1] and "
                 "replicated to 3 channels")
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode == "I":
    # 32-bit signed integers; older PIL and some TIFFs use this mode for
    # 16-bit data, so values within 16 bits are read as 16-bit.
    values = np.asarray(img).astype(np.float64)
    if values.size and values.min() < 0:
      raise ImageError(f"{where}: 32-bit integer image with negative values; "
                       "expected non-negative intensities")
    full = 65535.0 if values.size == 0 or values.max() <= 65535 else 2**31 - 1
    notes.append(f"{where}: integer greyscale, scaled by 1/{full:.0f} and "
                 "replicated to 3 channels")
    grey = (values / full).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode == "F":
    grey = np.asarray(img).astype(np.float32)
    if grey.size and not (np.isfinite(grey).all() and grey.min() >= 0
                          and grey.max() <= 1):
      raise ImageError(f"{where}: 32-bit float image with values in "
                       f"[{np.nanmin(grey):g}, {np.nanmax(grey):g}]; "
                       "expected values in [0, 1]")
    notes.append(f"{where}: float greyscale, replicated to 3 channels")
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode != "RGB":
    try:
      converted = img.convert("RGB")
    except (ValueError, OSError) as e:
      raise ImageError(f"{where}: image mode {mode} cannot be converted to "
                       f"RGB ({_one_line(e)})") from None
    if mode == "CMYK":
      notes.append(f"{where}: CMYK, converted to RGB without colour "
                   "management")
    elif mode not in ("RGBX", "YCbCr"):
      notes.append(f"{where}: {mode}, converted to RGB")
    img = converted
  return np.asarray(img).astype(np.float32) / 255.0


def read_image(path_or_name: PathLike, *,
               flag: Optional[str] = "content_image"
               ) -> Tuple[np.ndarray, List[str]]:
  """Reads an image file or `example:NAME` as RGB float in [0, 1].

  Args:
    path_or_name: a file path or `example:NAME` (see `example_names()`).
    flag: what the image is for (the command-line flag), named in messages;
      None names the file alone.

  Returns:
    (image [H, W, 3] float32 in [0, 1], notes): notes are one-line strings
    describing every conversion applied (greyscale replicated, alpha
    composited over white, palette, 16-bit scaling, CMYK, EXIF orientation,
    extra frames dropped), for the driver to log.

  Raises:
    ImageError: missing, unreadable, not an image, truncated or corrupt,
      an unconvertible mode, or an unknown example / missing example package.
  """
  path, where = _resolve(path_or_name, flag)
  notes = []
  with _open(path, where) as img:
    sixteen_bit_colour = _sixteen_bit_colour(img)
    try:
      with _strict_truncation():
        img.load()
    except Image.DecompressionBombError as e:
      raise ImageError(f"{where}: too many pixels to load safely "
                       f"({_one_line(e)})") from None
    except Exception as e:  # pylint: disable=broad-except
      # Decoders raise OSError, SyntaxError, ValueError, EOFError, ...
      raise ImageError(f"{where}: truncated or corrupt image data "
                       f"({_one_line(e)})") from None
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
      notes.append(f"{where}: {frames} frames, using the first")
    try:
      orientation = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # pylint: disable=broad-except
      orientation = 1  # Unreadable EXIF; exif_transpose would ignore it.
    if orientation in _ORIENTATIONS:
      try:
        img = ImageOps.exif_transpose(img)
      except Exception as e:  # pylint: disable=broad-except
        raise ImageError(f"{where}: cannot apply EXIF orientation "
                         f"{orientation} ({_one_line(e)})") from None
      notes.append(f"{where}: EXIF orientation {orientation} applied "
                   f"({_ORIENTATIONS[orientation]})")
    rgb = _to_rgb_float(img, where, notes,
                        sixteen_bit_colour=sixteen_bit_colour)
  rgb = np.ascontiguousarray(rgb, dtype=np.float32)
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or 0 in rgb.shape:
    raise ImageError(f"{where}: decoded to shape {rgb.shape}; expected "
                     "[H, W, 3] with H, W > 0")
  return rgb, notes


# ----------------------------------------------------------------------------
# Checks.


def check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")
  return int(value)


# ----------------------------------------------------------------------------
# Resizing.

RESIZE_METHODS = ("linear", "torch")


def _torch_scale_weights(src_len: int, dst_len: int) -> np.ndarray:
  """[dst_len, src_len] weights of Torch7 image.scale 'bilinear' on one axis.

  Upsampling interpolates linearly with the end pixels aligned (align
  corners); downsampling averages the source pixels each output pixel covers,
  fractional ones weighted by their coverage (a box filter). Float32
  arithmetic as in the C code.
  """
  weights = np.zeros((dst_len, src_len), np.float64)
  if dst_len == src_len:
    np.fill_diagonal(weights, 1.0)
  elif dst_len > src_len:
    if src_len == 1:
      weights[:, 0] = 1.0
    else:
      scale = np.float32(src_len - 1) / np.float32(dst_len - 1)
      pos = np.arange(dst_len - 1, dtype=np.float32) * scale
      index = pos.astype(np.int64)
      frac = (pos - index.astype(np.float32)).astype(np.float64)
      rows = np.arange(dst_len - 1)
      weights[rows, index] += 1.0 - frac
      weights[rows, index + 1] += frac
      weights[-1, -1] = 1.0
  else:
    scale = np.float32(src_len) / np.float32(dst_len)
    start, start_frac = 0, 0.0
    for i in range(dst_len):
      end_pos = np.float32(i + 1) * scale
      end = int(end_pos)
      end_frac = float(end_pos - np.float32(end))
      weights[i, start] += 1.0 - start_frac
      weights[i, start + 1:end] += 1.0
      if end < src_len:
        weights[i, end] += end_frac
      weights[i] /= weights[i].sum()
      start, start_frac = end, end_frac
  return weights.astype(np.float32)


def resize(image: Array, height: int, width: int, *, antialias: bool = False,
           method: str = "linear") -> Array:
  """Bilinear resize of [H, W, C] or [N, H, W, C] to height x width.

  Args:
    image: numpy or jax array, [H, W, C] or [N, H, W, C]; integer inputs are
      converted to float32.
    height, width: output size (static ints under jit).
    antialias: with method 'linear', low-pass filter when downsampling
      (jax.image.resize's antialias); off by default.
    method: 'linear': jax.image.resize(method='linear'), half-pixel centres.
      'torch': Torch7 image.scale(..., 'bilinear') as the reference calls it:
      align-corners interpolation when enlarging, box averaging over the
      covered source pixels when shrinking (see `_torch_scale_weights`).

  Returns:
    [..., height, width, C] float: a numpy array for numpy input, a jax
    array for jax input (traceable, so the call can sit inside jax.jit).
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"method must be one of {RESIZE_METHODS}, got "
                     f"{method!r}")
  if antialias and method != "linear":
    raise ValueError("antialias applies to method='linear' only; 'torch' "
                     "already averages when shrinking")
  height = check_positive_int("height", height)
  width = check_positive_int("width", width)
  is_jax = isinstance(image, jax.Array)  # Tracers are jax.Arrays too.
  x = jnp.asarray(image)
  if x.ndim not in (3, 4):
    raise ValueError(f"image must be [H, W, C] or [N, H, W, C], got shape "
                     f"{x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  if method == "linear":
    shape = x.shape[:-3] + (height, width, x.shape[-1])
    out = jax.image.resize(x, shape, method="linear", antialias=antialias,
                           precision=lax.Precision.HIGHEST)
  else:
    rows = jnp.asarray(_torch_scale_weights(x.shape[-3], height), x.dtype)
    cols = jnp.asarray(_torch_scale_weights(x.shape[-2], width), x.dtype)
    out = jnp.einsum("ih,...hwc->...iwc", rows, x,
                     precision=lax.Precision.HIGHEST)
    out = jnp.einsum("jw,...iwc->...ijc", cols, out,
                     precision=lax.Precision.HIGHEST)
  return out if is_jax else np.asarray(out)


# ----------------------------------------------------------------------------
# Writing.


def to_uint8(rgb: Array, *, mode: str = "stretch") -> np.ndarray:
  """Float image (any shape, usually [H, W, 3]) -> uint8, rounded.

  mode='stretch': the reference's output step, one min-max stretch of the
  whole image (all channels together) to [0, 255]. An image whose range is
  below 1e-6 is constant to the eye; it is clipped instead of divided by
  ~zero. mode='clip': clip to [0, 1].
  uint8 input is returned unchanged.
  """
  if mode not in ("stretch", "clip"):
    raise ValueError(f"mode must be 'stretch' or 'clip', got {mode!r}")
  x = np.asarray(rgb)
  if x.dtype == np.uint8:
    return x
  x = x.astype(np.float64)
  if not np.isfinite(x).all():
    raise ValueError("image has NaN or infinite values")
  if mode == "stretch" and x.size:
    lo, hi = x.min(), x.max()
    if hi - lo >= 1e-6:
      x = (x - lo) / (hi - lo)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_image(path: PathLike, rgb: Array, *, mode: str = "stretch",
                overwrite: bool = True) -> pathlib.Path:
  """Writes [H, W, 3] float (or uint8) RGB as PNG or JPEG, by extension.

  Atomic (fileio.atomic_open): on any failure the previous file, if any, is
  left intact. With overwrite=False an existing file raises
  fileio.ExistsError. JPEG quality is 95. Returns the path written.
  """
  path = pathlib.Path(path).expanduser()
  fmt = _WRITE_FORMATS.get(path.suffix.lower())
  if fmt is None:
    raise ImageError(f"{path}: unsupported output extension "
                     f"{path.suffix or '(none)'!r}; expected .png, .jpg or "
                     ".jpeg")
  x = np.asarray(rgb)
  if x.ndim != 3 or x.shape[-1] != 3 or 0 in x.shape:
    raise ImageError(f"{path}: image has shape {x.shape}; expected "
                     "[H, W, 3] with H, W > 0")
  if x.dtype != np.uint8 and not np.isfinite(x).all():
    raise ImageError(f"{path}: image has NaN or infinite values; nothing "
                     "written")
  pil = Image.fromarray(to_uint8(x, mode=mode), mode="RGB")
  options = {"quality": _JPEG_QUALITY} if fmt == "JPEG" else {}
  with fileio.atomic_open(path, overwrite=overwrite) as f:
    pil.save(f, format=fmt, **options)
  return path


# ----------------------------------------------------------------------------
# Colour.


def _apply_matrix(x: Array, matrix: np.ndarray) -> Array:
  if x.shape[-1] != 3:
    raise ValueError(f"expected 3 channels last, got shape {x.shape}")
  if isinstance(x, jax.Array):
    return jnp.einsum("...c,dc->...d", x, jnp.asarray(matrix, x.dtype),
                      precision=lax.Precision.HIGHEST)
  x = np.asarray(x)
  dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
  return np.einsum("...c,dc->...d", x.astype(dtype), matrix.astype(dtype))


def rgb_to_yuv(rgb: Array) -> Array:
  """[..., 3] RGB -> [..., 3] YUV (BT.601; Torch's image.rgb2yuv)."""
  return _apply_matrix(rgb, _RGB_TO_YUV)


def yuv_to_rgb(yuv: Array) -> Array:
  """[..., 3] YUV -> [..., 3] RGB (Torch's image.yuv2rgb)."""
  return _apply_matrix(yuv, _YUV_TO_RGB)


def match_luminance(generated_rgb: Array, content_rgb: Array) -> Array:
  """Colour preservation: the generated image's Y with the content's U, V.

  As neural-style's -original_colors. Both [..., H, W, 3] of the same
  shape (resize the content first). The result is not clipped: it can leave
  [0, 1] slightly; `to_uint8` handles that when saving.
  """
  if tuple(generated_rgb.shape) != tuple(content_rgb.shape):
    raise ValueError(f"generated {tuple(generated_rgb.shape)} and content "
                     f"{tuple(content_rgb.shape)} shapes differ")
  generated_yuv = rgb_to_yuv(generated_rgb)
  content_yuv = rgb_to_yuv(content_rgb)
  xp = jnp if isinstance(generated_yuv, jax.Array) else np
  content_yuv = xp.asarray(content_yuv, generated_yuv.dtype)
  yuv = xp.concatenate([generated_yuv[..., :1], content_yuv[..., 1:]],
                       axis=-1)
  return yuv_to_rgb(yuv)


# ----------------------------------------------------------------------------
# Contact sheets.


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any,
              max_width: int) -> str:
  """`text` shortened with '...' to fit max_width pixels."""
  if draw.textlength(text, font=font) <= max_width:
    return text
  while text and draw.textlength(text + "...", font=font) > max_width:
    text = text[:-1]
  return text + "..."


def contact_sheet(images: Sequence[Array], labels: Sequence[str], *,
                  columns: Optional[int] = None, cell: int = 256
                  ) -> np.ndarray:
  """A labelled grid of images, e.g. one per sweep point.

  Args:
    images: each [H, W, 3] (or [H, W] greyscale), float in [0, 1] (clipped)
      or uint8.
    labels: one string per image, drawn under it (PIL's default font);
      '\\n' starts a new line; lines too wide for the cell end in '...'.
    columns: images per row; default ceil(sqrt(len(images))).
    cell: each image is resized (aspect kept) to fit cell x cell pixels.

  Returns:
    [H, W, 3] uint8 sheet on a white background.
  """
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  if not images:
    raise ValueError("no images for the contact sheet")
  cell = check_positive_int("cell", cell)
  count = len(images)
  columns = (math.ceil(math.sqrt(count)) if columns is None
             else check_positive_int("columns", columns))
  columns = min(columns, count)
  rows = math.ceil(count / columns)

  font = ImageFont.load_default(size=max(10, cell // 20))
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  left, top, right, bottom = probe.textbbox((0, 0), "Ag", font=font)
  line_height = bottom - top + 2
  lines = [str(label).split("\n") for label in labels]
  label_height = line_height * max(len(l) for l in lines) + 4
  pad = max(4, cell // 32)
  pitch_x, pitch_y = cell + pad, cell + label_height + pad
  sheet = Image.new("RGB", (columns * pitch_x + pad, rows * pitch_y + pad),
                    "white")
  draw = ImageDraw.Draw(sheet)

  for k, (image, label_lines) in enumerate(zip(images, lines)):
    pixels = to_uint8(np.asarray(image), mode="clip")
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
      pixels = pixels[..., 0]
    if pixels.ndim == 2:
      pixels = np.repeat(pixels[..., None], 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or 0 in pixels.shape:
      raise ValueError(f"image {k} has shape {pixels.shape}; expected "
                       "[H, W, 3] or [H, W]")
    h, w = pixels.shape[:2]
    scale = min(cell / h, cell / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    thumb = Image.fromarray(pixels, mode="RGB").resize(
        size, Image.Resampling.LANCZOS)
    x0 = pad + (k % columns) * pitch_x
    y0 = pad + (k // columns) * pitch_y
    sheet.paste(thumb, (x0 + (cell - size[0]) // 2,
                        y0 + (cell - size[1]) // 2))
    for j, line in enumerate(label_lines):
      text = _fit_text(draw, line, font, cell)
      text_x = x0 + (cell - draw.textlength(text, font=font)) / 2
      draw.text((text_x, y0 + cell + 2 + j * line_height - top), text,
                fill="black", font=font)
  return np.asarray(sheet, dtype=np.uint8)


# ----------------------------------------------------------------------------
# Checks on a result.

# A result's channels spanning less than one 8-bit level look like one
# colour: the min-max stretch of "stretch" output then magnifies whatever
# variation there is (the start noise, a colour cast) to the full range.
FLAT_SPREAD = 1.0 / 255.0


def flat_image_warning(rgb: Array, *, flag_hint: str) -> Optional[str]:
  """A one-line warning if `rgb` is (nearly) one flat colour, else None.

  rgb: the synthesised image, [H, W, 3] float in [0, 1] (uint8 is read as
    v / 255), BEFORE the output's min-max stretch: the stretch turns a flat
    image into a saturated colour or magnified noise that no longer looks
    flat.
  flag_hint: what to change, naming flags (e.g. '--num_iter=100'); it ends
    the warning after 'try '.

  Nearly flat: in every channel the pixels between the 1st and 99th
  percentile lie within FLAT_SPREAD (one 8-bit level) of each other.
  Percentiles, not the min and max or the standard deviation, so that a few
  stray pixels (a bright border pixel) do not hide a flat image.
  Raises ValueError for an image not [H, W, 3] or with non-finite values.
  """
  x = np.asarray(rgb)
  if x.ndim != 3 or x.shape[-1] != 3 or 0 in x.shape:
    raise ValueError(f"image has shape {x.shape}; expected [H, W, 3] with "
                     "H, W > 0")
  x = x / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
  if not np.isfinite(x).all():
    raise ValueError("image has NaN or infinite values")
  pixels = x.reshape(-1, 3)
  low, high = np.percentile(pixels, [1.0, 99.0], axis=0)  # each [3]
  spread = float(np.max(high - low))
  if spread >= FLAT_SPREAD:
    return None
  colour = ", ".join(f"{c:.3f}" for c in np.median(pixels, axis=0))
  hint = " ".join(str(flag_hint).split())  # one line
  return (f"the result is nearly one flat colour (RGB {colour}; its channels "
          f"span {spread:.2g} of the 0-1 range, under one 8-bit level, and "
          "a stretched output magnifies that into a solid colour or noise): "
          f"the synthesis made no progress; try {hint}")
