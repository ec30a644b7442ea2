"""The solve loop of one pyramid level: blocks, the non-finite guard, Ctrl-C.

One level is `num_iter` L-BFGS iterations, each a single jitted update
(optim.py: one objective evaluation per iteration) dispatched from a Python
loop. Iterations run in blocks that end every `print_every` iterations and
wherever the caller checkpoints or saves an image; only at the end of a
block are the logged scalars of its iterations fetched, in one transfer, so
no host round trip is added inside a block. The fetched values are checked
there: a loss or gradient that turned non-finite stops the run with the last
finite image (`NonFiniteError`). A Ctrl-C (or SIGTERM, which main.py turns
into one) stops it with the position reached (`Interrupted`), so the caller
can write a checkpoint that resumes exactly there.
"""

import contextlib
import pathlib
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


def solve_level(stepper: Any, x: jnp.ndarray, targets: Dict[str, Any], *,
                level: int, num_iter: int, state: Any = None,
                first_iter: int = 0, on_block=None,
                num_pairs: Optional[int] = None, print_every: int = 0,
                block_ends: Sequence[int] = ()
                ) -> Tuple[jnp.ndarray, Any, List[Dict[str, Any]]]:
  """Runs iterations first_iter+1..num_iter from x [N, H, W, 3].

  stepper: init(x, targets) -> state and update(x, state, targets) -> (x,
  state), jitted over the batch (`synthesize.Synthesizer`), and value(state)
  / aux(state), the solver's. num_pairs: log only the first num_pairs pairs
  (the rest are padding). print_every: log every so many iterations (0:
  only at the end). block_ends: other periods at which a block ends (where
  the caller checkpoints or saves an image).

  state: the optimiser state at x (from a checkpoint), or None to start
  the level afresh. Returns (x, state, log) with one log record per
  iteration (and one for the start, iter 0, when starting afresh), every
  loss term and matching statistic per pair. on_block(records, x, state,
  it) runs at the end of every block of iterations (every print_every,
  checkpoint_every and save_every iterations), after the scalars are
  fetched.

  Raises NonFiniteError (carrying the last finite x) if the loss or the
  gradient turns non-finite; the check runs once per block, so no host
  round trip is added inside it.
  """
  history = []
  # (iteration, loss, aux, gradient finite), not yet fetched: copies, as
  # the update donates the state they are read from (`_logged`).
  pending = []
  logged = lambda state: _logged(stepper.value(state), stepper.aux(state),
                                 state)
  if state is None:
    state = stepper.init(x, targets)
    pending.append((0, *logged(state)))
  # The images since the last fetch (references, no copies), to fall back
  # on the last one whose loss and gradient were finite.
  images = {first_iter: x}
  block_start = time.perf_counter()
  block_iters = 0
  print_every = print_every or num_iter or 1
  # A block also ends where the caller checkpoints or saves an image, so
  # that --checkpoint_every and --save_every need not be multiples of it.
  block_ends = [n for n in (print_every, *block_ends) if n]
  # (iteration, x, state) as one value: a Ctrl-C landing between two
  # separate assignments would checkpoint the image of one iteration
  # under the count of another, and --resume would then repeat one.
  position = (first_iter, x, state)
  try:
    for it in range(first_iter + 1, num_iter + 1):
      # The update invalidates the state it is given (donated): a Ctrl-C
      # between its return and this assignment would lose both states, so
      # signals wait until the new one is held.
      with _signals_deferred():
        position = (it, *stepper.update(x, state, targets))
      _, x, state = position
      pending.append((it, *logged(state)))
      images[it] = x
      block_iters += 1
      if it == num_iter or any(it % n == 0 for n in block_ends):
        fetched = jax.device_get(pending)  # one transfer per block
        seconds = (time.perf_counter() - block_start) / max(1, block_iters)
        records = [_record(level, i, v, a, seconds, num_pairs)
                   for i, v, a, _ in fetched]
        bad = []  # (iteration, what turned non-finite)
        for r, (_, _, _, finite_grad) in zip(records, fetched):
          if not np.all(np.isfinite(r["loss"])):
            bad.append((r["iter"], "loss"))
          elif not np.all(finite_grad):
            bad.append((r["iter"], "gradient"))
        if bad:
          first_bad, what = bad[0]
          kept = max([i for i in images if i < first_bad] or [min(images)])
          raise NonFiniteError(
              f"level {level + 1}: the {what} became non-finite at "
              f"iteration {first_bad}; stopping with the image of "
              f"iteration {kept} (try a lower --learning_rate, "
              "--mrf_weight or --content_weight)",
              images[kept], history + [r for r in records
                                       if r["iter"] < first_bad])
        history, pending, block_iters = history + records, [], 0
        images = {it: x}
        if it % print_every == 0 or it == num_iter:
          _log_progress(records[-1], list(fetched[-1][2]["terms"]),
                        num_iter, seconds)
        if on_block is not None:
          on_block(records, x, state, it)
        block_start = time.perf_counter()
  except KeyboardInterrupt:
    done, x, state = position
    known = {r["iter"] for r in history} | {p[0] for p in pending}
    if done > first_iter and done not in known:  # its record was lost
      pending.append((done, *logged(state)))
    records = [_record(level, i, v, a, 0.0, num_pairs)
               for i, v, a, _ in jax.device_get(pending) if i <= done]
    raise Interrupted(level, done, x, state, history + records) from None
  if pending:  # no iterations ran: only the starting record
    history += [_record(level, i, v, a, 0.0, num_pairs)
                for i, v, a, _ in jax.device_get(pending)]
  return x, state, history



