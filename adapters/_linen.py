"""Flax Linen adapter: any `flax.linen.Module` with its variables."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from pccore._adapter import AbstractAdapter, UnsupportedLayerError
from pccore._model import PCModel

from ._chain import (
    _key,
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


def _is_box(node) -> bool:
    return isinstance(node, meta.AxisMetadata)


def _key_fns(params) -> tuple[Callable[[tuple], str], Callable[[tuple], tuple]]:
    """`owner(keys)` and `leaf_keys(keys)` of a params leaf, seeing through boxed params.

    A boxed param (`nn.with_partitioning` gives an `nn.Partitioned`) is a pytree whose leaf
    sits one key further down (`.../kernel/value`); it belongs to the module holding the box,
    and in the per-layer params it is the plain array under the param's own name.
    """
    boxes = {}
    for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]:
        if _is_box(node):
            boxes[tuple(_key(k) for k in path)] = len(jax.tree_util.tree_leaves(node))

    def split(keys: tuple) -> tuple[tuple, tuple]:
        for n in range(1, len(keys)):
            if keys[:n] in boxes:
                return keys[:n], keys[n:]
        return keys, ()

    def owner(keys: tuple) -> str:
        return "/".join(str(k) for k in split(keys)[0][:-1])

    def leaf_keys(keys: tuple) -> tuple:
        param, inner = split(keys)
        return param if inner and boxes[param] == 1 else keys

    return owner, leaf_keys


def _walk(tree, path=()):
    """`(keys, leaf)` of a nested mapping, in its own (insertion) order; boxes are leaves."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _walk(v, (*path, k))
    else:
        yield path, tree


def _candidates(params) -> list[tuple[tuple[int, ...], str]]:
    """`(input shape, owner)` of every module with a 2-D `kernel` (an nn.Dense), dict order.

    Dict order is usually call order (`init` inserts params as modules are called), but not
    after a `tree_map` or a checkpoint restore, which sort the keys; so each is tried.
    """
    out = []
    for keys, leaf in _walk(params):
        if _is_box(leaf):  # nn.Partitioned and other boxed params
            leaf = jax.tree_util.tree_leaves(leaf)[0]
        if keys and keys[-1] == "kernel" and np.ndim(leaf) == 2:
            out.append(((np.shape(leaf)[0],), "/".join(str(k) for k in keys[:-1])))
    return out


def _interceptor(icpt):
    """A Linen method interceptor calling `icpt(module path, method, next_fn, args, kwargs)`
    for every method call of a named submodule (not for setup, nor the top-level module)."""

    def ln_icpt(nf, a, kw, ctx):
        m = ctx.module
        if ctx.method_name in ("setup", "__post_init__") or m.scope is None:
            return nf(*a, **kw)
        name = "/".join(str(s) for s in m.scope.path)
        if not name:
            return nf(*a, **kw)
        return icpt(name, ctx.method_name, nf, a, kw)

    return ln_icpt


