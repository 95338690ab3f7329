"""Haiku adapter: any `hk.Transformed` / `hk.TransformedWithState` with its params."""

import inspect
from collections.abc import Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import get_opaque_trace_state

from pccore._adapter import UnsupportedLayerError
from pccore._model import PCModel

from ._intercepting import AbstractInterceptingAdapter, InterceptedModel, Options


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


class HaikuAdapter(AbstractInterceptingAdapter):
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
        options = Options(input_shape, boundaries, dtype, args, kwargs, train_args, train_kwargs)
        return self.wrap_intercepted(model, variables, options, state=state)

    def intercept(self, model: Any, variables: Any, options: Options, **extra: Any) -> "_Haiku":
        return _Haiku(model, variables, extra["state"], options)


class _Haiku(InterceptedModel):
    """A Haiku transform with its params (and state)."""

    what = "the Haiku transform"
    shape_what = "this Haiku model"
    weight_names = ("w",)
    first_layer = "hk.Linear"
    how = "`pccore.wrap(f, params, input_shape=(8, 8, 1))`"

    def __init__(self, f: Any, variables: Any, state: Any, options: Options):
        self.f = f
        self.args, self.kwargs, self.train_args, self.train_kwargs = options.calls()
        self.training = options.training
        self.has_state = stateful = isinstance(f, hk.TransformedWithState)
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
        self.params, self.frozen = variables, state if stateful else {}
        self.with_rng = "rng" in inspect.signature(f.apply).parameters
        self.transposed: set[str] = set()  # hk.ConvNDTranspose kernels are (*kernel, out, in)
        self.transformed: set[str] = set()  # called inside a JAX transform (hk.dynamic_unroll)

    def apply(self, params, frozen, x, icpt, rng, call_args, call_kwargs):
        """`f.apply` with the interceptor: `(output, new state)` (`frozen` if stateless)."""
        top = get_opaque_trace_state()

        def hk_icpt(nf, a, kw, ctx):
            if ctx.method_name == "__init__":
                return nf(*a, **kw)
            if ctx.method_name == "__call__" and get_opaque_trace_state() != top:
                self.transformed.add(ctx.module.module_name)
            if isinstance(ctx.module, hk.ConvNDTranspose):
                self.transposed.add(ctx.module.module_name)
            return icpt(ctx.module.module_name, ctx.method_name, nf, a, kw)

        call = (params, frozen) if self.has_state else (params,)
        if self.with_rng:
            call = (*call, rng)
        with hk.intercept_methods(hk_icpt):
            out = self.f.apply(*call, x, *call_args, **call_kwargs)
        return out if self.has_state else (out, frozen)

    def run(self, params, frozen, x, icpt):  # the evaluation call
        return self.apply(params, frozen, x, icpt, None, self.args, self.kwargs)[0]

    def train_run(self, params, frozen, x, icpt, key):  # the training call, with the step's key
        return self.apply(params, frozen, x, icpt, key, self.train_args, self.train_kwargs)

    def owner(self, keys: tuple) -> str:
        return keys[0]

    def refuse(self, e, where):
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

    def input_candidates(self):
        return _candidates(self.params)

    def discovery_error(self, e, boundaries):  # a boundary inside a scan fails in several ways
        inside = [b for b in boundaries or sorted(self.params) if b in self.transformed]
        return _in_transform_error(inside) if inside else None

    def check(self, plan, in_shape):
        if any(n in self.transformed for n in plan.names):  # else it fails at the first forward
            raise _in_transform_error([n for n in plan.names if n in self.transformed])
        if self.has_state:
            _check_state_frozen(self.f, self.params, self.frozen, in_shape, self.with_rng,
                                self.args, self.kwargs)

    def needs_key(self, e):
        """hk.dropout fails without a key; so does a training call whose `f` takes none."""
        if "rng" not in str(e).lower() and "prngkey" not in str(e).lower():
            return False
        if not self.with_rng:
            raise UnsupportedLayerError(
                "`train_args`/`train_kwargs`: the training call draws random numbers (e.g. "
                "hk.dropout), but `f.apply` takes no `rng` (hk.without_apply_rng). Transform "
                "the model with `hk.transform_with_state(...)` or `hk.transform(...)` alone, "
                "so that each training step can pass its key."
            ) from e
        return True

    def weight_out_axis(self, keys):
        return -2 if keys[0] in self.transposed else -1

    def rebuild(self, params, state=None):
        return params


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
