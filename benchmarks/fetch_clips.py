"""Fetches real test clips (OpenCV's sample videos) into a cache directory.

Debian's opencv-doc package ships OpenCV's sample data, among them
examples/data/vtest.avi (768x576, pedestrians) and Megamind.avi. This
script downloads that package with `apt-get download` (no root needed for
the download itself; a stale package list may need `apt-get update` once),
unpacks it with `dpkg-deb -x` in a temporary directory, copies the .avi
clips into the cache and prints their paths. Clips already in the cache
are not fetched again. The clips are not part of the repository.

    python benchmarks/fetch_clips.py                 # ~/.cache/cnnmrf_jax/clips
    python benchmarks/fetch_clips.py --cache_dir /tmp/clips
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Dict

PACKAGE = "opencv-doc"
DATA_DIR = "usr/share/doc/opencv-doc/examples/data"
CLIPS = ("vtest.avi", "Megamind.avi", "tree.avi")
DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "cnnmrf_jax" / "clips"


def fetch_clips(cache_dir: os.PathLike = DEFAULT_CACHE) -> Dict[str, str]:
  """{name: path} of the sample clips in cache_dir, fetched if missing.

  Raises:
    RuntimeError: apt-get or dpkg-deb missing or failing (one line).
  """
  cache_dir = pathlib.Path(cache_dir)
  wanted = {name: cache_dir / name for name in CLIPS}
  if all(path.exists() for path in wanted.values()):
    return {name: str(path) for name, path in wanted.items()}
  for tool in ("apt-get", "dpkg-deb"):
    if shutil.which(tool) is None:
      raise RuntimeError(f"fetch_clips needs {tool} (a Debian/Ubuntu "
                         f"system)")
  cache_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as scratch:
    done = subprocess.run(["apt-get", "download", PACKAGE], cwd=scratch,
                          capture_output=True, text=True, check=False)
    debs = list(pathlib.Path(scratch).glob(f"{PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
      last = (done.stderr.strip().splitlines() or ["no output"])[-1]
      raise RuntimeError(f"apt-get download {PACKAGE} failed: {last} (try "
                         f"apt-get update)")
    unpacked = pathlib.Path(scratch) / "unpacked"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)],
                   check=True, capture_output=True)
    for name, path in wanted.items():
      source = unpacked / DATA_DIR / name
      if source.exists() and not path.exists():
        # Copy beside the destination, then rename: no half-copied clips.
        partial = path.with_name(f".{name}.partial")
        shutil.copyfile(source, partial)
        os.replace(partial, path)
  return {name: str(path) for name, path in wanted.items() if path.exists()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE))
  args = parser.parse_args(argv)
  try:
    clips = fetch_clips(args.cache_dir)
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for name in sorted(clips):
    print(clips[name])
  return 0


if __name__ == "__main__":
  sys.exit(main())
