"""What every weights reader shares: the error, strict checks and naming.

`WeightsError` is the one error the package raises for weights that are
missing, unreadable, corrupt or of the wrong shape. `reading` turns whatever
a malformed file makes a reader raise into one WeightsError naming the file.
`check_params` checks a parameter tree {'conv1_1': {'kernel': [3, 3, I, O],
'bias': [O]}, ...} strictly against `vgg.conv_shapes(network)`. The naming
helpers give converted layers their VGG names (conv1_1, ...) from their
order, and tell VGG19 from VGG16 by the number of conv layers; `sha256_file`
identifies downloaded archives and cached files.
"""

import contextlib
import hashlib
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from cnnmrf_jax import vgg

PathLike = Union[str, os.PathLike]
Params = Dict[str, Dict[str, np.ndarray]]
# What every reader returns: (params, network, convention).
Converted = Tuple[Params, str, str]


class WeightsError(ValueError):
  """Weights that are missing, unreadable, corrupt or of the wrong shape."""


# Everything a malformed file can make the readers raise; turned into one
# WeightsError naming the file.
READ_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError,
               TypeError, AttributeError, MemoryError, zipfile.BadZipFile,
               zlib.error, struct.error, pickle.UnpicklingError,
               tarfile.TarError)


@contextlib.contextmanager
def reading(where: Any, what: str) -> Iterator[None]:
  """Re-raises READ_ERRORS as "WHERE: cannot read WHAT (Type: message)"."""
  try:
    yield
  except WeightsError:
    raise
  except READ_ERRORS as e:
    raise WeightsError(f"{where}: cannot read {what} ({type(e).__name__}: "
                       f"{e})") from e


def check_params(params: Params, network: str = "vgg19", *,
                 where: Any = "params",
                 file_network: Optional[str] = None) -> Params:
  """Strictly checks `params` against `vgg.conv_shapes(network)`.

  Returns the same tree with float32 C-contiguous numpy arrays. Raises one
  WeightsError naming `where` and listing missing, extra and mis-shaped
  (or non-float, or non-finite) keys, and saying so when `file_network`,
  the network recorded in the file, differs from `network`.
  """
  check_network(network)
  expected = {f"{layer}/{leaf}": shape
              for layer, leaves in vgg.conv_shapes(network).items()
              for leaf, shape in leaves.items()}
  found = {}
  problems = []
  for layer, leaves in params.items():
    if not isinstance(leaves, dict):
      problems.append(f"{layer} is a {type(leaves).__name__}, not a dict")
      continue
    for leaf, value in leaves.items():
      found[f"{layer}/{leaf}"] = value
  missing = [k for k in expected if k not in found]
  extra = [k for k in found if k not in expected]
  misshaped = []
  non_finite = []
  out: Params = {}
  for key, shape in expected.items():
    if key not in found:
      continue
    value = np.asarray(found[key])
    if value.dtype.kind != "f":
      misshaped.append(f"{key} has dtype {value.dtype}")
    elif value.shape != tuple(shape):
      misshaped.append(f"{key} is {value.shape}, expected {tuple(shape)}")
    elif not np.isfinite(value).all():
      # A corrupt conversion, not a shape problem, but just as fatal.
      non_finite.append(key)
    else:
      layer, leaf = key.split("/")
      out.setdefault(layer, {})[leaf] = np.ascontiguousarray(value,
                                                             np.float32)
  if file_network is not None and file_network != network:
    problems.insert(0, (
        f"the file holds {file_network} weights but {network} was requested "
        f"(use --network {file_network}, or {network} weights)"))
  if missing:
    problems.append("missing: " + _listing(
        [f"{k} {tuple(expected[k])}" for k in missing]))
  if extra:
    problems.append("extra: " + _listing(
        [f"{k} {np.shape(found[k])}" for k in extra]))
  if misshaped:
    problems.append("mis-shaped: " + _listing(misshaped))
  if non_finite:
    problems.append("holding NaN or Inf: " + _listing(non_finite))
  if problems:
    raise WeightsError(f"{where}: weights do not match {network}: " +
                       "; ".join(problems))
  return out


def _listing(items: List[str], limit: int = 12) -> str:
  # A file of another architecture mismatches every key; the first few say
  # enough and keep the message readable on one line.
  text = ", ".join(items[:limit])
  if len(items) > limit:
    text += f", ... ({len(items) - limit} more)"
  return text


def check_network(network: str, where: Any = None) -> None:
  """Raises WeightsError unless `network` is one of vgg.NETWORKS."""
  if network not in vgg.NETWORKS:
    prefix = f"{where}: " if where is not None else ""
    raise WeightsError(f"{prefix}unknown network {network!r}; expected one "
                       f"of {vgg.NETWORKS}")


def check_convention(convention: str, where: Any = None) -> None:
  """Raises WeightsError unless `convention` is one of vgg.CONVENTIONS."""
  if convention not in vgg.CONVENTIONS:
    prefix = f"{where}: " if where is not None else ""
    raise WeightsError(f"{prefix}unknown convention {convention!r}; "
                       f"expected one of {vgg.CONVENTIONS}")


def network_from_names(params: Params, where: Any) -> str:
  """The network whose conv layer names are exactly those of `params`."""
  for network in vgg.NETWORKS:
    if set(params) == set(vgg.conv_shapes(network)):
      return network
  raise WeightsError(f"{where}: no __network__ entry and its layers "
                     f"{sorted(params)} match neither VGG19 nor VGG16")


def network_from_count(count: int, where: Any) -> str:
  """The network with `count` conv layers; the converters name layers by
  their order, so the count is what tells VGG19 from VGG16."""
  by_count = {len(vgg.conv_shapes(n)): n for n in vgg.NETWORKS}
  if count not in by_count:
    raise WeightsError(
        f"{where}: holds {count} conv layers; expected " + " or ".join(
            f"{c} ({n})" for c, n in sorted(by_count.items(), reverse=True)))
  return by_count[count]


def named_in_order(convs: List[Tuple[np.ndarray, np.ndarray]],
                   where: Any) -> Tuple[Params, str]:
  """[(kernel HWIO, bias), ...] in forward order -> (params, network)."""
  network = network_from_count(len(convs), where)
  names = list(vgg.conv_shapes(network))
  params = {name: {"kernel": kernel, "bias": bias}
            for name, (kernel, bias) in zip(names, convs)}
  return params, network


def oihw_to_hwio(kernel: np.ndarray, where: Any, name: str) -> np.ndarray:
  """A conv kernel [O, I, H, W] -> float32 [H, W, I, O]."""
  # Caffe and torch both store [O, I, H, W] and compute a cross-correlation,
  # as lax.conv does, so only the axes move; no spatial flip.
  if kernel.ndim != 4:
    raise WeightsError(f"{where}: {name} kernel has shape {kernel.shape}; "
                       "expected [O, I, H, W]")
  return np.ascontiguousarray(kernel.transpose(2, 3, 1, 0), np.float32)


def sha256_file(path: PathLike) -> str:
  """The hex sha256 of the file at `path`, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
