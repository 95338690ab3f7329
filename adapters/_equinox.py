"""Equinox adapter: `eqx.nn.MLP`, `eqx.nn.Sequential`, lists/tuples of layers, and any
`eqx.Module` of the user's own class cut at named boundaries (`_equinox_custom.py`)."""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from pccore._adapter import AbstractAdapter, UnsupportedLayerError
from pccore._model import AbstractStatefulLayer, PCModel, WeightSpec

from ._equinox_custom import walk, wrap_custom

_WEIGHTED = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)
_act = eqx.filter_vmap(lambda a, b: a(b))  # how eqx.nn.MLP applies a (learnable) activation


def _has_params(layer: Any) -> bool:
    return bool(jtu.tree_leaves(eqx.filter(layer, eqx.is_inexact_array)))


def _weight_specs(params: Any) -> tuple[WeightSpec, ...]:
    """Leaf positions of the `weight` of every Linear/Conv inside a layer's params."""

    def mark(node):
        if isinstance(node, _WEIGHTED):
            flags = jtu.tree_map(lambda _: False, node)
            if node.weight is None:  # another layer's (a per-layer slice of a custom module)
                return flags
            return eqx.tree_at(lambda m: m.weight, flags, True)
        return False

    flags = jtu.tree_map(mark, params, is_leaf=lambda n: isinstance(n, _WEIGHTED))
    return tuple(WeightSpec(i, 0) for i, f in enumerate(jtu.tree_leaves(flags)) if f)


def _submodules(node: Any, path: str):
    """Every Equinox module inside `node` (itself included), at any depth, with its path."""
    if isinstance(node, eqx.Module):
        yield path, node
        for f in dataclasses.fields(node):  # static fields too: a module may hide there
            yield from _submodules(getattr(node, f.name, None), f"{path}.{f.name}")
        return
    for keys, leaf in jtu.tree_flatten_with_path(node, is_leaf=lambda n: isinstance(n, eqx.Module))[0]:
        if isinstance(leaf, eqx.Module):
            yield from _submodules(leaf, path + jtu.keystr(keys))


def _is_dropping(sub: Any) -> bool:
    return isinstance(sub, eqx.nn.Dropout) and not sub.inference and not (
        isinstance(sub.p, int | float) and sub.p == 0)  # p=0 (MultiheadAttention)


def _check_stateless(layers: Sequence[Any], where: str, state: Any = None,
                     whole: bool = False, training_ok: bool = False) -> None:
    """Refuse training-mode Dropout/BatchNorm (unless `training_ok`: a Sequential or list
    trains them), and stateful layers given without their state, wherever they are nested
    (inside custom modules or inner Sequentials). `whole`: `layers` is the one model `where`
    itself, not a sequence of its elements."""
    for i, layer in enumerate(layers):
        for at, sub in _submodules(layer, where if whole else f"{where}[{i}]"):
            if _is_dropping(sub) and not training_ok:
                raise UnsupportedLayerError(
                    f"`model`: {at} is eqx.nn.Dropout in training mode "
                    "(`inference=False`) inside a module of your own class. Training-mode "
                    "Dropout and BatchNorm train in an eqx.nn.Sequential or a list of layers "
                    "(one mask per training step, from its `key`); for this class, pass "
                    "`eqx.nn.inference_mode(model)` to run it as the identity."
                )
            if isinstance(sub, eqx.nn.BatchNorm) and not sub.inference and not training_ok:
                raise UnsupportedLayerError(
                    f"`model`: {at} is eqx.nn.BatchNorm in training mode "
                    "(`inference=False`) inside a module of your own class. Training-mode "
                    "BatchNorm trains in an eqx.nn.Sequential or a list of layers "
                    "(`pccore.wrap(seq, state)`); for this class, pass "
                    "`eqx.nn.inference_mode(model)` and its `state` to run it frozen on its "
                    "running averages."
                )
            if isinstance(sub, eqx.nn.StatefulLayer) and sub.is_stateful() and state is None:
                raise UnsupportedLayerError(
                    f"`model`: {at} is a stateful {type(sub).__name__} that reads an "
                    "eqx.nn.State. Pass its state (`pccore.wrap(model, state)` with "
                    "`model, state = eqx.nn.make_with_state(...)(...)`); it stays frozen."
                )


