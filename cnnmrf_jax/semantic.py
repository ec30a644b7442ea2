"""Semantic maps on the host: finding, reading and labelling them, and
resizing them to every level, style copy and MRF layer.

Champandard, "Semantic Style Transfer and Turning Two-Bit Doodles into Fine
Artworks" (2016; alexjc/neural-doodle) gives each image a map whose colours
label its regions (sky, face, ...) and lets the map take part in the
matching, so that a synthesis patch labelled sky is matched with style
patches labelled sky. Here:

  - Finding: --content_map and --style_map (one per style image), or, when
    those flags are not given, NAME_sem.png beside an image file NAME.ext
    (neural-doodle's convention; not for example:NAME images). A video's
    --content_map is one map for every frame or a directory / glob of one
    map per selected frame (`load_video`).
  - Reading: a map whose size differs from its image's is resized to it
    (nearest neighbour, so colours stay colours) when the aspect ratios
    agree (`plan.check_map_size`), refused otherwise.
  - Labels: one-hot channels over the distinct colours of all the maps of a
    pair (content and styles together), not the maps' RGB as neural-doodle
    feeds them. With RGB, two labels' correlation depends on how alike
    their colours happen to be (dark red and black are nearly the same
    label, and NCC ignores a colour's brightness altogether: grey and white
    normalise to one vector), whereas one-hot labels are orthogonal
    whatever colours were picked, so the map part of the NCC is exactly
    the overlap of labels. Colours covering less than MINOR_SHARE of every
    map (anti-aliased edges, JPEG noise) are merged into the nearest
    frequent colour, so a map saved with soft edges still has few labels.
    A video's maps (every frame's and the styles') share one palette, so
    a colour is one label in every frame.
  - Resizing: to a pyramid level with the images' own resize
    (`image_io.resize(method='torch')`, box averaging of the covered pixels
    when shrinking, i.e. area), so a map stays aligned with its image pixel
    for pixel; labels become fractions at region borders, which is what the
    features there mix too. Style augmentation rotates and scales each map
    with its image by nearest neighbour (`augment.augment_style`,
    resample='nearest'), so labels are never blended by the rotation. To a
    VGG layer by averaging over the pixels each feature cell covers
    (`layer_map`), as neural-doodle average-pools its maps.

What the maps then do in the matching is in patches.py (`build_bank`'s
semantic_maps, `SynthesisMap`, `match`); the MRF term (terms.py) builds
both from the arrays made here.
"""

import dataclasses
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from cnnmrf_jax import augment
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import image_io
from cnnmrf_jax import vgg

SUFFIX = "_sem.png"  # NAME.ext -> NAME_sem.png, neural-doodle's convention
# A colour covering less than this share of every map is an edge or noise
# pixel, merged into the nearest frequent colour.
MINOR_SHARE = 1e-3
MAX_LABELS = 32  # more distinct frequent colours than this is not a map


def beside(image: str) -> Optional[pathlib.Path]:
  """NAME_sem.png next to the image file NAME.ext if it exists, else None
  (always None for example:NAME images)."""
  if not image or str(image).startswith("example:"):
    return None
  path = pathlib.Path(image).expanduser()
  candidate = path.with_name(path.stem + SUFFIX)
  return candidate if candidate.is_file() else None


@dataclasses.dataclass(frozen=True)
class MapPaths:
  """The maps of one pair: content (or doodle canvas) and one per style."""
  content: str
  styles: Tuple[str, ...]


def find(config: config_lib.Config) -> Tuple[Optional[MapPaths], List[str]]:
  """The maps a config uses, and log lines saying where they came from.

  Explicit flags win; without them, NAME_sem.png beside each image is
  picked up. Returns (None, notes) for a run without maps. Raises
  ConfigError naming the flag when a map is missing for some images only.
  """
  notes = []
  if config.mode not in ("transfer", "doodle"):
    return None, notes
  content = config.content_map
  if not content and config.mode == "transfer":
    found = beside(config.content_image)
    if found:
      content = str(found)
      notes.append(f"--content_map: using {found}, found beside "
                   f"{config.content_image}")
  styles = list(config.style_map)
  if not styles:
    found = [beside(s) for s in config.style_image]
    for style, path in zip(config.style_image, found):
      if path:
        notes.append(f"--style_map: using {path}, found beside {style}")
    if content and not all(found):
      missing = [s for s, p in zip(config.style_image, found) if not p]
      raise config_lib.ConfigError(
          f"--style_map: there is a content map ({content}) but no map for "
          f"style image(s) {', '.join(missing)}: give --style_map (one per "
          f"--style_image) or put NAME{SUFFIX} beside each")
    if any(found) and not content:
      notes.append("semantic maps: style maps found but no content map "
                   "(--content_map, or NAME" + SUFFIX + " beside the "
                   "content image); running without maps")
      return None, notes
    styles = [str(p) for p in found if p]
  if not content:
    return None, notes
  if config.semantic_weight == 0:
    notes.append("semantic maps: --semantic_weight=0, the maps are not used")
    return None, notes
  return MapPaths(content, tuple(styles)), notes


