"""The one update path: parameter gradients at the inferred activities, and a training step."""

import dataclasses
from collections import OrderedDict
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
from jaxtyping import PRNGKeyArray

from ._check import check_activities, check_data
from ._compiled import compiled
from ._custom_types import Activities, BatchArray, Params, Scalar
from ._energy import PC, AbstractEnergy
from ._infer import _solve, check_solver
from ._init import AbstractInit, FeedForward
from ._model import PCModel
from ._results import RESULTS
from ._solution import SteadyState, TrainStats


def objective(params, model: PCModel, energy: AbstractEnergy, z, x, y) -> Scalar:
    r"""$\mathcal L(\theta) = \frac1B \sum_i F_i(z_i, \theta) + R(\theta)$."""
    m = model.with_params(params)
    return energy.per_sample(energy.prepare(m), z, x, y).mean() + energy.penalty(m)


def param_grads(
    model: PCModel,
    activities: Activities,
    *,
    x: BatchArray | None = None,
    y: BatchArray | None,
    energy: AbstractEnergy = PC(),
) -> tuple[Params, ...]:
    r"""$\nabla_\theta \mathcal L$ with $\mathcal L = \frac1B \sum_i F_i(z_i, \theta) + R(\theta)$.

    The activities are held constant (no gradient flows through inference); at an
    equilibrium this is the gradient of the equilibrium energy (envelope theorem).

    **Returns:** a gradient with the structure of `model.params`.
    """
    x, y = check_data(model, energy, x, y)
    z = check_activities(model, energy, activities, x, y)
    return _param_grads(model, energy, z, x, y)


@eqx.filter_jit
def _param_grads(model, energy, z, x, y):
    return jax.grad(objective)(model.params, model, energy, z, x, y)


def _update(optim, grads, opt_state, params):
    updates, opt_state = optim.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def update(model, optim, opt_state, x, y, energy, solver, controller, t1, dt0, n, steady, init,
           key):
    """Initialise, infer and update (traceable); also returns the equilibrium activities."""
    prepared = energy.prepare(model)
    z0 = energy.init(prepared, x, y, init, key)
    sol = _solve(prepared, z0, x, y, energy, solver, controller, t1, dt0, n, steady, None)
    z = jax.lax.stop_gradient(sol.activities)
    value, grads = jax.value_and_grad(objective)(model.params, model, energy, z, x, y)
    # Finite activities, energy and objective: the update is applied. (A separate pass over
    # every gradient leaf cost ~4% of a step; with finite inputs to the objective and a finite
    # value, a non-finite gradient needs an overflow in the backward pass.)
    ok = (sol.result != RESULTS.diverged) & jnp.isfinite(value)
    # A branch, not an elementwise select: the update stays one fused pass over the
    # parameters, and a skipped update costs nothing.
    dyn_state, static_state = eqx.partition(opt_state, eqx.is_array)
    params, dyn_state = jax.lax.cond(
        ok,
        lambda g, s, p: eqx.filter(_update(optim, g, eqx.combine(s, static_state), p), eqx.is_array),
        lambda g, s, p: (p, s),
        grads, dyn_state, model.params,
    )
    stats = TrainStats(
        loss=energy.per_sample(prepared, z0, x, y).mean(),
        energy=sol.energy / z0[0].shape[0] if z0 else sol.energy,
        num_steps=sol.num_steps,
        result=sol.result,
        updated=ok,
        num_grad_evals=sol.num_grad_evals,
    )
    return model.with_params(params), eqx.combine(dyn_state, static_state), stats, z


def _train_step_impl(*args):
    return update(*args)[:3]


_train_step = compiled(_train_step_impl)


class _Skeleton:
    """A model without its parameters, as a static argument hashed by identity.

    Flattening and hashing the model's layer functions on every call costs more than the
    parameters do; a training loop passes the same structure every time (the returned
    model shares it, see `_with_params`), so it is looked up by identity instead.
    """

    __slots__ = ("model",)

    def __init__(self, model: PCModel):
        self.model = model


_SKELETONS: OrderedDict = OrderedDict()
_STATIC = tuple(f.name for f in dataclasses.fields(PCModel) if f.name != "params")


def _with_params(model: PCModel, params) -> PCModel:
    """`model.with_params(params)` sharing every other field (no flatten/unflatten)."""
    new = object.__new__(type(model))
    for f in dataclasses.fields(model):
        object.__setattr__(new, f.name, params if f.name == "params" else getattr(model, f.name))
    return new


def _skeleton(model: PCModel) -> _Skeleton | None:
    """The cached skeleton of `model`, or None if its layer functions hold arrays."""
    if type(model) is not PCModel:
        return None
    skel = _SKELETONS.get(id(model.layers))
    if skel is not None and all(getattr(skel.model, f) is getattr(model, f) for f in _STATIC):
        return skel
    if any(eqx.is_array(a) for a in jtu.tree_leaves(model.layers)):
        return None
    shapes = jax.eval_shape(lambda: model.params)
    skel = _Skeleton(_with_params(model, shapes))
    _SKELETONS[id(model.layers)] = skel
    if len(_SKELETONS) > 16:
        _SKELETONS.popitem(last=False)
    return skel


@compiled
def _train_step_params(skel, params, *args):
    model, opt_state, stats = _train_step_impl(skel.model.with_params(params), *args)
    return model.params, opt_state, stats


def train_step(
    model: PCModel,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    *,
    x: BatchArray | None = None,
    y: BatchArray | None,
    energy: AbstractEnergy = PC(),
    solver: Any = diffrax.Euler(),
    stepsize_controller: diffrax.AbstractStepSizeController = diffrax.ConstantStepSize(),
    t1: float = 2.0,
    dt0: float | None = 0.1,
    max_steps: int | None = None,
    steady_state: SteadyState | None = None,
    init: AbstractInit = FeedForward(),
    key: PRNGKeyArray | None = None,
) -> tuple[PCModel, optax.OptState, TrainStats]:
    """One jitted predictive coding training step: initialise, infer, update the parameters.

    1. initialise the activities (`init`, feed-forward by default);
    2. equilibrate them with [`pccore.infer`][]'s engine (`solver`, `t1`, `dt0`, ...);
    3. take $\\nabla_\\theta \\mathcal L$ at the result ([`pccore.param_grads`][]);
    4. apply one `optim` update.

    `opt_state = optim.init(model.params)` starts the optimiser; thread the returned state
    into the next call. Calling again with new data of the same shapes does not recompile
    (hyper-parameters given as Python numbers are compile-time constants: changing one
    recompiles). If inference diverges or the objective is non-finite, the parameters and the
    optimiser state are returned unchanged and `stats.updated` is False.

    **Arguments:** `model`, `x`, `y`, `energy` and the solver options as in
    [`pccore.infer`][]; `optim` an optax optimiser for the parameters, `opt_state` its state.

    **Returns:** `(model, opt_state, stats)` with a [`pccore.TrainStats`][].
    """
    x, y = check_data(model, energy, x, y)
    n = check_solver(solver, stepsize_controller, t1, dt0, max_steps, steady_state, None)
    if not isinstance(optim, optax.GradientTransformation):
        raise TypeError(
            f"`optim` must be an optax GradientTransformation (e.g. optax.adam(1e-3)); got "
            f"{type(optim).__name__}."
        )
    args = (optim, opt_state, x, y, energy, solver, stepsize_controller, t1, dt0, n,
            steady_state, init, key)
    skel = _skeleton(model)
    if skel is None:
        return _train_step(model, *args)
    params, opt_state, stats = _train_step_params(skel, model.params, *args)
    return _with_params(model, params), opt_state, stats
