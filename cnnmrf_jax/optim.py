"""Optimisers over the image: the only module that imports jaxopt and optax.

Every optimiser has the same shape: `init(x, *args) -> state` evaluates the
objective once; `update(x, state, *args) -> (x, state)` takes one step and
evaluates the objective once at the new point, so one iteration costs exactly
one forward and backward pass, and `value(state)` / `aux(state)` are the loss
and auxiliary outputs at the current x. The objective is
`fun(x, *args) -> (loss, aux)`. States are pytrees of arrays (checkpoints
store their flattened leaves) and every update is jit- and vmap-able.

The default follows the update rules of the reference's optimiser (torch7
`optim.lbfgs` as copied into chuanli11/CNNMRF mylib/myoptimizer.lua, called
with history nCorrection = 25, learningRate 1, no line search), on jaxopt's
L-BFGS engine:
- the first step is x1 = x0 - t g0 with t = min(1, 1/|g0|_1) * lr; every
  later step is x + lr * d, d the two-loop L-BFGS direction;
- a curvature pair (s = x_new - x, y = g_new - g) enters the history only
  when y.s > 1e-10; a skipped pair takes no slot and evicts nothing, so the
  history is always the last `history_size` ACCEPTED pairs;
- the initial inverse-Hessian scale Hdiag = y.s / y.y of the last accepted
  pair, 1 until a pair is accepted (a skipped pair keeps the previous one).
Starting from near-zero noise the first pairs are often skipped; carrying the
tiny first-step scale over to the next steps instead (as jaxopt would) makes
every later step as tiny, and synthesis stalls.
torch's early exits (tolFun on |g|_1, tolX on the step and on |f - f_old|,
and gtd > -tolX) are left out: CNNMRF sets tolX = tolFun = 0 and returns a
zero loss, so they fire only on an exactly zero gradient or step, where a
further update here moves nothing. Iterations are a fixed count.
jaxopt is unmaintained (its L-BFGS lives on as optax.lbfgs): keeping it behind
this module makes the swap a one-file change.
"""

import dataclasses
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

with warnings.catch_warnings():
  # jaxopt warns on import that it is no longer maintained; we know.
  warnings.simplefilter("ignore")
  import jaxopt  # pylint: disable=g-import-not-at-top

Objective = Callable[..., Any]

# torch optim.lbfgs skips a curvature pair whose y.s is at most this.
_CURVATURE_EPS = 1e-10


class _StateAccessors:
  """value(state) / aux(state): the loss and aux at the current x. Both
  solvers' states keep them under these names."""

  @staticmethod
  def value(state):
    return state.value

  @staticmethod
  def aux(state):
    return state.aux


class LBFGSState(NamedTuple):
  """The default L-BFGS's state: jaxopt's, plus the iteration count.

  engine: jaxopt.LBFGS's state (`LbfgsState`), with two fields re-read:
    - engine.iter_num counts the ACCEPTED curvature pairs, not iterations.
      jaxopt writes each new pair into slot iter_num % history_size of its
      ring [history_size, ...], so the ring holds the last history_size
      accepted pairs, the oldest at slot accepted % history_size, which is
      where its two-loop recursion starts.
    - engine.gamma is torch's Hdiag (the initial inverse Hessian is
      Hdiag * I), except before the first step, where it is the first
      step's scale min(1, 1/|g|_1).
  iter_num: iterations taken.
  """
  engine: Any
  iter_num: jnp.ndarray

  # What the rest of the package and the tests read, under jaxopt's names.
  value = property(lambda self: self.engine.value)
  grad = property(lambda self: self.engine.grad)
  aux = property(lambda self: self.engine.aux)
  num_fun_eval = property(lambda self: self.engine.num_fun_eval)
  rho_history = property(lambda self: self.engine.rho_history)
  num_accepted = property(lambda self: self.engine.iter_num)


def _tree_vdot(a, b) -> jnp.ndarray:
  """Sum over leaves of <a, b> (real)."""
  return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a),
                                            jax.tree.leaves(b)))


