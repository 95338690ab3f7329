"""Generative evaluation: infer the bottom latent from an observation and read it as a label."""

from typing import Any

import diffrax
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._check import as_batch
from .._custom_types import BatchArray, StepSizeController
from .._energy._abstract import AbstractEnergy
from .._energy._base import PC
from .._inference._infer import infer
from .._inference import AbstractInference
from .._energy._init import AbstractInit, RandomNormal
from .._model import PCModel
from .._solution import SteadyState


class GenerativeEvaluation(eqx.Module):
    """The outcome of [`pccore.generative_evaluate`][].

    **Fields:**

    - `accuracy`: fraction of samples with `argmax` of the inferred $z_0$ equal to the label's.
    - `energy`: the energy at the inferred activities, batch mean $\\frac1B\\sum_i F_i$.
    - `prediction`: the inferred $z_0$ (one row per sample).
    """

    accuracy: Float[Array, ""]
    energy: Float[Array, ""]
    prediction: Float[Array, "batch ..."]


def generative_evaluate(
    model: PCModel,
    y: BatchArray,
    labels: BatchArray,
    *,
    energy: AbstractEnergy = PC(),
    method: AbstractInference | None = None,
    solver: Any = diffrax.Euler(),
    stepsize_controller: StepSizeController = diffrax.ConstantStepSize(),
    t1: float | None = None,
    dt0: float | None = 0.1,
    max_steps: int | None = None,
    steady_state: SteadyState | None = None,
    init: AbstractInit = RandomNormal(),
    key: PRNGKeyArray | None = None,
) -> GenerativeEvaluation:
    r"""Evaluate a supervised generative model (label $\to$ data): infer the label from data.

    The observation `y` is clamped, the bottom latent $z_0$ is free and randomly initialised
    (`init`, `key`), inference runs with the given solver, and the prediction is
    $\arg\max z_0$, compared with $\arg\max$ of the one-hot `labels`.

    **Arguments:**

    - `model`: the generative model (bottom = label, top = data).
    - `y`: observations, `(batch, *data_shape)`; `labels`: one-hot labels `(batch, classes)`.
    - `energy`, `method`, `solver`, `stepsize_controller`, `t1`, `dt0`, `max_steps`,
        `steady_state`, `init`, `key`: as in [`pccore.infer`][] (inference with `x=None`); `t1`
        defaults to 20.0 with the diffrax solver shorthand (a random start needs a longer horizon than a
        feed-forward one).

    **Returns:** a [`pccore.GenerativeEvaluation`][].
    """
    x_shape, _ = energy.data_shapes(model)
    labels = as_batch("labels", labels, x_shape)
    if t1 is None and isinstance(solver, diffrax.AbstractSolver):
        t1 = 20.0
    sol = infer(
        model, x=None, y=y, energy=energy, method=method, solver=solver, stepsize_controller=stepsize_controller,
        t1=t1, dt0=dt0, max_steps=max_steps, steady_state=steady_state, init=init, key=key,
    )
    if labels.shape[0] != sol.activities[0].shape[0]:
        raise ValueError(
            f"`labels` has {labels.shape[0]} samples but `y` has {sol.activities[0].shape[0]}; "
            "pass one label per observation."
        )
    z0 = sol.activities[0]
    acc = jnp.mean(jnp.argmax(z0, axis=-1) == jnp.argmax(labels, axis=-1))
    return GenerativeEvaluation(accuracy=acc, energy=sol.energy / z0.shape[0], prediction=z0)
