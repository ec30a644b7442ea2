"""Reading clips as frames and writing MP4s, for video style transfer.

A clip is a video file OpenCV can decode (.mp4, .avi, ...), a directory of
frame images (.png, .jpg; in natural order, so frame2 comes before frame10),
or a glob pattern of frame images. `read_frames` returns a `Clip`: an
indexable sequence of RGB float32 [H, W, 3] frames in [0, 1] (kept in memory
as uint8, converted on access) with its frame rate and source frame numbers.

Videos need OpenCV (`pip install -e '.[video]'`); frame directories only
need PIL (they are read by `image_io.read_image`, strictly). Bad input
raises `VideoError`, one line naming the flag (--content_video, --frames,
--max_frames).

`write_video` encodes RGB uint8 frames to MP4: H.264 (yuv420p, plays in
browsers and QuickTime) through the ffmpeg binary bundled in the
imageio-ffmpeg wheel when it is installed, otherwise MPEG-4 part 2 ('mp4v')
through OpenCV's VideoWriter (the PyPI OpenCV wheels cannot encode H.264:
their 'avc1' writer finds no usable encoder). The file appears atomically.
"""

import collections.abc
import glob
import importlib
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterable, List, Optional, Union

import numpy as np
from PIL import Image

from cnnmrf_jax import fileio
from cnnmrf_jax import image_io

PathLike = Union[str, os.PathLike]

CONTENT_FLAG = "--content_video"
FRAMES_FLAG = "--frames"
MAX_FRAMES_FLAG = "--max_frames"
PIP_VIDEO = "pip install -e '.[video]'"
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GLOB_CHARS = re.compile(r"[*?\[]")
CODECS = ("auto", "h264", "mp4v")


class VideoError(ValueError):
  """A bad video input or output; the message is one line naming the flag."""


def require_cv2(flag: str = CONTENT_FLAG):
  """The cv2 module, or VideoError naming the pip command."""
  try:
    return importlib.import_module("cv2")
  except ImportError as e:
    raise VideoError(f"{flag}: needs OpenCV (opencv-python-headless); "
                     f"{PIP_VIDEO}") from e


# ----------------------------------------------------------------------------
# --frames


def parse_frames(spec: Union[None, str, slice]) -> slice:
  """--frames START:STOP[:STEP] -> slice (0-based, STOP exclusive).

  Any part may be empty (':50', '10:', '::2'); parts are non-negative
  integers and STEP is positive. None selects every frame.
  """
  if spec is None:
    return slice(None)
  if isinstance(spec, slice):
    parts = [spec.start, spec.stop, spec.step]
    text = f"{spec.start}:{spec.stop}:{spec.step}"
  else:
    text = str(spec).strip()
    fields = text.split(":")
    if len(fields) not in (2, 3):
      raise VideoError(f"{FRAMES_FLAG}={text!r}: expected START:STOP[:STEP] "
                       f"(e.g. 0:100 or 10::2)")
    parts = []
    for field in fields + [""] * (3 - len(fields)):
      field = field.strip()
      if not field:
        parts.append(None)
      elif re.fullmatch(r"\d+", field):
        parts.append(int(field))
      else:
        raise VideoError(f"{FRAMES_FLAG}={text!r}: {field!r} is not a "
                         f"non-negative integer (START:STOP[:STEP])")
  start, stop, step = parts
  for value in (start, stop, step):
    if value is not None and (not isinstance(value, (int, np.integer)) or
                              value < 0):
      raise VideoError(f"{FRAMES_FLAG}={text!r}: frame numbers must be "
                       f"non-negative integers")
  if step == 0:
    raise VideoError(f"{FRAMES_FLAG}={text!r}: STEP must be positive")
  if start is not None and stop is not None and stop <= start:
    raise VideoError(f"{FRAMES_FLAG}={text!r}: STOP must be after START")
  return slice(start, stop, step)


def _check_max_frames(max_frames: Optional[int]) -> Optional[int]:
  if max_frames is None:
    return None
  if (isinstance(max_frames, bool) or
      not isinstance(max_frames, (int, np.integer)) or max_frames < 1):
    raise VideoError(f"{MAX_FRAMES_FLAG}={max_frames!r}: expected a positive "
                     f"integer")
  return int(max_frames)


