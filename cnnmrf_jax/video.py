"""Video style transfer: the frame-by-frame driver and its command line.

    python -m cnnmrf_jax.video --flagfile=configs/video.flags \
        --content_video=clip.mp4 --style_image=STYLE --workdir=OUT

Ruder, Dosovitskiy & Brox, "Artistic style transfer for videos" (GCPR 2016;
manuelruder/artistic-videos), on CNNMRF's objective. Frame 1 is an ordinary
transfer (the whole pyramid, no temporal term). Frame t > 1 starts from the
previous result warped into it by the optical flow, the pixels the flow
cannot track (disocclusions, motion boundaries, the frame's border) filled
from the content frame (`temporal.init_from_previous`), and runs only the
finest --video_num_res levels for --video_num_iter iterations with the
temporal term added: the consistency-weighted squared distance to the
results of frames t-j, j in --flow_relative_indices, warped into frame t
(terms.py's 'temporal' term; `temporal.temporal_loss`).

The flows are OpenCV's DIS between the content frames at the output size,
both directions per pair, computed for frame t+1 in a background thread
while frame t is synthesised (`flow.FlowPrefetcher`) and kept in OUT/flows.
Frame 1 uses one compiled program per pyramid level, every later frame the
same --video_num_res programs: two Synthesizers serve the whole clip, so
frames after the second compile nothing.

OUT holds:

    frames/00001.png ...  the stylised frames, as each is finished
    raw/00001.npy         each result before --output_mode, float32 RGB
                          [H, W, 3]: what the next frames are warped from
    work/00001/           the frame's synthesis workdir (workdir.py: log,
                          plan, checkpoint while unfinished)
    flows/                the flows (flow.FlowCache)
    video_log.jsonl       one record per frame: seconds, flow seconds, the
                          temporal error against the previous frame (with
                          semantic maps also label_agreement_LAYER)
    video_flags.txt       the resolved flags (--flagfile reproduces the run)
    result.mp4            the stylised clip; side_by_side.mp4 with
                          --side_by_side (content left, result right)

Semantic maps (semantic.py): --content_map is one map for every frame,
or a directory or glob of maps, one per selected frame, paired with the
frames in natural order (`semantic.load_video`); --style_map as for
images. Each frame's synthesis matches with its frame's map, resized to
the frame's levels as an image's is; all maps share one set of labels.

--resume continues a stopped run at its first unfinished frame (inside it
from the frame's checkpoint): the frames already written are kept, and the
result is that of a run straight through. Bad input (an unreadable or empty
video, frames of different sizes, OpenCV missing, flow offsets that are not
positive or lack 1, a count of per-frame maps other than the number of
frames, an unreadable map, ...) fails before any work, one line naming the
flag, exit 2; an interrupted run exits 130.
"""

import copy
import dataclasses
import json
import pathlib
import shutil
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import numpy as np

from cnnmrf_jax import cli
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import fileio
from cnnmrf_jax import huge_pages

USAGE = """Video style transfer with temporal consistency (Ruder et al. 2016)
on CNNMRF.

usage: python -m cnnmrf_jax.video --flagfile=configs/video.flags \\
           --content_video=CLIP --style_image=STYLE --workdir=OUT \\
           [--frames=START:STOP[:STEP]] [--max_frames=N] [--side_by_side]"""

# temporal_weight of the video command when no flag sets it (the Config's
# own default, 0, keeps image runs free of the term), for configs/
# video.flags at 384 px with the real weights. The temporal term is a mean
# over pixels (Ruder et al.'s 1/D) but the MRF energy a sum over patches,
# so the weight that balances them grows with the pixel count: it was
# chosen at 128 px (where a tenth of it barely changes the flicker and ten
# times it freezes the motion; benchmarks/bench_video.py prints both) and
# scaled by (384 / 128)**2. Scale it likewise for other --max_size.
DEFAULT_TEMPORAL_WEIGHT = 2.7e4
# Frame rate of the outputs when the clip is a directory of frames and
# --fps is not given.
DEFAULT_FPS = 25.0

