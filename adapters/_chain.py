"""Layer discovery by substitution, shared by the Haiku, Linen and NNX adapters.

A framework supplies an `Intercepted` (its hooks): its `run(full_params, frozen, x, icpt)`
calls the user's model with an interceptor installed: `icpt(name, method, next_fn, args,
kwargs)` is called for every method call of a named submodule. The model is cut at
*boundaries*: by default the outermost calls of modules that own parameters directly, in
call order; or the module names the user gives. Layer `i` runs the model with

- boundaries `j < i` replaced by zeros of their recorded output shape (dead code that XLA
  removes; they need no parameters, so other layers' parameters are zero placeholders),
- boundary `i` fed the layer input `x`,
- a stop at the input of boundary `i + 1`, which is the layer's output.

Parameter-free work between boundaries (activations, pooling, reshapes) thus folds into the
layer before it, as in the Equinox adapter. Parameters owned by modules that are not
boundaries belong to the layer during which they are called; parameters read by no call
raise, so nothing is dropped silently.

A model that is not a chain of these layers is refused: a skip or residual connection around
a boundary, or a parameter read by two layers, would read the zeros above. The check traces
the model once more with every boundary's input cut loose and follows, through the jaxpr,
what each layer's output depends on.
"""

import abc
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from pccore._adapter import UnsupportedLayerError
from pccore._model import AbstractStatefulLayer, WeightSpec

Icpt = Callable[[str, str, Callable, tuple, dict], Any]
Run = Callable[[Any, Any, Any, Icpt], Any]


class _Stop(Exception):
    pass


def _input(name: str, args: tuple, kw: dict):
    """The array a boundary call takes as its input (its first positional argument, else its
    first array keyword argument), and a function giving the call's `(args, kw)` with another
    input in its place."""
    if args:
        return args[0], lambda a: ((a, *args[1:]), kw)
    for k, v in kw.items():
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            return v, lambda a, k=k: ((), {**kw, k: a})
    raise ValueError(
        f"`model`: module {name!r} is called without an array argument; a layer boundary "
        "takes its input array as an argument."
    )


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
    """The result of discovery: boundaries in call order and their shapes.

    `per_sample`: `run` takes one sample (the Equinox convention; `ChainLayer` vmaps it), and
    all shapes are per sample; otherwise `run` takes a batch on axis 0.
    """

    def __init__(self, run: Run, names: tuple[str, ...], out_shapes, boundary_out, in_shape,
                 slicer: Slicer, per_sample: bool = False, reads_input: tuple[bool, ...] = ()):
        self.run = run
        self.reads_input = tuple(reads_input) or (False,) * len(names)
        self.per_sample = per_sample
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.boundary_out = boundary_out
        self.out_shapes = out_shapes
        self.in_shape = in_shape
        self.slicer = slicer
        self.module_layer: dict[str, int] = {}  # the layer during which each module is called


def require_params(params: Any, what: str) -> None:
    if not jtu.tree_leaves(params):
        raise ValueError(
            f"`model`: {what} has no parameters, so there is nothing for predictive coding to "
            "train. Pass the model's initialised parameters (e.g. `f.init(key, x)`), and use a "
            "model with at least one parameterised layer."
        )


class Intercepted(abc.ABC):
    """One model as discovery sees it: the hooks a framework implements (`discover` calls them).

    Attributes, set by the subclass: `params` (the whole trainable tree), `frozen`
    (non-trainable state, passed to `run` unchanged) and `what` (how errors name the model).
    """

    params: Any
    frozen: Any
    what: str
    per_sample: bool = False
    """`run` takes one sample, not a batch (see `Plan`)."""

    @abc.abstractmethod
    def run(self, params: Any, frozen: Any, x: Any, icpt: Icpt) -> Any:
        """The framework's call, see the module docstring."""

    @abc.abstractmethod
    def owner(self, keys: tuple) -> str:
        """The name of the module owning a parameter leaf, from its key path."""

    def leaf_keys(self, keys: tuple) -> tuple:
        """The key path of a leaf inside the per-layer nested dicts."""
        return keys

    def refuse(self, e: BaseException, where: str | None) -> BaseException | None:
        """The error to raise instead of `e`, raised by the model (in module `where`, the
        innermost), or `None` to re-raise it."""
        return None

    def loose(self, owner: str) -> bool:
        """Whether `owner` is no module call (an array used directly by the forward pass): its
        leaves go to the one layer whose output depends on them."""
        return False

    def slicer(self, layer_of_leaf: Sequence[int], num_layers: int) -> Any:
        """The per-layer params and their merge (`Slicer`, or one in the framework's own
        structure)."""
        return Slicer(self.params, self.leaf_keys, layer_of_leaf, num_layers)


