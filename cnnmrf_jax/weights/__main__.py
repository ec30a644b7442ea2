"""`python -m cnnmrf_jax.weights fetch|convert ...`; see weights/cli.py."""

import sys

from cnnmrf_jax.weights import cli

if __name__ == "__main__":
  sys.exit(cli.main())
