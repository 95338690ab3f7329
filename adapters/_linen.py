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
    ChainLayer,
    _key,
    discover,
    infer_input_shape,
    layer_names,
    owners_by_layer,
    recording,
    require_params,
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
        `kwargs={"train": False}`.

    Only the `"params"` collection trains; other collections (`"batch_stats"`) are frozen.
    `unwrap()` returns the variables in the original structure and mapping type.
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
    ) -> PCModel:
        module = model
        kwargs = dict(kwargs or {})
        if not isinstance(variables, Mapping) or "params" not in variables:
            got = type(variables).__name__ if not isinstance(variables, Mapping) else list(variables)
            raise ValueError(
                "`variables`: a Linen module needs its variables, a mapping with a 'params' "
                f"collection (`variables = module.init(key, x)`); got {got}."
            )
        params = variables["params"]
        frozen = {k: v for k, v in variables.items() if k != "params"}

        def run(p, fr, x, icpt):
            def ln_icpt(nf, a, kw, ctx):
                m = ctx.module
                if ctx.method_name in ("setup", "__post_init__") or m.scope is None:
                    return nf(*a, **kw)
                name = "/".join(str(s) for s in m.scope.path)
                if not name:
                    return nf(*a, **kw)
                return icpt(name, ctx.method_name, nf, a, kw)

            with nn.intercept_methods(ln_icpt):
                return module.apply({"params": p, **fr}, x, *args, **kwargs)

        def refuse(e, where):
            if isinstance(e, flax.errors.ModifyScopeVariableError):
                return UnsupportedLayerError(
                    f"`model`: Linen submodule {where!r} updates a variable in the forward pass "
                    f"({str(e).splitlines()[0]}), e.g. nn.BatchNorm with "
                    "use_running_average=False. Predictive coding runs each layer many times "
                    "per step, so its statistics would be updated at every inference step. Run "
                    "the module in eval mode (e.g. `kwargs={'train': False}`, or "
                    "use_running_average=True) so that its state stays frozen."
                )
            if isinstance(e, flax.errors.InvalidRngError):
                return UnsupportedLayerError(
                    f"`model`: Linen submodule {where!r} needs a random key (e.g. nn.Dropout "
                    "with deterministic=False); a fresh mask at every inference step would make "
                    "inference stochastic. Run it deterministically (e.g. "
                    "`kwargs={'train': False}` or deterministic=True)."
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
        layers = tuple(ChainLayer(i, plan, frozen) for i in range(len(plan.names)))
        per_layer = plan.slicer.params

        def rebuild(new_params):
            merged = plan.slicer.merge(new_params)
            out = {**variables, "params": merged}
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
        )