def discover(
    model: Intercepted,
    in_shape: jax.ShapeDtypeStruct,
    boundaries: Sequence[str] | None,
    probe: Run | None = None,
) -> Plan:
    """Trace the model once (abstractly) and cut it into layers.

    **Arguments:**

    - `model`: the framework's hooks and the model's parameters, see `Intercepted`.
    - `in_shape`: per-sample input shape.
    - `boundaries`: explicit boundary module names, or `None` for automatic discovery.
    - `probe`: the run for discovery's own traces when they should do more than `model.run`
        (record the calls, check the model's state); wrap time only: the plan keeps `run`.
    """
    run, params, frozen, what = model.run, model.params, model.frozen, model.what
    per_sample, owner_of_leaf = model.per_sample, model.owner
    probe = run if probe is None else probe
    k0 = 0 if per_sample else 1  # where the per-sample shape starts
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
            a, _ = _input(name, args, kw)
            in_shapes.append(jax.ShapeDtypeStruct(a.shape[k0:], a.dtype))
        seg.setdefault(name, set()).add(max(len(order) - 1, 0))
        active[0] += is_b
        try:
            res = nf(*args, **kw)
            if is_b:
                if not isinstance(res, jax.Array):
                    raise UnsupportedLayerError(
                        f"`model`: layer boundary {name!r} returns a {type(res).__name__}, not "
                        "one array (an nn.scan or a module returning several values). Name "
                        "modules that return one array in `boundaries=[...]`, or wrap that "
                        "module so that it does."
                    )
                b_out.append(jax.ShapeDtypeStruct(res.shape[k0:], res.dtype))
            return res
        except _Stop:
            raise
        except Exception:
            if where[0] is None:
                where[0] = name
            raise
        finally:
            active[0] -= is_b

    x = jax.ShapeDtypeStruct((*((2,) * k0), *in_shape.shape), in_shape.dtype)
    try:
        out = jax.eval_shape(lambda p, s, x: probe(p, s, x, icpt), params, frozen, x)
    except UnsupportedLayerError:
        raise
    except Exception as e:
        err = model.refuse(e, where[0])
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
    loose_owners = {o for o in owners if model.loose(o)}
    outs = _layer_reads(probe, params, frozen, x, tuple(order), in_shapes)
    # Modules whose calls the interceptor did not see, because a transform runs them on
    # copies of their own (nnx.scan over stacked blocks): their parameters belong to the one
    # layer whose output reads them, as loose parameters do (refused if read by several).
    unseen = {o for o in owners if o not in seg and o not in loose_owners}
    read_by = {o: 0 for o in unseen}
    for k, o in enumerate(leaf_owner):
        if o in read_by:
            read_by[o] |= sum(1 << i for i, mask in enumerate(outs) if mask >> k & 1)
    loose_owners |= {o for o, users in read_by.items() if users}
    unread = sorted(o for o, users in read_by.items() if not users)
    if unread:
        raise ValueError(
            f"`variables`: parameters of {unread} belong to no layer: no call of these modules "
            f"was seen in the forward pass of {what} (layers: {order}). Parameters created by "
            "the top-level module or function itself, outside any submodule, and parameters "
            "renamed by a transform such as hk.layer_stack are not supported: move them into "
            "a submodule that the forward pass calls. Otherwise remove them from the "
            "parameters, or check that the parameters belong to this model."
        )
    shared = {o: sorted(s) for o, s in seg.items() if len(s) > 1 and o in owners}
    if shared:
        raise ValueError(
            f"`model`: parameters of {sorted(shared)} are used by several layers "
            f"({shared}); predictive coding layers cannot share parameters."
        )
    n_p = len(with_path)
    layer_of = []
    for k, o in enumerate(leaf_owner):
        if o in loose_owners:
            layer_of.append(_loose_layer(o, k, outs, tuple(order), what))
        else:
            layer_of.append(next(iter(seg[o])))
    reads = _check_chain(outs, n_p, len(jtu.tree_leaves(frozen)), tuple(order), layer_of, what)
    slicer = model.slicer(layer_of, len(order))
    shapes = [*in_shapes[1:], jax.ShapeDtypeStruct(out.shape[k0:], out.dtype)]
    plan = Plan(run, tuple(order), tuple(shapes), tuple(b_out), in_shape, slicer, per_sample,
                reads_input=reads)
    plan.module_layer = {n: min(ls) for n, ls in seg.items()}
    return plan


