"""Host-side style augmentation: rotated and scaled copies of a style image.

The reference (chuanli11/CNNMRF) enlarges the style patch bank with copies of
the style image rotated by k * 7.5 degrees, k in [-R, R], each cropped to the
largest axis-aligned rectangle inside it (no blank corners), and each of
those scaled by 1.05 ** k, k in [-S, S]. This runs once per pyramid level on
the host with PIL, before the copies go through the VGG; the device code
that matches their patches is in patches.py.

`copy_sizes` gives the sizes of the copies without touching a pixel (the
plan of a run reads it); `augment_style` makes the copies, with exactly those
sizes.
"""

import math
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

ROTATION_STEP = 7.5  # degrees between rotated copies (the reference's)
SCALE_STEP = 1.05  # ratio between scaled copies (the reference's)


def _rotated_crop_size(width: int, height: int, radians: float
                       ) -> Tuple[float, float]:
  """Largest axis-aligned rectangle inside a rotated width x height one.

  Centre both at the origin; by symmetry the best rectangle is centred with
  half-sides (a, b) >= 0, and it fits iff its corners stay inside the rotated
  rectangle: a*c + b*s <= width/2 and a*s + b*c <= height/2 (c = |cos|,
  s = |sin|). Maximising a*b under two linear constraints: the optimum lies
  where one constraint alone is tight at its own maximiser (a, b halfway
  along it), or where both are tight. Returns (full width, full height).
  """
  c, s = abs(math.cos(radians)), abs(math.sin(radians))
  half_w, half_h = width / 2.0, height / 2.0
  fits = lambda a, b: (a * c + b * s <= half_w * (1 + 1e-9) and
                       a * s + b * c <= half_h * (1 + 1e-9))
  candidates = []
  if s < 1e-12:
    candidates.append((half_w / c, half_h / c))
  elif c < 1e-12:
    candidates.append((half_h / s, half_w / s))
  else:
    candidates += [(half_w / (2 * c), half_w / (2 * s)),
                   (half_h / (2 * s), half_h / (2 * c))]
    det = c * c - s * s
    if abs(det) > 1e-12:
      a = (half_w * c - half_h * s) / det
      b = (half_h * c - half_w * s) / det
      if a >= 0 and b >= 0:
        candidates.append((a, b))
  a, b = max((ab for ab in candidates if fits(*ab)),
             key=lambda ab: ab[0] * ab[1])
  return 2 * a, 2 * b


def rotated_size(height: int, width: int, degrees: float) -> Tuple[int, int]:
  """(h, w) of a copy rotated by `degrees` and cropped (floor, at least 1).

  Rounding down keeps every output pixel centre inside the source image;
  PIL's bilinear clamps neighbours at the source border there, so nothing
  blends with the blank outside (checked in tests/augment_test.py).
  """
  if degrees == 0:
    return height, width
  crop_w, crop_h = _rotated_crop_size(width, height, math.radians(degrees))
  return max(int(math.floor(crop_h)), 1), max(int(math.floor(crop_w)), 1)