FRAMES_DIR = "frames"
RAW_DIR = "raw"
WORK_DIR = "work"
FLOWS_DIR = "flows"
LOG_NAME = "video_log.jsonl"
FLAGS_NAME = "video_flags.txt"
RESULT_VIDEO = "result.mp4"
SIDE_BY_SIDE_VIDEO = "side_by_side.mp4"
# init of frames after the first: the previous result warped (not a path).
INIT_PREVIOUS = "previous"

EXIT_INTERRUPTED = 130
# The module the video flags are listed under in --help (also when run as
# __main__).
_FLAGS_MODULE = "cnnmrf_jax.video"
_VIDEO_FLAGS = ("content_video", "frames", "max_frames", "side_by_side",
                "fps", "video_codec")


@dataclasses.dataclass(frozen=True)
class VideoOptions:
  """What a video run reads and writes beyond the synthesis Config.

  content_video: a video file, a directory of frames or a glob of frame
    images. frames: 'START:STOP[:STEP]' over its frames (None: all).
  max_frames: at most this many of them. side_by_side: also write
  side_by_side.mp4. fps: frame rate of the outputs (None: the video's own,
  DEFAULT_FPS for frame images). video_codec: 'auto', 'h264' or 'mp4v'.
  """
  content_video: str
  frames: Optional[str] = None
  max_frames: Optional[int] = None
  side_by_side: bool = False
  fps: Optional[float] = None
  video_codec: str = "auto"

  def to_flag_lines(self) -> List[str]:
    lines = [f"--content_video={self.content_video}"]
    if self.frames:
      lines.append(f"--frames={self.frames}")
    if self.max_frames:
      lines.append(f"--max_frames={self.max_frames}")
    lines.append("--side_by_side" if self.side_by_side
                 else "--noside_by_side")
    if self.fps:
      lines.append(f"--fps={self.fps!r}")
    lines.append(f"--video_codec={self.video_codec}")
    return lines


@dataclasses.dataclass
class VideoResult:
  """What `run` returns.

  frames: [T, H, W, 3] uint8, the stylised frames as written.
  records: one dict per frame (video_log.jsonl's records).
  temporal_error: mean over t of the c-weighted squared difference of
    stylised frame t and warped frame t-1 (`temporal.temporal_error`, on
    the frames as written, in [0, 1]); content_temporal_error the same of
    the content frames with the same flows; None for a one-frame clip.
  paths: the videos written.
  """
  frames: np.ndarray
  records: List[Dict[str, Any]]
  temporal_error: Optional[float]
  content_temporal_error: Optional[float]
  paths: List[pathlib.Path]

  @property
  def temporal_error_ratio(self) -> Optional[float]:
    """How much more the result flickers than its content (1: as little)."""
    if self.temporal_error is None:
      return None
    return self.temporal_error / max(self.content_temporal_error, 1e-12)


def frame_name(t: int) -> str:
  """Output name stem of frame t (0-based): 00001 for the first."""
  return f"{t + 1:05d}"


def frame_configs(config: config_lib.Config
                  ) -> Tuple[config_lib.Config, config_lib.Config]:
  """(first frame's config, later frames' config).

  The first: the run's own, without the temporal term. The later: only
  the finest --video_num_res levels (the pyramid's sizes are ceil(size /
  2**k) of the output size, so its levels are the first frame's finest
  ones), --video_num_iter iterations, started from the warped previous
  result.
  """
  first = config_lib.replace(config, temporal_weight=0.0, resume=False,
                             overwrite=False)
  later = config_lib.replace(
      first, temporal_weight=config.temporal_weight,
      num_res=config.video_num_res, num_iter=tuple(config.video_num_iter),
      video_num_res=config.video_num_res, init=INIT_PREVIOUS)
  return first.validate(), later.validate()


def _with_run_flags(synthesizer, **changes):
  """The synthesizer with other run flags (resume, overwrite), its
  compiled programs shared: they do not depend on those fields."""
  twin = copy.copy(synthesizer)
  twin.config = dataclasses.replace(synthesizer.config, **changes)
  return twin