def _loose_layer(owner: str, k: int, outs: Sequence[int], names: tuple[str, ...], what: str) -> int:
    """The one layer whose output depends on parameter leaf `k` (owned by no module call)."""
    users = [i for i, mask in enumerate(outs) if mask >> k & 1]
    if not users:
        raise ValueError(
            f"`model`: parameter {owner!r} of {what} is not used by the forward pass, so it "
            "belongs to no layer. Remove it, or mark it static (`eqx.field(static=True)`) or "
            "non-trainable."
        )
    if len(users) > 1:
        layers = ", ".join(f"{i} ({names[i]!r})" for i in users)
        raise ValueError(
            f"`model`: parameter {owner!r} of {what} is read by layers {layers}; predictive "
            "coding layers cannot share parameters. Move the boundaries so that one layer "
            "reads it, or give each layer its own copy."
        )
    return users[0]


def _sub_jaxpr(eqn) -> Any:
    """The jaxpr an equation calls with its own inputs and outputs (jit, custom_jvp/vjp), or
    None if it has none of that form."""
    for v in eqn.params.values():
        j = getattr(v, "jaxpr", v)  # a ClosedJaxpr, or a Jaxpr
        if (
            isinstance(j, jax.extend.core.Jaxpr)
            and len(j.invars) == len(eqn.invars)
            and len(j.outvars) == len(eqn.outvars)
        ):
            return j
    return None


def _depends(jaxpr, in_deps: Sequence[int]) -> list[int]:
    """For each output of `jaxpr`, the set (a bit mask) of inputs it depends on, given each
    input's own mask. Calls to sub-jaxprs are followed; any other equation's outputs depend on
    all its inputs (a conservative bound)."""
    deps: dict = dict(zip(jaxpr.invars, in_deps))
    get = lambda v: 0 if isinstance(v, jax.extend.core.Literal) else deps.get(v, 0)
    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            outs = _depends(sub, ins)
        else:
            mask = 0
            for m in ins:
                mask |= m
            outs = [mask] * len(eqn.outvars)
        deps.update(zip(eqn.outvars, outs))
    return [get(v) for v in jaxpr.outvars]


def _layer_reads(run, params, frozen, x, names, in_shapes) -> list[int]:
    """Per layer, the inputs its output depends on, as a bit mask over
    `(*param leaves, *frozen leaves, x, *boundary inputs 1..L-1)`.

    Traced once (abstractly) with every boundary's input cut loose, so that each layer's
    output shows what it reads.
    """
    index = {n: i for i, n in enumerate(names)}
    lead = x.shape[: len(x.shape) - len(in_shapes[0].shape)]
    cuts = tuple(jax.ShapeDtypeStruct((*lead, *s.shape), s.dtype) for s in in_shapes[1:])

    def cut(p, s, x, us):
        ins = []

        def icpt(name, method, nf, args, kw):
            j = index.get(name) if method == "__call__" else None
            if j:  # a boundary after the first: its input is a free variable
                a, with_input = _input(name, args, kw)
                ins.append(a)
                a, k = with_input(us[j - 1])
                return nf(*a, **k)
            return nf(*args, **kw)

        y = run(p, s, x, icpt)
        return (*ins, y)

    closed = jax.make_jaxpr(cut)(params, frozen, x, cuts)
    n_in = len(closed.jaxpr.invars)
    n_expected = len(jtu.tree_leaves(params)) + len(jtu.tree_leaves(frozen)) + 1 + len(cuts)
    assert n_in == n_expected, (n_in, n_expected)
    return _depends(closed.jaxpr, [1 << k for k in range(n_in)])


