"""Haiku adapter: any `hk.Transformed` / `hk.TransformedWithState` with its params."""

import inspect
from collections.abc import Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from pccore._adapter import AbstractAdapter, UnsupportedLayerError
from pccore._model import PCModel

from ._chain import (
    chain_layers,
    discover,
    infer_input_shape,
    layer_names,
    merged_state,
    owners_by_layer,
    recording,
    require_params,
    state_layers,
    weight_specs,
    with_input_dtype,
)


def _owner(keys: tuple) -> str:
    return keys[0]


def _leaf_keys(keys: tuple) -> tuple:
    return keys


def _candidates(params) -> list[tuple[tuple[int, ...], str]]:
    """`(input shape, module)` of every module with a 2-D `w` (an hk.Linear), in dict order.

    Dict order is usually call order (`init` inserts params as modules are called), but not
    after a `tree_map` or a checkpoint restore, which sort the keys; so each is tried.
    """
    return [
        ((np.shape(d["w"])[0],), name)
        for name, d in params.items()
        if isinstance(d, dict) and np.ndim(d.get("w")) == 2
    ]


class HaikuAdapter(AbstractAdapter):
    """`hk.Transformed` and `hk.TransformedWithState` (e.g. `hk.nets.MLP`, `hk.Sequential`,
    custom modules and functions calling parameterised modules in sequence).

    `pccore.wrap(f, params, **options)`. Options:

    - `state`: the state of an `hk.TransformedWithState` (frozen: BatchNorm running averages).
    - `input_shape`: the per-sample input shape (inferred when the first module is `hk.Linear`;
        pass it for token models, e.g. `input_shape=(seq_len,)`).
    - `dtype`: the input dtype, e.g. `jnp.int32` for token ids. By default the parameters'
        float dtype, or int32 when the model fails on float inputs because it indexes with
        them (a first `hk.Embed`). Integer inputs are clamped, never inferred.
    - `boundaries`: module names that start each layer, in call order (default: every
        outermost module that owns parameters). Parameters between boundaries (a LayerNorm)
        belong to the layer before. A layer may read the model input besides its own input
        (a transformer block building its attention mask from the tokens); it may not read
        another layer's output (a skip around a boundary).
    - `args`, `kwargs`: extra arguments of `f.apply` after the input, e.g. `args=(False,)`
        for an `is_training` flag: the evaluation call.
    - `train_args`, `train_kwargs`: the training call's extra arguments (e.g.
        `train_args=(True,)`), for train-mode hk.BatchNorm and hk.dropout. The model is then
        in training mode (`model.training`): batch statistics and dropout masks (from the
        step's `key`; `f` must take an `rng`) during inference, running averages updated
        once per `train_step`, and `args`/`kwargs` for evaluation.

    `unwrap()` returns the params dict, with the original structure and names;
    `unwrap_state()` the state, with the running averages as training left them.
    """

    name = "haiku"
    framework_module = "haiku"
    extra = "haiku"
    priority = 0

    def matches(self, model: Any) -> bool:
        return isinstance(model, hk.Transformed | hk.TransformedWithState)

    def wrap(
        self,
        model: Any,
        variables: Any = None,
        *,
        state: Any = None,
        input_shape: Sequence[int] | None = None,
        boundaries: Sequence[str] | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        dtype: Any = None,
        train_args: tuple | None = None,
        train_kwargs: dict | None = None,
    ) -> PCModel:
        f = model
        kwargs = dict(kwargs or {})
        training = train_args is not None or train_kwargs is not None
        train_args, train_kwargs = tuple(train_args or ()), dict(train_kwargs or {})
        stateful = isinstance(f, hk.TransformedWithState)
        if variables is None:
            raise ValueError(
                "`variables`: a Haiku transform needs its params: `pccore.wrap(f, params)` with "
                "`params = f.init(key, x)`."
            )
        if stateful and state is None:
            raise ValueError(
                "`state`: an hk.TransformedWithState needs its state: "
                "`params, state = f.init(key, x)`; `pccore.wrap(f, params, state=state)`."
            )
        if not stateful and state is not None:
            raise ValueError("`state`: this hk.Transformed has no state; pass none.")
        if not isinstance(variables, dict) or not all(isinstance(v, dict) for v in variables.values()):
            raise TypeError(
                "`variables`: expected Haiku params, a dict {module_name: {param_name: array}}; "
                f"got {type(variables).__name__}."
            )
        with_rng = "rng" in inspect.signature(f.apply).parameters

        transposed = set()  # hk.ConvNDTranspose kernels are (*kernel, out, in)

        from jax.extend.core import get_opaque_trace_state

        transformed = set()  # modules called inside a JAX transform (hk.dynamic_unroll's scan)

        def apply(params, frozen, x, icpt, rng, call_args, call_kwargs):
            """`f.apply` with the interceptor: `(output, new state)` (`frozen` if stateless)."""
            top = get_opaque_trace_state()

            def hk_icpt(nf, a, kw, ctx):
                if ctx.method_name == "__init__":
                    return nf(*a, **kw)
                if ctx.method_name == "__call__" and get_opaque_trace_state() != top:
                    transformed.add(ctx.module.module_name)
                if isinstance(ctx.module, hk.ConvNDTranspose):
                    transposed.add(ctx.module.module_name)
                return icpt(ctx.module.module_name, ctx.method_name, nf, a, kw)

            call = (params, frozen) if stateful else (params,)
            if with_rng:
                call = (*call, rng)
            with hk.intercept_methods(hk_icpt):
                out = f.apply(*call, x, *call_args, **call_kwargs)
            return out if stateful else (out, frozen)

        def run(params, frozen, x, icpt):  # the evaluation call
            return apply(params, frozen, x, icpt, None, args, kwargs)[0]

        def train_run(params, frozen, x, icpt, key):  # the training call, with the step's key
            return apply(params, frozen, x, icpt, key, train_args, train_kwargs)

        def refuse(e, where):
            msg = str(e)
            at = f"Haiku module {where!r}"
            if where is None:  # raised by the transformed function, outside any module
                at = "the transformed function itself (outside any hk.Module)"
            if "rng" in msg.lower() or "prngkey" in msg.lower():
                return UnsupportedLayerError(
                    f"`model`: {at} needs a random key (e.g. hk.dropout in "
                    "training mode) in the call given by `args`/`kwargs`, which is the "
                    "evaluation call. Pass the evaluation call there (e.g. `args=(False,)` for "
                    "an `is_training` argument) and the training call as `train_args=(True,)`: "
                    "dropout then draws one mask per training step from its `key`."
                )
            if "Unable to retrieve parameter" in msg or "does not match shape" in msg:
                return ValueError(
                    f"`variables`: the params do not match the Haiku model (in {at}): "
                    f"{msg.splitlines()[0]} Pass the params from this model's own `init`."
                )
            return None

        require_params(variables, "the Haiku transform")

        def build(dt):
            def trace(shape, called):
                in_shape = jax.ShapeDtypeStruct(tuple(shape), dt)
                plan = discover(
                    run, variables, state, in_shape, _owner, _leaf_keys, boundaries,
                    "the Haiku transform", refuse, probe=recording(run, called),
                )
                return plan, in_shape

            if input_shape is not None:
                return trace(input_shape, set())
            return infer_input_shape(
                trace, _candidates(variables), lambda plan: owners_by_layer(plan, variables, _owner),
                "this Haiku model", "hk.Linear", "`pccore.wrap(f, params, input_shape=(8, 8, 1))`",
            )

        float_dtype = jnp.result_type(jax.tree_util.tree_leaves(variables)[0])
        try:
            plan, in_shape = with_input_dtype(build, dtype, float_dtype)
        except Exception as e:  # a boundary inside a scan fails in several ways: say why
            inside = [b for b in boundaries or sorted(variables) if b in transformed]
            if inside:
                raise _in_transform_error(inside) from e
            raise
        if any(n in transformed for n in plan.names):  # else it fails at the first forward
            raise _in_transform_error([n for n in plan.names if n in transformed])
        if stateful:
            _check_state_frozen(f, variables, state, in_shape, with_rng, args, kwargs)
        frozen = state if stateful else {}
        owners: tuple[int, ...] = ()
        stochastic = False
        if training:
            owners = state_layers(plan, frozen, _owner)
            stochastic = _draws_random(f, variables, frozen, in_shape, with_rng, train_run)
        layers = chain_layers(plan, frozen, train_run if training else None, owners, stochastic)
        params = plan.slicer.params
        return PCModel(
            layers=layers,
            params=params,
            in_shape=in_shape,
            out_shapes=plan.out_shapes,
            names=layer_names(plan, owners_by_layer(plan, variables, _owner)),
            weights=tuple(
                weight_specs(p, ("w",), lambda ks: -2 if ks[0] in transposed else -1) for p in params
            ),
            skips=(False,) * len(layers),
            framework="haiku",
            rebuild=(lambda p, state=None: plan.slicer.merge(p)) if training else plan.slicer.merge,
            reads_input=plan.reads_input,
            training=training,
            restate=(lambda fs: merged_state(fs, owners)) if training and stateful else None,
        )