def _read(path: str, flag: str, image_shape: Optional[Tuple[int, int]]
          ) -> Tuple[np.ndarray, List[str]]:
  """A map as uint8 RGB [H, W, 3], resized (nearest) to image_shape."""
  from cnnmrf_jax import plan  # pylint: disable=g-import-not-at-top
  rgb, notes = image_io.read_image(path, flag=f"--{flag}")
  colours = np.round(rgb * 255).astype(np.uint8)
  if image_shape is None or tuple(colours.shape[:2]) == tuple(image_shape):
    return colours, notes
  plan.check_map_size(flag, path, colours.shape[:2], image_shape)
  height, width = image_shape
  resized = np.asarray(Image.fromarray(colours).resize(
      (width, height), Image.NEAREST))
  notes.append(f"--{flag}: {path} is {colours.shape[0]}x{colours.shape[1]}, "
               f"resized (nearest) to its image's {height}x{width}")
  return resized, notes


def _hex(colour) -> str:
  return "#" + "".join(f"{int(c):02x}" for c in colour)


def _codes(colours: np.ndarray) -> np.ndarray:
  """uint8 RGB [H, W, 3] -> int64 [H, W] colour codes 0xRRGGBB."""
  return ((colours[..., 0].astype(np.int64) << 16) |
          (colours[..., 1].astype(np.int64) << 8) | colours[..., 2])


def label_palette(maps: Sequence[np.ndarray], flags: Sequence[str],
                  num_content: int = 1) -> Tuple[np.ndarray, List[str]]:
  """The labels of a set of maps: their frequent colours.

  Args:
    maps: uint8 RGB [H_i, W_i, 3]; the first num_content are content maps
      (a video's per-frame maps), the rest the style maps.
    flags: the flag each map came from (for messages).

  Returns:
    (palette uint8 [L, 3], sorted by colour code; warnings): a warning for
    every content colour that no style map has (its region is matched by
    the features alone).
  """
  frequent = {}  # colour code -> the largest share it has in any map
  shares = []
  for colours in maps:
    code = _codes(colours)
    values, counts = np.unique(code, return_counts=True)
    share = dict(zip(values.tolist(), (counts / code.size).tolist()))
    shares.append(share)
    for value, s in share.items():
      if s >= MINOR_SHARE:
        frequent[value] = max(frequent.get(value, 0), s)
  palette_codes = np.asarray(sorted(frequent), np.int64)
  if len(palette_codes) > MAX_LABELS:
    raise config_lib.ConfigError(
        f"--{flags[0]}: the maps have {len(palette_codes)} distinct colours "
        f"covering at least {MINOR_SHARE:.1%} of a map each; at most "
        f"{MAX_LABELS} labels (a map is a few flat colours; save it as PNG, "
        "not JPEG)")
  palette = np.stack([(palette_codes >> 16) & 255, (palette_codes >> 8) & 255,
                      palette_codes & 255], axis=1).astype(np.uint8)
  style_colours = set()
  for share in shares[num_content:]:
    style_colours |= {v for v, s in share.items() if s >= MINOR_SHARE}
  content_shares = {}  # colour code -> its largest share in a content map
  for share in shares[:num_content]:
    for value, s in share.items():
      content_shares[value] = max(content_shares.get(value, 0), s)
  where = "the map" if num_content == 1 else "a frame's map at most"
  warnings = []
  for value, s in sorted(content_shares.items(), key=lambda vs: -vs[1]):
    if s >= MINOR_SHARE and value not in style_colours:
      colour = ((value >> 16) & 255, (value >> 8) & 255, value & 255)
      warnings.append(
          f"--{flags[0]}: colour {_hex(colour)} ({s:.1%} of {where}) is in "
          f"no --style_map; that region is matched by the features alone")
  return palette, warnings


def onehot(colours: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """A uint8 RGB map [H, W, 3] as one-hot labels float32 [H, W, L] over
  `label_palette`'s palette [L, 3]: each pixel the nearest palette colour
  (itself when it is one), so edge and noise pixels join a frequent one."""
  values, inverse = np.unique(_codes(colours), return_inverse=True)
  rgb = np.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255],
                 axis=1).astype(np.float32)
  distance = np.sum(np.square(rgb[:, None] - palette[None].astype(
      np.float32)), axis=-1)  # [distinct colours, L]
  label = np.argmin(distance, axis=1)[inverse.reshape(colours.shape[:2])]
  return np.eye(len(palette), dtype=np.float32)[label]