def _check_chain(outs, n_p, n_s, names, layer_of, what) -> tuple[bool, ...]:
    """Refuse a model that is not a chain of its layers; return, per layer, whether it reads
    the clamped model input `x`.

    Reading `x` (a transformer block building its attention mask from the tokens) skips no
    latent, so it is allowed: such a layer `i > 0` is flagged, and its function takes `x` too.

    Layer `i` is computed from its own input alone: the model input and the outputs of
    earlier layers are replaced by zeros, and other layers' parameters by zero placeholders.
    A skip or residual connection around a boundary, or a parameter read by two layers,
    would silently read those zeros. `outs` comes from `_layer_reads`.
    """
    n_cuts = len(names) - 1
    frozen_bits = sum(1 << (n_p + k) for k in range(n_s))
    x_bit = 1 << (n_p + n_s)
    cut_bit = [x_bit] + [1 << (n_p + n_s + 1 + k) for k in range(n_cuts)]
    param_bits = [0] * len(names)
    for k, l in enumerate(layer_of):
        param_bits[l] |= 1 << k
    reads_input = []
    for i, mask in enumerate(outs):
        reads_input.append(bool(i > 0 and mask & x_bit))
        extra = mask & ~(cut_bit[i] | param_bits[i] | frozen_bits | x_bit)
        if not extra:
            continue
        extra |= mask & x_bit & ~cut_bit[i]  # named too: all it reads besides its own input
        reads = [
            "the model input" if j == 0 else f"the output of layer {j - 1} ({names[j - 1]!r})"
            for j, b in enumerate(cut_bit) if extra & b
        ] + [f"parameters of layer {j} ({names[j]!r})"
             for j, b in enumerate(param_bits) if j != i and extra & b]
        reads = ", ".join(reads[:-1]) + " and " + reads[-1] if len(reads) > 1 else reads[0]
        raise UnsupportedLayerError(
            f"`model`: {what} is not a chain of its layers: layer {i} ({names[i]!r}) reads "
            f"{reads} besides its own input, as a skip or residual connection or a "
            "weight shared across layers does. Predictive coding cuts the model into layers "
            "that each see only the previous layer's output. Make each residual block one "
            "layer (a module named in `boundaries=[...]`), use pccore's own skips "
            "(`model.with_skips(True)`), or untie the weights."
        )
    return tuple(reads_input)


class ChainLayer(eqx.Module):
    """`apply_i(params_i, x)` of layer `i` of a discovered plan (frozen state as a pytree);
    `apply_i(params_i, x, model_input)` for a layer that reads the clamped model input
    (`plan.reads_input[i]`): the model then runs on `model_input` instead of zeros."""

    i: int = eqx.field(static=True)
    plan: Plan = eqx.field(static=True)
    frozen: Any

    def __call__(self, params, x, model_input=None):
        if self.plan.per_sample:
            return jax.vmap(lambda xi, mi: self._run(params, xi, (), mi))(x, model_input)
        return self._run(params, x, (x.shape[0],), model_input)

    def _run(self, params, x, lead: tuple[int, ...], model_input=None, train=None):
        """The layer on `x`, whose leading axes `lead` are not in the recorded shapes; the
        model runs on `model_input` (the clamped input) where given, else on zeros.

        `train`: `(train_run, key)` to run the framework's training forward, which returns
        `(y, new frozen state)`. The framework returns its updated state only from a call
        that completes, so later boundaries return zeros (dead code) instead of stopping."""
        plan, i = self.plan, self.i
        full = plan.slicer.full(i, params)
        out = {}
        finish = train is not None

        def icpt(name, method, nf, args, kw):
            if method != "__call__" or name not in plan.index:
                return nf(*args, **kw)
            j = plan.index[name]
            if j < i:
                s = plan.boundary_out[j]
                return jnp.zeros((*lead, *s.shape), s.dtype)
            if j == i:
                if i == 0:
                    return nf(*args, **kw)
                a, k = _input(name, args, kw)[1](x)
                return nf(*a, **k)
            if j == i + 1:
                out["y"] = _input(name, args, kw)[0]
            if not finish:
                raise _Stop
            s = plan.boundary_out[j]
            return jnp.zeros((*lead, *s.shape), s.dtype)

        if i == 0:
            data = x
        elif model_input is not None:
            data = model_input
        else:
            data = jnp.zeros((*lead, *plan.in_shape.shape), plan.in_shape.dtype)
        if finish:
            train_run, key = train
            y, new = train_run(full, self.frozen, data, icpt, key)
            return out.get("y", y), new
        try:
            out["y"] = plan.run(full, self.frozen, data, icpt)
        except _Stop:
            pass
        return out["y"]


