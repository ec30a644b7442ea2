"""JAX's persistent compilation cache, for --compilation_cache=DIR.

Every pyramid level compiles its own programs (the solver's init and update,
and a VGG forward pass per style copy shape), seconds a level on a CPU. With
a cache directory, a later run of the same shapes (a sweep over weights,
seeds or images of one size) loads the compiled executables instead.

The cache is trusted code: executables in it are run as they are. Do not
point it at a directory others can write to.
"""

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

# Cache everything: the per-copy VGG forward passes of the style targets
# compile in 0.1-0.4 s each, below JAX's default 1 s threshold, and there
# are 10 of them a level with 9 style copies.
_MIN_COMPILE_SECONDS = 0.0


def enable(directory: str) -> str:
  """Uses `directory` (created if missing) as the persistent cache.

  Safe to call more than once, and after other programs were compiled: JAX
  decides whether a cache is in use at its first compilation, so a change of
  directory resets that decision. Returns the absolute directory.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  if jax.config.jax_compilation_cache_dir == directory:
    return directory
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    _MIN_COMPILE_SECONDS)
  compilation_cache.reset_cache()
  return directory


def disable() -> None:
  """Stops reading and writing the persistent cache (tests, benchmarks)."""
  jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()
