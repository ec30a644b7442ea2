"""Tests for cnnmrf_jax.optim: every optimiser against a closed-form minimum,
the reference's first step, one evaluation per iteration, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnmrf_jax import optim

DIAG = jnp.arange(1.0, 11.0)


def quadratic(x, b):
  """0.5 x^T A x - b^T x with A = diag(1..10); minimum A^-1 b."""
  return 0.5 * jnp.sum(DIAG * x * x) - jnp.dot(b, x), {"sum": jnp.sum(x)}


@pytest.mark.parametrize("name, rate, iters, tol", [
    ("lbfgs", 1.0, 30, 1e-5), ("optax_lbfgs", 1.0, 30, 1e-5),
    ("adam", 0.05, 600, 1e-2)])
def test_reaches_the_minimum(name, rate, iters, tol):
  solver = optim.make(name, quadratic, learning_rate=rate)
  b = jnp.ones(10)
  x = jnp.zeros(10)
  state = solver.init(x, b)
  update = jax.jit(solver.update)
  for _ in range(iters):
    x, state = update(x, state, b)
  np.testing.assert_allclose(x, 1.0 / DIAG, atol=tol)
  np.testing.assert_allclose(solver.value(state), quadratic(x, b)[0],
                             rtol=1e-6)
  np.testing.assert_allclose(solver.aux(state)["sum"], jnp.sum(x), rtol=1e-6)


def test_lbfgs_first_step_is_the_references():
  """torch optim.lbfgs: x1 = x0 - min(1, 1/|g|_1) g."""
  solver = optim.make("lbfgs", quadratic)
  b = jnp.linspace(1.0, 3.0, 10)
  x0 = jnp.zeros(10)
  state = solver.init(x0, b)
  x1, _ = solver.update(x0, state, b)
  g = DIAG * x0 - b
  np.testing.assert_allclose(x1, x0 - min(1.0, 1.0 / float(jnp.sum(jnp.abs(g))))
                             * g, rtol=1e-6)


def test_one_evaluation_per_iteration_and_one_trace():
  calls = {"traces": 0}

  def counted(x, b):
    calls["traces"] += 1
    return quadratic(x, b)

  solver = optim.make("lbfgs", counted)
  update = jax.jit(solver.update)
  x, b = jnp.zeros(10), jnp.ones(10)
  state = solver.init(x, b)
  before = calls["traces"]
  for _ in range(5):
    x, state = update(x, state, b)
  assert calls["traces"] - before == 1  # traced once, one evaluation in it
  assert int(state.num_fun_eval) == 6  # init + 5 updates


def test_negative_curvature_pair_is_left_out():
  """A concave direction must not enter the history (torch skips it)."""
  f = lambda x, _: (jnp.sum(jnp.cos(x)), {})
  solver = optim.make("lbfgs", f)
  x = jnp.full(4, 0.1)
  state = solver.init(x, None)
  x, state = solver.update(x, state, None)
  assert float(jnp.abs(state.rho_history).sum()) == 0.0
  assert np.all(np.isfinite(x))


def test_unknown_optimizer_names_the_flag():
  with pytest.raises(ValueError, match="--optimizer"):
    optim.make("sgd", quadratic)