def scaled_size(height: int, width: int, factor: float) -> Tuple[int, int]:
  """(h, w) of a copy scaled by `factor`, as the reference: the long side
  floor(long * factor), then torch `image.scale` to it, which truncates
  the short side to floor(short * new_long / long); each at least 1."""
  if factor == 1:
    return height, width
  long_side = max(height, width)
  new_long = max(1, int(math.floor(long_side * factor)))
  return (max(1, height * new_long // long_side),
          max(1, width * new_long // long_side))


def copy_transforms(num_rotations: int, num_scales: int
                    ) -> List[Tuple[float, float]]:
  """(degrees, scale factor) of every copy, rotation-major."""
  return [(r * ROTATION_STEP, SCALE_STEP ** s)
          for r in range(-num_rotations, num_rotations + 1)
          for s in range(-num_scales, num_scales + 1)]


def copy_sizes(height: int, width: int, *, num_rotations: int = 0,
               num_scales: int = 0) -> List[Tuple[int, int]]:
  """(h, w) of every copy `augment_style` makes of a height x width image."""
  return [scaled_size(*rotated_size(height, width, degrees), factor)
          for degrees, factor in copy_transforms(num_rotations, num_scales)]


def _map_channels(image: np.ndarray, fn) -> np.ndarray:
  """Applies a PIL operation per channel in float mode 'F' (no 8-bit loss)."""
  return np.stack([np.asarray(fn(Image.fromarray(
      np.ascontiguousarray(image[..., i]), mode="F")), np.float32)
                   for i in range(image.shape[-1])], axis=-1)


# PIL filters by name: bilinear for images, nearest for semantic maps
# (labels must stay labels, never a blend of two).
RESAMPLING = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def _rotate_and_crop(image: np.ndarray, degrees: float,
                     resample: str = "bilinear") -> np.ndarray:
  rotated = _map_channels(
      image, lambda im: im.rotate(degrees, resample=RESAMPLING[resample],
                                  expand=True))
  crop_h, crop_w = rotated_size(image.shape[0], image.shape[1], degrees)
  top = (rotated.shape[0] - crop_h) // 2
  left = (rotated.shape[1] - crop_w) // 2
  return rotated[top:top + crop_h, left:left + crop_w]


def _scale(image: np.ndarray, factor: float,
           resample: str = "bilinear") -> np.ndarray:
  height, width = scaled_size(image.shape[0], image.shape[1], factor)
  return _map_channels(image, lambda im: im.resize(
      (width, height), RESAMPLING[resample]))


def _check_counts(num_rotations, num_scales) -> None:
  for name, value in (("num_rotations", num_rotations),
                      ("num_scales", num_scales)):
    if int(value) != value or value < 0:
      raise ValueError(f"{name} must be a non-negative integer, got "
                       f"{value!r}")


def augment_style(image: np.ndarray, *, num_rotations: int = 0,
                  num_scales: int = 0, resample: str = "bilinear"
                  ) -> List[np.ndarray]:
  """Rotated and scaled copies of a style image (host side, PIL).

  As the reference: rotations by k * ROTATION_STEP degrees (counter-
  clockwise), k in [-R, R], each cropped to the largest axis-aligned
  rectangle inside the rotated image; then each is resized by
  SCALE_STEP ** k, k in [-S, S] (`scaled_size`: the long side floored, the
  short side as torch's image.scale makes it). The copy for k = 0, 0 is the
  image itself, unchanged. Sizes are `copy_sizes`. The reference rotates
  without expanding and crops a box of its own geometry; the largest
  inscribed rectangle here keeps a little more of each rotated copy.

  Args:
    image: [H, W, 3] float32 RGB in [0, 1], or a semantic label map
      [H, W, L] (any number of channels).
    resample: 'bilinear' (images) or 'nearest' (semantic maps, whose copies
      must match the image's copies region for region with labels intact);
      the sizes are the same either way.

  Returns:
    (2R + 1) * (2S + 1) float32 arrays [H_i, W_i, C], rotation-major.
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"augment_style expects one image [H, W, 3], got shape "
                     f"{image.shape}")
  _check_counts(num_rotations, num_scales)
  if resample not in RESAMPLING:
    raise ValueError(f"resample must be one of {sorted(RESAMPLING)}, got "
                     f"{resample!r}")
  image = image.astype(np.float32)
  copies = []
  for r in range(-num_rotations, num_rotations + 1):
    degrees = r * ROTATION_STEP
    rotated = image if r == 0 else _rotate_and_crop(image, degrees, resample)
    for s in range(-num_scales, num_scales + 1):
      copies.append(rotated if s == 0 else
                    _scale(rotated, SCALE_STEP ** s, resample))
  return copies


def check_copy_sizes(copies: Sequence[np.ndarray],
                     expected: Sequence[Tuple[int, int]]) -> None:
  """Raises if the copies made differ from the sizes the plan expected."""
  got = [tuple(c.shape[:2]) for c in copies]
  if got != [tuple(e) for e in expected]:
    raise AssertionError(f"augment_style made copies of sizes {got}, the "
                         f"plan expected {list(expected)}")
