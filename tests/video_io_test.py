"""Tests of cnnmrf_jax.video_io: reading clips, --frames, writing MP4s."""

import builtins
import os

import numpy as np
from PIL import Image
import pytest

from cnnmrf_jax import fileio
from cnnmrf_jax import video_io

cv2 = pytest.importorskip("cv2")


def clip_frames(count=10, height=32, width=48):
  """Frames whose mean brightness encodes their number (survives codecs)."""
  rng = np.random.default_rng(0)
  texture = rng.integers(0, 40, (height, width, 3))
  return [np.clip(texture + 20 * t, 0, 255).astype(np.uint8)
          for t in range(count)]


def write_cv2_video(path, frames, fourcc, fps=12.0):
  height, width = frames[0].shape[:2]
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps,
                           (width, height))
  assert writer.isOpened()
  for frame in frames:
    writer.write(frame[..., ::-1])
  writer.release()
  return str(path)


def frame_number(frame):
  """Inverse of clip_frames' brightness ramp (frame float in [0, 1])."""
  return int(round((np.mean(frame) * 255 - 19.5) / 20))


@pytest.mark.parametrize("name,fourcc", [("clip.avi", "MJPG"),
                                         ("clip.mp4", "mp4v")])
def test_read_video_file(tmp_path, name, fourcc):
  frames = clip_frames()
  path = write_cv2_video(tmp_path / name, frames, fourcc)
  clip = video_io.read_frames(path)
  assert len(clip) == 10 and clip.fps == pytest.approx(12.0)
  assert (clip.height, clip.width) == (32, 48)
  first = clip[0]
  assert first.dtype == np.float32 and first.shape == (32, 48, 3)
  assert 0 <= first.min() and first.max() <= 1
  assert [frame_number(f) for f in clip] == list(range(10))
  # RGB order: a red-only frame reads back red.
  red = np.zeros((32, 48, 3), np.uint8)
  red[..., 0] = 200
  clip = video_io.read_frames(write_cv2_video(tmp_path / ("red_" + name),
                                              [red] * 2, fourcc))
  assert clip[0][..., 0].mean() > 0.6 and clip[0][..., 2].mean() < 0.15


def test_read_video_with_frames_and_max_frames(tmp_path):
  path = write_cv2_video(tmp_path / "clip.avi", clip_frames(), "MJPG")
  clip = video_io.read_frames(path, frames="2:9:3")
  assert clip.indices == [2, 5, 8]
  assert [frame_number(f) for f in clip] == [2, 5, 8]
  assert clip.names == ["frame_000002", "frame_000005", "frame_000008"]
  clip = video_io.read_frames(path, frames=slice(4, None), max_frames=2)
  assert clip.indices == [4, 5]
  with pytest.raises(video_io.VideoError, match="--frames=20:.*10-frame"):
    video_io.read_frames(path, frames="20:")


def test_read_frame_directory_natural_order(tmp_path):
  frames = clip_frames(count=12)
  for t, frame in enumerate(frames):
    Image.fromarray(frame).save(tmp_path / f"f{t}.png")
  (tmp_path / "notes.txt").write_text("not a frame")
  clip = video_io.read_frames(tmp_path)
  assert len(clip) == 12 and clip.fps is None
  assert clip.names[:3] == ["f0", "f1", "f2"] and clip.names[10] == "f10"
  np.testing.assert_array_equal(clip.uint8(11), frames[11])  # lossless
  np.testing.assert_allclose(clip[3], frames[3] / 255.0, atol=1e-7)
  assert video_io.read_frames(tmp_path, frames="::5").names == [
      "f0", "f5", "f10"]


def test_read_glob(tmp_path):
  frames = clip_frames(count=4)
  for t, frame in enumerate(frames):
    Image.fromarray(frame).save(tmp_path / f"shot_{t:03d}.jpg", quality=95)
  Image.fromarray(frames[0]).save(tmp_path / "other.jpg")
  clip = video_io.read_frames(str(tmp_path / "shot_*.jpg"))
  assert clip.names == ["shot_000", "shot_001", "shot_002", "shot_003"]
  assert [frame_number(f) for f in clip] == [0, 1, 2, 3]
  with pytest.raises(video_io.VideoError, match="matches no files"):
    video_io.read_frames(str(tmp_path / "nothing_*.png"))


def test_frames_of_different_sizes(tmp_path):
  Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "a.png")
  Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / "b.png")
  with pytest.raises(video_io.VideoError,
                     match=r"--content_video .*b\.png is 12x8 .* a\.png is "
                           r"10x8"):
    video_io.read_frames(tmp_path)


