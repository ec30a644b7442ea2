"""Atomic file writes: nothing the user had is left half-written.

Every file the project writes (weights caches, images, logs, checkpoints)
goes through `atomic_write`: the content is written to a temporary file in the
destination's directory, flushed and fsynced, then renamed over the
destination in one step, so a crash or a failing writer leaves the previous
file (or no file) in place, never a partial one. A writer killed mid-write
(kill -9) leaves its temporary file, `.NAME.<random>.tmp`;
`remove_temp_files` removes those of a directory's own files, for the
holder of the directory's lock.

`DirectoryLock` is the lock: an OS file lock on a file in the directory,
which dies with its process, so a killed process never leaves it held.
"""

import contextlib
import errno
import os
import pathlib
import re
import tempfile
import time
from typing import BinaryIO, Callable, Iterator, List, Optional, Sequence, Union

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # Not POSIX: directories are not locked.
  fcntl = None

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


# ----------------------------------------------------------------------------
# Temporary files left by killed writers.

# tempfile.mkstemp's random part: 8 of these characters.
_TEMP_RANDOM = r"[a-z0-9_]{8}"


def temp_file_pattern(names: Sequence[str]) -> "re.Pattern[str]":
  """The names `atomic_open` gives the temporary files of files whose names
  match one of the regular expressions `names`: `.NAME.<random>.tmp`."""
  alternatives = "|".join(f"(?:{name})" for name in names)
  return re.compile(rf"\.(?:{alternatives})\.{_TEMP_RANDOM}\.tmp")


def remove_temp_files(directory: PathLike, pattern: "re.Pattern[str]"
                      ) -> List[str]:
  """Removes the files in `directory` whose names match `pattern` in full;
  returns their names, sorted. Only for a directory whose writers all hold
  its lock (`DirectoryLock`), by the holder: then no live writer owns them.
  """
  removed = []
  with os.scandir(directory) as entries:
    for entry in entries:
      if pattern.fullmatch(entry.name) and entry.is_file(
          follow_symlinks=False):
        with contextlib.suppress(FileNotFoundError):
          os.unlink(entry.path)
          removed.append(entry.name)
  return sorted(removed)


# ----------------------------------------------------------------------------
# Directory locks.


class LockHeldError(OSError):
  """Raised when another process holds a directory's lock.

  pid: the holder's process id as it wrote it in the lock file (None when
  it could not be read).
  """

  def __init__(self, path: pathlib.Path, pid: Optional[int]):
    super().__init__(errno.EWOULDBLOCK, "locked by another process",
                     str(path))
    self.pid = pid


class DirectoryLock:
  """An exclusive OS file lock (flock) on DIRECTORY/NAME.

  The lock belongs to an open file description, so it dies with its
  process, kill -9 included: a lock file a killed process left is free to
  the next one. The holder writes its pid into the file (for the message
  of whoever finds it held) and removes the file before it unlocks; one
  that locked the file just as it was removed finds that the path names
  another file (or none) and locks again, so two processes never both hold
  it. File descriptors are not inherited by child processes (PEP 446), so
  a child that outlives its parent does not keep the lock.

  Without fcntl (not POSIX) acquire and release do nothing.
  """

  def __init__(self, directory: PathLike, name: str):
    self.path = pathlib.Path(directory) / name
    self._fd: Optional[int] = None

  def acquire(self, wait_seconds: float = 0.2) -> None:
    """Takes the lock, trying for `wait_seconds` (covering a holder that is
    just releasing it, or a reader probing it); else LockHeldError. An
    OSError opening the lock file (a read-only directory) propagates."""
    if fcntl is None:
      return
    deadline = time.monotonic() + wait_seconds
    while True:
      fd = self._try_lock()
      if fd is not None:
        break
      if time.monotonic() >= deadline:
        raise LockHeldError(self.path, read_lock_pid(self.path))
      time.sleep(0.02)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd

  def _try_lock(self) -> Optional[int]:
    """A descriptor of the lock file, locked, or None if it is held."""
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          os.close(fd)
          return None
        if _names(self.path, fd):
          return fd
      except BaseException:
        os.close(fd)
        raise
      os.close(fd)  # locked a file its holder had just removed: again

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.unlink(self.path)
    os.close(self._fd)
    self._fd = None


def _names(path: pathlib.Path, fd: int) -> bool:
  """Whether `path` names the file open as `fd`."""
  held = os.fstat(fd)
  try:
    current = os.stat(path)
  except FileNotFoundError:
    return False
  return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def read_lock_pid(path: PathLike) -> Optional[int]:
  """The pid a lock's holder wrote in `path`, or None."""
  for _ in range(5):  # the holder writes it just after it locks
    try:
      text = pathlib.Path(path).read_text().strip()
    except OSError:
      return None
    if text.isdigit():
      return int(text)
    time.sleep(0.01)
  return None


def is_locked(directory: PathLike, name: str) -> bool:
  """Whether a live process (this one included) holds DIRECTORY/NAME's
  DirectoryLock. Probes with a shared lock taken and dropped at once."""
  if fcntl is None:
    return False
  try:
    fd = os.open(pathlib.Path(directory) / name, os.O_RDONLY)
  except OSError:  # no lock file: nobody holds it
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return True
  finally:
    os.close(fd)  # closing drops the probe's lock
  return False
