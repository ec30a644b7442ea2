"""Transparent huge pages for the CPU backend's buffers (Linux, glibc).

XLA:CPU takes every activation, gradient and patch matrix of an evaluation
from malloc, and glibc serves each block over its mmap threshold (32 MiB at
most) by a fresh mmap that it unmaps again when the block is freed. So at
every iteration the kernel faults in and zeroes each 4 KiB page of several
GiB anew: at 2048 px about 30 % of a run's CPU time was the kernel's.
glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and later) has malloc
advise transparent huge pages (madvise(MADV_HUGEPAGE)) on the memory it maps,
which the kernel honours when its THP mode is `madvise`: 2 MiB pages, 512x
fewer faults. With it a 1024 px iteration of the reference transfer with
PatchMatch ran ~15-20 % faster on the 2-core CPU (README, "Speed and
memory"), with the same pixels and the same peak memory.

glibc reads its tunables once, when a process starts. So the command-line
tools (`python -m cnnmrf_jax.main`, `.video`, `.sweep`) execute themselves
again, once, first thing, with the tunable added to GLIBC_TUNABLES
(`reexec_with_huge_pages`); the process keeps its id, arguments and
descriptors. Nothing happens where the kernel's THP mode is `always` (huge
pages already) or `never`, on another C library, or when the environment
says CNNMRF_HUGE_PAGES=0. A library user sets GLIBC_TUNABLES before
starting Python.
"""

import os
import pathlib
import sys
from typing import Mapping, Optional, Tuple

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "CNNMRF_HUGE_PAGES"  # "0": never re-execute
_THP_ENABLED = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(text: str) -> str:
  """The kernel's THP mode from the text of its `enabled` file, e.g.
  'always [madvise] never' -> 'madvise'; '' when unreadable."""
  for word in text.split():
    if word.startswith("[") and word.endswith("]"):
      return word[1:-1]
  return ""


def glibc_version(confstr: Optional[str]) -> Optional[Tuple[int, int]]:
  """(major, minor) from os.confstr('CS_GNU_LIBC_VERSION'), e.g.
  'glibc 2.36' -> (2, 36); None for another C library."""
  if not confstr or not confstr.startswith("glibc "):
    return None
  try:
    major, minor = confstr.split()[1].split(".")[:2]
    return int(major), int(minor)
  except (IndexError, ValueError):
    return None


def tunables_to_set(environ: Mapping[str, str], mode: str,
                    version: Optional[Tuple[int, int]]) -> Optional[str]:
  """The GLIBC_TUNABLES value to re-execute with, or None to run as is."""
  if environ.get(OPT_OUT, "1") == "0" or mode != "madvise":
    return None
  if version is None or version < _MIN_GLIBC:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in current:  # set already (by us, or by the user: theirs wins)
    return None
  return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_huge_pages() -> None:
  """Executes this process's command line again with the tunable set, when
  `tunables_to_set` says so; returns only when it does not (or cannot)."""
  if not sys.platform.startswith("linux"):
    return
  try:
    mode = thp_mode(_THP_ENABLED.read_text())
    version = glibc_version(os.confstr("CS_GNU_LIBC_VERSION"))
  except (OSError, ValueError):
    return
  tunables = tunables_to_set(os.environ, mode, version)
  orig_argv = getattr(sys, "orig_argv", None)
  if tunables is None or not orig_argv or not sys.executable:
    return
  environ = dict(os.environ, GLIBC_TUNABLES=tunables)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + list(orig_argv[1:]),
              environ)
  except OSError:
    return  # run on with 4 KiB pages