class _Frozen(eqx.Module):
    """A layer function that closes over frozen `eqx.nn.State` (a pytree, never trained)."""

    fn: Callable = eqx.field(static=True)
    static: Any = eqx.field(static=True)
    state: Any

    def __call__(self, params, x):
        model = eqx.combine(params, self.static)
        return jax.vmap(lambda xi: self.fn(model, xi, self.state))(x)


class _Pure(eqx.Module):
    fn: Callable = eqx.field(static=True)
    static: Any = eqx.field(static=True)

    def __call__(self, params, x):
        model = eqx.combine(params, self.static)
        return jax.vmap(lambda xi: self.fn(model, xi))(x)


def _run_group(group, x, state=None):
    for layer in group:
        if isinstance(layer, eqx.nn.StatefulLayer) and state is not None:
            x, _ = layer(x, state)
        else:
            x = layer(x)
    return x


def _train_group(group, x, state, keys):
    """A group's training forward on one sample: `keys[j]` for its `j`-th element, as
    `eqx.nn.Sequential` splits its key; returns the output and the updated state."""
    for layer, k in zip(group, keys):
        if isinstance(layer, eqx.nn.StatefulLayer) and layer.is_stateful():
            x, state = layer(x, state, key=k)
        else:
            x = layer(x, key=k)
    return x, state


class _Training(AbstractStatefulLayer):
    """A group of Sequential elements with training-mode BatchNorm/Dropout.

    Evaluation runs the group in inference mode on the held `eqx.nn.State`. Training runs it
    as a native training loop does, `jax.vmap(seq, axis_name="batch", in_axes=(0, None, 0),
    out_axes=(0, None))(z, state, jax.random.split(key, B))`: one key per sample, split over
    the Sequential's `n` elements; this group's elements are `positions` among them.
    """

    train_static: Any = eqx.field(static=True)
    eval_static: Any = eqx.field(static=True)
    state: Any
    positions: tuple[int, ...] = eqx.field(static=True)
    n: int = eqx.field(static=True)
    axis_name: Any = eqx.field(static=True)
    stochastic: bool = eqx.field(static=True)

    @property
    def static(self) -> Any:
        return self.eval_static

    def __call__(self, params, z, x=None):
        group = eqx.combine(params, self.eval_static)
        return jax.vmap(lambda zi: _run_group(group, zi, self.state))(z)

    def train(self, params, z, key, x=None):
        group = eqx.combine(params, self.train_static)
        idx = jnp.asarray(self.positions)

        keys = None if key is None else jax.random.split(key, z.shape[0])
        held = _clone(self.state)  # used once: a layer's update retires the State it gets

        def one(zi, ki):
            keys = [None] * len(self.positions) if ki is None else list(
                jax.random.split(ki, self.n)[idx])
            return _train_group(group, zi, held, keys)

        y, state = jax.vmap(one, in_axes=(0, None if keys is None else 0), out_axes=(0, None),
                            axis_name=self.axis_name)(z, keys)
        return y, eqx.tree_at(lambda f: f.state, self, state) if self.state is not None else self


def _trial_train(layers, params, in_shape, where: str) -> None:
    """Trace the training forward once at wrap time (two samples, a key), so that an element
    that cannot run it (a custom module without a `key` argument) fails here, named."""
    x = jax.ShapeDtypeStruct((2, *in_shape.shape), in_shape.dtype)
    key = jax.random.key(0)
    for l, (f, p) in enumerate(zip(layers, params)):
        try:
            x = jax.eval_shape(lambda p, z: f.train(p, z, key)[0], p, x)
        except Exception as e:
            said = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"`model`: the training forward of layer {l} (elements {list(f.positions)} of "
                f"{where}) failed at wrap time: {said}. In training mode each element is called "
                "as an eqx.nn.Sequential calls it, `element(x, state, key=key)` if it is "
                "stateful, else `element(x, key=key)`, per sample under "
                f"`jax.vmap(axis_name={f.axis_name!r})`; give your own elements a `key` "
                "keyword argument, or pass `eqx.nn.inference_mode(model)`."
            ) from e


def _clone(state: Any) -> Any:
    """A copy of an `eqx.nn.State` (None stays None)."""
    if state is None:
        return None
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(treedef, leaves)


