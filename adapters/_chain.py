"""Layer discovery by substitution, shared by the Haiku, Linen and NNX adapters.

A framework supplies `run(full_params, frozen, x, icpt)`, which calls the user's model with
an interceptor installed: `icpt(name, method, next_fn, args, kwargs)` is called for every
method call of a named submodule. The model is cut at *boundaries*: by default the
outermost calls of modules that own parameters directly, in call order; or the module
names the user gives. Layer `i` runs the model with

- boundaries `j < i` replaced by zeros of their recorded output shape (dead code that XLA
  removes; they need no parameters, so other layers' parameters are zero placeholders),
- boundary `i` fed the layer input `x`,
- a stop at the input of boundary `i + 1`, which is the layer's output.

Parameter-free work between boundaries (activations, pooling, reshapes) thus folds into the
layer before it, as in the Equinox adapter. Parameters owned by modules that are not
boundaries belong to the layer during which they are called; parameters read by no call
raise, so nothing is dropped silently.
"""

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from pccore._adapter import UnsupportedLayerError
from pccore._model import WeightSpec

Icpt = Callable[[str, str, Callable, tuple, dict], Any]
Run = Callable[[Any, Any, Any, Icpt], Any]


class _Stop(Exception):
    pass


def _key(k) -> Hashable:
    if isinstance(k, jtu.DictKey):
        return k.key
    if isinstance(k, jtu.GetAttrKey):
        return k.name
    if isinstance(k, jtu.SequenceKey):
        return k.idx
    if isinstance(k, jtu.FlattenedIndexKey):
        return k.key
    raise TypeError(f"unsupported pytree key {k!r}")


class Slicer:
    """Splits a nested parameter mapping into per-layer nested dicts, and merges them back.

    Flattening happens here once, at wrap time; `full` and `merge` only unflatten.
    """

    def __init__(self, tree: Any, leaf_keys: Callable[[tuple], tuple], layer_of_leaf: Sequence[int],
                 num_layers: int):
        with_path, self.treedef = jtu.tree_flatten_with_path(tree)
        self.shapes = tuple(jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for _, a in with_path)
        self.layer = tuple(layer_of_leaf)
        self.num_layers = num_layers
        nested: list[dict] = [{} for _ in range(num_layers)]
        keys = []
        for (path, leaf), l in zip(with_path, self.layer):
            ks = leaf_keys(tuple(_key(k) for k in path))
            keys.append(ks)
            d = nested[l]
            for k in ks[:-1]:
                d = d.setdefault(k, {})
            d[ks[-1]] = leaf
        self.params = tuple(nested)
        pos = []
        for ks, l in zip(keys, self.layer):
            order = [tuple(_key(k) for k in p) for p, _ in jtu.tree_flatten_with_path(nested[l])[0]]
            pos.append(order.index(ks))
        self.pos = tuple(pos)

    def full(self, i: int, params_i: Any) -> Any:
        """The whole tree with layer `i`'s leaves and zero placeholders elsewhere."""
        leaves = jtu.tree_leaves(params_i)
        out = [
            leaves[p] if l == i else jnp.zeros(s.shape, s.dtype)
            for l, p, s in zip(self.layer, self.pos, self.shapes)
        ]
        return jtu.tree_unflatten(self.treedef, out)

    def merge(self, params: Sequence[Any]) -> Any:
        """The whole tree, in the original structure, from per-layer params."""
        leaves = [jtu.tree_leaves(p) for p in params]
        return jtu.tree_unflatten(self.treedef, [leaves[l][p] for l, p in zip(self.layer, self.pos)])


class Plan:
    """The result of discovery: boundaries in call order and their shapes."""

    def __init__(self, run: Run, names: tuple[str, ...], out_shapes, boundary_out, in_shape,
                 slicer: Slicer):
        self.run = run
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.boundary_out = boundary_out
        self.out_shapes = out_shapes
        self.in_shape = in_shape
        self.slicer = slicer