class LinenAdapter(AbstractAdapter):
    """Flax Linen modules: `nn.Sequential`, modules with submodule lists built in `setup()`,
    and `@nn.compact` modules.

    `pccore.wrap(module, variables, **options)`. Options:

    - `input_shape`: the per-sample input shape (inferred when the first submodule is
        `nn.Dense`; pass it for token models, e.g. `input_shape=(seq_len,)`).
    - `dtype`: the input dtype, e.g. `jnp.int32` for token ids. By default the parameters'
        float dtype, or int32 when the module fails on float inputs because it indexes with
        them (a first `nn.Embed`). Integer inputs are clamped, never inferred.
    - `boundaries`: module paths (`"layers_0"`, `"enc/Dense_0"`) that start each layer, in call
        order (default: every outermost submodule that owns parameters). A layer may read the
        model input besides its own input (a transformer block building its attention mask
        from the tokens); it may not read another layer's output (a skip around a boundary).
    - `args`, `kwargs`: extra arguments of `module.apply` after the input, e.g.
        `kwargs={"train": False}`: the evaluation call.
    - `train_args`, `train_kwargs`: the training call's extra arguments (e.g.
        `train_kwargs={"train": True}`), for nn.BatchNorm(use_running_average=False) and
        nn.Dropout(deterministic=False). The model is then in training mode
        (`model.training`): batch statistics and dropout masks (the `rng_names` streams,
        from the step's `key`) during inference, the other collections (`batch_stats`)
        updated once per `train_step`, and `args`/`kwargs` for evaluation.
    - `rng_names`: the rng streams the training call draws from (default `("dropout",)`).

    Only the `"params"` collection trains; other collections (`"batch_stats"`) are frozen,
    or, in training mode, updated once per training step. `unwrap()` returns the variables
    in the original structure and mapping type (with the current `batch_stats`);
    `unwrap_state()` the non-parameter collections alone.
    """

    name = "flax.linen"
    framework_module = "flax"
    extra = "flax"
    priority = 0

    def matches(self, model: Any) -> bool:
        return isinstance(model, nn.Module)

    def wrap(
        self,
        model: Any,
        variables: Any = None,
        *,
        input_shape: Sequence[int] | None = None,
        boundaries: Sequence[str] | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        dtype: Any = None,
        train_args: tuple | None = None,
        train_kwargs: dict | None = None,
        rng_names: Sequence[str] = ("dropout",),
    ) -> PCModel:
        module = model
        kwargs = dict(kwargs or {})
        training = train_args is not None or train_kwargs is not None
        train_args, train_kwargs = tuple(train_args or ()), dict(train_kwargs or {})
        if not isinstance(variables, Mapping) or "params" not in variables:
            got = type(variables).__name__ if not isinstance(variables, Mapping) else list(variables)
            raise ValueError(
                "`variables`: a Linen module needs its variables, a mapping with a 'params' "
                f"collection (`variables = module.init(key, x)`); got {got}."
            )
        params = variables["params"]
        frozen = {k: v for k, v in variables.items() if k != "params"}

        def run(p, fr, x, icpt):
            with nn.intercept_methods(_interceptor(icpt)):
                return module.apply({"params": p, **fr}, x, *args, **kwargs)

        def train_run(p, fr, x, icpt, key):
            rngs = {} if key is None else {
                n: key if i == 0 else jax.random.fold_in(key, i) for i, n in enumerate(rng_names)}
            with nn.intercept_methods(_interceptor(icpt)):
                if not fr:
                    return module.apply({"params": p}, x, *train_args, rngs=rngs,
                                        **train_kwargs), fr
                out, new = module.apply({"params": p, **fr}, x, *train_args, rngs=rngs,
                                        mutable=list(fr), **train_kwargs)
            return out, {k: new[k] for k in fr}

        def refuse(e, where):
            if isinstance(e, flax.errors.ModifyScopeVariableError):
                return UnsupportedLayerError(
                    f"`model`: Linen submodule {where!r} updates a variable in the forward pass "
                    f"({str(e).splitlines()[0]}), e.g. nn.BatchNorm with "
                    "use_running_average=False. Predictive coding runs each layer many times "
                    "per step, so its statistics would be updated at every inference step. "
                    "`args`/`kwargs` are the evaluation call: pass e.g. "
                    "`kwargs={'train': False}` there, and the training call as "
                    "`train_kwargs={'train': True}` to train with batch statistics (running "
                    "averages updated once per training step)."
                )
            if isinstance(e, flax.errors.InvalidRngError):
                return UnsupportedLayerError(
                    f"`model`: Linen submodule {where!r} needs a random key (e.g. nn.Dropout "
                    "with deterministic=False) in the evaluation call given by `args`/`kwargs`. "
                    "Pass e.g. `kwargs={'train': False}` there, and the training call as "
                    "`train_kwargs={'train': True}`: dropout then draws one mask per training "
                    "step from its `key`."
                )
            if isinstance(e, flax.errors.ScopeParamShapeError | flax.errors.ScopeParamNotFoundError
                          | flax.errors.ScopeCollectionNotFound):
                return ValueError(
                    f"`variables` do not match the Linen module (at {where!r}): "
                    f"{str(e).splitlines()[0]} Pass the variables from this module's own `init`."
                )
            return None

        what = f"the Linen module {type(module).__name__}"
        require_params(params, what)
        _owner, _leaf_keys = _key_fns(params)

        def build(dt):
            def trace(shape, called):
                in_shape = jax.ShapeDtypeStruct(tuple(shape), dt)
                plan = discover(run, params, frozen, in_shape, _owner, _leaf_keys, boundaries,
                                what, refuse, probe=recording(run, called))
                return plan, in_shape

            if input_shape is not None:
                return trace(input_shape, set())
            return infer_input_shape(
                trace, _candidates(params), lambda plan: owners_by_layer(plan, params, _owner), what,
                "nn.Dense", "`pccore.wrap(module, variables, input_shape=(8, 8, 1))`",
            )

        float_dtype = jnp.result_type(jax.tree_util.tree_leaves(params)[0])
        plan, in_shape = with_input_dtype(build, dtype, float_dtype)
        owners: tuple[int, ...] = ()
        stochastic = False
        if training:
            owners = state_layers(plan, frozen, lambda ks: "/".join(str(k) for k in ks[1:-1]))
            stochastic = _draws_random(train_run, params, frozen, in_shape)
        layers = chain_layers(plan, frozen, train_run if training else None, owners, stochastic)
        per_layer = plan.slicer.params

        def rebuild(new_params, state=None):
            merged = plan.slicer.merge(new_params)
            out = {**variables, **(state or {}), "params": merged}
            return out if type(variables) is dict else type(variables)(out)

        return PCModel(
            layers=layers,
            params=per_layer,
            in_shape=in_shape,
            out_shapes=plan.out_shapes,
            names=layer_names(plan, owners_by_layer(plan, params, _owner)),
            weights=tuple(weight_specs(p, ("kernel",)) for p in per_layer),
            skips=(False,) * len(layers),
            framework="flax.linen",
            rebuild=rebuild,
            reads_input=plan.reads_input,
            training=training,
            restate=(lambda fs: merged_state(fs, owners)) if training and frozen else None,
        )


def _draws_random(train_run, params, frozen, in_shape) -> bool:
    """Whether the training call draws random numbers (nn.Dropout): it fails without rngs."""
    x = jax.ShapeDtypeStruct((2, *in_shape.shape), in_shape.dtype)
    try:
        jax.eval_shape(lambda p, s, x: train_run(p, s, x, lambda n, m, nf, a, k: nf(*a, **k), None),
                       params, frozen, x)
    except flax.errors.InvalidRngError:
        return True
    return False