def to_labels(maps: Sequence[np.ndarray], flags: Sequence[str]
              ) -> Tuple[List[np.ndarray], np.ndarray, List[str]]:
  """One-hot label maps over the frequent colours of all `maps`.

  Args:
    maps: uint8 RGB [H_i, W_i, 3]; the first is the content map, the rest
      the style maps.
    flags: the flag each map came from (for messages).

  Returns:
    (one-hot float32 [H_i, W_i, L] per map, palette uint8 [L, 3], warnings):
    a warning for every content colour that no style map has (its region
    is matched by the features alone).
  """
  palette, warnings = label_palette(maps, flags)
  return [onehot(m, palette) for m in maps], palette, warnings


def load(paths: MapPaths, content_shape: Optional[Tuple[int, int]],
         style_shapes: Sequence[Tuple[int, int]]
         ) -> Tuple[Dict[str, Any], List[str]]:
  """Reads and labels the maps of one pair.

  content_shape: the content image's (h, w), or None in doodle mode (the
  content map is then the canvas, at its own size).

  Returns ({'content_map': [H, W, L], 'style_maps': [[H_s, W_s, L], ...],
  'palette': [L, 3] uint8}, log lines); the dict is the pair's
  `targets.Inputs.extras` entry the MRF term reads.
  """
  if len(paths.styles) != len(style_shapes):
    raise config_lib.ConfigError(
        f"--style_map: {len(paths.styles)} map(s) for {len(style_shapes)} "
        "style image(s); expected one per --style_image")
  notes = []
  content, more = _read(paths.content, "content_map", content_shape)
  notes += more
  maps, flags = [content], ["content_map"]
  for path, shape in zip(paths.styles, style_shapes):
    style, more = _read(path, "style_map", shape)
    notes += more
    maps.append(style)
    flags.append("style_map")
  onehots, palette, warnings = to_labels(maps, flags)
  notes.append(f"semantic maps: {len(palette)} labels "
               f"({', '.join(_hex(c) for c in palette)})")
  return ({"content_map": onehots[0], "style_maps": onehots[1:],
           "palette": palette}, notes + [f"WARNING {w}" for w in warnings])


@dataclasses.dataclass
class VideoMaps:
  """The semantic maps of a video run (`load_video`), labelled over one
  palette for the whole clip, so every frame's targets have the same
  shapes (the later frames share one compiled program) and a colour means
  one label in every frame.

  content: uint8 RGB [H, W, 3] maps at the frames' size (resized as an
    image's map is): one for every frame, or one per selected frame.
  styles: one-hot float32 [H_s, W_s, L] per style image.
  palette: uint8 [L, 3].
  """
  content: List[np.ndarray]
  styles: List[np.ndarray]
  palette: np.ndarray
  # One map for all frames: its one-hot [H, W, L], made once.
  _shared: Optional[np.ndarray] = dataclasses.field(default=None,
                                                    repr=False)

  @property
  def per_frame(self) -> bool:
    return len(self.content) > 1

  @property
  def num_labels(self) -> int:
    return len(self.palette)

  def extras(self, t: int) -> Dict[str, Any]:
    """Frame t's entry of `targets.Inputs.extras`, as `load` makes an
    image's: {'content_map': [H, W, L], 'style_maps', 'palette'}."""
    if self.per_frame:
      content = onehot(self.content[t], self.palette)
    else:
      if self._shared is None:
        self._shared = onehot(self.content[0], self.palette)
      content = self._shared
    return {"content_map": content, "style_maps": self.styles,
            "palette": self.palette}


