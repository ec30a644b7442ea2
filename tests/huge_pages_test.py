"""Tests for cnnmrf_jax/huge_pages.py: when the command-line tools
re-execute themselves with glibc.malloc.hugetlb=1, and that the re-executed
process keeps its arguments and gets huge pages for a large buffer."""

import os
import pathlib
import subprocess
import sys

import pytest

from cnnmrf_jax import huge_pages

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_thp_mode_and_glibc_version_are_parsed():
  assert huge_pages.thp_mode("always [madvise] never\n") == "madvise"
  assert huge_pages.thp_mode("[always] madvise never") == "always"
  assert huge_pages.thp_mode("") == ""
  assert huge_pages.glibc_version("glibc 2.36") == (2, 36)
  assert huge_pages.glibc_version("glibc 2.35.1") == (2, 35)
  assert huge_pages.glibc_version("musl 1.2") is None
  assert huge_pages.glibc_version(None) is None


@pytest.mark.parametrize("environ, mode, version, expected", [
    ({}, "madvise", (2, 36), "glibc.malloc.hugetlb=1"),
    # The user's tunables are kept; theirs wins where they set it.
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 36),
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), None),
    ({}, "always", (2, 36), None),  # huge pages already
    ({}, "never", (2, 36), None),
    ({}, "madvise", (2, 34), None),  # no such tunable yet
    ({}, "madvise", None, None),     # not glibc
    ({"CNNMRF_HUGE_PAGES": "0"}, "madvise", (2, 36), None),
])
def test_tunables_to_set(environ, mode, version, expected):
  assert huge_pages.tunables_to_set(environ, mode, version) == expected


_CHILD = """
import ctypes, os, sys
from cnnmrf_jax import huge_pages
huge_pages.reexec_with_huge_pages()
# 256 MiB from malloc itself, as XLA:CPU takes its buffers (numpy advises
# huge pages on its own large arrays).
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
address = libc.malloc(256 << 20)
ctypes.memset(address, 1, 256 << 20)
huge = 0
for line in open("/proc/self/smaps_rollup"):
  if line.startswith("AnonHugePages:"):
    huge = int(line.split()[1])
print(os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], huge)
"""


def _eligible():
  try:
    mode = huge_pages.thp_mode(
        pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
        .read_text())
  except OSError:
    return False
  version = huge_pages.glibc_version(os.confstr("CS_GNU_LIBC_VERSION"))
  return (sys.platform.startswith("linux") and mode == "madvise" and
          version is not None and version >= (2, 35))


@pytest.mark.skipif(not _eligible(),
                    reason="needs Linux, glibc >= 2.35 and THP 'madvise'")
@pytest.mark.parametrize("opt_out", [False, True])
def test_the_reexecuted_process_keeps_its_arguments_and_gets_huge_pages(
    opt_out):
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT)}
  if opt_out:
    environ[huge_pages.OPT_OUT] = "0"
  out = subprocess.run([sys.executable, "-c", _CHILD, "--a=1", "b c"],
                       capture_output=True, text=True, env=environ,
                       cwd=_ROOT, check=True).stdout.split(" ", 1)
  tunables, rest = (out if len(out) == 2 else ["", out[0]])
  assert rest.startswith("['--a=1', 'b c'] ")
  huge_kib = int(rest.split()[-1])
  if opt_out:
    assert tunables == "" and huge_kib == 0
  else:
    assert tunables == "glibc.malloc.hugetlb=1"
    assert huge_kib >= 2048  # at least one 2 MiB page
