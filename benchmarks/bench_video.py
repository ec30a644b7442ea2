"""Flicker and speed of video style transfer (python -m cnnmrf_jax.video).

On the first frames of a real clip (default OpenCV's vtest.avi, fetched by
benchmarks/fetch_clips.py) with the real VGG19 weights and
configs/video.flags' settings (at --size px, --num_iter iterations per level
for frame 1 and --video_num_iter after it), prints one figure per line:

  - the temporal error of the stylised clip divided by the content clip's
    (`temporal.temporal_error`: the mean over consecutive frames of the
    consistency-weighted squared difference of frame t and frame t-1 warped
    into it, both clips with the content's flows) for independent per-frame
    transfers (each frame a whole transfer from its content, no temporal
    term), for the video driver with the temporal term off (the warped
    init alone) and for each --temporal_weight; and the MRF energy of the
    later frames relative to the independent transfers' (a style that froze
    into the warped previous frame would move it);
  - with --timing_size: seconds per frame after the first at that size
    (frame 1 then runs only --timing_first_iter iterations per level: its
    time is not the figure), the flow seconds per frame and whether the
    flow thread overlapped with the synthesis.

    python benchmarks/bench_video.py                        # quick, 128 px
    python benchmarks/bench_video.py --size 192 --frames 8 \
        --temporal_weight 0.03 0.1 0.3 --timing_size 384
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import fetch_clips  # pylint: disable=g-import-not-at-top
from cnnmrf_jax import cli
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import image_io
from cnnmrf_jax import synthesize
from cnnmrf_jax import video
from cnnmrf_jax import video_io
from cnnmrf_jax import weights as weights_lib

FLAGS_FILE = pathlib.Path(__file__).resolve().parents[1] / "configs" / (
    "video.flags")


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clip", default=None,
                      help="video file or frames (default vtest.avi)")
  parser.add_argument("--style", default="example:coffee")
  parser.add_argument("--size", type=int, default=128, help="long side, px")
  parser.add_argument("--frames", type=int, default=6)
  parser.add_argument("--num_res", type=int, default=2)
  parser.add_argument("--num_iter", type=int, default=50,
                      help="frame 1's iterations per level")
  parser.add_argument("--video_num_iter", type=int, default=50)
  # The video command's default is for 384 px; the weight scales with the
  # pixel count (cnnmrf_jax/video.py), so 3e3 at the default 128 px.
  parser.add_argument("--temporal_weight", type=float, nargs="+",
                      default=[3e3])
  parser.add_argument("--timing_size", type=int, default=0,
                      help="also time frames after the first at this size")
  parser.add_argument("--timing_frames", type=int, default=4)
  parser.add_argument("--timing_first_iter", type=int, default=10)
  parser.add_argument("--out", default="bench_out/bench_video.json")
  parser.add_argument("--keep", default="",
                      help="keep the runs' workdirs under this directory")
  parser.add_argument("--strip", default="",
                      help="write a content/result strip of the first "
                      "--temporal_weight's run here (e.g. "
                      "docs/video_strip.jpg)")
  return parser.parse_args(argv)


def _config(args, size, **changes):
  config = cli.parse_config([
      f"--flagfile={FLAGS_FILE}", f"--style_image={args.style}",
      f"--content_image={args.clip}", f"--max_size={size}",
      f"--num_res={args.num_res}", f"--num_iter={args.num_iter}",
      f"--video_num_iter={args.video_num_iter}"])
  return config_lib.replace(config, **changes)


def _independent(args, config, params, convention, workdir):
  """Each frame a whole transfer from its own content (no temporal term)."""
  clip = video_io.read_frames(args.clip, max_frames=args.frames)
  first, _ = video.frame_configs(config)
  synthesizer = synthesize.Synthesizer(first, params, convention)
  styles = [image_io.read_image(p, flag="style_image")[0]
            for p in first.style_image]
  frames, mrf = [], []
  for t in range(len(clip)):
    result = synthesizer.run(synthesize.Inputs(
        contents=[clip[t]], styles=[styles], init_images=[None]))
    frames.append(image_io.to_uint8(result.images[0],
                                    mode=config.output_mode))
    mrf.append(_mrf_energy(result.history[-1]))
  size = frames[0].shape[:2]
  at_size = video._FramesAtSize(clip, size)  # pylint: disable=protected-access
  errors = video.clip_temporal_errors(np.stack(frames), at_size,
                                      pathlib.Path(workdir) / "flows",
                                      config.flow_preset)
  return errors, mrf


def _mrf_energy(record):
  return float(sum(np.mean(v) for k, v in record.items()
                   if k.startswith("mrf_relu")))


def _later_mrf(workdir, num_frames):
  energies = []
  for t in range(1, num_frames):
    log = pathlib.Path(workdir) / "work" / video.frame_name(t) / "log.jsonl"
    energies.append(_mrf_energy(json.loads(
        log.read_text().splitlines()[-1])))
  return energies


def _strip(result, clip_path, num_frames, path):
  """Content frames above, results below, 4 frames spread over the clip."""
  clip = video_io.read_frames(clip_path, max_frames=num_frames)
  picks = np.linspace(0, num_frames - 1, min(4, num_frames)).round()
  rows = []
  for t in picks.astype(int):
    stylised = result.frames[t]
    content = np.asarray(image_io.resize(clip[t], *stylised.shape[:2],
                                         method="torch"))
    rows.append(np.concatenate([image_io.to_uint8(content, mode="clip"),
                                np.full((4,) + stylised.shape[1:], 255,
                                        np.uint8), stylised]))
  gap = np.full((rows[0].shape[0], 4, 3), 255, np.uint8)
  strip = np.concatenate(sum(([r, gap] for r in rows), [])[:-1], axis=1)
  image_io.write_image(path, strip, mode="clip")
  return path


def main(argv=None):
  args = _parse_args(argv)
  if args.clip is None:
    args.clip = fetch_clips.fetch_clips()["vtest.avi"]
  command = "python benchmarks/bench_video.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  params, convention = weights_lib.load_params(None, network="vgg19")
  figures = {}
  print(f"# {command}")
  print(f"# clip {args.clip}, {args.frames} frames, style {args.style}, "
        f"{args.size} px, frame 1 {args.num_res} levels x {args.num_iter} "
        f"iterations, later frames 1 level x {args.video_num_iter}")
  with tempfile.TemporaryDirectory() as scratch:
    scratch = pathlib.Path(args.keep or scratch)
    config = _config(args, args.size)
    t0 = time.perf_counter()
    (error, content_error), mrf = _independent(
        args, config, params, convention, scratch / "independent")
    independent = error / content_error
    figures["independent"] = {"ratio": independent, "mrf": mrf,
                              "seconds": time.perf_counter() - t0}
    print(f"temporal error / content's, independent per-frame transfers: "
          f"{independent:.2f} (content's own error {content_error:.4g})")
    mrf_independent = float(np.mean(mrf[1:]))
    for weight in [0.0] + list(args.temporal_weight):
      workdir = scratch / f"w{weight}"
      t0 = time.perf_counter()
      result = video.run(_config(args, args.size, temporal_weight=weight),
                         video.VideoOptions(args.clip,
                                            max_frames=args.frames),
                         str(workdir), params=params, convention=convention)
      mrf = _later_mrf(workdir, args.frames)
      ratio = result.temporal_error_ratio
      figures[f"temporal_weight={weight:g}"] = {
          "ratio": ratio, "mrf": mrf, "seconds": time.perf_counter() - t0,
          "records": result.records}
      label = (f"--temporal_weight={weight:g}" if weight
               else "--temporal_weight=0 (warped init only)")
      print(f"temporal error / content's, video {label}: {ratio:.2f} "
            f"({independent / ratio:.1f}x lower than independent); MRF "
            f"energy of frames 2+ {np.mean(mrf) / mrf_independent:.2f}x "
            f"the independent frames'")
      if args.strip and weight == args.temporal_weight[0]:
        print(f"strip: {_strip(result, args.clip, args.frames, args.strip)}")
    if args.timing_size:
      workdir = scratch / "timing"
      config = _config(args, args.timing_size,
                       num_iter=(args.timing_first_iter,),
                       temporal_weight=video.DEFAULT_TEMPORAL_WEIGHT)
      result = video.run(config, video.VideoOptions(
          args.clip, max_frames=args.timing_frames), str(workdir),
                         params=params, convention=convention)
      # Frame 2 compiles the later frames' program; frames 3+ compile
      # nothing.
      later = result.records[2:] or result.records[1:]
      seconds = [r["seconds"] for r in later]
      flow_seconds = [r["flow_seconds"] for r in later]
      waits = [r["flow_wait_seconds"] for r in later]
      figures["timing"] = {"size": args.timing_size, "records":
                           result.records}
      print(f"seconds per frame after the second (compiled) at "
            f"{args.timing_size} px ({args.video_num_iter} iterations): "
            f"{np.mean(seconds):.1f} s (frames {', '.join(map(str, seconds))})")
      print(f"flow seconds per frame at {args.timing_size} px (DIS "
            f"{config.flow_preset}, both directions): "
            f"{np.mean(flow_seconds):.2f} s, waited for {np.mean(waits):.2f} "
            f"s per frame: " + ("overlapped" if np.mean(waits) < 0.5 *
                                np.mean(flow_seconds) else "not overlapped"))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"command": command, "figures": figures},
                            indent=1, default=str))


if __name__ == "__main__":
  main()
