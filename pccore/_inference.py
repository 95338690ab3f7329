r"""Inference methods as objects: a step contract, and the one driver loop that runs it.

An inference method moves the activities $z$ towards a minimum of the energy
$\mathcal F = \sum_i F_i$. A family subclasses [`pccore.AbstractInference`][] and writes one
step; the driver owns everything else: the gradient at each new point, the steady-state test
([`pccore.SteadyState`][]) on that gradient, the count of gradient evaluations, the step
budget (`max_steps`), saving at step counts (`diffrax.SaveAt(ts=...)`), and (in `_finish`)
the divergence and stability checks. Pass an instance as `solver=` to [`pccore.infer`][],
[`pccore.train_step`][] or [`pccore.TrainStep`][].

Optax optimisers on the activities run through this driver ([`pccore.OptaxInference`][]; an
optax `GradientTransformation` given as `solver=` is the shorthand). Diffrax solvers and
optimistix minimisers keep their specialised loops (a time axis and adaptive steps; an
optimistix state machine), which fuse work the contract cannot express.
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
from jaxtyping import PRNGKeyArray

from ._custom_types import Activities, Scalar
from ._results import RESULTS


class Fields(NamedTuple):
    r"""What a step may evaluate: the activity gradient $\nabla_z \mathcal F$ and the energy
    $\mathcal F$ (batch sums), on the model, data and energy of the solve.

    Inside a training step a joint method ([`pccore.AbstractJointInference`][]) also gets
    `param_grad(z, params)`, the gradient $\nabla_\theta \mathcal L$ of the batch-mean
    parameter objective (regularisers included) at the activities `z`, and
    `param_update(grads, opt_state, params) -> (params, opt_state)`, one update of the
    training step's optax optimiser; both None elsewhere.
    """

    grad: Callable[[Activities], Activities]
    energy: Callable[[Activities], Scalar]
    param_grad: Callable[[Activities, Any], Any] | None = None
    param_update: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None


class AbstractInference(eqx.Module):
    r"""An inference method: one step of a descent of the energy over the activities.

    A subclass implements `init` and `step`; the driver calls
    `state = init(z0, key)`, then, until `max_steps` steps or a steady state,
    `z, state = step(fields, z, g, state)` with `g` the gradient at `z`. The driver evaluates
    the gradient at each new point (once per step) and tests it; a step that needs more
    evaluations calls `fields.grad` or `fields.energy` itself (each `fields.grad` call in the
    traced step counts as one evaluation per step in `num_grad_evals`; calls inside a loop
    transform count once).

    Steps are traced once and run in a `jax.lax` loop: they must be pure functions of their
    arguments, and the state a pytree of arrays of fixed shapes.
    """

    descends: ClassVar[bool] = True
    """Whether the method descends the energy: a solve that ends above its starting energy is
    then reported (`RESULTS.energy_increased`). A sampler (Langevin dynamics) sets False."""

    needs_key: ClassVar[bool] = False
    """Whether the method draws random numbers (Langevin noise): it then gets a key per solve,
    split from the `key` given to [`pccore.infer`][] or [`pccore.train_step`][] (required)."""

    @abc.abstractmethod
    def init(self, z0: Activities, key: PRNGKeyArray | None) -> Any:
        """The method's state at the start `z0` (e.g. an optimiser's moments); `key` is this
        solve's key if `needs_key`, else None."""

    @abc.abstractmethod
    def step(self, fields: Fields, z: Activities, g: Activities,
             state: Any) -> tuple[Activities, Any]:
        """One step from `z`, where the gradient is `g`: the new activities and state."""


class OptaxInference(AbstractInference):
    r"""An optax optimiser on the activities: $z \leftarrow z + \mathrm{update}(\nabla_z \mathcal F)$.

    `OptaxInference(optax.sgd(0.1))` is Euler's method with step 0.1; momentum, Adam and
    noise injection (`optax.add_noise`) are descents of their own. `solver=optim` with an
    optax `GradientTransformation` is the shorthand for `solver=OptaxInference(optim)`.

    **Arguments:** `optim`, an optax `GradientTransformation`.
    """

    optim: optax.GradientTransformation = eqx.field(static=True)

    def init(self, z0: Activities, key: PRNGKeyArray | None) -> Any:
        return self.optim.init(z0)

    def step(self, fields: Fields, z: Activities, g: Activities,
             state: Any) -> tuple[Activities, Any]:
        updates, state = self.optim.update(g, state, z)
        return optax.apply_updates(z, updates), state