def test_bad_inputs(tmp_path):
  with pytest.raises(video_io.VideoError, match="--content_video .*no such"):
    video_io.read_frames(tmp_path / "missing.mp4")
  (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
  with pytest.raises(video_io.VideoError, match="--content_video .*junk"):
    video_io.read_frames(tmp_path / "junk.mp4")
  (tmp_path / "empty.avi").write_bytes(b"")
  with pytest.raises(video_io.VideoError, match="--content_video"):
    video_io.read_frames(tmp_path / "empty.avi")
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  with pytest.raises(video_io.VideoError, match="no .png"):
    video_io.read_frames(empty_dir)
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 20)
  with pytest.raises(video_io.VideoError, match="--content_video"):
    video_io.read_frames(str(tmp_path / "broken*.png"))
  for error in (ValueError, video_io.VideoError):
    assert issubclass(video_io.VideoError, error)


@pytest.mark.parametrize("spec,expected", [
    ("0:100", slice(0, 100, None)), ("10:", slice(10, None, None)),
    (":50", slice(None, 50, None)), ("::2", slice(None, None, 2)),
    (" 3:9:3 ", slice(3, 9, 3)), (None, slice(None)),
    (slice(1, 4), slice(1, 4, None))])
def test_parse_frames(spec, expected):
  assert video_io.parse_frames(spec) == expected


@pytest.mark.parametrize("spec", ["5", "a:b", "1:2:3:4", "-1:", "5:5",
                                  "9:3", "::0", "1.5:3", slice(-2, None)])
def test_parse_frames_rejects(spec):
  with pytest.raises(video_io.VideoError, match="^--frames="):
    video_io.parse_frames(spec)


def test_max_frames_must_be_positive(tmp_path):
  with pytest.raises(video_io.VideoError, match="--max_frames"):
    video_io.read_frames(tmp_path, max_frames=0)


def test_missing_opencv_names_the_extra(tmp_path, monkeypatch):
  real_import = builtins.__import__

  def no_cv2(name, *args, **kwargs):
    if name == "cv2":
      raise ImportError("No module named 'cv2'")
    return real_import(name, *args, **kwargs)

  monkeypatch.delitem(__import__("sys").modules, "cv2")
  monkeypatch.setattr(builtins, "__import__", no_cv2)
  monkeypatch.setattr(video_io.importlib, "import_module",
                      lambda name: no_cv2(name))
  (tmp_path / "clip.mp4").write_bytes(b"x")
  with pytest.raises(video_io.VideoError,
                     match=r"--content_video.*pip install -e '\.\[video\]'"):
    video_io.read_frames(tmp_path / "clip.mp4")


@pytest.mark.parametrize("codec", ["h264", "mp4v"])
def test_write_video_round_trip(tmp_path, codec):
  if codec == "h264":
    pytest.importorskip("imageio_ffmpeg")
  frames = clip_frames(count=6, height=33, width=47)  # odd sizes
  path = tmp_path / "out" / "result.mp4"
  assert video_io.write_video(path, iter(frames), 8, codec=codec) == codec
  clip = video_io.read_frames(path)
  assert len(clip) == 6 and clip.fps == pytest.approx(8.0)
  assert (clip.height, clip.width) == (34, 48)  # last row/column repeated
  assert [frame_number(f[:33, :47]) for f in clip] == list(range(6))
  assert sorted(os.listdir(path.parent)) == ["result.mp4"]  # no temp files
  if codec == "h264":
    code = int(cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FOURCC))
    fourcc = "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4))
    assert fourcc.lower() in ("h264", "avc1")


def test_write_video_keeps_old_file_on_failure(tmp_path):
  path = tmp_path / "result.mp4"
  path.write_bytes(b"previous")

  def frames():
    yield np.zeros((16, 16, 3), np.uint8)
    yield np.zeros((16, 18, 3), np.uint8)  # another size: fails mid-way

  with pytest.raises(video_io.VideoError, match="frame 1 is 18x16"):
    video_io.write_video(path, frames(), 10)
  assert path.read_bytes() == b"previous"
  assert sorted(os.listdir(tmp_path)) == ["result.mp4"]
  with pytest.raises(fileio.ExistsError):
    video_io.write_video(path, [np.zeros((16, 16, 3), np.uint8)], 10,
                         overwrite=False)
  with pytest.raises(video_io.VideoError, match="--fps"):
    video_io.write_video(path, [np.zeros((16, 16, 3), np.uint8)], 0)
  with pytest.raises(video_io.VideoError, match="--video_codec"):
    video_io.write_video(path, [np.zeros((16, 16, 3), np.uint8)], 10,
                         codec="avc1")
  assert path.read_bytes() == b"previous"


def test_side_by_side():
  content = np.full((20, 30, 3), 0.5, np.float32)
  result = np.zeros((10, 12, 3), np.uint8)
  both = video_io.side_by_side(content, result, gap=2)
  assert both.dtype == np.uint8 and both.shape == (10, 15 + 2 + 12, 3)
  assert np.all(both[:, :15] == 128) and np.all(both[:, 15:17] == 255)
  assert np.all(both[:, 17:] == 0)
