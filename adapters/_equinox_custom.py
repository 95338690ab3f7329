"""Equinox adapter for any `eqx.Module` of the user's own class, cut at named boundaries.

The user names the submodules whose outputs are the latents (`boundaries=`). While the
model is traced, each boundary is replaced (with `eqx.tree_at`) by a `_Tap` that routes its
call through the interceptor of `adapters/_chain.py`, the machinery the Haiku, Linen and NNX
adapters share: layer `l` runs the user's own `__call__` from latent `z_{l-1}` (substituted as
the output of boundary `l-1`) up to the output of boundary `l`. Equinox modules take one
sample, so the chain runs per sample (`per_sample=True`) and each layer is vmapped.
"""

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from pccore._adapter import UnsupportedLayerError
from pccore._model import PCModel

from ._chain import ChainLayer, Intercepted, discover

try:  # the trace a call runs in: differs inside jax.vmap / lax.scan / jit in the forward
    from jax._src.core import get_opaque_trace_state as _opaque_trace_state
except ImportError:  # pragma: no cover - older or newer jax: the check is skipped
    _opaque_trace_state = None

KeyPath = tuple[tuple[str, Any], ...]  # (("attr", "layers"), ("item", 0))
_CTX = threading.local()


def _trace_state() -> Any:
    return None if _opaque_trace_state is None else _opaque_trace_state(convention="flax")


@contextlib.contextmanager
def _intercepting(icpt: Callable):
    """Route calls of `_Tap`s through `icpt` while the forward pass runs."""
    stack = _CTX.__dict__.setdefault("stack", [])
    stack.append((icpt, _trace_state()))
    try:
        yield
    finally:
        stack.pop()


def _identity(a):
    return a


class _Tap(eqx.Module):
    """A boundary submodule. While a forward pass is intercepted it runs as usual, then
    passes its output through the marker `marker` (the name of the layer that starts there;
    `None` after the last boundary), which the interceptor may replace by a latent."""

    inner: Any
    name: str = eqx.field(static=True)
    marker: str | None = eqx.field(static=True, default=None)

    def __call__(self, *args, **kwargs):
        stack = getattr(_CTX, "stack", None)
        if not stack:
            return self.inner(*args, **kwargs)
        icpt, trace = stack[-1]
        if trace is not None and _trace_state() != trace:
            raise UnsupportedLayerError(
                f"`boundaries`: {self.name!r} is called inside a jax.vmap, lax.scan or other "
                "JAX transform (jit, checkpoint, cond) within the model's forward pass, so its "
                "output there is not one latent of the sample. Name the module that contains "
                "the transform (the one whose __call__ runs the vmap or scan) as the boundary "
                f"instead of {self.name!r}."
            )
        y = self.inner(*args, **kwargs)
        if self.marker is None:
            return y
        return icpt(self.marker, "__call__", _identity, (y,), {})

    def __getattr__(self, item: str) -> Any:  # user code reading `self.conv.weight` and such
        if item in ("inner", "name", "marker") or item.startswith("__"):
            raise AttributeError(item)
        return getattr(self.inner, item)


def walk(node: Any, kp: KeyPath = ()):
    """Every Equinox module below `node` that is a pytree child (static fields are not), with
    its key path, in attribute order."""
    if isinstance(node, eqx.Module):
        if kp:
            yield kp, node
        for f in dataclasses.fields(node):
            if not f.metadata.get("static", False):
                yield from walk(getattr(node, f.name, None), (*kp, ("attr", f.name)))
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from walk(v, (*kp, ("item", i)))
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, (*kp, ("item", k)))


def fmt(kp: KeyPath) -> str:
    """`layers[0]`, `blocks[2].attn`, `heads['a']`."""
    out = "".join(f".{k}" if kind == "attr" else f"[{k!r}]" for kind, k in kp)
    return out.lstrip(".")


def _get(node: Any, kp: KeyPath) -> Any:
    for kind, k in kp:
        node = getattr(node, k) if kind == "attr" else node[k]
    return node