TrainRun = Callable[[Any, Any, Any, Icpt, Any], tuple[Any, Any]]


class StatefulChainLayer(ChainLayer, AbstractStatefulLayer):
    """A chain layer with a training forward (train-mode BatchNorm, Dropout).

    `train_run(full_params, frozen, x, icpt, key) -> (y, new_frozen)` is the framework's
    training-mode call. Each layer holds a copy of the whole frozen state (the framework
    runs the whole model), and keeps from a training forward only the leaves of the modules
    called during its own segment (`owned`); the others belong to other layers.
    """

    train_run: TrainRun = eqx.field(static=True)
    owned: tuple[bool, ...] = eqx.field(static=True)
    stochastic: bool = eqx.field(static=True)

    def train(self, params, z, key, x=None):
        y, new = self._run(params, z, (z.shape[0],), x, train=(self.train_run, key))
        old_leaves, treedef = jtu.tree_flatten(self.frozen)
        new_leaves = jtu.tree_leaves(new)
        kept = [n if o else a for a, n, o in zip(old_leaves, new_leaves, self.owned)]
        return y, eqx.tree_at(lambda s: s.frozen, self, jtu.tree_unflatten(treedef, kept))


def state_layers(plan: Plan, frozen: Any, owner_of_leaf: Callable[[tuple], str]) -> tuple[int, ...]:
    """Per leaf of the frozen state, the layer during whose segment its module is called (its
    owner module, or the nearest enclosing module that is called), or -1 for none."""
    out = []
    for path, _ in jtu.tree_flatten_with_path(frozen)[0]:
        name = owner_of_leaf(tuple(_key(k) for k in path))
        layer = -1
        while True:
            if name in plan.module_layer:
                layer = plan.module_layer[name]
                break
            if "/" not in name:
                break
            name = name.rsplit("/", 1)[0]
        out.append(layer)
    return tuple(out)


def chain_layers(plan: Plan, frozen: Any, train_run: TrainRun | None = None,
                 owners: Sequence[int] = (), stochastic: bool = False) -> tuple[ChainLayer, ...]:
    """The layer functions of a plan: stateful ones when there is a training forward."""
    n = len(plan.names)
    if train_run is None:
        return tuple(ChainLayer(i, plan, frozen) for i in range(n))
    if plan.per_sample:  # batch statistics need the batch: the framework must run batched
        raise ValueError(
            "a training forward (batch statistics, dropout) needs a plan that runs on the "
            "whole batch (`discover(..., per_sample=False)`); this one runs per sample."
        )
    return tuple(
        StatefulChainLayer(i, plan, frozen, train_run, tuple(o == i for o in owners), stochastic)
        for i in range(n)
    )


def merged_state(layers: Sequence[Any], owners: Sequence[int]) -> Any:
    """The whole frozen state, each leaf taken from the layer that owns it (layer 0's copy for
    leaves no layer updates)."""
    per_layer = [jtu.tree_leaves(f.frozen) for f in layers]
    treedef = jtu.tree_structure(layers[0].frozen)
    return jtu.tree_unflatten(
        treedef, [per_layer[max(o, 0)][k] for k, o in enumerate(owners)])


def layer_names(plan: Plan, leaf_owner_names: Sequence[tuple[str, int]]) -> tuple[str, ...]:
    """Readable layer names: the boundary, plus other parameter owners folded into it."""
    extra: list[list[str]] = [[] for _ in plan.names]
    for o, l in leaf_owner_names:
        if o not in plan.names and o not in extra[l]:
            extra[l].append(o)
    return tuple("+".join([n, *e]) for n, e in zip(plan.names, extra))


def weight_specs(params: Any, names: Sequence[str], out_axis=lambda keys: -1,
                 out_ndim=lambda keys: 1) -> tuple[WeightSpec, ...]:
    """WeightSpecs of the leaves called one of `names` with ndim >= 2; `out_axis(keys)` gives
    the output axis from a leaf's key path (default -1: `(..., in, out)`), and `out_ndim(keys)`
    how many axes index outputs (default 1; 2 for an `(in, heads, head_dim)` kernel)."""
    specs = []
    for i, (path, leaf) in enumerate(jtu.tree_flatten_with_path(params)[0]):
        ks = [_key(k) for k in path]
        if ks and ks[-1] == "value":  # a boxed leaf (nnx.Variable, nn.Partitioned), not a module
            ks = ks[:-1]
        if ks and ks[-1] in names and np.ndim(leaf) >= 2:
            specs.append(WeightSpec(i, out_axis(tuple(ks)), out_ndim(tuple(ks))))
    return tuple(specs)