# ----------------------------------------------------------------------------
# Reading


class Clip(collections.abc.Sequence):
  """Frames of a clip: clip[t] is RGB float32 [H, W, 3] in [0, 1].

  Attributes:
    source: what was read (the path or pattern).
    fps: frames per second of a video file (None for frame images, or when
      the container does not say).
    indices: the source frame number of each frame (0-based, after
      --frames), for naming outputs.
    names: a name per frame (the file stem for frame images,
      'frame_000012' for video frames).
    height, width: the frames' size.
  """

  def __init__(self, frames_uint8: List[np.ndarray], *, source: str,
               fps: Optional[float], indices: List[int], names: List[str]):
    self._frames = frames_uint8
    self.source = source
    self.fps = fps
    self.indices = indices
    self.names = names
    self.height, self.width = frames_uint8[0].shape[:2]

  def __len__(self) -> int:
    return len(self._frames)

  def __getitem__(self, t):
    if isinstance(t, slice):
      return [self[i] for i in range(*t.indices(len(self)))]
    return self._frames[t].astype(np.float32) / 255.0

  def uint8(self, t: int) -> np.ndarray:
    """Frame t as stored: RGB uint8 [H, W, 3]."""
    return self._frames[t]

  def __repr__(self) -> str:
    return (f"Clip({self.source!r}, {len(self)} frames of "
            f"{self.width}x{self.height}, fps={self.fps})")


def _natural_key(path: pathlib.Path):
  return [int(part) if part.isdigit() else part.lower()
          for part in re.split(r"(\d+)", path.name)]


def frame_files(path: str, flag: str = CONTENT_FLAG
                ) -> Optional[List[pathlib.Path]]:
  """Frame image files for a directory or glob (natural order), None for
  anything else; VideoError naming `flag` when there are none. Per-frame
  semantic maps (--content_map) are listed by the same rule, so they pair
  with the frames in order."""
  if _GLOB_CHARS.search(path) and not os.path.exists(path):
    files = [pathlib.Path(p) for p in glob.glob(path)]
    files = [p for p in files if p.is_file()]
    if not files:
      raise VideoError(f"{flag} {path}: the pattern matches no files")
    return sorted(files, key=_natural_key)
  if os.path.isdir(path):
    files = [p for p in pathlib.Path(path).iterdir()
             if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS]
    if not files:
      raise VideoError(f"{flag} {path}: the directory holds no "
                       f"{'/'.join(FRAME_EXTENSIONS)} frames")
    return sorted(files, key=_natural_key)
  return None


def _none_selected(spec: slice, total: int) -> VideoError:
  return VideoError(f"{FRAMES_FLAG}={spec.start or ''}:{spec.stop or ''}"
                    f"{':' + str(spec.step) if spec.step else ''} selects no "
                    f"frames of a {total}-frame clip")


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _read_frame_files(files: List[pathlib.Path], source: str, spec: slice,
                      max_frames: Optional[int]) -> Clip:
  numbers = list(range(len(files)))[spec]
  if max_frames is not None:
    numbers = numbers[:max_frames]
  if not numbers:
    raise _none_selected(spec, len(files))
  frames = []
  for number in numbers:
    try:
      rgb, _ = image_io.read_image(files[number], flag=CONTENT_FLAG)
    except image_io.ImageError as e:
      raise VideoError(str(e)) from e
    if frames and rgb.shape != frames[0].shape:
      raise VideoError(
          f"{CONTENT_FLAG} {source}: frame {files[number].name} is "
          f"{rgb.shape[1]}x{rgb.shape[0]} but {files[numbers[0]].name} is "
          f"{frames[0].shape[1]}x{frames[0].shape[0]}; all frames must have "
          f"one size")
    frames.append(_to_uint8(rgb))
  return Clip(frames, source=source, fps=None, indices=numbers,
              names=[files[n].stem for n in numbers])