def has_params(node: Any) -> bool:
    return bool(jtu.tree_leaves(eqx.filter(node, eqx.is_inexact_array)))


def _outermost(subs, pred: Callable[[Any], bool]) -> list[KeyPath]:
    """Key paths of the submodules satisfying `pred`, not descending into a match."""
    found: list[KeyPath] = []
    for kp, m in subs:
        if any(kp[: len(f)] == f for f in found):
            continue
        if pred(m):
            found.append(kp)
    return found


def resolve(model: Any, boundaries: Any) -> tuple[list[KeyPath], bool]:
    """Boundary key paths from paths, a predicate, or module objects; and whether the user
    gave their order (paths do; a predicate or objects are put in call order)."""
    subs = list(walk(model))
    if isinstance(boundaries, str) or isinstance(boundaries, eqx.Module):
        raise TypeError(
            f"`boundaries`: expected a list (of submodule paths such as 'layers[0]', or of "
            f"submodules) or a predicate; got one {type(boundaries).__name__}. Wrap it in a "
            f"list: `boundaries=[...]`."
        )
    if callable(boundaries):
        found = _outermost(subs, lambda m: bool(boundaries(m)))
        if not found:
            raise ValueError(
                f"`boundaries`: the predicate matches no submodule of {type(model).__name__}; "
                f"submodules: {[fmt(kp) for kp, _ in subs]}."
            )
        return found, False
    by_path = {fmt(kp): kp for kp, _ in subs}
    out: list[KeyPath] = []
    ordered = True
    for b in boundaries:
        if isinstance(b, str):
            if b not in by_path:
                raise ValueError(
                    f"`boundaries`: {type(model).__name__} has no submodule {b!r}; its "
                    f"submodules: {list(by_path)}."
                )
            out.append(by_path[b])
        elif isinstance(b, eqx.Module):
            hits = [kp for kp, m in subs if m is b]
            if not hits:
                raise ValueError(
                    f"`boundaries`: a {type(b).__name__} given is not a submodule of "
                    f"{type(model).__name__} (modules are matched by identity: pass "
                    "`model.layer`, not a copy)."
                )
            out.append(hits[0])
            ordered = False
        else:
            raise TypeError(
                f"`boundaries`: entries are submodule paths (str) or submodules; got "
                f"{type(b).__name__}."
            )
    if not out:
        raise ValueError("`boundaries`: empty; name at least one submodule.")
    return out, ordered


def tap(model: Any, kps: Sequence[KeyPath], markers: Sequence[str | None] | None = None) -> Any:
    """`model` with the submodules at `kps` replaced by `_Tap`s named by their paths."""
    if not kps:
        return model
    markers = [None] * len(kps) if markers is None else markers
    return eqx.tree_at(
        lambda m: [_get(m, kp) for kp in kps], model,
        [_Tap(_get(model, kp), fmt(kp), mk) for kp, mk in zip(kps, markers)],
    )


def call_order(model: Any, kps: Sequence[KeyPath], x: jax.ShapeDtypeStruct, call) -> list[str]:
    """Names of the submodules at `kps` in the order the forward pass calls them (outermost
    calls only; a name repeats if it is called again)."""
    seen: list[str] = []
    depth = [0]
    names = [fmt(kp) for kp in kps]

    def icpt(name, method, nf, args, kw):
        if depth[0] == 0:
            seen.append(name)
        depth[0] += 1
        try:
            return nf(*args, **kw)
        finally:
            depth[0] -= 1

    class _Rec(eqx.Module):  # records the call itself, around the real module
        inner: Any
        name: str = eqx.field(static=True)

        def __call__(self, *a, **k):
            return _CTX.rec(self.name, "__call__", self.inner, a, k)

        def __getattr__(self, item: str) -> Any:
            if item in ("inner", "name") or item.startswith("__"):
                raise AttributeError(item)
            return getattr(self.inner, item)

    def run(xi):
        _CTX.rec = icpt
        m = eqx.tree_at(lambda m: [_get(m, kp) for kp in kps], model,
                        [_Rec(_get(model, kp), n) for kp, n in zip(kps, names)])
        return call(m, xi)

    jax.eval_shape(run, x)
    return seen


