"""Atomic file writes: nothing the user had is left half-written.

Every file the project writes (weights caches, images, logs, checkpoints)
goes through `atomic_write`: the content is written to a temporary file in the
destination's directory, flushed and fsynced, then renamed over the
destination in one step, so a crash or a failing writer leaves the previous
file (or no file) in place, never a partial one.
"""

import contextlib
import os
import pathlib
import tempfile
from typing import BinaryIO, Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


class ExistsError(FileExistsError):
  """Raised when a result exists and overwriting was not asked for."""


@contextlib.contextmanager
def atomic_open(path: PathLike, *, overwrite: bool = True
                ) -> Iterator[BinaryIO]:
  """Yields a binary file; on clean exit it atomically replaces `path`.

  If the body raises, the temporary file is removed and `path` is untouched.
  With overwrite=False an existing `path` raises ExistsError before writing.
  """
  path = pathlib.Path(path)
  if not overwrite and path.exists():
    raise ExistsError(f"{path} exists; pass --overwrite to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    # mkstemp makes the file 0600; results should get the usual 0666 & ~umask.
    os.chmod(tmp, 0o666 & ~_umask())
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    if isinstance(e, OSError) and e.errno and not e.filename:
      e.filename = str(path)  # so "No space left on device" says where
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None], *,
                 overwrite: bool = True) -> pathlib.Path:
  """Calls write(f) on a temporary file, then renames it to `path`."""
  with atomic_open(path, overwrite=overwrite) as f:
    write(f)
  return pathlib.Path(path)


def atomic_write_bytes(path: PathLike, data: bytes, *,
                       overwrite: bool = True) -> pathlib.Path:
  """Atomically writes `data` to `path`."""
  return atomic_write(path, lambda f: f.write(data), overwrite=overwrite)
