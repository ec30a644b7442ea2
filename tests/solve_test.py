"""Tests of the solve loop (solve.py) with an update that donates its state.

The Synthesizer's update donates the optimiser state it reads, so the L-BFGS
rings are written in place: these check that it does, that the loop's
logged values survive the donation (it copies them out), and that a Ctrl-C
arriving while an update runs stops the loop with the update's new state,
valid, rather than the donated one. A small quadratic stands in for the
objective where the synthesis is not the point.
"""

import signal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import plan as plan_lib
from cnnmrf_jax import solve
from cnnmrf_jax import synthesize
from cnnmrf_jax import targets as targets_lib


class _State(NamedTuple):
  value: jnp.ndarray  # [N]
  grad: jnp.ndarray  # [N, H, W, 3]
  ring: jnp.ndarray  # [N, 4, H, W, 3]: stands in for L-BFGS's history


class _Quadratic:
  """Gradient descent on sum((x - 1)^2) with a donating jitted update."""

  def __init__(self, on_update=None):
    self.on_update = on_update
    self.calls = 0
    self._update = jax.jit(self._step, donate_argnums=(1,))

  @staticmethod
  def _state(x, ring):
    value = jnp.sum(jnp.square(x - 1), axis=(1, 2, 3))
    return _State(value, 2 * (x - 1), ring)

  def init(self, x, targets):
    del targets
    return self._state(x, jnp.zeros((x.shape[0], 4) + x.shape[1:]))

  def _step(self, x, state, targets):
    del targets
    x = x - 0.25 * state.grad
    ring = jnp.roll(state.ring, 1, axis=1).at[:, 0].set(x)
    return x, self._state(x, ring)

  def update(self, x, state, targets):
    self.calls += 1
    out = self._update(x, state, targets)
    if self.on_update is not None:
      self.on_update(self.calls)
    return out

  def value(self, state):
    return state.value

  def aux(self, state):
    return {"terms": {"quadratic": state.value}, "stats": {}}


def _x():
  return jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 5, 3)),
                     jnp.float32)


def test_logged_values_survive_the_donated_states():
  stepper = _Quadratic()
  x, state, history = solve.solve_level(stepper, _x(), {}, level=0,
                                        num_iter=6, print_every=4)
  assert [r["iter"] for r in history] == list(range(7))
  losses = [r["loss"][0] for r in history]
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert [r["quadratic"] for r in history] == [r["loss"] for r in history]
  np.testing.assert_allclose(state.value, np.sum((np.asarray(x) - 1) ** 2),
                             rtol=1e-5)


@pytest.fixture
def ctrl_c_interrupts():
  """SIGINT raises KeyboardInterrupt for the test (a process started in
  the background inherits it ignored)."""
  saved = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, saved)


def test_a_signal_during_an_update_stops_with_its_new_state(
    ctrl_c_interrupts):
  del ctrl_c_interrupts
  def interrupt(calls):
    if calls == 3:  # Ctrl-C while the third update runs
      signal.raise_signal(signal.SIGINT)

  stepper = _Quadratic(on_update=interrupt)
  with pytest.raises(solve.Interrupted) as stopped:
    solve.solve_level(stepper, _x(), {}, level=0, num_iter=6, print_every=4)
  interrupted = stopped.value
  # The third update's result is kept: its state is valid (the second
  # one's was donated to it) and matches its image.
  assert interrupted.iteration == 3
  assert not any(leaf.is_deleted()
                 for leaf in jax.tree.leaves(interrupted.state))
  np.testing.assert_allclose(
      jax.device_get(interrupted.state.value),
      np.sum((np.asarray(interrupted.x) - 1) ** 2, axis=(1, 2, 3)),
      rtol=1e-6)
  assert [r["iter"] for r in interrupted.history] == [0, 1, 2, 3]
  # The handler is back: a later Ctrl-C is a KeyboardInterrupt again.
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_synthesizers_update_donates_its_state(tiny_images,
                                                   random_vgg19):
  config = config_lib.Config(
      content_image=tiny_images["content"],
      style_image=(tiny_images["style"],), max_size=32, num_res=1,
      num_iter=(2,), mrf_layers=("relu2_1",), content_layers=("relu2_1",),
      conv="xla")
  synthesizer = synthesize.Synthesizer(config, *random_vgg19)
  inputs = synthesize.load_inputs(config)
  run_plan = plan_lib.make(config, inputs.sizes())
  level = run_plan.levels[0]
  targets = targets_lib.level_targets(config, run_plan, level, inputs,
                                      synthesizer.features)
  x = jnp.asarray(targets_lib.initial_images(config, inputs, level.size,
                                             synthesizer.convention))
  state = synthesizer.init(x, targets)
  history = state.engine.s_history
  assert history.shape[1] == config.history_size
  new_x, new_state = synthesizer.update(x, state, targets)
  assert history.is_deleted()  # written in place, not copied
  assert not x.is_deleted()
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))
  assert np.all(np.isfinite(np.asarray(synthesizer.value(new_state))))
  assert not np.array_equal(np.asarray(new_x), np.asarray(x))
