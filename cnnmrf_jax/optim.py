"""Optimisers over the image: the only module that imports jaxopt and optax.

Every optimiser has the same shape: `init(x, *args) -> state` evaluates the
objective once; `update(x, state, *args) -> (x, state)` takes one step and
evaluates the objective once at the new point, so one iteration costs exactly
one forward and backward pass, and `value(state)` / `aux(state)` are the loss
and auxiliary outputs at the current x. The objective is
`fun(x, *args) -> (loss, aux)`.

The default reproduces the reference's torch `optim.lbfgs` configuration
(SPEC section 2): L-BFGS with history 25, no line search, a fixed step 1, the
first step scaled to min(1, 1/|g|_1), and curvature pairs with s.y <= 1e-10
left out of the history (torch skips them; keeping them would make the
inverse-Hessian estimate indefinite when the MRF matching switches).
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

# torch.optim.LBFGS skips the curvature pair when y.s is below this.
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


@dataclasses.dataclass(frozen=True)
class JaxoptLBFGS(_StateAccessors):
  """jaxopt.LBFGS with the reference's fixed step and torch's safeguards."""
  fun: Objective
  history_size: int = 25
  stepsize: float = 1.0

  @property
  def _solver(self):
    return jaxopt.LBFGS(fun=self.fun, has_aux=True, stepsize=self.stepsize,
                        history_size=self.history_size, maxiter=1 << 30,
                        tol=0.0)

  def init(self, x, *args):
    state = self._solver.init_state(x, *args)
    # torch: first step t = min(1, 1/|g|_1) * lr. With an empty history the
    # jaxopt direction is -gamma * g, so gamma carries that scale.
    grad_l1 = sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(state.grad))
    gamma = jnp.minimum(1.0, 1.0 / jnp.maximum(grad_l1, 1e-30))
    return state._replace(gamma=gamma.astype(state.gamma.dtype))

  def update(self, x, state, *args):
    new_x, new_state = self._solver.update(x, state, *args)
    s = jax.tree.map(jnp.subtract, new_x, x)
    y = jax.tree.map(jnp.subtract, new_state.grad, state.grad)
    sy = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(s),
                                           jax.tree.leaves(y)))
    keep = sy > _CURVATURE_EPS
    slot = state.iter_num % self.history_size
    # Left-out pair: zero s, y and rho in its slot (it then adds nothing to
    # the two-loop recursion) and keep the previous gamma. Only the slot is
    # rewritten: a select over the whole history copied 2 x history_size
    # images per iteration (~25 % of the solver's time).
    zero_slot = lambda h: h.at[slot].set(jnp.where(keep, h[slot], 0))
    new_state = new_state._replace(
        s_history=jax.tree.map(zero_slot, new_state.s_history),
        y_history=jax.tree.map(zero_slot, new_state.y_history),
        rho_history=zero_slot(new_state.rho_history),
        gamma=jnp.where(keep, new_state.gamma, state.gamma))
    return new_x, new_state


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

  lbfgs: jaxopt L-BFGS, fixed step `learning_rate` (the reference: 1).
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