def _read_video_file(path: str, spec: slice, max_frames: Optional[int]
                     ) -> Clip:
  cv2 = require_cv2(CONTENT_FLAG)
  capture = cv2.VideoCapture(path)
  try:
    if not capture.isOpened():
      raise VideoError(f"{CONTENT_FLAG} {path}: OpenCV cannot open it "
                       f"(expected a video file, a directory of frames or a "
                       f"glob of frame images)")
    fps = float(capture.get(cv2.CAP_PROP_FPS)) or None
    start = spec.start or 0
    step = spec.step or 1
    frames, numbers = [], []
    number = 0
    while spec.stop is None or number < spec.stop:
      if max_frames is not None and len(frames) >= max_frames:
        break
      wanted = number >= start and (number - start) % step == 0
      if wanted:
        ok, bgr = capture.read()
      else:
        ok, bgr = capture.grab(), None  # skip without decoding to pixels
      if not ok:
        break
      if wanted:
        if bgr is None or bgr.ndim != 3:
          raise VideoError(f"{CONTENT_FLAG} {path}: frame {number} decodes "
                           f"to shape {getattr(bgr, 'shape', None)}")
        frames.append(np.ascontiguousarray(bgr[..., ::-1]))
        numbers.append(number)
      number += 1
  finally:
    capture.release()
  if not frames:
    if number == 0:
      raise VideoError(f"{CONTENT_FLAG} {path}: no frames could be decoded "
                       f"(empty or unreadable video)")
    raise _none_selected(spec, number)
  return Clip(frames, source=path, fps=fps, indices=numbers,
              names=[f"frame_{n:06d}" for n in numbers])


def read_frames(path: PathLike, *, frames: Union[None, str, slice] = None,
                max_frames: Optional[int] = None) -> Clip:
  """Reads a clip: a video file, a directory of frames or a glob.

  Args:
    path: a video file OpenCV can decode, a directory of .png/.jpg frames
      (natural order), or a glob pattern of frame images.
    frames: --frames, 'START:STOP[:STEP]' or a slice over the source's
      frames (0-based, STOP exclusive).
    max_frames: keep at most this many of the selected frames.

  Returns:
    A `Clip` (len >= 1), frames RGB float32 [H, W, 3] in [0, 1] on access.

  Raises:
    VideoError: a missing path, an unreadable or empty video, frames of
      different sizes or unreadable frame images, a bad --frames or
      --max_frames, no frames selected, OpenCV missing for a video file.
  """
  spec = parse_frames(frames)
  max_frames = _check_max_frames(max_frames)
  text = os.fspath(path)
  files = frame_files(text)
  if files is not None:
    return _read_frame_files(files, text, spec, max_frames)
  if not os.path.exists(text):
    raise VideoError(f"{CONTENT_FLAG} {text}: no such file or directory")
  if pathlib.Path(text).suffix.lower() in FRAME_EXTENSIONS:
    return _read_frame_files([pathlib.Path(text)], text, spec, max_frames)
  return _read_video_file(text, spec, max_frames)


# ----------------------------------------------------------------------------
# Writing


def _as_uint8_rgb(frame) -> np.ndarray:
  frame = np.asarray(frame)
  if frame.dtype != np.uint8:
    frame = _to_uint8(frame)
  if frame.ndim != 3 or frame.shape[-1] != 3:
    raise VideoError(f"write_video: expected RGB frames [H, W, 3], got "
                     f"shape {frame.shape}")
  return frame


def _pad_even(frame: np.ndarray) -> np.ndarray:
  """Both encoders need even sizes (4:2:0 chroma halves the resolution;
  OpenCV's mp4v writer silently crops an odd row/column), so an odd last
  row/column is repeated instead."""
  height, width = frame.shape[:2]
  return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _available(module: str) -> bool:
  try:
    importlib.import_module(module)
  except ImportError:
    return False
  return True