class AbstractJointInference(AbstractInference):
    r"""A method that steps the activities and the parameters together, as incremental PC
    does: every step may update the parameters, and the next steps see the new ones.

    It runs in a training step ([`pccore.TrainStep`][], [`pccore.train_step`][]), which gives it
    the parameters and the optimiser state (`init_joint`) and takes them back at the end
    (`params`), instead of one update at the equilibrium. Its steps reach the parameters
    through `fields.param_grad` and `fields.param_update` (see [`pccore.Fields`][]); the
    driver evaluates the activity gradient at the parameters the state holds.
    """

    descends = False  # the energy changes with the parameters too

    def init(self, z0: Activities, key: PRNGKeyArray | None) -> Any:
        raise TypeError(
            f"`solver={type(self).__name__}(...)` steps the parameters too, so it runs in a "
            "training step (pccore.TrainStep or pccore.train_step), which holds them; "
            "pccore.infer has no parameters to update."
        )

    @abc.abstractmethod
    def init_joint(self, z0: Activities, key: PRNGKeyArray | None, params: Any,
                   opt_state: Any) -> Any:
        """The state at the start, holding the model's parameters and optimiser state."""

    @abc.abstractmethod
    def params(self, state: Any) -> tuple[Any, Any]:
        """The parameters and optimiser state a state holds."""


def _counted(fields: Fields, calls: list[int]) -> Fields:
    """`fields` whose gradient adds its calls to `calls` while a step is traced."""

    def grad(z):
        calls[0] += 1
        return fields.grad(z)

    return fields._replace(grad=grad)


def drive(method: AbstractInference, fields: Fields, z0: Activities, n: int,
          is_steady: Callable[[Activities, Activities], Any] | None, ts: Any,
          key: PRNGKeyArray | None = None, *, state0: Any = None,
          fields_at: Callable[[Any], Fields] | None = None):
    """The loop: `n` steps of `method` or fewer (a steady state by `is_steady(g, z)`),
    saving at the step counts `ts`.

    `state0`: the method's starting state (default `method.init(z0, key)`); `fields_at(state)`:
    the fields at the parameters a joint method's state holds (default: `fields` throughout).

    **Returns** `(z, k, result, evals, g, saved, e0, state)`: the end, the steps taken, the
    result code, gradient evaluations, the gradient at the end (None on the fast path), the
    buffer of saved activities, the starting energy (or None) and the method's final state.
    """
    calls = [0]
    at = (lambda s: fields) if fields_at is None else fields_at
    s0 = method.init(z0, key) if state0 is None else state0
    if is_steady is None and ts is None:
        # No test, nothing saved: the gradient at the start of each step is all it needs.
        def body(_, c):
            z, s = c
            f = at(s)
            return method.step(_counted(f, calls), z, f.grad(z), s)

        z, s = jax.lax.fori_loop(0, n, body, (z0, s0))
        return z, n, RESULTS.completed, n * (1 + calls[0]), None, None, None, s

    def save(buf, z, k):
        if buf is None:
            return None
        hit = ts == k
        return jtu.tree_map(
            lambda b, a: jnp.where(hit.reshape((-1,) + (1,) * a.ndim), a[None], b), buf, z
        )

    # a save time the solve does not reach (after a steady-state stop) holds inf, as in diffrax
    buf0 = None if ts is None else jtu.tree_map(
        lambda a: jnp.full((ts.size, *a.shape), jnp.inf, a.dtype), z0)
    buf0 = save(buf0, z0, 0)
    check = (lambda g, z: jnp.array(False)) if is_steady is None else is_steady

    # The carry holds the gradient at the current point: one evaluation per step, and the
    # steady-state test reads the same gradient as the next step.
    def cond(c):
        k, _, _, _, done, _ = c
        return (k < n) & ~done

    def body(c):
        k, z, s, g, _, buf = c
        z, s = method.step(_counted(at(s), calls), z, g, s)
        g = at(s).grad(z)
        return k + 1, z, s, g, check(g, z), save(buf, z, k + 1)

    e0, g0 = jax.value_and_grad(at(s0).energy)(z0)
    c0 = (0, z0, s0, g0, check(g0, z0), buf0)
    k, z, s, g, done, buf = jax.lax.while_loop(cond, body, c0)
    if is_steady is None:
        result = RESULTS.completed
    else:
        result = RESULTS.where(done, RESULTS.converged, RESULTS.max_steps_reached)
    return z, k, result, 1 + k * (1 + calls[0]), g, buf, e0, s


def descends(solver: Any) -> bool:
    """Whether a solve with `solver` must not end above its starting energy."""
    return not isinstance(solver, AbstractInference) or solver.descends


def split_key(solver: Any, key: PRNGKeyArray | None) -> tuple[PRNGKeyArray | None, PRNGKeyArray | None]:
    """`(key for the initialiser, key for the solve)`: the given key is split only for a
    method that draws random numbers (which then must have one)."""
    if not (isinstance(solver, AbstractInference) and solver.needs_key):
        return key, None
    if key is None:
        raise ValueError(
            f"`key`: the inference method {type(solver).__name__} draws random numbers, so each "
            "solve needs a key. Pass `key=` (a new one every call for a new sample, e.g. "
            "`jax.random.fold_in(key, step)`); the same key gives the same sample."
        )
    init_key, solve_key = jax.random.split(key)
    return init_key, solve_key


__all__ = ["AbstractInference", "AbstractJointInference", "Fields", "OptaxInference", "descends", "drive", "split_key"]