class _MaskSlicer:
    """Per-layer params in the user's own structure: the model with `None` at every leaf of
    the other layers (what `eqx.filter` gives), and back."""

    def __init__(self, tree: Any, layer_of: Sequence[int], num_layers: int):
        leaves, self.treedef = jtu.tree_flatten(tree)
        self.shapes = tuple(jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves)
        self.layer = tuple(layer_of)
        self.num_layers = num_layers
        self.params = tuple(
            jtu.tree_unflatten(self.treedef, [a if l == i else None for a, l in zip(leaves, self.layer)])
            for i in range(num_layers)
        )

    def full(self, i: int, params_i: Any) -> Any:
        """The whole tree with layer `i`'s leaves and zero placeholders elsewhere."""
        it = iter(jtu.tree_leaves(params_i))
        return jtu.tree_unflatten(self.treedef, [
            next(it) if l == i else jnp.zeros(s.shape, s.dtype) for l, s in zip(self.layer, self.shapes)
        ])

    def merge(self, params: Sequence[Any]) -> Any:
        its = [iter(jtu.tree_leaves(p)) for p in params]
        return jtu.tree_unflatten(self.treedef, [next(its[l]) for l in self.layer])


def _first_leaf_module(model: Any) -> Any:
    """The first submodule (attribute order) that owns parameters and has no submodules that do."""
    subs = [(kp, m) for kp, m in walk(model) if has_params(m)]
    for kp, m in subs:
        if not any(k[: len(kp)] == kp and k != kp for k, _ in subs):
            return m
    return None


def input_spec(model: Any, input_shape, dtype) -> jax.ShapeDtypeStruct:
    """The per-sample input: `input_shape` (or the fan-in of a leading `eqx.nn.Linear`) and
    `dtype` (int32 when the first parameterised submodule is an `eqx.nn.Embedding`)."""
    first = _first_leaf_module(model)
    token = isinstance(first, eqx.nn.Embedding)
    if dtype is None:
        leaves = jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
        dtype = jnp.int32 if token else (leaves[0].dtype if leaves else jnp.float32)
    if input_shape is not None:
        return jax.ShapeDtypeStruct(tuple(input_shape), dtype)
    if isinstance(first, eqx.nn.Linear) and first.in_features != "scalar":
        return jax.ShapeDtypeStruct((first.in_features,), dtype)
    what = "a token sequence, e.g. `input_shape=(seq_len,)`" if token else "e.g. `input_shape=(1, 28, 28)`"
    raise ValueError(
        f"`input_shape`: cannot infer the per-sample input shape of {type(model).__name__} "
        f"(its first parameterised submodule is {type(first).__name__}, not an eqx.nn.Linear). "
        f"Pass the shape of one sample, without the batch axis: {what}."
    )


def no_boundaries_error(model: Any, x: jax.ShapeDtypeStruct | None, call, shape_given: bool) -> ValueError:
    """What to do when a custom module comes without `boundaries`: list the candidates."""
    kps = _outermost(list(walk(model)), has_params)
    names = [fmt(kp) for kp in kps]
    where = "in attribute order"
    if x is not None:
        try:
            names = call_order(model, kps, x, call)
            where = "in call order"
        except Exception:  # the model does not run on this input: list them unordered
            pass
    if x is None:  # not inferable: the user must add it
        shape = ", input_shape=(...)"
    else:  # as given (inferred ones need not be repeated)
        shape = f", input_shape={tuple(x.shape)}" if shape_given else ""
    return ValueError(
        f"`boundaries`: {type(model).__name__} is an Equinox module of your own class, so "
        "pccore cannot tell which submodule outputs are the latents of predictive coding (one "
        "latent after each boundary). Its parameterised submodules, "
        f"{where}: {names}. Name the boundaries, e.g. "
        f"`pccore.wrap(model, boundaries={names!r}{shape})`, or pass a predicate "
        "(`boundaries=lambda m: isinstance(m, eqx.nn.Conv2d | eqx.nn.Linear)`) or the "
        "submodules themselves (`boundaries=[model.conv, model.head]`). A parameter-free "
        "submodule (eqx.nn.Identity, a pooling layer) may be a boundary too."
    )