class _FramesAtSize:
  """The clip's frames resized to the output size (RGB float32 [H, W, 3]),
  as the finest level sees them; indexable, computed on access (the flow
  thread reads them too)."""

  def __init__(self, clip, size):
    self.clip, self.size = clip, tuple(size)

  def __len__(self):
    return len(self.clip)

  def __getitem__(self, t):
    from cnnmrf_jax import image_io  # pylint: disable=g-import-not-at-top
    frame = self.clip[t]
    if frame.shape[:2] == self.size:
      return frame
    return np.asarray(image_io.resize(frame, *self.size, method="torch"),
                      np.float32)


class _TimedFlows:
  """A FlowCache whose pair() records its seconds per frame (the second
  index): what the prefetcher spent on frame t's flows."""

  def __init__(self, cache):
    self.cache = cache
    self.seconds: Dict[int, float] = {}
    self._lock = threading.Lock()

  def pair(self, i, j, frame_i, frame_j):
    start = time.perf_counter()
    flows = self.cache.pair(i, j, frame_i, frame_j)
    with self._lock:
      self.seconds[j] = self.seconds.get(j, 0.0) + time.perf_counter() - start
    return flows


def _check_fps(fps: Optional[float]) -> None:
  if fps is not None and not (np.isfinite(fps) and fps > 0):
    raise config_lib.ConfigError(f"--fps: expected a positive frame rate, "
                                 f"got {fps!r}")


class _Outdir:
  """OUT's paths, and the check that a run may write there."""

  def __init__(self, workdir, config, options):
    self.root = pathlib.Path(workdir)
    self.frames = self.root / FRAMES_DIR
    self.raw = self.root / RAW_DIR
    self.work = self.root / WORK_DIR
    self.flows = self.root / FLOWS_DIR
    self.log = self.root / LOG_NAME
    self.flag_lines = config.to_flag_lines() + options.to_flag_lines()
    self.config = config

  def frame_png(self, t):
    return self.frames / f"{frame_name(t)}.png"

  def raw_npy(self, t):
    return self.raw / f"{frame_name(t)}.npy"

  def frame_workdir(self, t):
    return self.work / frame_name(t)

  def finished(self, t) -> bool:
    return self.frame_png(t).exists() and self.raw_npy(t).exists()

  def prepare(self) -> None:
    """Refuses to replace a run without --overwrite or to resume another
    run's frames; then writes video_flags.txt."""
    root, config = self.root, self.config
    if root.exists() and not root.is_dir():
      raise config_lib.ConfigError(f"--workdir: {root} is a file, not a "
                                   "directory; choose another --workdir")
    started = self.frames.exists() or self.work.exists()
    flags_path = root / FLAGS_NAME
    if config.resume and started and flags_path.exists():
      before = flags_path.read_text().splitlines()
      if before != self.flag_lines:
        changed = sorted(set(before) ^ set(self.flag_lines))
        raise config_lib.ConfigError(
            f"--resume: the flags differ from the run in {root} in "
            f"{changed}; resume with --flagfile={flags_path} --resume")
    elif started and not config.resume and not config.overwrite:
      raise fileio.ExistsError(
          f"--workdir: {root} holds frames of a run; pass --resume to "
          "continue it or --overwrite to start again")
    try:
      root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise config_lib.ConfigError(f"--workdir: cannot create the directory "
                                   f"{root} ({e.strerror or e})") from None
    if config.overwrite:
      for directory in (self.frames, self.raw, self.work):
        shutil.rmtree(directory, ignore_errors=True)
      if self.log.exists():
        self.log.unlink()
    for directory in (self.frames, self.raw, self.work):
      directory.mkdir(exist_ok=True)
    fileio.atomic_write_bytes(flags_path,
                              ("\n".join(self.flag_lines) + "\n").encode())

  def read_records(self) -> List[Dict[str, Any]]:
    if not self.log.exists():
      return []
    return [json.loads(l) for l in self.log.read_text().splitlines() if l]

  def write_records(self, records) -> None:
    fileio.atomic_write_bytes(
        self.log, "".join(json.dumps(r) + "\n" for r in records).encode())


def _load_styles(config):
  from cnnmrf_jax import image_io  # pylint: disable=g-import-not-at-top
  styles = []
  for path in config.style_image:
    image, notes = image_io.read_image(path, flag="style_image")
    for note in notes:
      logging.info("%s", note)
    styles.append(image)
  return styles