def require_params(params: Any, what: str) -> None:
    if not jtu.tree_leaves(params):
        raise ValueError(
            f"`model`: {what} has no parameters, so there is nothing for predictive coding to "
            "train. Pass the model's initialised parameters (e.g. `f.init(key, x)`), and use a "
            "model with at least one parameterised layer."
        )


def discover(
    run: Run,
    params: Any,
    frozen: Any,
    in_shape: jax.ShapeDtypeStruct,
    owner_of_leaf: Callable[[tuple], str],
    leaf_keys: Callable[[tuple], tuple],
    boundaries: Sequence[str] | None,
    what: str,
    refuse: Callable[[BaseException, str | None], BaseException | None],
) -> Plan:
    """Trace the model once (abstractly) and cut it into layers.

    **Arguments:**

    - `run`: the framework's call, see the module docstring.
    - `params`: the whole trainable tree.
    - `frozen`: non-trainable state passed to `run` unchanged.
    - `in_shape`: per-sample input shape.
    - `owner_of_leaf`: module name owning a leaf, from its key path.
    - `leaf_keys`: the key path of a leaf inside the per-layer nested dicts.
    - `boundaries`: explicit boundary module names, or `None` for automatic discovery.
    - `what`: how to name the model in errors.
    - `refuse`: maps an exception raised by the model (and the innermost module name) to
        an error to raise instead (or `None` to re-raise it).
    """
    require_params(params, what)
    with_path = jtu.tree_flatten_with_path(params)[0]
    leaf_owner = [owner_of_leaf(tuple(_key(k) for k in p)) for p, _ in with_path]
    owners = set(leaf_owner)
    explicit = None if boundaries is None else list(boundaries)
    if explicit is not None and len(set(explicit)) != len(explicit):
        raise ValueError(f"`boundaries`: names repeat: {explicit}.")
    order: list[str] = []
    in_shapes: list[jax.ShapeDtypeStruct] = []
    b_out: list[jax.ShapeDtypeStruct] = []
    seg: dict[str, set[int]] = {}
    active = [0]
    where: list[str | None] = [None]

    def icpt(name, method, nf, args, kw):
        is_b = method == "__call__" and (
            name in explicit if explicit is not None else (name in owners and active[0] == 0)
        )
        if is_b:
            if active[0] > 0:
                raise ValueError(
                    f"`boundaries`: {name!r} is called inside another boundary; boundaries must "
                    "be called one after another. Name the outer module or its children, not both."
                )
            order.append(name)
            a = args[0]
            in_shapes.append(jax.ShapeDtypeStruct(a.shape[1:], a.dtype))
        if name in owners:
            seg.setdefault(name, set()).add(max(len(order) - 1, 0))
        active[0] += is_b
        try:
            res = nf(*args, **kw)
            if is_b:
                b_out.append(jax.ShapeDtypeStruct(res.shape[1:], res.dtype))
            return res
        except _Stop:
            raise
        except Exception:
            if where[0] is None:
                where[0] = name
            raise
        finally:
            active[0] -= is_b

    x = jax.ShapeDtypeStruct((2, *in_shape.shape), in_shape.dtype)
    try:
        out = jax.eval_shape(lambda p, s, x: run(p, s, x, icpt), params, frozen, x)
    except UnsupportedLayerError:
        raise
    except Exception as e:
        err = refuse(e, where[0])
        if err is None:
            raise
        raise err from e
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(
            f"`model`: {what} returns a {type(out).__name__}; predictive coding needs a model "
            "that returns one array."
        )
    if explicit is not None:
        missing = [b for b in explicit if b not in order]
        if missing:
            raise ValueError(
                f"`boundaries`: {missing} are never called by {what}; modules called in order: "
                f"{order}. Use module names of the forward pass."
            )
        if order != explicit:
            raise ValueError(
                f"`boundaries`: given as {explicit} but called in the order {order}; list them in "
                "call order."
            )
    counts = {n: order.count(n) for n in order}
    twice = {n: c for n, c in counts.items() if c > 1}
    if twice:
        raise ValueError(
            f"`model`: cannot determine the layer order of {what}: module(s) {twice} are called "
            "more than once (shared weights or a loop over one module). Predictive coding needs "
            "a chain in which each parameterised module is called once; use separate modules, "
            "or pass `boundaries=[...]` naming modules that are called once each."
        )
    if not order:
        raise ValueError(
            f"`model`: found no parameterised module call in {what} (parameters of "
            f"{sorted(owners)}); pass `boundaries=[module names]` in call order."
        )
    unread = sorted(o for o in owners if o not in seg)
    if unread:
        raise ValueError(
            f"`variables`: parameters of {unread} belong to no layer: no call of these modules "
            f"was seen in the forward pass of {what} (layers: {order}). Remove them from the "
            "parameters, or check that the parameters belong to this model."
        )
    shared = {o: sorted(s) for o, s in seg.items() if len(s) > 1}
    if shared:
        raise ValueError(
            f"`model`: parameters of {sorted(shared)} are used by several layers "
            f"({shared}); predictive coding layers cannot share parameters."
        )
    layer_of = [next(iter(seg[o])) for o in leaf_owner]
    slicer = Slicer(params, leaf_keys, layer_of, len(order))
    shapes = [*in_shapes[1:], jax.ShapeDtypeStruct(out.shape[1:], out.dtype)]
    return Plan(run, tuple(order), tuple(shapes), tuple(b_out), in_shape, slicer)


