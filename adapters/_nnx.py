"""Flax NNX adapter: any `flax.nnx.Module`.

The module is split once (`nnx.split(model, nnx.Param, ...)`); `nnx.merge` runs only inside
traced code, where it costs nothing at run time. Layers are found by call order: the
`__call__` of every parameter-owning submodule class is wrapped while the model is traced
(NNX has no method interceptor), and instances are matched to their paths by identity.
"""

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from flax import nnx

from pccore._adapter import UnsupportedLayerError
from pccore._model import PCModel

from ._chain import discover
from ._intercepting import AbstractInterceptingAdapter, InterceptedModel, Options

_LOCK = threading.RLock()


class _InputShapeError(ValueError):
    """The model fails on inputs of the tried shape (what a wrong input-shape guess gives)."""


def _strip(keys: tuple) -> tuple:
    return keys[:-1] if keys and keys[-1] == "value" else keys


def _owner(keys: tuple) -> str:
    return "/".join(str(k) for k in _strip(keys)[:-1])


def _path_name(path: tuple) -> str:
    return "/".join(str(k) for k in path)


@contextlib.contextmanager
def _patched(classes, ids: dict[int, str], icpt):
    """Temporarily route `__call__` of `classes` through `icpt` for instances in `ids`."""
    originals = {cls: (cls.__dict__.get("__call__"), cls.__call__) for cls in classes}

    def wrapper_for(orig):
        def __call__(self, *args, **kwargs):
            name = ids.get(id(self))
            if name is None:
                return orig(self, *args, **kwargs)
            return icpt(name, "__call__", lambda *a, **k: orig(self, *a, **k), args, kwargs)

        return __call__

    with _LOCK:
        try:
            for cls, (_, resolved) in originals.items():
                cls.__call__ = wrapper_for(resolved)
            yield
        finally:
            for cls, (own, _) in originals.items():
                if own is None:
                    del cls.__call__
                else:
                    cls.__call__ = own


def _training_layers(model) -> tuple[bool, bool]:
    """Whether any nnx.BatchNorm or nnx.Dropout is in training mode, and whether a Dropout
    with a positive rate is (it draws random masks)."""
    bn = drop = False
    for _, m in nnx.iter_modules(model):
        bn |= isinstance(m, nnx.BatchNorm) and not m.use_running_average
        drop |= isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0
    return bn or drop, drop


_WATCHED = nnx.Any(nnx.BatchStat, nnx.RngState)


def _watched(m) -> dict:
    """BatchStat and RNG-stream variables of a merged module: path -> (type, value)."""
    return {
        path: (type(v).__name__, v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(m, _WATCHED))
    }


def _check_unchanged(m, before: dict, what: str) -> None:
    """Refuse a forward pass that draws random numbers or updates batch statistics: a call
    argument (`deterministic=not train`) overrides the modules' own modes.
    Values are tracers here, so a variable written by the call holds a new object."""
    changed = [
        f"{kind} {_path_name(path)!r}"
        for path, (kind, value) in _watched(m).items()
        if path not in before or before[path][1] is not value
    ]
    if changed:
        raise UnsupportedLayerError(
            f"`model`: the forward pass of {what} changes {', '.join(changed)} although its "
            "submodules are in eval mode: a call argument (e.g. `deterministic=not train` for "
            "nnx.Dropout, `use_running_average=not train` for nnx.BatchNorm) selects training "
            "mode. Predictive coding runs each layer many times per step, so random masks and "
            "batch statistics would change at every inference step (and a pure merge-and-apply "
            "loses the updates). Pass the call argument that selects inference mode, e.g. "
            "`pccore.wrap(model, kwargs={'train': False})` or `args=(False,)`."
        )