def _encode_h264(path: str, frames: Iterable[np.ndarray], fps: float) -> int:
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  writer, count, size = None, 0, None
  try:
    for frame in frames:
      frame = _pad_even(_as_uint8_rgb(frame))
      if writer is None:
        size = frame.shape[:2]
        writer = imageio_ffmpeg.write_frames(
            path, (size[1], size[0]), fps=fps, codec="libx264",
            pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None,
            macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", "18", "-movflags", "+faststart"])
        writer.send(None)
      elif frame.shape[:2] != size:
        raise VideoError(f"write_video {path}: frame {count} is "
                         f"{frame.shape[1]}x{frame.shape[0]}, the first "
                         f"{size[1]}x{size[0]}")
      writer.send(np.ascontiguousarray(frame))
      count += 1
  finally:
    if writer is not None:
      writer.close()
  return count


def _encode_mp4v(path: str, frames: Iterable[np.ndarray], fps: float) -> int:
  cv2 = require_cv2("write_video")
  writer, count, size = None, 0, None
  try:
    for frame in frames:
      frame = _pad_even(_as_uint8_rgb(frame))
      if writer is None:
        size = frame.shape[:2]
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                 (size[1], size[0]))
        if not writer.isOpened():
          raise VideoError(f"write_video {path}: OpenCV's mp4v writer did "
                           f"not open")
      elif frame.shape[:2] != size:
        raise VideoError(f"write_video {path}: frame {count} is "
                         f"{frame.shape[1]}x{frame.shape[0]}, the first "
                         f"{size[1]}x{size[0]}")
      writer.write(np.ascontiguousarray(frame[..., ::-1]))
      count += 1
  finally:
    if writer is not None:
      writer.release()
  return count


def choose_codec(codec: str = "auto") -> str:
  """'auto' -> 'h264' if imageio-ffmpeg is installed, else 'mp4v'."""
  if codec not in CODECS:
    raise VideoError(f"--video_codec={codec!r}: expected one of "
                     f"{', '.join(CODECS)}")
  if codec == "auto":
    codec = "h264" if _available("imageio_ffmpeg") else "mp4v"
  needed = {"h264": "imageio_ffmpeg", "mp4v": "cv2"}[codec]
  if not _available(needed):
    raise VideoError(f"--video_codec={codec}: needs {needed}; {PIP_VIDEO}")
  return codec


def write_video(path: PathLike, frames_uint8: Iterable[np.ndarray],
                fps: float, *, codec: str = "auto",
                overwrite: bool = True) -> str:
  """Encodes RGB frames to an MP4 file, atomically.

  The encoder writes to a temporary file beside `path`, which then replaces
  `path` in one step (`fileio.atomic_open`): a failure leaves the previous
  file, or none.

  Args:
    path: the .mp4 to write.
    frames_uint8: an iterable of RGB [H, W, 3] uint8 frames (float frames in
      [0, 1] are rounded), all one size, at least one.
    fps: frames per second, > 0.
    codec: 'h264' (imageio-ffmpeg's bundled ffmpeg, libx264 yuv420p, CRF
      18), 'mp4v' (OpenCV's VideoWriter) or 'auto' (h264 when available).
      With either, an odd height or width gets its last row/column
      repeated.
    overwrite: False raises fileio.ExistsError, before encoding, if path
      exists.

  Returns:
    The codec used.
  """
  path = pathlib.Path(path)
  codec = choose_codec(codec)
  if not fps or fps <= 0:
    raise VideoError(f"--fps={fps!r}: expected a positive frame rate")
  if not overwrite and path.exists():
    raise fileio.ExistsError(f"{path} exists; pass --overwrite to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  encode = _encode_h264 if codec == "h264" else _encode_mp4v
  with tempfile.TemporaryDirectory(dir=path.parent,
                                   prefix=f".{path.name}.") as scratch:
    scratch_path = os.path.join(scratch, "video.mp4")
    if encode(scratch_path, frames_uint8, float(fps)) == 0:
      raise VideoError(f"write_video {path}: no frames to write")
    with open(scratch_path, "rb") as encoded:
      fileio.atomic_write(path, lambda f: shutil.copyfileobj(encoded, f),
                          overwrite=overwrite)
  return codec


def side_by_side(content, result, *, gap: int = 4) -> np.ndarray:
  """[H, W, 3] content beside [H, W', 3] result, as one uint8 frame.

  The content frame is resized (bilinear) to the result's height keeping
  its aspect ratio; a white gap of `gap` pixels separates the two. Inputs
  are uint8 or float in [0, 1].
  """
  content = _as_uint8_rgb(content)
  result = _as_uint8_rgb(result)
  height = result.shape[0]
  if content.shape[0] != height:
    width = max(1, round(content.shape[1] * height / content.shape[0]))
    content = np.asarray(Image.fromarray(content).resize(
        (width, height), Image.BILINEAR))
  spacer = np.full((height, gap, 3), 255, np.uint8)
  return np.concatenate([content, spacer, result], axis=1)