@contextlib.contextmanager
def _signals_deferred():
  """SIGINT and SIGTERM received inside are delivered on leaving, to the
  handlers they had (main.py turns SIGTERM into KeyboardInterrupt). Only
  the main thread receives signals; elsewhere this does nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = {}
  for number in (signal.SIGINT, signal.SIGTERM):
    previous[number] = signal.signal(
        number, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    for number, handler in previous.items():
      # None: a handler installed outside Python; the default stands in.
      signal.signal(number, signal.SIG_DFL if handler is None else handler)
    for number in received:
      signal.raise_signal(number)


@jax.jit
def _logged(value, aux, state):
  """(loss, aux, gradient finite) of one iteration, the first two copied
  out of the state (the next update donates it)."""
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  return copy(value), copy(aux), _all_finite(state)


def _all_finite(state) -> jnp.ndarray:
  """[N]: whether each pair's gradient in the optimiser state is finite.

  Reduced per pair, not over the batch: on a sharded batch a reduction over
  N is an all-reduce across devices at every iteration, and on XLA:CPU's
  host devices that collective can deadlock (a device thread waits in the
  rendezvous for one stuck behind it).
  """
  finite = jnp.asarray(True)
  for g in jax.tree.leaves(getattr(state, "grad", None)):  # each [N, ...]
    finite = finite & jnp.all(jnp.isfinite(g), axis=tuple(range(1, g.ndim)))
  return finite


def _record(level, iteration, value, aux, seconds,
            num_pairs=None) -> Dict[str, Any]:
  """One log record; per-pair values are lists (of the first num_pairs)."""
  def plain(a):
    a = np.asarray(a)[:num_pairs]
    return a.tolist()
  record = {"level": level, "iter": int(iteration), "loss": plain(value),
            "seconds_per_iter": round(float(seconds), 4)}
  for name, v in aux["terms"].items():
    record[name] = plain(v)
  for name, v in aux["stats"].items():
    record[name] = plain(v)
  return record


def _log_progress(record, term_names, num_iter, seconds):
  """One progress line: the loss and every term (the mean over the pairs
  of a batch, and it says so)."""
  values = " ".join(f"{k}={np.mean(record[k]):.4g}"
                    for k in ("loss", *term_names))
  pairs = len(record["loss"])
  mean = f" (mean over {pairs} pairs)" if pairs > 1 else ""
  left = (num_iter - record["iter"]) * seconds
  logging.info("level %d iter %d/%d%s %s | %.2f s/iter, %.0f s left in "
               "level", record["level"] + 1, record["iter"], num_iter, mean,
               values, seconds, left)


class NonFiniteError(FloatingPointError):
  """The loss turned non-finite; carries the last finite image [N,H,W,3]."""

  def __init__(self, message, last_finite_x, history):
    super().__init__(message)
    self.last_finite_x = last_finite_x
    self.history = history
    self.paths: List[pathlib.Path] = []  # where run() wrote that image


class Interrupted(KeyboardInterrupt):
  """Ctrl-C or SIGTERM during a solve, with the state reached."""

  def __init__(self, level, iteration, x, state, history):
    super().__init__(f"interrupted at level {level + 1} iteration "
                     f"{iteration}")
    self.level, self.iteration = level, iteration
    self.x, self.state, self.history = x, state, history