class NNXAdapter(AbstractInterceptingAdapter):
    """Flax NNX modules: `nnx.Sequential`, and custom modules holding layers in `nnx.List`,
    `nnx.Dict` or attributes.

    `pccore.wrap(module, **options)`. Options:

    - `input_shape`: the per-sample input shape (inferred when the first layer is
        `nnx.Linear`; pass it for token models, e.g. `input_shape=(seq_len,)`).
    - `dtype`: the input dtype, e.g. `jnp.int32` for token ids. By default the parameters'
        float dtype, or int32 when the module fails on float inputs because it indexes with
        them (a first `nnx.Embed`). Integer inputs are clamped, never inferred.
    - `boundaries`: submodule paths (`"layers/0"`, `"enc"`) that start each layer, in call
        order (default: every outermost submodule that owns parameters). A layer may read the
        model input besides its own input (a transformer block building its attention mask
        from the tokens); it may not read another layer's output (a skip around a boundary).
    - `args`, `kwargs`: extra arguments of the module call after the input.
    - `in_place`: if True, `unwrap()` writes the parameters into the user's module with
        `nnx.update` and returns it; by default it returns a new module.

    Only `nnx.Param`s train. A module in evaluation mode (`model.eval()`) runs its
    BatchNorm statistics frozen. A module in training mode (`model.train()`: nnx.BatchNorm with
    `use_running_average=False`, nnx.Dropout with `deterministic=False`) wraps in training
    mode (`model.training`): batch statistics and dropout masks (drawn from the step's `key`)
    during inference, BatchStats updated once per `train_step`, and an evaluation copy of the
    module (`.eval()`) for evaluation. `unwrap()` returns the module, with the current
    BatchStats; `unwrap_state()` its non-parameter state. Modes chosen by a call argument
    (`deterministic=not train`) are not read: pass `kwargs` that select evaluation mode.
    """

    name = "flax.nnx"
    framework_module = "flax"
    extra = "flax"
    priority = 0

    def matches(self, model: Any) -> bool:
        return isinstance(model, nnx.Module)

    def wrap(
        self,
        model: Any,
        variables: Any = None,
        *,
        input_shape: Sequence[int] | None = None,
        boundaries: Sequence[str] | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        in_place: bool = False,
        dtype: Any = None,
    ) -> PCModel:
        options = Options(input_shape, boundaries, dtype, args, kwargs)
        return self.wrap_intercepted(model, variables, options, in_place=in_place)

    def intercept(self, model: Any, variables: Any, options: Options, **extra: Any) -> "_NNX":
        if variables is not None:
            raise ValueError(
                "`variables`: an NNX module holds its own parameters; call `pccore.wrap(model)` "
                "without variables."
            )
        return _NNX(model, options, extra["in_place"])