def _draws_random(f, params, frozen, in_shape, with_rng, train_run) -> bool:
    """Whether the training call draws random numbers (hk.dropout): it fails without a key."""
    x = jax.ShapeDtypeStruct((2, *in_shape.shape), in_shape.dtype)
    try:
        jax.eval_shape(lambda p, s, x: train_run(p, s, x, lambda n, m, nf, a, k: nf(*a, **k), None),
                       params, frozen, x)
    except Exception as e:
        if "rng" not in str(e).lower() and "prngkey" not in str(e).lower():
            raise
        if not with_rng:
            raise UnsupportedLayerError(
                "`train_args`/`train_kwargs`: the training call draws random numbers (e.g. "
                "hk.dropout), but `f.apply` takes no `rng` (hk.without_apply_rng). Transform "
                "the model with `hk.transform_with_state(...)` or `hk.transform(...)` alone, "
                "so that each training step can pass its key."
            ) from e
        return True
    return False


def _check_state_frozen(f, params, state, in_shape, with_rng, args, kwargs) -> None:
    """Refuse a forward pass that updates Haiku state (e.g. BatchNorm with is_training=True)."""
    x = jnp.ones((2, *in_shape.shape), in_shape.dtype)
    call = (params, state, None) if with_rng else (params, state)
    try:
        _, new_state = jax.jit(lambda *c: f.apply(*c, x, *args, **kwargs))(*call)
    except Exception:
        return  # discovery reports errors of the forward pass with more context
    flat_old, flat_new = hk.data_structures.to_haiku_dict(state), new_state
    changed = sorted(
        f"{m}/{n}"
        for m, d in flat_old.items()
        for n, a in d.items()
        if not np.array_equal(np.asarray(a), np.asarray(flat_new[m][n]))
    )
    if changed:
        modules = sorted({c.split("/~/")[0] for c in changed})
        raise UnsupportedLayerError(
            f"`model`: Haiku module(s) {modules} update their state {changed} in the forward "
            "pass given by `args`/`kwargs` (e.g. hk.BatchNorm with is_training=True), which is "
            "the evaluation call. Pass the evaluation call there (e.g. `args=(False,)` for an "
            "`is_training` argument) and, to train with batch statistics, the training call as "
            "`train_args=(True,)`: the running averages are then updated once per training "
            "step, at the equilibrium."
        )


def _in_transform_error(names: list) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"`model`: layer boundary Haiku module(s) {names} are called inside a JAX transform "
        "(the lax.scan that hk.dynamic_unroll or hk.scan runs its core in, or hk.vmap/hk.remat). "
        "pccore cuts the model into layers by intercepting module calls, and a cut inside the "
        "scanned step cannot carry a latent out of the loop. Make the whole RNN one layer: put "
        "the hk.dynamic_unroll call in a module of its own that returns one array, and name "
        "that module in `boundaries=[...]` (e.g. `boundaries=['enc', 'head']`)."
    )