def _state_owners(state: Any, groups: Sequence[Any]) -> tuple[int, ...]:
    """Per leaf of `state`, the group whose layers hold its `eqx.nn.StateIndex` (-1: none)."""
    where = {id(a): k for k, a in enumerate(jtu.tree_leaves(state))}
    owners = [-1] * len(where)
    for g, group in enumerate(groups):
        for index in jtu.tree_leaves(group, is_leaf=lambda n: isinstance(n, eqx.nn.StateIndex)):
            if isinstance(index, eqx.nn.StateIndex):
                for a in jtu.tree_leaves(state.get(index)):
                    owners[where[id(a)]] = g
    return tuple(owners)


def _check_float_arrays(items: Sequence[Any], where: str) -> None:
    """Refuse integer/boolean JAX arrays inside layers: Equinox would hold them fixed (only
    floating arrays are parameters), so an integer weight would silently never train."""
    for i, item in enumerate(items):
        leaves = jtu.tree_flatten_with_path(item)[0]
        for path, a in leaves:
            if isinstance(a, jax.Array) and not jnp.issubdtype(a.dtype, jnp.inexact):
                raise TypeError(
                    f"`model`: {where}[{i}]{jtu.keystr(path)} is an array of dtype {a.dtype}; expected "
                    "float32 or float64 parameters (Equinox trains floating arrays only, so "
                    "this one would silently stay fixed). Cast it, e.g. `.astype(jnp.float32)`; "
                    "a constant that must stay integer belongs in a NumPy array or a static "
                    "field (`eqx.field(static=True)`)."
                )


def _expects(group: Any) -> str:
    """What the first Linear/Conv of a layer takes per sample, in words ('' if unknown)."""
    first = group[0] if isinstance(group, tuple | list) and group else group
    if isinstance(first, tuple | list):  # an MLP block (linear, activation)
        first = first[0]
    if isinstance(first, eqx.nn.Linear):
        n = first.in_features
        return "a scalar, shape ()" if n == "scalar" else f"shape ({n},) (its in_features)"
    if isinstance(first, eqx.nn.Conv | eqx.nn.ConvTranspose):
        dims = ", ".join(["H", "W", "D"][: first.num_spatial_dims])
        return (f"shape ({first.in_channels}, {dims}): channels first, "
                f"{first.in_channels} channel(s) (its in_channels)")
    return ""


def _shapes(layers, params, in_shape, names=None) -> tuple[jax.ShapeDtypeStruct, ...]:
    out, x = [], jax.ShapeDtypeStruct((1, *in_shape.shape), in_shape.dtype)
    for l, (fn, p) in enumerate(zip(layers, params)):
        try:
            x = jax.eval_shape(fn, p, x)
        except (TypeError, ValueError) as e:
            raise _shape_error(l, fn, p, x.shape[1:], names, e) from e
        out.append(jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
    return tuple(out)


def _shape_error(l, fn, p, got, names, e) -> ValueError:
    name = f"layer {l}" + (f" ({names[l]!r})" if names else "")
    source = "the model input (`input_shape`)" if l == 0 else f"layer {l - 1}'s output"
    expects = _expects(eqx.combine(p, fn.static))
    want = f"; it expects per-sample {expects}" if expects else ""
    hint = ""
    if len(got) >= 3 and "channels first" in expects:
        hint = (f" Equinox convolutions are channels-first: for images of shape {got} "
                f"(channels last) pass input_shape={(got[-1], *got[:-1])} and transpose x "
                "to (batch, C, H, W).")
    fix = ("Pass the per-sample input shape, without the batch axis, as `input_shape=`."
           if l == 0 else f"Make layer {l - 1}'s output size match layer {l}'s input.")
    said = ""
    if not expects:  # no Linear/Conv to name what it wants: say what failed
        said = f" (the layer raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return ValueError(
        f"`model`: {name} gets per-sample shape {tuple(got)} from {source}{want}.{hint} {fix}"
        f"{said}"
    )


