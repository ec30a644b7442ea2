"""Milliseconds of DIS optical flow per frame, for presets ultrafast..medium.

Reads the first frames of a clip (default OpenCV's vtest.avi, fetched by
benchmarks/fetch_clips.py), resizes them to --size px on the long side, and
times `flow.dis_flow` for each consecutive pair, both directions (what one
video frame needs for the previous-frame temporal term), presets
round-robin per pair (absolute times on a shared CPU drift; compare the
ratios within one run). Also reports, per preset, the mean consistency
weight (the fraction of pixels the flow tracks reliably) and the content
clip's own c-weighted warping error (`temporal.temporal_error`), the
baseline a stylised clip's error is divided by; and the time of
`flow.consistency_weights` (jitted, after a warm-up).

    python benchmarks/bench_flow.py                       # vtest, 384 px
    python benchmarks/bench_flow.py --clip my.mp4 --size 512 --pairs 20
"""

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cv2  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from benchmarks import fetch_clips  # pylint: disable=g-import-not-at-top
from cnnmrf_jax import flow
from cnnmrf_jax import temporal
from cnnmrf_jax import video_io


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clip", default=None,
                      help="video file or frames (default vtest.avi)")
  parser.add_argument("--size", type=int, default=384, help="long side, px")
  parser.add_argument("--pairs", type=int, default=12,
                      help="consecutive frame pairs timed")
  parser.add_argument("--presets", nargs="+", default=list(flow.PRESETS))
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  path = args.clip or fetch_clips.fetch_clips()["vtest.avi"]
  clip = video_io.read_frames(path, max_frames=args.pairs + 1)
  scale = args.size / max(clip.height, clip.width)
  size = (round(clip.width * scale), round(clip.height * scale))
  frames = [cv2.resize(clip.uint8(t), size, interpolation=cv2.INTER_AREA)
            for t in range(len(clip))]
  print(f"clip {path}: {len(frames)} frames {clip.width}x{clip.height} -> "
        f"{size[0]}x{size[1]}; cv2 {cv2.__version__}, "
        f"{cv2.getNumThreads()} OpenCV threads")
  for preset in args.presets:  # warm-up: first calls allocate
    flow.dis_flow(frames[0], frames[1], preset=preset)
  seconds = {preset: [] for preset in args.presets}
  flows = {preset: [] for preset in args.presets}
  for t in range(1, len(frames)):
    for preset in args.presets:
      start = time.perf_counter()
      forward = flow.dis_flow(frames[t - 1], frames[t], preset=preset)
      backward = flow.dis_flow(frames[t], frames[t - 1], preset=preset)
      seconds[preset].append(time.perf_counter() - start)
      flows[preset].append((forward, backward))
  content = np.stack(frames).astype(np.float32) / 255.0
  weights_time = None
  print(f"{'preset':>10} {'ms/frame (2 flows)':>19} {'ms/flow':>8} "
        f"{'mean c':>7} {'content error':>14}")
  for preset in args.presets:
    weights = []
    for forward, backward in flows[preset]:
      weights.append(flow.consistency_weights(forward, backward))
    if weights_time is None:
      forward, backward = flows[preset][0]
      jax.block_until_ready(flow.consistency_weights(forward, backward))
      start = time.perf_counter()
      for _ in range(10):
        jax.block_until_ready(flow.consistency_weights(forward, backward))
      weights_time = (time.perf_counter() - start) / 10
    weights = np.stack(weights)
    backward_flows = np.stack([b for _, b in flows[preset]])
    error = float(temporal.temporal_error(content, backward_flows, weights))
    median = statistics.median(seconds[preset]) * 1e3
    print(f"{preset:>10} {median:19.1f} {median / 2:8.1f} "
          f"{weights.mean():7.3f} {error:14.2e}")
  print(f"consistency_weights (jit, {jax.default_backend()}): "
        f"{weights_time * 1e3:.1f} ms per pair")
  return 0


if __name__ == "__main__":
  sys.exit(main())
