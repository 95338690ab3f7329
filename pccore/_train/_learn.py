"""The one update path: parameter gradients at the inferred activities, and the traceable
body of a training step (compiled by [`pccore.TrainStep`][], in `_train_step.py`)."""

import dataclasses
import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from .._check import check_activities, check_data
from .._custom_types import Activities, BatchArray, Params, Scalar
from .._energy._abstract import AbstractEnergy
from .._energy._base import PC, AbstractChainEnergy
from .._inference._infer import activity_grad, all_finite, is_steady, solve_raw, with_stability
from .._inference import AbstractJointInference, Fields, descends, drive, split_key
from .._model import AbstractStatefulLayer, PCModel
from .._results import RESULTS
from .._solution import TrainStats


def objective(trainable, model: PCModel, energy: AbstractEnergy, z, x, y) -> tuple[Scalar, Scalar]:
    r"""$\mathcal L(\theta) = \frac1B \sum_i F_i(z_i, \theta) + R(\theta)$, and the batch-mean
    energy $\frac1B \sum_i F_i$ from the same forward pass (an auxiliary output).

    $\theta$ is `trainable`, structured as `model.trainable`: the network's parameters, and
    the energy's own (`model.energy_params`) where the model holds any."""
    m = model.with_trainable(trainable)
    e = energy.per_sample(energy.prepare(m), z, x, y).mean()
    return e + energy.penalty(m), e


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
    $\theta$ is everything the model trains, [`pccore.PCModel.trainable`][]: its parameters,
    and the energy's own parameters (`model.energy_params`) where it holds any.

    **Returns:** a gradient with the structure of `model.trainable`: of `model.params` for a
    model without energy parameters, else the pair `(params, energy_params)`.
    """
    x, y = check_data(model, energy, x, y)
    z = check_activities(model, energy, activities, x, y)
    return _param_grads(model, energy, z, x, y)


@eqx.filter_jit
def _param_grads(model, energy, z, x, y):
    return jax.grad(objective, has_aux=True)(model.trainable, model, energy, z, x, y)[0]


def _update(optim, grads, opt_state, params):
    updates, opt_state = optim.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def update(model, optim, opt_state, x, y, energy, solver, controller, t1, dt0, n, steady, init,
           key):
    """Initialise, infer and update (traceable); also returns the equilibrium activities.

    Everything beyond the lean step (feed-forward init, T solver steps, one parameter
    gradient, one optax update) is a few scalars: the divergence test reads the energy that
    the parameter gradient's forward pass computes anyway, the starting energy comes with
    the solver's first gradient, and a skipped update is an elementwise select fused into
    the optimiser's own update of each parameter.
    """
    if isinstance(solver, AbstractJointInference):
        return _joint_update(model, optim, opt_state, x, y, energy, solver, n, steady, init, key)
    stateful = isinstance(model, PCModel) and model.training and model.stateful
    if stateful:  # one key for the masks of this step, fixed through inference and update
        model, key = _with_step_key(model, energy, key)
    prepared = energy.prepare(model)
    key, solve_key = split_key(solver, key)
    z0 = energy.init(prepared, x, y, init, key)
    raw = solve_raw(prepared, z0, x, y, energy, solver, controller, t1, dt0, n, steady, None,
                    solve_key)
    # The energy at the start comes from the solver's first evaluation where it has one (a
    # separate pass over the initial activities, kept alive across the loop, put XLA's CPU
    # schedule of the whole step into a measurably slower mode).
    e0 = raw.e0 if raw.e0 is not None else energy.per_sample(prepared, z0, x, y).sum()
    z = jax.lax.stop_gradient(raw.z)
    (value, e), grads = jax.value_and_grad(objective, has_aux=True)(
        model.trainable, model, energy, z, x, y
    )
    # A non-finite energy at the inferred activities means inference diverged (every
    # variable enters the energy through its own error, so a NaN/inf anywhere shows here).
    result = RESULTS.where(jnp.isfinite(e), raw.result, RESULTS.diverged)
    B = (x if x is not None else y).shape[0]
    # Inference that raised the energy (an unstable step size) is said in the result code,
    # whose message names the remedies; the update is still applied (its gradient is finite).
    if descends(solver):
        result = with_stability(result, e * B, e0)
    ok = (result != RESULTS.diverged) & jnp.isfinite(value)
    trainable, opt_state, ok = guarded_update(optim, grads, opt_state, model.trainable, ok)
    if stateful:  # running averages: once per step, at the equilibrium, kept if updated
        model = _updated_state(model, prepared, energy, z, x, ok)
    stats = TrainStats(
        loss=e0 / B,
        energy=e,
        num_steps=jnp.asarray(raw.k, jnp.int32),
        result=result,
        updated=ok,
        num_grad_evals=jnp.asarray(raw.evals, jnp.int32),
    )
    return model.with_trainable(trainable), opt_state, stats, z


def _joint_update(model, optim, opt_state, x, y, energy, solver, n, steady, init, key):
    """A training step whose inference method also steps the parameters (incremental PC):
    the driver runs it with fields at the parameters its state holds; the parameters and
    optimiser state it ends with are the step's (kept only if everything is finite). The
    parameters are `model.trainable` (the energy's own parameters included)."""
    prepared = energy.prepare(model)
    key, solve_key = split_key(solver, key)
    z0 = energy.init(prepared, x, y, init, key)

    def fields_at(state):
        params, _ = solver.params(state)
        pm = energy.prepare(model.with_trainable(params))
        return Fields(
            grad=lambda z: activity_grad(energy, pm, z, x, y),
            energy=lambda z: energy.per_sample(pm, z, x, y).sum(),
            param_grad=lambda z, p: jax.grad(
                lambda q: objective(q, model, energy, jax.lax.stop_gradient(z), x, y)[0])(p),
            param_update=lambda g, s, p: _update(optim, g, s, p),
        )

    s0 = solver.init_joint(z0, solve_key, model.trainable, opt_state)
    test = None if steady is None else ft.partial(is_steady, steady)
    z, k, result, evals, _, _, e0, s = drive(solver, fields_at(s0), z0, n, test, None, solve_key,
                                             state0=s0, fields_at=fields_at)
    if e0 is None:  # the driver's fast path has no starting energy
        e0 = energy.per_sample(prepared, z0, x, y).sum()
    params, new_state = solver.params(s)
    value, e = objective(params, model, energy, jax.lax.stop_gradient(z), x, y)
    result = RESULTS.where(jnp.isfinite(e) & all_finite(z), result, RESULTS.diverged)
    ok = (result != RESULTS.diverged) & jnp.isfinite(value) & all_finite(params)
    keep = lambda new, old: jnp.where(ok, new, old) if eqx.is_array(new) else new
    B = (x if x is not None else y).shape[0]
    stats = TrainStats(
        loss=e0 / B,
        energy=e,
        num_steps=jnp.asarray(k, jnp.int32),
        result=result,
        updated=ok,
        num_grad_evals=jnp.asarray(evals, jnp.int32),
    )
    return (model.with_trainable(jtu.tree_map(keep, params, model.trainable)),
            jtu.tree_map(keep, new_state, opt_state), stats, z)


def _with_step_key(model: PCModel, energy: AbstractEnergy, key):
    """The model with this step's key for its dropout masks, and the key left for the
    initialiser (split off only when both need one)."""
    if not isinstance(energy, AbstractChainEnergy):
        raise TypeError(
            f"`energy`: a model in training mode with BatchNorm or Dropout "
            f"({', '.join(n for n, f in zip(model.names, model.layers) if isinstance(f, AbstractStatefulLayer))}) "
            f"trains with a chain energy such as pccore.PC or pccore.EPC (its running averages "
            f"are updated from the layers' inputs); got {type(energy).__name__}. Use "
            "`model.eval()` to run those layers frozen with this energy."
        )
    if not model.stochastic:
        return model, key
    if key is None:
        model._key(next(l for l, f in enumerate(model.layers)
                        if isinstance(f, AbstractStatefulLayer) and f.stochastic))
    step_key, init_key = jax.random.split(key)
    return model.with_step_key(step_key), init_key


def _updated_state(model: PCModel, prepared: PCModel, energy: AbstractChainEnergy, z, x,
                   ok) -> PCModel:
    """`model` (new parameters) with the layers' state updated from the layers' inputs at
    the equilibrium (`x, z_1, ..., z_{L-1}`, or `z_0, ...` with a free bottom), run through
    the prepared model that inference used; the old state where the update was skipped."""
    fresh = prepared.update_state(energy.layer_inputs(prepared, z, x), x)
    keep = lambda new, old: jnp.where(ok, new, old) if eqx.is_array(new) else new
    layers = jtu.tree_map(keep, fresh.layers, model.layers)
    return dataclasses.replace(model, layers=layers, step_key=None)


def guarded_update(optim, grads, opt_state, params, ok):
    """One optax update if `ok` and the new parameters are finite, else parameters and
    optimiser state unchanged. Also returns whether the update was applied. `params` is
    whatever is trained (`model.trainable`), `grads` its gradient.

    An elementwise select that XLA fuses into the optimiser's own pass over each parameter:
    no branch, and no copy of the parameters and optimiser state (a
    `lax.cond` returning its unchanged operands makes XLA copy every output buffer).
    """
    new_params, new_state = _update(optim, grads, opt_state, params)
    # An update can overflow even from finite gradients (a huge learning rate): test the new
    # parameters too (a reduction over them; the select still fuses into the update).
    ok = ok & all_finite(new_params)
    keep = lambda new, old: jnp.where(ok, new, old) if eqx.is_array(new) else new
    return jtu.tree_map(keep, new_params, params), jtu.tree_map(keep, new_state, opt_state), ok