def _load_maps(config, frame_shape, num_frames, style_sizes):
  """The run's `semantic.VideoMaps` (None without maps), its notes logged;
  raises naming the flag on a map count that does not match the frames or
  an unreadable map."""
  from cnnmrf_jax import semantic  # pylint: disable=g-import-not-at-top
  maps, notes = semantic.load_video(config, frame_shape, num_frames,
                                    style_sizes)
  for note in notes:
    if note.startswith("WARNING "):
      logging.warning("%s", note[len("WARNING "):])
    else:
      logging.info("%s", note)
  return maps


def _padded(array, size):
  """[K, ...] padded with zeros to [size, ...] (static shapes whatever the
  number of earlier frames a frame near the start has)."""
  missing = size - array.shape[0]
  if missing <= 0:
    return array
  return np.concatenate([array, np.zeros((missing,) + array.shape[1:],
                                         array.dtype)])


def run(config: config_lib.Config, options: VideoOptions, workdir: str, *,
        params=None, convention=None) -> VideoResult:
  """Stylises options.content_video into workdir frame by frame.

  config: the synthesis Config; its temporal_weight, flow_*, video_* fields
  say how frames after the first run, its resume/overwrite what happens to
  an earlier run in workdir. params/convention: VGG weights instead of
  loading config.weights (tests pass random weights).

  Raises the project's ValueErrors (ConfigError, VideoError, ImageError,
  ExistsError) before any work on bad input; KeyboardInterrupt (after the
  frame's checkpoint is written) when interrupted.
  """
  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import flow
  from cnnmrf_jax import plan as plan_lib
  from cnnmrf_jax import synthesize
  from cnnmrf_jax import video_io
  # pylint: enable=g-import-not-at-top
  # The clip is the content (the Config's checks and messages name it so).
  config = config_lib.replace(config, content_image=options.content_video)
  config.validate()
  if config.mode != "transfer":
    raise config_lib.ConfigError(
        f"--mode={config.mode}: video runs are transfers of each frame "
        "(--mode=transfer)")
  _check_fps(options.fps)
  codec = video_io.choose_codec(options.video_codec)
  video_io.require_cv2(video_io.CONTENT_FLAG)  # the flows need OpenCV
  clip = video_io.read_frames(options.content_video, frames=options.frames,
                              max_frames=options.max_frames)
  fps = options.fps or clip.fps or DEFAULT_FPS
  styles = _load_styles(config)
  first_config, later_config = frame_configs(config)
  style_sizes = tuple(s.shape[:2] for s in styles)
  content_size = (clip.height, clip.width)
  maps = _load_maps(config, content_size, len(clip), style_sizes)
  num_labels = maps.num_labels if maps else 0
  first_plan = plan_lib.make(first_config, [plan_lib.InputSizes(
      content_size, style_sizes, num_labels=num_labels)])
  plan_lib.check(first_config, first_plan)
  output_size = first_plan.output_size
  later_plan = plan_lib.make(later_config, [plan_lib.InputSizes(
      content_size, style_sizes, output_size, num_labels=num_labels)])
  plan_lib.check(later_config, later_plan)
  out = _Outdir(workdir, config, options)
  out.prepare()
  logging.info("%s: %d frames of %dx%d, output %dx%d px at %.3g fps",
               clip.source, len(clip), clip.width, clip.height,
               output_size[1], output_size[0], fps)
  logging.info("frame 1: %s", first_plan.table())
  if len(clip) > 1:
    logging.info("frames 2-%d: %s", len(clip), later_plan.table())

  if params is None:
    # pylint: disable-next=g-import-not-at-top
    from cnnmrf_jax import weights as weights_lib
    params, convention = weights_lib.load_params(
        config.weights or None, network=config.network)
  synthesizers = {}

  def synthesizer(later):
    key = bool(later)
    if key not in synthesizers:
      synthesizers[key] = synthesize.Synthesizer(
          later_config if later else first_config, params, convention)
    return synthesizers[key]

  jumps = sorted(set(config.flow_relative_indices))
  start = 0
  while start < len(clip) and out.finished(start):
    start += 1
  records = [r for r in out.read_records() if r["frame"] < start]
  if start:
    logging.info("resuming at frame %d: frames 1-%d are done", start + 1,
                 start)
  # Results (RGB float32 [H, W, 3] before --output_mode) of the frames the
  # next ones are warped from.
  results = {t: np.load(out.raw_npy(t)) for t in range(start)
             if start - t <= max(jumps)}
  at_size = _FramesAtSize(clip, output_size)
  timed = _TimedFlows(flow.FlowCache(out.flows, preset=config.flow_preset))
  with flow.FlowPrefetcher(timed, at_size, jumps=jumps) as prefetch:
    for t in range(start, len(clip)):
      t0 = time.perf_counter()
      pairs = prefetch.flows(t)
      flow_wait = time.perf_counter() - t0
      later = t > 0
      frame_synth = synthesizer(later)
      content = at_size[t]
      inputs, temporal_in = _frame_inputs(
          t, clip[t], styles, content, results, pairs, jumps, frame_synth,
          maps.extras(t) if maps else None)
      run_plan = later_plan if later else first_plan
      frame_dir = out.frame_workdir(t)
      resume = ((frame_dir / "checkpoint.npz").exists() and
                not (frame_dir / "result.png").exists())
      if resume:
        logging.info("frame %d: resuming from its checkpoint", t + 1)
      frame_synth = _with_run_flags(frame_synth, resume=resume,
                                    overwrite=not resume)
      result = synthesize.synthesize(frame_synth, inputs, run_plan,
                                     frame_dir)
      rgb = np.asarray(result.images[0], np.float32)
      fileio.atomic_write(out.raw_npy(t), lambda f, a=rgb: np.save(f, a))
      from cnnmrf_jax import image_io  # pylint: disable=g-import-not-at-top
      image_io.write_image(out.frame_png(t), rgb, mode=config.output_mode)
      results[t] = rgb
      for old in [k for k in results if t + 1 - k > max(jumps)]:
        del results[old]
      record = _frame_record(t, len(clip), result, t0, flow_wait,
                             timed.seconds.get(t, 0.0), temporal_in,
                             out, at_size)
      records.append(record)
      out.write_records(records)
  written = np.stack([_read_png(out.frame_png(t)) for t in range(len(clip))])
  paths = [out.root / RESULT_VIDEO]
  video_io.write_video(paths[0], list(written), fps, codec=codec)
  if options.side_by_side:
    paths.append(out.root / SIDE_BY_SIDE_VIDEO)
    video_io.write_video(paths[1], [video_io.side_by_side(
        clip.uint8(t), written[t]) for t in range(len(clip))], fps,
                         codec=codec)
  stylised_error, content_error = clip_temporal_errors(
      written, at_size, out.flows, config.flow_preset)
  result = VideoResult(written, records, stylised_error, content_error,
                       paths)
  if result.temporal_error is not None:
    logging.info("temporal error %.4g, %.2fx the content clip's (%.4g)",
                 stylised_error, result.temporal_error_ratio, content_error)
  logging.info("wrote %s", ", ".join(map(str, paths)))
  return result