class _NNX(InterceptedModel):
    """An NNX module, split once: `nnx.Param`s train, the rest of its state is frozen (or, in
    training mode, updated once per step; its RNG streams restart from each step's key)."""

    has_state = True

    def __init__(self, model: Any, options: Options, in_place: bool):
        self.args, self.kwargs = options.calls()[:2]
        self.in_place = in_place
        self.training, self._stochastic = _training_layers(model)
        self.target = model  # what `in_place` updates
        self.train_graphdef = None
        if self.training:  # layers are found on an evaluation copy; the module's own graph trains
            self.train_graphdef = nnx.split(model, nnx.Param, ...)[0]
            model = nnx.clone(model)
            model.eval()
        self.graphdef, self.params, self.frozen = nnx.split(model, nnx.Param, ...)
        self.out_graphdef = self.train_graphdef if self.training else self.graphdef
        self.classes = {type(m) for path, m in nnx.iter_modules(model) if path and callable(m)}
        self.modules = dict((_path_name(p), m) for p, m in nnx.iter_modules(model))
        self.what = f"the NNX module {type(model).__name__}"
        self.rng_kinds = [
            (isinstance(v, nnx.RngKey), isinstance(v, nnx.RngCount))
            for _, v in jtu.tree_flatten_with_path(
                self.frozen, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
        ]

    def call(self, m, x, icpt):
        ids = {id(sub): _path_name(path) for path, sub in nnx.iter_modules(m) if path}
        with _patched(self.classes, ids, icpt):
            return m(x, *self.args, **self.kwargs)

    def run(self, params, frozen, x, icpt):
        return self.call(nnx.merge(self.graphdef, params, frozen), x, icpt)

    def train_run(self, params, frozen, x, icpt, key):
        leaves, tdef = jtu.tree_flatten(frozen)
        if key is not None:  # every RNG stream restarts from this step's key
            if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
                key = jax.random.wrap_key_data(key)
            leaves = [
                jax.random.fold_in(key, k) if is_key else
                jnp.zeros_like(a) if is_count else a
                for k, (a, (is_key, is_count)) in enumerate(zip(leaves, self.rng_kinds))
            ]
        m = nnx.merge(self.train_graphdef, params, jtu.tree_unflatten(tdef, leaves))
        out = self.call(m, x, icpt)
        return out, nnx.split(m, nnx.Param, ...)[2]

    def checked(self, params, frozen, x, icpt):  # wrap time: no random draws, no statistics updates
        m = nnx.merge(self.graphdef, params, frozen)
        before = _watched(m)
        out = self.call(m, x, icpt)
        _check_unchanged(m, before, self.what)
        return out

    def owner(self, keys):
        return _owner(keys)

    def leaf_keys(self, keys):
        return _strip(keys)

    def weight_out_ndim(self, keys):  # an nnx.LinearGeneral's kernel is (in..., out...)
        m = self.modules.get(_path_name(keys[:-1]))
        if isinstance(m, nnx.LinearGeneral) and keys[-1] == "kernel":
            return len(m.out_features)
        return 1

    def refuse(self, e, where):
        msg = str(e)
        if "shape" in msg.lower() or "dot_general" in msg:
            return _InputShapeError(
                f"`model`: the NNX module fails on inputs of the given `input_shape` (at "
                f"{where!r}): {msg.splitlines()[0]} Pass the per-sample `input_shape=`."
            )
        return None

    def find_plan(self, dtype, input_shape, boundaries):
        if input_shape is not None:
            candidates = [tuple(input_shape)]
        else:  # iter_modules is sorted by name, not call order: try each nnx.Linear's fan-in
            candidates = list(dict.fromkeys(
                (m.in_features,) for m in self.modules.values() if isinstance(m, nnx.Linear)))
        other = None
        for shape in candidates:
            in_shape = jax.ShapeDtypeStruct(shape, dtype)
            try:
                plan = discover(self, in_shape, boundaries, probe=self.checked)
            except _InputShapeError:
                if input_shape is not None:
                    raise
                continue  # a wrong guess: try the next nnx.Linear's fan-in
            except ValueError as e:  # the model traced on this shape but is unsupported
                if input_shape is not None:
                    raise
                other = other or e
                continue
            first = self.modules.get(plan.names[0]) if input_shape is None else None
            if input_shape is None and not (
                isinstance(first, nnx.Linear) and (first.in_features,) == shape
            ):
                continue
            return plan, in_shape
        if other is not None:
            raise other
        raise ValueError(
            "`input_shape`: cannot infer the per-sample input shape of this NNX module "
            "(it does not start with an nnx.Linear). Pass it, e.g. "
            "`pccore.wrap(model, input_shape=(8, 8, 1))`."
        )

    def state_layers(self, plan):  # RNG streams are restarted from each step's key, never kept
        return tuple(-1 if any(kind) else o for o, kind in zip(super().state_layers(plan), self.rng_kinds))

    def stochastic(self, in_shape):
        return self._stochastic

    def rebuild(self, params, state=None):
        if self.in_place:
            nnx.update(self.target, params, *(() if state is None else (state,)))
            return self.target
        return nnx.merge(self.out_graphdef, params, self.frozen if state is None else state)
