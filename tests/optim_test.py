"""Tests for cnnmrf_jax.optim: every optimiser against a closed-form minimum,
the default L-BFGS against a numpy transcription of torch optim.lbfgs (the
reference's optimiser), one evaluation per iteration, no recompilation,
vmap over a batch axis."""

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


# torch optim.lbfgs's curvature threshold: a pair with y.s at most this is
# skipped.
TORCH_CURVATURE_EPS = 1e-10


def torch_lbfgs(fun_and_grad, x0, num_iter, history_size, learning_rate=1.0):
  """numpy transcription of torch7 optim.lbfgs, no line search.

  As chuanli11/CNNMRF calls it (mylib/myoptimizer.lua, tolX = tolFun = 0,
  so no early exit fires), evaluating after every step. torch's names are
  kept: y = g - g_old, s = d * t, old_dirs holds the s's and old_stps the
  y's. Returns (iterates [num_iter, n], ys of the pair decided at the start
  of iterations 2..num_iter [num_iter - 1]).
  """
  x = np.array(x0, np.float64)
  _, g = fun_and_grad(x)
  old_dirs, old_stps = [], []
  hdiag = 1.0
  iterates, pair_ys = [], []
  for n_iter in range(1, num_iter + 1):
    if n_iter == 1:
      d = -g
    else:
      y = g - g_old
      s = d * t
      ys = y @ s
      pair_ys.append(ys)
      if ys > TORCH_CURVATURE_EPS:
        if len(old_dirs) == history_size:  # shift history by one
          old_dirs.pop(0)
          old_stps.pop(0)
        old_dirs.append(s)
        old_stps.append(y)
        hdiag = ys / (y @ y)
      k = len(old_dirs)
      ro = [1.0 / (old_stps[i] @ old_dirs[i]) for i in range(k)]
      al = [0.0] * k
      q = -g
      for i in range(k - 1, -1, -1):
        al[i] = (old_dirs[i] @ q) * ro[i]
        q = q - al[i] * old_stps[i]
      r = q * hdiag
      for i in range(k):
        be_i = (old_stps[i] @ r) * ro[i]
        r = r + (al[i] - be_i) * old_dirs[i]
      d = r
    g_old = g
    if n_iter == 1:
      t = min(1.0, 1.0 / np.sum(np.abs(g))) * learning_rate
    else:
      t = learning_rate
    x = x + t * d
    _, g = fun_and_grad(x)
    iterates.append(x)
  return np.stack(iterates), np.array(pair_ys)


# f(x) = sum_i x_i^4 / 4 - 2 x_i^2 + b_i x_i: a tilted double well per
# coordinate, concave where 3 x_i^2 < 4, i.e. |x_i| < 1.15.
WELL_TILT = np.array([0.2, -0.8, 0.1, -0.3])
WELL_START = np.array([-0.09, -0.04, 0.03, 0.0])


def double_wells(x, _=None):
  return (jnp.sum(0.25 * x**4 - 2.0 * x**2 + jnp.asarray(WELL_TILT) * x),
          {})


def double_wells_numpy(x):
  return (np.sum(0.25 * x**4 - 2.0 * x**2 + WELL_TILT * x),
          x**3 - 4.0 * x + WELL_TILT)