def _frame_inputs(t, frame, styles, content, results, pairs, jumps,
                  synthesizer, map_extras=None):
  """(synthesize.Inputs, flow.TemporalInputs or None) of frame t.

  frame: the content frame as read; content: it at the output size.
  results: {t: RGB result} of the earlier frames; pairs: the frame's flows
  (`FlowPrefetcher.flows`). The temporal targets are the previous results
  warped at the output size in the preprocessed space, their K jumps
  padded with zero weights to len(jumps). map_extras: the frame's semantic
  maps (`semantic.VideoMaps.extras`), or None.
  """
  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import flow
  from cnnmrf_jax import synthesize
  from cnnmrf_jax import temporal
  from cnnmrf_jax import terms
  from cnnmrf_jax import vgg
  # pylint: enable=g-import-not-at-top
  temporal_in = flow.temporal_inputs(pairs)
  if temporal_in is None:
    return synthesize.Inputs(
        contents=[frame], styles=[styles], init_images=[None],
        extras=[dict(map_extras)] if map_extras else None), None
  previous = np.stack([results[t - j] for j in temporal_in.jumps])
  # Jump 1's weights are its own consistency weights (long-term weights
  # only change the longer jumps').
  init = temporal.init_from_previous(
      results[t - 1], temporal_in.backward_flows[0], temporal_in.weights[0],
      content)
  warped = temporal.warp_batch(
      vgg.preprocess(previous, synthesizer.convention),
      temporal_in.backward_flows)
  extras = dict(map_extras or {})
  extras[terms.TEMPORAL_EXTRA] = {
      "warped": _padded(np.asarray(warped, np.float32), len(jumps)),
      "weights": _padded(np.asarray(temporal_in.weights, np.float32),
                         len(jumps))}
  return synthesize.Inputs(contents=[frame], styles=[styles],
                           init_images=[np.asarray(init, np.float32)],
                           extras=[extras]), temporal_in


