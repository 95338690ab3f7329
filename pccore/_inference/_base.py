r"""The step contract of an inference method, and what a step may evaluate.

An inference method moves the activities $z$ towards a minimum of the energy
$\mathcal F = \sum_i F_i$. A family subclasses [`pccore.AbstractInference`][] and writes one
step; the driver (`_driver.py`) owns everything else: the gradient at each new point, the
steady-state test ([`pccore.SteadyState`][]) on that gradient, the count of gradient
evaluations, the step budget (`max_steps`), saving at step counts, and (in the engine's
packaging) the divergence and stability checks.
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
from jaxtyping import Array, PRNGKeyArray

from .._custom_types import Activities, Scalar


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
    `state = init(fields, z0, key)`, then, until `max_steps` steps, a steady state or the
    method's own end (`finished`), `z, state = step(fields, z, g, state)` with `g` the
    gradient at `z`. The driver evaluates
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
    def init(self, fields: Fields, z0: Activities, key: PRNGKeyArray | None) -> Any:
        """The method's state at the start `z0` (e.g. an optimiser's moments); `key` is this
        solve's key if `needs_key`, else None. `fields` as in `step` (a method that picks its
        first step size from the vector field evaluates it here)."""

    @abc.abstractmethod
    def step(self, fields: Fields, z: Activities, g: Activities,
             state: Any) -> tuple[Activities, Any]:
        """One step from `z`, where the gradient is `g`: the new activities and state. A
        step may reject itself (an adaptive step size): it then returns `z` unchanged and a
        state with a smaller step."""

    def steps_needed(self) -> int | None:
        """The fewest steps the method needs to complete (its own schedule, e.g. a burn-in
        and a number of samples), or None (the default). The step budget defaults to at
        least this, and a smaller `max_steps` is refused."""
        return None

    def finished(self, state: Any) -> Array | None:
        """Whether the method has reached its own end (a time horizon), as a boolean array;
        None (the default) for a method whose only end is the step budget `max_steps`.
        Running out of `max_steps` before this end is reported as
        `RESULTS.max_steps_reached`; ending here without a steady state as `completed`, or
        `not_converged` when a steady state was asked for."""
        return None


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

    def init(self, fields: Fields, z0: Activities, key: PRNGKeyArray | None) -> Any:
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


__all__ = ["AbstractInference", "AbstractJointInference", "Fields", "descends", "split_key"]
