"""Logging set-up of the command lines: INFO, without start-up noise.

JAX logs at INFO, on every machine without a TPU, that it could not open
libtpu.so while it looks for backends; it means nothing to a user of a CPU
or GPU run, so that one logger is raised to WARNING (its warnings, and every
other INFO line, still show).
"""

import logging as std_logging

from absl import logging

# The logger of JAX's backend discovery ("Unable to initialize backend").
_BACKEND_LOGGER = "jax._src.xla_bridge"


def quiet_startup() -> None:
  """INFO logging for our modules; JAX's backend probing only from
  WARNING up."""
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger(_BACKEND_LOGGER).setLevel(std_logging.WARNING)