def load_video(config: config_lib.Config, frame_shape: Tuple[int, int],
               num_frames: int, style_shapes: Sequence[Tuple[int, int]]
               ) -> Tuple[Optional[VideoMaps], List[str]]:
  """Reads and labels the maps of a video run, before any frame is made.

  --content_map is one map for every frame (an image file), or one map per
  selected frame (a directory of .png/.jpg maps or a glob of them, taken
  in natural order as the frames are, and paired with the selected frames
  by that order: the i-th map for the i-th frame synthesised, so their
  count must be the number of frames after --frames and --max_frames).
  It is never looked up beside the clip. --style_map as for images (or
  NAME_sem.png beside each style image). Each content map is resized
  (nearest) to the frames' (h, w) = frame_shape when its aspect ratio
  agrees, as an image's is.

  Returns (None, notes) for a run without maps, else (VideoMaps, log
  lines; those starting 'WARNING ' are warnings). Raises ConfigError,
  ImageError or VideoError naming the flag (one line) on a count of maps
  that does not match the frames or an unreadable map.
  """
  from cnnmrf_jax import video_io  # pylint: disable=g-import-not-at-top
  # The clip is no image file: no NAME_sem.png beside it.
  paths, notes = find(config_lib.replace(config, content_image=""))
  if paths is None:
    return None, notes
  if len(paths.styles) != len(style_shapes):
    raise config_lib.ConfigError(
        f"--style_map: {len(paths.styles)} map(s) for {len(style_shapes)} "
        "style image(s); expected one per --style_image")
  files = video_io.frame_files(paths.content, flag="--content_map")
  if files is None:
    files = [paths.content]
  elif len(files) != num_frames:
    raise config_lib.ConfigError(
        f"--content_map: {paths.content} holds {len(files)} map(s) for "
        f"{num_frames} selected frame(s); expected one map per selected "
        "frame (paired in natural order) or a single image for all frames")
  else:
    notes.append(f"--content_map: {len(files)} per-frame maps from "
                 f"{paths.content}, {pathlib.Path(files[0]).name} for the "
                 f"first frame ... {pathlib.Path(files[-1]).name} for the "
                 "last")
  content, resized = [], []
  for path in files:
    colours, more = _read(str(path), "content_map", frame_shape)
    content.append(colours)
    resized += more
  # One line for the resized maps, not one per frame.
  notes += resized[:1]
  if len(resized) > 1:
    notes.append(f"--content_map: {len(resized) - 1} more map(s) resized "
                 "likewise")
  styles = []
  for path, shape in zip(paths.styles, style_shapes):
    colours, more = _read(path, "style_map", shape)
    notes += more
    styles.append(colours)
  palette, warnings = label_palette(
      content + styles, ["content_map"] * len(content) +
      ["style_map"] * len(styles), num_content=len(content))
  notes.append(f"semantic maps: {len(palette)} labels "
               f"({', '.join(_hex(c) for c in palette)})")
  return (VideoMaps(content, [onehot(m, palette) for m in styles], palette),
          notes + [f"WARNING {w}" for w in warnings])


def equalize_labels(extras: Optional[List[Dict[str, Any]]]) -> None:
  """Pads every pair's label channels to the batch's largest L (in place),
  so that their map patches stack; zero channels change no correlation."""
  if not extras:
    return
  num_labels = max(e["content_map"].shape[-1] for e in extras)

  def pad(m):
    return np.pad(m, ((0, 0), (0, 0), (0, num_labels - m.shape[-1])))

  for e in extras:
    e["content_map"] = pad(e["content_map"])
    e["style_maps"] = [pad(m) for m in e["style_maps"]]


def level_map(label_map: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """A label map [H, W, L] at a pyramid level's (h, w), resized as the
  images are (area averaging when shrinking), [h, w, L] float32."""
  if tuple(label_map.shape[:2]) == tuple(size):
    return np.asarray(label_map, np.float32)
  return np.asarray(image_io.resize(label_map, *size, method="torch"),
                    np.float32)


def style_copies(label_map: np.ndarray, size: Tuple[int, int], *,
                 num_rotations: int, num_scales: int) -> List[np.ndarray]:
  """A style map at a level, in the rotated and scaled copies its image
  gets (`augment.augment_style`), resampled by nearest neighbour."""
  return augment.augment_style(level_map(label_map, size),
                               num_rotations=num_rotations,
                               num_scales=num_scales, resample="nearest")


def layer_map(label_map: np.ndarray, layer: str, network: str = "vgg19"
              ) -> np.ndarray:
  """A label map [H, W, L] at a VGG layer's resolution: each cell the mean
  of the pixels it covers, [ceil(H / s), ceil(W / s), L] for the layer's
  total stride s (a ceil-mode pooling's last cell covers fewer pixels)."""
  height, width, channels = label_map.shape
  stride = vgg.downsampling_of(layer, network)
  rows, cols = vgg.map_size(height, width, layer, network)
  pad = ((0, rows * stride - height), (0, cols * stride - width))
  summed = np.pad(label_map.astype(np.float64), pad + ((0, 0),)).reshape(
      rows, stride, cols, stride, channels).sum(axis=(1, 3))
  count = np.pad(np.ones((height, width)), pad).reshape(
      rows, stride, cols, stride).sum(axis=(1, 3))
  return (summed / count[..., None]).astype(np.float32)