class ChainLayer(eqx.Module):
    """`apply_i(params_i, x)` of layer `i` of a discovered plan (frozen state as a pytree)."""

    i: int = eqx.field(static=True)
    plan: Plan = eqx.field(static=True)
    frozen: Any

    def __call__(self, params, x):
        plan, i = self.plan, self.i
        full = plan.slicer.full(i, params)
        B = x.shape[0]
        out = {}

        def icpt(name, method, nf, args, kw):
            if method != "__call__" or name not in plan.index:
                return nf(*args, **kw)
            j = plan.index[name]
            if j < i:
                s = plan.boundary_out[j]
                return jnp.zeros((B, *s.shape), s.dtype)
            if j == i:
                return nf(x, *args[1:], **kw) if i > 0 else nf(*args, **kw)
            out["y"] = args[0]
            raise _Stop

        data = x if i == 0 else jnp.zeros((B, *plan.in_shape.shape), plan.in_shape.dtype)
        try:
            out["y"] = plan.run(full, self.frozen, data, icpt)
        except _Stop:
            pass
        return out["y"]


def layer_names(plan: Plan, leaf_owner_names: Sequence[str]) -> tuple[str, ...]:
    """Readable layer names: the boundary, plus other parameter owners folded into it."""
    extra: list[list[str]] = [[] for _ in plan.names]
    for o, l in leaf_owner_names:
        if o not in plan.names and o not in extra[l]:
            extra[l].append(o)
    return tuple("+".join([n, *e]) for n, e in zip(plan.names, extra))


def weight_specs(params: Any, names: Sequence[str], out_axis=lambda keys: -1) -> tuple[WeightSpec, ...]:
    """WeightSpecs of the leaves called one of `names` with ndim >= 2; `out_axis(keys)` gives
    the output axis from a leaf's key path (default -1: `(..., in, out)`)."""
    specs = []
    for i, (path, leaf) in enumerate(jtu.tree_flatten_with_path(params)[0]):
        ks = [_key(k) for k in path]
        ks = [k for k in ks if k != "value"]
        if ks and ks[-1] in names and np.ndim(leaf) >= 2:
            specs.append(WeightSpec(i, out_axis(tuple(ks))))
    return tuple(specs)


def owners_by_layer(plan: Plan, params: Any, owner_of_leaf) -> list[tuple[str, int]]:
    with_path = jtu.tree_flatten_with_path(params)[0]
    return [
        (owner_of_leaf(tuple(_key(k) for k in p)), l) for (p, _), l in zip(with_path, plan.slicer.layer)
    ]