def _in_shape(first: Any, input_shape: Sequence[int] | None, dtype, default) -> jax.ShapeDtypeStruct:
    """The per-sample input; `dtype` None: int32 tokens for a leading eqx.nn.Embedding, else
    `default` (the parameters' float dtype)."""
    token = isinstance(first, eqx.nn.Embedding)
    dtype = dtype if dtype is not None else (jnp.int32 if token else default)
    if input_shape is not None:
        return jax.ShapeDtypeStruct(tuple(input_shape), dtype)
    if token:  # eqx.nn.Embedding takes one integer index per sample
        return jax.ShapeDtypeStruct((), dtype)
    if isinstance(first, eqx.nn.Linear):
        shape = () if first.in_features == "scalar" else (first.in_features,)
        return jax.ShapeDtypeStruct(shape, dtype)
    if isinstance(first, eqx.nn.MLP):
        shape = () if first.in_size == "scalar" else (first.in_size,)
        return jax.ShapeDtypeStruct(shape, dtype)
    raise ValueError(
        f"`input_shape`: cannot infer the per-sample input shape of a model starting with "
        f"{type(first).__name__}. Pass it, e.g. `pccore.wrap(model, input_shape=(1, 8, 8))`."
    )


def _dtype(tree) -> Any:
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return leaves[0].dtype if leaves else jnp.float32


class EquinoxAdapter(AbstractAdapter):
    """Equinox models: `eqx.nn.MLP` (also learnable activations and `scan=True`),
    `eqx.nn.Sequential`, and any `eqx.Module` of your own class with its own `__call__`.

    Options:

    - `input_shape`: the per-sample input shape (inferred from a leading `eqx.nn.Linear`, or
        `()` for a Sequential starting with `eqx.nn.Embedding`).
    - `dtype`: the input dtype (default: the parameters' float dtype; `int32` tokens when the
        first parameterised layer is an `eqx.nn.Embedding`).
    - `boundaries`: where the latents are. For a custom class (required): the submodules whose
        outputs are latents, as attribute paths (`["layers[0]", "conv1", "blocks[2]"]`, in
        call order), a predicate on submodules, or the submodules themselves. For a
        Sequential or list: element indices (or a predicate on elements) that start a layer,
        so a parameter-free element may end a layer of its own.
    - `args`, `kwargs`: extra arguments of a custom module's call after the sample.
    - `variables`: the `eqx.nn.State` of a Sequential with BatchNorm in inference mode.
    """

    name = "equinox"
    framework_module = "equinox"
    priority = 0

    def matches(self, model: Any) -> bool:
        return isinstance(model, eqx.Module) and callable(model)

    def wrap(self, model: Any, variables: Any = None, *, input_shape: Sequence[int] | None = None,
             dtype: Any = None, boundaries: Any = None, args: tuple = (),
             kwargs: dict | None = None) -> PCModel:
        if isinstance(model, eqx.nn.MLP | eqx.nn.Sequential) and (args or kwargs):
            raise ValueError(
                f"`args`/`kwargs`: an {type(model).__name__} takes only the sample; these "
                "options are for modules of your own class."
            )
        if isinstance(model, eqx.nn.MLP):
            if variables is not None:
                raise ValueError("`variables`: an eqx.nn.MLP has no state; pass none.")
            if boundaries is not None:
                raise ValueError(
                    "`boundaries`: an eqx.nn.MLP is one layer per Linear; pass the same layers "
                    "as an eqx.nn.Sequential to place latents elsewhere."
                )
            return _wrap_mlp(model, input_shape=input_shape, dtype=dtype)
        if isinstance(model, eqx.nn.Sequential):
            return _wrap_sequence(model, variables, input_shape=input_shape, dtype=dtype,
                                  boundaries=boundaries)
        if variables is not None:
            raise ValueError(
                f"`variables`: a module of your own class ({type(model).__name__}) holds its "
                "own parameters; pass none (stateful layers are supported in an "
                "eqx.nn.Sequential)."
            )
        _check_stateless([model], "model", whole=True)
        if boundaries is None and _has_params(model) and not any(
                _has_params(m) for _, m in walk(model)):
            return _wrap_single(model, input_shape=input_shape, dtype=dtype)
        return wrap_custom(model, boundaries=boundaries, input_shape=input_shape, dtype=dtype,
                           args=args, kwargs=kwargs)


class EquinoxSequenceAdapter(AbstractAdapter):
    """A list or tuple of Equinox layers and plain callables (at least one Equinox module)."""

    name = "equinox.sequence"
    framework_module = "equinox"
    priority = -10

    def matches(self, model: Any) -> bool:
        return type(model) in (list, tuple) and any(isinstance(m, eqx.Module) for m in model)

    def wrap(self, model: Any, variables: Any = None, *, input_shape: Sequence[int] | None = None,
             dtype: Any = None, boundaries: Any = None) -> PCModel:
        return _wrap_sequence(model, variables, input_shape=input_shape, dtype=dtype,
                              boundaries=boundaries)


