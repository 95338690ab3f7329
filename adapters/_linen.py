"""Flax Linen adapter: any `flax.linen.Module` with its variables."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import numpy as np
from flax.core import meta

from pccore._adapter import UnsupportedLayerError
from pccore._model import PCModel

from ._chain import _key
from ._intercepting import AbstractInterceptingAdapter, InterceptedModel, Options


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


def _interceptor(icpt, out_ndims: dict[str, int] | None = None):
    """A Linen method interceptor calling `icpt(module path, method, next_fn, args, kwargs)`
    for every method call of a named submodule (not for setup, nor the top-level module).

    It also notes in `out_ndims` how many output axes the kernel of each `nn.DenseGeneral`
    called has (its `features`: its kernel is `(in..., *features)`)."""

    def ln_icpt(nf, a, kw, ctx):
        m = ctx.module
        if ctx.method_name in ("setup", "__post_init__") or m.scope is None:
            return nf(*a, **kw)
        name = "/".join(str(s) for s in m.scope.path)
        if not name:
            return nf(*a, **kw)
        if out_ndims is not None and isinstance(m, nn.DenseGeneral):
            out_ndims[name] = len(m.features) if isinstance(m.features, Sequence) else 1
        return icpt(name, ctx.method_name, nf, a, kw)

    return ln_icpt


class LinenAdapter(AbstractInterceptingAdapter):
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
        options = Options(input_shape, boundaries, dtype, args, kwargs, train_args, train_kwargs)
        return self.wrap_intercepted(model, variables, options, rng_names=rng_names)

    def intercept(self, model: Any, variables: Any, options: Options, **extra: Any) -> "_Linen":
        return _Linen(model, variables, options, extra["rng_names"])


class _Linen(InterceptedModel):
    """A Linen module with its variables: `"params"` trains, the other collections are frozen."""

    first_layer = "nn.Dense"
    how = "`pccore.wrap(module, variables, input_shape=(8, 8, 1))`"

    def __init__(self, module: Any, variables: Any, options: Options, rng_names: Sequence[str]):
        self.module, self.rng_names = module, rng_names
        self.args, self.kwargs, self.train_args, self.train_kwargs = options.calls()
        self.training = options.training
        if not isinstance(variables, Mapping) or "params" not in variables:
            got = type(variables).__name__ if not isinstance(variables, Mapping) else list(variables)
            raise ValueError(
                "`variables`: a Linen module needs its variables, a mapping with a 'params' "
                f"collection (`variables = module.init(key, x)`); got {got}."
            )
        self.variables = variables
        self.params = variables["params"]
        self.frozen = {k: v for k, v in variables.items() if k != "params"}
        self.has_state = bool(self.frozen)
        self.what = f"the Linen module {type(module).__name__}"
        self._owner, self._leaf_keys = _key_fns(self.params)
        self._out_ndims: dict[str, int] = {}  # per nn.DenseGeneral called, by module path

    def run(self, params, frozen, x, icpt):
        with nn.intercept_methods(_interceptor(icpt, self._out_ndims)):
            return self.module.apply({"params": params, **frozen}, x, *self.args, **self.kwargs)

    def train_run(self, params, frozen, x, icpt, key):
        rngs = {} if key is None else {
            n: key if i == 0 else jax.random.fold_in(key, i) for i, n in enumerate(self.rng_names)}
        with nn.intercept_methods(_interceptor(icpt, self._out_ndims)):
            if not frozen:
                return self.module.apply({"params": params}, x, *self.train_args, rngs=rngs,
                                         **self.train_kwargs), frozen
            out, new = self.module.apply({"params": params, **frozen}, x, *self.train_args,
                                         rngs=rngs, mutable=list(frozen), **self.train_kwargs)
        return out, {k: new[k] for k in frozen}

    def owner(self, keys):
        return self._owner(keys)

    def leaf_keys(self, keys):
        return self._leaf_keys(keys)

    def weight_out_ndim(self, keys):  # an nn.DenseGeneral's kernel is (in..., *features)
        if keys[-1] == "kernel":
            return self._out_ndims.get("/".join(str(k) for k in keys[:-1]), 1)
        return 1

    def state_owner(self, keys):  # (collection, *module path, name)
        return "/".join(str(k) for k in keys[1:-1])

    def refuse(self, e, where):
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

    def input_candidates(self):
        return _candidates(self.params)

    def needs_key(self, e):  # nn.Dropout fails without rngs
        return isinstance(e, flax.errors.InvalidRngError)

    def rebuild(self, params, state=None):
        out = {**self.variables, **(state or {}), "params": params}
        return out if type(self.variables) is dict else type(self.variables)(out)