def test_lbfgs_follows_torch_update_rules_through_skipped_pairs():
  """20 iterates of optim's L-BFGS equal torch's, history 3, with pairs
  skipped at the first step and again after the history has wrapped.

  The first pair is skipped by construction: the start lies inside every
  well's concave region |x_i| < 1.15, and the first step has L1 length
  min(1, 1/|g|_1) |g|_1 <= 1, so it ends at |x_i| <= 1.09, still inside;
  along it the Hessian diag(3 x^2 - 4) is negative definite, so
  y.s = s^T (mean Hessian) s < 0. The start then takes full steps in the
  wells, crossing back over a hump (another negative y.s) once the three
  slots have been refilled: the reference's trace below asserts both, with
  every y.s far from the threshold so that rounding cannot flip a decision.
  """
  num_iter, history = 20, 3
  # One more reference iteration decides the 20th step's pair too.
  want, pair_ys = torch_lbfgs(double_wells_numpy, WELL_START, num_iter + 1,
                              history)
  want = want[:num_iter]
  accepted = pair_ys > TORCH_CURVATURE_EPS  # [num_iter], pair of step k + 1
  assert np.all((pair_ys < -1e-3) | (pair_ys > 1e-6)), pair_ys
  assert not accepted[0]  # the first pair is skipped
  accepted_before = np.concatenate([[0], np.cumsum(accepted)[:-1]])
  wrapped_skips = np.flatnonzero(~accepted & (accepted_before > history))
  assert wrapped_skips.size and wrapped_skips[0] < num_iter - 5, (
      accepted, accepted_before)  # with accepted pairs and steps after it
  with jax.enable_x64():
    solver = optim.make("lbfgs", double_wells, history_size=history)
    x = jnp.asarray(WELL_START, jnp.float64)
    state = solver.init(x, None)
    update = jax.jit(solver.update)
    got, num_accepted = [], []
    for _ in range(num_iter):
      x, state = update(x, state, None)
      got.append(np.asarray(x))
      num_accepted.append(int(state.num_accepted))
    assert x.dtype == jnp.float64
  np.testing.assert_array_equal(num_accepted, np.cumsum(accepted))
  np.testing.assert_allclose(np.stack(got), want, rtol=0, atol=1e-6)
  assert np.all(np.isfinite(want)) and np.abs(want).max() < 5


def test_lbfgs_after_a_skipped_first_pair_takes_a_full_gradient_step():
  """torch: Hdiag stays 1 until a pair is accepted, and only the first step
  is scaled by min(1, 1/|g|_1): the second step is x2 = x1 - lr * g1."""
  f = lambda x, _: (jnp.sum(jnp.cos(x)), {})  # concave near 0
  rate = 0.5
  solver = optim.make("lbfgs", f, learning_rate=rate)
  x0 = jnp.linspace(0.1, 0.4, 4)
  state = solver.init(x0, None)
  x1, state = solver.update(x0, state, None)
  assert int(state.num_accepted) == 0
  x2, state = solver.update(x1, state, None)
  np.testing.assert_allclose(x2, x1 + rate * jnp.sin(x1), rtol=1e-6)


def test_lbfgs_vmaps_over_a_batch_of_problems():
  """A batch of starts (one skips its first pair, one does not) solves
  each as it would alone: the ring and counts are per problem."""
  solver = optim.make("lbfgs", double_wells, history_size=3)
  starts = jnp.stack([jnp.asarray(WELL_START, jnp.float32),
                      jnp.asarray([2.0, -2.0, 2.0, 2.0])])
  init = jax.jit(jax.vmap(solver.init, in_axes=(0, None)))
  update = jax.jit(jax.vmap(solver.update, in_axes=(0, 0, None)))
  x, state = update(starts, init(starts, None), None)
  # The first start is in the wells' concave region, the second in the
  # convex one (3 x^2 > 4): only the second keeps its first pair.
  np.testing.assert_array_equal(state.num_accepted, [0, 1])
  for _ in range(7):
    x, state = update(x, state, None)
  for n in range(2):
    alone_x, alone_state = starts[n], solver.init(starts[n], None)
    for _ in range(8):
      alone_x, alone_state = solver.update(alone_x, alone_state, None)
    np.testing.assert_allclose(x[n], alone_x, rtol=1e-5, atol=1e-6)
    assert int(state.num_accepted[n]) == int(alone_state.num_accepted)


def test_lbfgs_state_round_trips_through_its_leaves():
  """Checkpoints store the flattened leaves: rebuilding the state from them
  (as --resume does) continues exactly."""
  solver = optim.make("lbfgs", double_wells, history_size=3)
  x = jnp.asarray(WELL_START, jnp.float32)
  state = solver.init(x, None)
  for _ in range(5):
    x, state = solver.update(x, state, None)
  leaves, treedef = jax.tree.flatten(state)
  assert all(isinstance(leaf, jax.Array) for leaf in leaves)
  like = jax.eval_shape(solver.init, x, None)
  assert jax.tree.structure(like) == treedef
  restored = jax.tree.unflatten(
      treedef, [jnp.asarray(np.asarray(leaf)) for leaf in leaves])
  np.testing.assert_array_equal(solver.update(x, restored, None)[0],
                                solver.update(x, state, None)[0])


def test_unknown_optimizer_names_the_flag():
  with pytest.raises(ValueError, match="--optimizer"):
    optim.make("sgd", quadratic)