def _read_png(path) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def _frame_record(t, num_frames, result, t0, flow_wait, flow_seconds,
                  temporal_in, out, at_size):
  """video_log.jsonl's record of frame t, and its log line."""
  from cnnmrf_jax import temporal  # pylint: disable=g-import-not-at-top
  seconds = time.perf_counter() - t0
  last = result.history[-1] if result.history else {}
  record = {"frame": t, "name": frame_name(t), "seconds": round(seconds, 3),
            "flow_seconds": round(flow_seconds, 3),
            "flow_wait_seconds": round(flow_wait, 3),
            "loss": float(np.mean(last.get("loss", [np.nan]))),
            "temporal": (float(np.mean(last["temporal"]))
                         if "temporal" in last else None)}
  # Semantic maps: the share of the last iteration's matches that kept
  # the frame's map label, per MRF layer (as the frame's log.jsonl).
  agreement = {k: float(np.mean(v)) for k, v in last.items()
               if k.startswith("label_agreement_")}
  record.update(agreement)
  text = "".join(f", {k.replace('_', ' ', 1).replace('_', ' ', 1)} "
                 f"{v:.3f}" for k, v in agreement.items())
  if temporal_in is not None:
    # Frame t against frame t-1 as written, and the content's own change
    # over the same flow: their ratio is 1 for a result as steady as its
    # content.
    backward = temporal_in.backward_flows[:1]
    weights = temporal_in.weights[:1]
    stylised = [_read_png(out.frame_png(k)) / 255.0 for k in (t - 1, t)]
    error = float(temporal.temporal_error(stylised, backward, weights))
    content_error = float(temporal.temporal_error(
        [at_size[t - 1], at_size[t]], backward, weights))
    record.update(temporal_error=error, content_temporal_error=content_error,
                  reliable=float(np.mean(np.asarray(weights))))
    ratio = error / max(content_error, 1e-12)
    overlap = ("overlapped" if flow_wait < 0.5 * max(flow_seconds, 1e-9)
               else f"waited {flow_wait:.2f} s")
    text += (f", temporal error {error:.3g} ({ratio:.2f}x the content's), "
             f"flow {flow_seconds:.2f} s ({overlap})")
  logging.info("frame %d/%d done in %.1f s%s", t + 1, num_frames, seconds,
               text)
  return record


def clip_temporal_errors(frames, content_frames, flow_dir, preset
                         ) -> Tuple[Optional[float], Optional[float]]:
  """(stylised, content) temporal errors of a clip: `temporal.temporal_error`
  of frames [T, H, W, 3] (uint8 or [0, 1]) and of the content frames
  (indexable, at the same size), with the content's jump-1 flows from
  flow_dir (computed if missing). (None, None) for T < 2."""
  # pylint: disable=g-import-not-at-top
  from cnnmrf_jax import flow
  from cnnmrf_jax import temporal
  # pylint: enable=g-import-not-at-top
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    frames = frames.astype(np.float32) / 255.0
  if len(frames) < 2:
    return None, None
  cache = flow.FlowCache(flow_dir, preset=preset)
  backward, weights = [], []
  for t in range(1, len(frames)):
    forward_flow, backward_flow = cache.pair(t - 1, t, content_frames[t - 1],
                                             content_frames[t])
    backward.append(backward_flow)
    weights.append(flow.consistency_weights(forward_flow, backward_flow))
  backward, weights = np.stack(backward), np.stack(weights)
  content = np.stack([content_frames[t] for t in range(len(frames))])
  return (float(temporal.temporal_error(frames, backward, weights)),
          float(temporal.temporal_error(content, backward, weights)))