def _starts(items: Sequence[Any], boundaries: Any, where: str) -> list[int]:
    """Indices of the elements that start a layer, from `boundaries` (indices or a predicate)."""
    n = len(items)
    if callable(boundaries) and not isinstance(boundaries, eqx.Module):
        starts = [i for i, item in enumerate(items) if boundaries(item)]
    elif isinstance(boundaries, Sequence) and not isinstance(boundaries, str) and all(
            isinstance(b, int) and not isinstance(b, bool) for b in boundaries):
        starts = [b + n if b < 0 else b for b in boundaries]
    else:
        raise TypeError(
            f"`boundaries`: for {where} these are the indices of the elements that start a "
            "layer (e.g. `boundaries=[0, 2, 3]`) or a predicate on elements; got "
            f"{boundaries!r}."
        )
    bad = [b for b in starts if not 0 <= b < n]
    if bad or not starts or starts != sorted(set(starts)):
        raise ValueError(
            f"`boundaries`: expected increasing element indices in 0..{n - 1} (at least one); "
            f"got {list(boundaries) if not callable(boundaries) else starts}."
        )
    return starts


def _wrap_single(layer: Any, *, input_shape=None, dtype=None) -> PCModel:
    """One Equinox layer with no parameterised submodules (`eqx.nn.Linear`, a Conv): a
    one-layer model; `unwrap()` gives the layer itself."""
    model = _wrap_sequence([layer], input_shape=input_shape, dtype=dtype)
    rebuild = model.rebuild
    return dataclasses.replace(model, names=(type(layer).__name__,),
                               rebuild=lambda params: rebuild(params)[0])


def _wrap_sequence(model, state=None, *, input_shape=None, dtype=None, boundaries=None) -> PCModel:
    seq = isinstance(model, eqx.nn.Sequential)
    items = list(model.layers if seq else model)
    where = "model.layers" if seq else "model"
    if state is not None and not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"`variables`: for an Equinox model this is its eqx.nn.State; got "
            f"{type(state).__name__}."
        )
    if not items:
        raise ValueError(
            f"`model` is an empty eqx.nn.Sequential; expected at least one layer with "
            "parameters, e.g. `eqx.nn.Sequential([eqx.nn.Linear(4, 3, key=key)])`."
        )
    _check_stateless(items, where, state, training_ok=True)
    state = _clone(state)  # the caller's State is retired when a native call updates it
    subs = [sub for i, item in enumerate(items) for _, sub in _submodules(item, "")]
    dropping = any(_is_dropping(sub) for sub in subs)
    training = dropping or any(
        isinstance(sub, eqx.nn.BatchNorm) and not sub.inference for sub in subs)
    axis_names = {sub.axis_name for sub in subs if isinstance(sub, eqx.nn.BatchNorm)}
    for i, item in enumerate(items):
        if not callable(item):
            raise TypeError(f"`model`: {where}[{i}] is a {type(item).__name__}, not callable.")
    _check_float_arrays(items, where)
    groups: list[list[int]] = []
    if boundaries is not None:  # the user's layer starts; leading elements join the first
        starts = _starts(items, boundaries, where)
        ends = [*starts[1:], len(items)]
        groups = [list(range(a, b)) for a, b in zip(starts, ends)]
        groups[0] = list(range(0, ends[0]))
    # a parameterised layer starts a layer; parameter-free ones join the layer before (leading
    # ones the first layer, as in the other adapters: a layer without parameters would add a
    # latent that predictive coding cannot learn anything for, unless the user asks for one)
    for i, layer in enumerate(items if boundaries is None else ()):
        if not groups or (_has_params(layer) and any(_has_params(items[j]) for j in groups[-1])):
            groups.append([i])
        else:
            groups[-1].append(i)
    parts = [eqx.partition(tuple(items[j] for j in g), eqx.is_inexact_array) for g in groups]
    params = tuple(p for p, _ in parts)
    restate = None
    if training:
        if len(axis_names) > 1:
            raise ValueError(
                f"`model`: its BatchNorms name different vmap axes {sorted(axis_names)}; "
                "one batch axis is vmapped in training. Give them one `axis_name`."
            )
        axis = next(iter(axis_names), "batch")
        evals = [eqx.partition(eqx.nn.inference_mode(tuple(items[j] for j in g)),
                               eqx.is_inexact_array)[1] for g in groups]
        layers = tuple(
            _Training(s, ev, state, tuple(g), len(items), axis, dropping)
            for g, (_, s), ev in zip(groups, parts, evals)
        )
        _trial_train(layers, params, _in_shape(items[0], input_shape, dtype, _dtype(model)), where)
        if state is not None:
            owners = _state_owners(state, [s for _, s in parts])

            def restate(fs):
                per_layer = [jtu.tree_leaves(f.state) for f in fs]
                leaves, treedef = jtu.tree_flatten(fs[0].state)
                return jtu.tree_unflatten(
                    treedef, [per_layer[max(o, 0)][k] for k, o in enumerate(owners)])
    elif state is None:
        layers = tuple(_Pure(_run_group, s) for _, s in parts)
    else:
        layers = tuple(_Frozen(_run_group, s, state) for _, s in parts)
    in_shape = _in_shape(items[0], input_shape, dtype, _dtype(model))
    names = tuple(
        "+".join(f"{j}:{type(items[j]).__name__}" for j in g) for g in groups
    )

    def rebuild(new_params, state=None):
        flat = list(items)
        for g, p, (_, s) in zip(groups, new_params, parts):
            for j, layer in zip(g, eqx.combine(p, s)):
                flat[j] = layer
        if seq:
            return eqx.nn.Sequential(flat)
        return type(model)(flat)

    return PCModel(
        layers=layers,
        params=params,
        in_shape=in_shape,
        out_shapes=_shapes(layers, params, in_shape, names),
        names=names,
        weights=tuple(_weight_specs(p) for p in params),
        skips=(False,) * len(layers),
        framework="equinox",
        rebuild=rebuild,
        training=training,
        restate=restate,
    )