def owners_by_layer(plan: Plan, model: Intercepted) -> list[tuple[str, int]]:
    """`(owner module, layer)` of each parameter leaf of `model`."""
    with_path = jtu.tree_flatten_with_path(model.params)[0]
    return [
        (model.owner(tuple(_key(k) for k in p)), l) for (p, _), l in zip(with_path, plan.slicer.layer)
    ]


def infer_input_shape(trace, candidates, layer_owners, what: str, layer: str, how: str):
    """Guess the per-sample input shape from the fan-ins of the model's `layer`s (an
    hk.Linear, an nn.Dense): keep the first on which the model traces with such a layer in
    layer 0. Params in dict order are usually in call order, but not after a `tree_map` or a
    checkpoint restore (which sort the keys), so each candidate is tried.

    `candidates`: `(input shape, module)` pairs; `trace(shape, called)` returns
    `(plan, in_shape)` or raises, and collects `(module, per-sample input shape)` of the module
    calls in `called` (`None` in it when the model itself failed, rather than being refused
    after tracing); `layer_owners(plan)` gives `(module, layer)` pairs; `how` shows the call
    with `input_shape=`.
    """
    if not candidates:
        raise ValueError(
            f"`input_shape`: cannot infer the per-sample input shape of {what} (it has no "
            f"{layer} to read it from). Pass it, e.g. {how}."
        )
    shapes = list(dict.fromkeys(s for s, _ in candidates))
    failure = None
    for shape in shapes:
        owners = {o for s, o in candidates if s == shape}
        called: set = set()
        try:
            plan, in_shape = trace(shape, called)
        except UnsupportedLayerError:
            raise
        except Exception as e:
            if None not in called or any((o, shape) in called for o in owners):
                raise  # refused after tracing, or such a layer got inputs of this shape
            failure = failure or (shape, e.__cause__ or e)  # a wrong guess
            continue
        if any(o in owners and l == 0 for o, l in layer_owners(plan)):
            return plan, in_shape
    detail = ""
    if failure is not None:
        detail = f" (on {failure[0]}: {str(failure[1]).splitlines()[0]})"
    raise ValueError(
        f"`input_shape`: cannot infer the per-sample input shape of {what}: none of the input "
        f"shapes read from its {layer} weights, {shapes}, fits a first-called {layer}{detail}. "
        f"Pass it, e.g. {how}, or check that the parameters belong to this model."
    )


def recording(run: Run, called: set) -> Run:
    """`run` that adds `(module, per-sample input shape)` of every module call to `called`, and
    `None` when the model itself fails, for `infer_input_shape`."""

    def traced(p, fr, x, icpt):
        def rec(name, method, nf, args, kw):
            a = args[0] if args else next(iter(kw.values()), None)
            called.add((name, tuple(getattr(a, "shape", (None,))[1:])))
            return icpt(name, method, nf, args, kw)

        try:
            return run(p, fr, x, rec)
        except Exception:
            called.add(None)
            raise

    return traced


_INDEX_ERRORS = ("Indexer must have integer", "must be an integer", "of integer dtype")


def is_index_error(e: BaseException | None) -> bool:
    """Whether `e` (or an exception it was raised from) is a refusal to index with floats: an
    embedding (`hk.Embed`, `nn.Embed`, `nnx.Embed`, `x[ids]`) looked up with a float input."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(m in str(e) for m in _INDEX_ERRORS):
            return True
        e = e.__cause__ or e.__context__
    return False


def with_input_dtype(trace: Callable[[Any], Any], dtype: Any, float_dtype: Any) -> Any:
    """`trace(input dtype)` for the dtype given; with `dtype=None`, `float_dtype` first and,
    if that fails on float indices (the model starts with an embedding), int32 token ids."""
    if dtype is not None:
        return trace(jnp.dtype(dtype))
    try:
        return trace(float_dtype)
    except Exception as e:
        if not is_index_error(e):
            raise
    return trace(jnp.dtype(jnp.int32))