# ----------------------------------------------------------------------------
# The command line.


def make_flag_values() -> flags.FlagValues:
  """Fresh flags of the video command: every synthesis flag (cli.py), the
  video's own, and the video default of --temporal_weight."""
  values = flags.FlagValues()
  cli.define_flags(values)
  kwargs = dict(flag_values=values, module_name=_FLAGS_MODULE)
  flags.DEFINE_string("content_video", None, "The clip: a video file "
                      "OpenCV decodes, a directory of .png/.jpg frames or a "
                      "glob of frame images.", **kwargs)
  flags.DEFINE_string("frames", None, "START:STOP[:STEP] over the clip's "
                      "frames, 0-based, STOP exclusive (e.g. 0:100, 10::2).",
                      **kwargs)
  flags.DEFINE_integer("max_frames", None, "Stylise at most this many of "
                       "the selected frames.", **kwargs)
  flags.DEFINE_boolean("side_by_side", False, "Also write side_by_side.mp4, "
                       "content beside result.", **kwargs)
  flags.DEFINE_float("fps", None, "Frame rate of the outputs; default the "
                     f"video's own, {DEFAULT_FPS:g} for frame images.",
                     **kwargs)
  flags.DEFINE_enum("video_codec", "auto", ["auto", "h264", "mp4v"],
                    "MP4 codec: h264 (imageio-ffmpeg), mp4v (OpenCV); auto: "
                    "h264 when available.", **kwargs)
  values.set_default("temporal_weight", DEFAULT_TEMPORAL_WEIGHT)
  return values


def options_from_flags(values: flags.FlagValues) -> VideoOptions:
  return VideoOptions(
      content_video=cli.required(values, "content_video",
                                 "the clip to stylise"),
      frames=values.frames, max_frames=values.max_frames,
      side_by_side=values.side_by_side, fps=values.fps,
      video_codec=values.video_codec)


def _raise_interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str], values: flags.FlagValues) -> None:
  """The command after its flags are parsed into `values`; bad input and
  interruptions exit through cli.fail / sys.exit."""
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  workdir = cli.required(values, "workdir", "where the frames and videos "
                         "are written")
  if values.pairs:
    cli.fail("--pairs: not for videos; give --content_video and "
             "--style_image")
  from cnnmrf_jax import logs  # pylint: disable=g-import-not-at-top
  logs.quiet_startup()
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    options = options_from_flags(values)
    config = cli.config_from_flags(values,
                                   content_image=options.content_video)
    run(config, options, workdir)
  except KeyboardInterrupt:
    print(f"interrupted: the finished frames are in "
          f"{pathlib.Path(workdir) / FRAMES_DIR}; run again with --resume "
          f"(--flagfile={pathlib.Path(workdir) / FLAGS_NAME} --resume) to "
          "continue", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except FloatingPointError as e:  # solve.NonFiniteError
    cli.fail(str(e), 3)
  except (ValueError, OSError) as e:
    cli.fail(str(e).splitlines()[0] if str(e) else repr(e))


def parse_argv(argv: Sequence[str], values: flags.FlagValues) -> List[str]:
  """cli.parse_argv with the video flags in --help too."""
  if any(a in ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")
         for a in argv[1:]):
    print(cli.help_text(USAGE, values))
    print(values.module_help(_FLAGS_MODULE))
    sys.exit(0)
  return cli.parse_argv(list(argv), USAGE, values)


def command(argv: Sequence[str]) -> None:
  """Parses argv (program name first) and runs, without absl's app (tests
  and other programs); exits like the command line."""
  values = make_flag_values()
  main(parse_argv(argv, values), values)


def run_main():
  """`python -m cnnmrf_jax.video`."""
  huge_pages.reexec_with_huge_pages()
  values = make_flag_values()

  def parse(argv):
    rest = parse_argv(argv, values)
    flags.FLAGS(argv[:1])  # absl's own flags (logging) at their defaults
    return rest

  app.run(lambda rest: main(rest, values), flags_parser=parse)


if __name__ == "__main__":
  run_main()