def _mlp_block(block, x):
    layer, act = block
    return _act(act, layer(x))


def _mlp_final(block, x):
    layer, act = block
    return act(layer(x))


def _index(tree, i):
    return jtu.tree_map(lambda a: a[i] if eqx.is_array(a) else a, tree)


def _wrap_mlp(mlp: eqx.nn.MLP, *, input_shape=None, dtype=None) -> PCModel:
    if mlp.scan:
        first, stacked, last = mlp.layers
        linears = [first] + [_index(stacked, j) for j in range(mlp.depth - 1)] + [last]
    else:
        linears = list(mlp.layers)
    L = len(linears)
    scalar_out = mlp.out_size == "scalar"
    blocks = [(linears[i], _index(mlp.activation, i)) for i in range(L - 1)]
    blocks.append((linears[-1], mlp.final_activation))
    parts = [eqx.partition(b, eqx.is_inexact_array) for b in blocks]
    params = tuple(p for p, _ in parts)
    fns = [_mlp_block] * (L - 1) + [_mlp_final if scalar_out else _mlp_block]
    layers = tuple(_Pure(fn, s) for fn, (_, s) in zip(fns, parts))
    in_shape = _in_shape(mlp, input_shape, dtype, _dtype(mlp))

    def rebuild(new_params):
        nb = [eqx.combine(p, s) for p, (_, s) in zip(new_params, parts)]
        lins = [b[0] for b in nb]

        def stack(*xs):
            return jnp.stack(xs) if eqx.is_array(xs[0]) else xs[0]

        if mlp.scan:
            hidden = jtu.tree_map(stack, *lins[1:-1]) if L > 2 else stacked
            new_layers = (lins[0], hidden, lins[-1])
        else:
            new_layers = tuple(lins)
        acts = [b[1] for b in nb[:-1]]
        activation = jtu.tree_map(stack, *acts) if acts else mlp.activation
        return eqx.tree_at(
            lambda m: (m.layers, m.activation, m.final_activation),
            mlp,
            (new_layers, activation, nb[-1][1]),
        )

    names = tuple(f"layers[{i}]" for i in range(L))
    return PCModel(
        layers=layers,
        params=params,
        in_shape=in_shape,
        out_shapes=_shapes(layers, params, in_shape, names),
        names=names,
        weights=tuple(_weight_specs(p) for p in params),
        skips=(False,) * L,
        framework="equinox",
        rebuild=rebuild,
    )