@dataclasses.dataclass(frozen=True)
class JaxoptLBFGS(_StateAccessors):
  """jaxopt.LBFGS run with torch optim.lbfgs's update rules.

  jaxopt's `update` is the engine: the two-loop direction over its ring, the
  fixed step, the one evaluation, the new pair written into its ring, rho
  and gamma = y.s / y.y. What jaxopt's rules cannot express is done around
  it, on its state:
  - a skipped pair taking no slot: jaxopt writes every pair into slot
    iter_num % history_size. Its iter_num is fed the count of accepted
    pairs, which advances only on acceptance, and a skipped pair's slot gets
    its previous contents back (an accepted pair, or zeros).
  - Hdiag kept on a skipped pair (jaxopt recomputes gamma from the slot it
    just wrote) and 1 until a pair is accepted (jaxopt's gamma is also the
    carrier of the first step's scale): gamma is set after jaxopt's update.
  - the first step's scale min(1, 1/|g|_1): jaxopt's stepsize is a constant
    (or a function of iter_num only); with an empty history its direction
    is -gamma * g, so the initial gamma carries the scale.
  """
  fun: Objective
  history_size: int = 25
  stepsize: float = 1.0

  def __post_init__(self):
    if self.history_size < 1:
      raise ValueError(f"--history_size: got {self.history_size}; expected "
                       "at least 1")

  @property
  def _solver(self):
    return jaxopt.LBFGS(fun=self.fun, has_aux=True, stepsize=self.stepsize,
                        history_size=self.history_size, maxiter=1 << 30,
                        tol=0.0)

  def init(self, x, *args) -> LBFGSState:
    engine = self._solver.init_state(x, *args)
    # torch: first step t = min(1, 1/|g|_1) * lr along d = -g.
    grad_l1 = sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(engine.grad))
    first_scale = jnp.minimum(1.0, 1.0 / jnp.maximum(grad_l1, 1e-30))
    # Strongly typed int32 counts: a weak-typed 0 here would turn strong
    # after the first update and make a jitted update recompile once.
    engine = engine._replace(
        gamma=first_scale.astype(engine.gamma.dtype),
        iter_num=jnp.asarray(0, jnp.int32))
    return LBFGSState(engine, jnp.asarray(0, jnp.int32))

  def update(self, x, state: LBFGSState, *args):
    old = state.engine
    new_x, new = self._solver.update(x, old, *args)
    # The pair as jaxopt stored it (x_new - x, which is torch's t * d up to
    # rounding): torch's ys = y.dot(s).
    s = jax.tree.map(jnp.subtract, new_x, x)
    y = jax.tree.map(jnp.subtract, new.grad, old.grad)
    accept = _tree_vdot(s, y) > _CURVATURE_EPS
    slot = old.iter_num % self.history_size
    # A skipped pair's slot gets back what it held. Only the slot is
    # rewritten: a select over the whole ring would copy 2 x history_size
    # images per iteration.
    restore = lambda h_new, h_old: h_new.at[slot].set(
        jnp.where(accept, h_new[slot], h_old[slot]))
    hessian_scale_if_skipped = jnp.where(
        state.iter_num == 0, jnp.ones_like(old.gamma), old.gamma)
    new = new._replace(
        iter_num=old.iter_num + accept.astype(old.iter_num.dtype),
        s_history=jax.tree.map(restore, new.s_history, old.s_history),
        y_history=jax.tree.map(restore, new.y_history, old.y_history),
        rho_history=restore(new.rho_history, old.rho_history),
        gamma=jnp.where(accept, new.gamma, hessian_scale_if_skipped))
    return new_x, LBFGSState(new, state.iter_num + 1)


class OptaxState(NamedTuple):
  """optax state plus the objective's value, gradient and aux at x."""
  opt_state: Any
  value: jnp.ndarray
  grad: Any
  aux: Any
  iter_num: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class OptaxSolver(_StateAccessors):
  """Any optax GradientTransformation (no line search) in the same shape."""
  fun: Objective
  transform: optax.GradientTransformation

  def _value_and_grad(self, x, *args):
    return jax.value_and_grad(self.fun, has_aux=True)(x, *args)

  def init(self, x, *args):
    (value, aux), grad = self._value_and_grad(x, *args)
    opt_state = self.transform.init(x)
    # optax inits some scalars weak-typed; a jitted step would recompile on
    # its second call unless they are cast once here.
    opt_state = jax.tree.map(lambda a: jnp.asarray(a, jnp.asarray(a).dtype),
                             opt_state)
    return OptaxState(opt_state, value, grad, aux, jnp.asarray(0, jnp.int32))

  def update(self, x, state, *args):
    updates, opt_state = self.transform.update(
        state.grad, state.opt_state, x, value=state.value, grad=state.grad,
        value_fn=lambda p: self.fun(p, *args)[0])
    new_x = optax.apply_updates(x, updates)
    (value, aux), grad = self._value_and_grad(new_x, *args)
    return new_x, OptaxState(opt_state, value, grad, aux, state.iter_num + 1)


def make(name: str, fun: Objective, *, history_size: int = 25,
         learning_rate: float = 1.0):
  """Returns the optimiser called `name` ('lbfgs', 'optax_lbfgs', 'adam').

  lbfgs: jaxopt L-BFGS with torch optim.lbfgs's rules (`JaxoptLBFGS`),
    fixed step `learning_rate` (the reference: 1).
  optax_lbfgs: optax.lbfgs without line search, the same fixed step.
  adam: optax.adam(learning_rate); pixels live in the Caffe 0-255 scale, so
    useful rates are around 1-10.
  """
  if name == "lbfgs":
    return JaxoptLBFGS(fun, history_size=history_size, stepsize=learning_rate)
  if name == "optax_lbfgs":
    return OptaxSolver(fun, optax.lbfgs(learning_rate=learning_rate,
                                        memory_size=history_size,
                                        linesearch=None))
  if name == "adam":
    return OptaxSolver(fun, optax.adam(learning_rate))
  raise ValueError(f"--optimizer: unknown optimizer {name!r}; expected "
                   "lbfgs, optax_lbfgs or adam")
