"""`pccore.wrap`: any supported model to a [`pccore.PCModel`][]."""

import inspect
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._check import check_params
from ._custom_types import Model
from ._model import PCModel


def wrap(model: Model, variables: Any = None, *, skips: bool = False, **options: Any) -> PCModel:
    """Decompose a model into the layer chain predictive coding runs on.

    **Arguments:**

    - `model`: an Equinox model (`eqx.nn.MLP`, `eqx.nn.Sequential`, a list/tuple of layers
        and callables), a Haiku `hk.Transformed`, a Flax Linen module or a Flax NNX module, or
        any object a registered adapter handles (see [`pccore.adapters.register`][]).
    - `variables`: the parameters where the framework keeps them apart (Haiku params, Linen
        variables; Equinox `eqx.nn.State` of frozen BatchNorm layers).
    - `skips`: add identity residual skips on hidden-to-hidden layers
        (see [`pccore.PCModel.with_skips`][]).
    - `**options`: adapter options, e.g. `input_shape=(1, 8, 8)`; an option the adapter does
        not take is refused with the list of those it does.

    Parameter-free work between parameterised layers (activations, reshapes, pooling) folds
    into the layer before it, so the latents are post-activation.

    A model without layers or without trainable parameters, and parameters that are not
    float32/float64, are refused here, at wrap time.

    **Returns:** a [`pccore.PCModel`][]; `unwrap()` gives back the native object.
    """
    if isinstance(model, PCModel):
        if variables is not None or options:
            raise ValueError("`model` is already a PCModel; `variables` and options do not apply.")
        return model.with_skips(skips) if skips else model
    if type(model) in (list, tuple) and len(model) == 0:
        raise ValueError(
            f"`model` is an empty {type(model).__name__}; expected at least one layer with "
            "parameters, e.g. `pccore.wrap([eqx.nn.Linear(4, 3, key=key)])`."
        )
    from pccore.adapters import get_adapter

    adapter = get_adapter(model)
    _check_options(adapter, options)
    out = adapter.wrap(model, variables, **options)
    _check_wrapped(out)
    return out.with_skips(skips) if skips else out


def _check_options(adapter: Any, options: dict[str, Any]) -> None:
    """Refuse options the adapter's `wrap` does not declare (unless it takes `**options`)."""
    params = inspect.signature(adapter.wrap).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"`pccore.wrap`: unknown option(s) {', '.join(map(repr, unknown))} for the "
            f"{adapter.name!r} adapter; valid options: "
            f"{', '.join(map(repr, ['skips', *valid]))}."
        )


def _check_wrapped(model: PCModel) -> None:
    """What every adapter's result must be: layers, trainable parameters, real floats."""
    if model.num_layers == 0:
        raise ValueError(
            "`model` has no layers; expected at least one layer with parameters, e.g. "
            "`pccore.wrap([eqx.nn.Linear(4, 3, key=key)])`."
        )
    if not any(eqx.is_inexact_array(a) for a in jtu.tree_leaves(model.params)):
        raise ValueError(
            f"`model` has no trainable parameters (layers {list(model.names)}), so there is "
            "nothing for predictive coding to learn. Wrap a model with at least one "
            "parameterised layer (e.g. eqx.nn.Linear)."
        )
    check_params(model.params)
    if model.framework not in _PURE_FRAMEWORKS:
        _trial_step(model)
    _warn_single_layer(model)


_PURE_FRAMEWORKS = ("equinox",)
"""Adapters whose layer functions are pure pytrees by construction (no framework state to
mutate, no transform of its own): the trial step is skipped for them (it costs a trace of a
whole training step at wrap time)."""


def _trial_step(model: PCModel) -> None:
    """Trace one training step of the model abstractly (`train_step`'s own update: the
    feed-forward initialisation, two Euler steps of inference, the parameter gradient and an
    SGD update, under `jax.jit`), so that a forward that cannot be trained fails here, at
    wrap time, not in the first `train_step`."""
    import diffrax
    import optax

    from ._energy._base import PC
    from ._energy._init import FeedForward
    from ._train._learn import update

    x = jnp.zeros((1, *model.in_shape.shape), model.in_shape.dtype)
    y = jnp.zeros((1, *model.out_shapes[-1].shape), model.out_shapes[-1].dtype)
    optim = optax.sgd(0.0)

    def step(model, x, y, key):
        return update(model, optim, optim.init(model.params), x, y, PC(), diffrax.Euler(),
                      diffrax.ConstantStepSize(), 0.2, 0.1, 2, None, FeedForward(), key)[2]

    # a training-mode model's masks come from the step's key; batch statistics need two samples
    key = jax.random.key(0) if model.training and model.stochastic else None
    if model.training and model.stateful:
        x, y = (jnp.concatenate([a, a]) for a in (x, y))
    try:  # the model is an argument, as in train_step (its arrays are traced)
        eqx.filter_eval_shape(eqx.filter_jit(step), model, x, y, key)
    except Exception as e:  # any framework's error: say what it means for PC, keep the cause
        said = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"`model`: a trial training step failed at wrap time ({type(e).__name__}: {said}). "
            "predictive coding differentiates every layer as a pure function of its "
            "parameters and its input, under jax.jit; expected a forward without side "
            "effects. Typical causes: a forward that updates state (an NNX Variable or "
            "counter, a Haiku state, a BatchNorm in training mode) or runs framework modules "
            "inside its own loop transform (hk.dynamic_unroll, nnx.scan). Move the state "
            "update out of the forward (or run the model in inference mode), or make the "
            "looping part one layer with `boundaries=` (see the adapters docs)."
        ) from e


def _warn_single_layer(model: PCModel) -> None:
    """A model wrapped as one layer that holds several weight matrices has no latent: PC on
    it is backprop. Usually the adapter found one parameterised submodule around the others
    (a transformer's top-level module); say so and how to place latents."""
    if model.num_layers != 1 or len(model.weights[0]) < 2:
        return
    warnings.warn(
        f"`pccore.wrap`: the model became ONE layer ({model.names[0]!r}) holding "
        f"{len(model.weights[0])} weight matrices, so predictive coding has no latent to infer "
        "(training it is plain backprop). Name the submodules whose outputs should be latents "
        "with `boundaries=` (see the adapters docs), or wrap a list of its layers.",
        UserWarning,
        stacklevel=4,  # the caller of pccore.wrap
    )