def _check_calls(bnames: list[str], order: list[str], ordered: bool, model: str) -> None:
    """Each boundary is called once, in the order given."""
    missing = [b for b in bnames if b not in order]
    if missing:
        raise ValueError(
            f"`boundaries`: {missing} are never called by the forward pass of {model} "
            f"(boundaries called: {order}). Name submodules that its __call__ calls."
        )
    twice = sorted({b for b in order if order.count(b) > 1})
    if twice:
        raise ValueError(
            f"`boundaries`: {twice} are called more than once per forward pass of {model} "
            "(shared weights or a loop); each latent is the output of one call. Name a module "
            "called once, such as the one containing the loop or scan."
        )
    if ordered and order != bnames:
        raise ValueError(
            f"`boundaries`: given as {bnames} but called in the order {order}; list them in "
            "call order."
        )


class _Custom(Intercepted):
    """A custom module cut at its boundaries: every leaf goes to the layer whose output reads
    it; the chain runs per sample."""

    per_sample = True

    def __init__(self, params, static, what, kps, markers, bnames, call):
        self.params, self.frozen, self.what = params, None, what
        self.static, self.kps, self.markers, self.bnames, self.call = static, kps, markers, bnames, call

    def run(self, params, frozen, x, icpt):
        m = tap(eqx.combine(params, self.static), self.kps, self.markers)
        with _intercepting(icpt):
            # the start of layer 0, for the chain's bookkeeping; the forward reads `x` itself
            # (the clamped input where a later layer reads it, else zeros there)
            icpt(self.bnames[0], "__call__", _identity, (x,), {})
            return self.call(m, x)

    def owner(self, keys: tuple) -> str:
        return fmt(tuple(("attr" if isinstance(k, str) else "item", k) for k in keys))

    def loose(self, owner: str) -> bool:
        return True

    def slicer(self, layer_of_leaf, num_layers):
        return _MaskSlicer(self.params, layer_of_leaf, num_layers)


def wrap_custom(model: Any, *, boundaries: Any, input_shape=None, dtype=None, args: tuple = (),
                kwargs: dict | None = None) -> PCModel:
    """Cut a custom Equinox module at `boundaries` (see `EquinoxAdapter`)."""
    kwargs = dict(kwargs or {})
    name = type(model).__name__
    what = f"the Equinox module {name}"

    def call(m, xi):
        return m(xi, *args, **kwargs)

    if boundaries is None:
        try:
            x = input_spec(model, input_shape, dtype)
        except ValueError:
            x = None
        raise no_boundaries_error(model, x, call, input_shape is not None)
    kps, ordered = resolve(model, boundaries)
    in_shape = input_spec(model, input_shape, dtype)
    order = call_order(model, kps, in_shape, call)
    if not ordered:
        kps = sorted(kps, key=lambda kp: order.index(fmt(kp)) if fmt(kp) in order else len(order))
    bnames = [fmt(kp) for kp in kps]
    _check_calls(bnames, order, ordered, name)
    markers = [*bnames[1:], None]  # after boundary l starts layer l + 1
    params, static = eqx.partition(model, eqx.is_inexact_array)

    plan = discover(_Custom(params, static, what, kps, markers, bnames, call), in_shape, bnames)
    layers = tuple(ChainLayer(i, plan, None) for i in range(len(plan.names)))

    def rebuild(new_params):
        return eqx.combine(plan.slicer.merge(new_params), static)

    from ._equinox import _weight_specs

    per_layer = plan.slicer.params
    return PCModel(
        layers=layers,
        params=per_layer,
        in_shape=in_shape,
        out_shapes=plan.out_shapes,
        names=plan.names,
        weights=tuple(_weight_specs(p) for p in per_layer),
        skips=(False,) * len(layers),
        framework="equinox",
        rebuild=rebuild,
        reads_input=plan.reads_input,
    )
