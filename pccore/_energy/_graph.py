r"""General skips and DAGs: a stateless node marker inside the user's own forward pass.

Write `h = pccore.node("h", u)` wherever a value should become a latent. Outside a PC
context `node` is the identity, so the model still runs natively in any framework (Equinox,
Haiku, Flax Linen or NNX). Inside one, `node` records the prediction $u_n$ and returns the
latent $z_n$, so everything downstream, skip paths included, sees the latent. The energy is
$$F = \sum_n \tfrac12 \lVert z_n - u_n(\theta, z_{\mathrm{parents}(n)}) \rVert^2
    + \lambda E_{\mathrm{out}}(y, \hat y(\theta, z)),$$
with $\hat y$ the forward pass's return value. Nodes must not sit inside an inner transform
(`lax.scan`, `vmap`, `hk.vmap`, `nn.scan`, remat), and names are unique per forward pass.
"""

# GraphPC's methods take a GraphModel, not the PCModel of AbstractEnergy's signatures
# pyright: reportIncompatibleMethodOverride=false

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._check import check_option
from ._parts import check_energy_parts
from .._custom_types import Activities, Params
from ._abstract import AbstractEnergy
from ._base import add_activity_decay, output_term, sq_norm
from ._init import AbstractInit, FeedForward
from ._loss import MSE, AbstractLoss
from .._model import AbstractPCModel

_CTX = threading.local()


class _Collector:
    def __init__(self, latents):
        self.latents = latents
        self.preds: dict[str, Array] = {}


def node(name: str, u: Array) -> Array:
    """Mark `u` as the prediction of the latent `name`.

    **Arguments:** `name`, unique within one forward pass; `u`, the value computed from the
    node's parents.

    **Returns:** `u` itself outside a PC context (the model runs natively); inside one, the
    latent $z_{\\mathrm{name}}$ that replaces it downstream.
    """
    stack = getattr(_CTX, "stack", None)
    if not stack:
        return u
    c = stack[-1]
    if name in c.preds:
        raise ValueError(
            f"`pccore.node`: node {name!r} was visited twice in one forward pass; node names "
            "must be unique (give weight-shared blocks distinct names)."
        )
    c.preds[name] = u
    if c.latents is None:
        return u
    if name not in c.latents:
        raise ValueError(
            f"`pccore.node`: node {name!r} is not a latent of this model (latents: "
            f"{sorted(c.latents)}). Node names must not depend on the data."
        )
    z = c.latents[name]
    if z.shape != jnp.shape(u):
        raise ValueError(f"`pccore.node`: latent {name!r} has shape {z.shape}; the node's "
                         f"prediction has shape {jnp.shape(u)}.")
    return z


@contextlib.contextmanager
def collecting(latents: dict[str, Array] | None = None) -> Iterator[_Collector]:
    """Run a forward pass with nodes substituted by `latents` (None: record only)."""
    stack = _CTX.__dict__.setdefault("stack", [])
    c = _Collector(latents)
    stack.append(c)
    try:
        yield c
    finally:
        stack.pop()


class GraphModel(AbstractPCModel):
    """A model whose latents are marked with [`pccore.node`][]: any DAG, any framework.

    Build one with [`pccore.wrap_graph`][]. The engine only uses `params`, `with_params` and
    the energy ([`pccore.GraphPC`][]), so every solver and [`pccore.train_step`][] apply.

    **Fields:** `apply` (the native forward `apply(params, x) -> output`, batched unless
    `per_sample`), `params` (the whole trainable tree, native structure), `in_shape`,
    `out_shape`, `names` (nodes in visit order), `node_shapes`, `per_sample`, `rebuild`.
    """

    apply: Callable[[Params, Array], Array] = eqx.field(static=True)
    params: Params
    in_shape: jax.ShapeDtypeStruct = eqx.field(static=True)
    out_shape: jax.ShapeDtypeStruct = eqx.field(static=True)
    names: tuple[str, ...] = eqx.field(static=True)
    node_shapes: tuple[jax.ShapeDtypeStruct, ...] = eqx.field(static=True)
    per_sample: bool = eqx.field(static=True)
    rebuild: Callable[[Params], Any] = eqx.field(static=True)

    @property
    def num_layers(self) -> int:
        """Number of energy terms: one per node plus the output."""
        return len(self.names) + 1

    def with_params(self, params: Params) -> "GraphModel":
        return eqx.tree_at(lambda m: m.params, self, params)

    def unwrap(self) -> Any:
        """The user's native model with the current parameters."""
        return self.rebuild(self.params)

    def predict(
        self, latents: tuple[Array, ...] | None, x: Float[Array, "batch ..."]
    ) -> tuple[tuple[Array, ...], Array]:
        """Node predictions $u_n$ (in `names` order) and the output, with nodes replaced by
        `latents` (None: the feed-forward pass)."""

        def run(lat, xx):
            with collecting(None if lat is None else dict(zip(self.names, lat))) as c:
                out = self.apply(self.params, xx)
            if tuple(c.preds) != self.names:
                raise ValueError(
                    f"`model`: the forward pass visited nodes {list(c.preds)}, but the model "
                    f"was built with {list(self.names)}; node names and order must not depend "
                    "on the data or parameters."
                )
            return tuple(c.preds[n] for n in self.names), out

        return jax.vmap(run)(latents, x) if self.per_sample else run(latents, x)

    def __call__(self, x: Float[Array, "batch ..."]) -> Float[Array, "batch ..."]:
        """The native feed-forward output of a batch (nodes are the identity)."""
        return jax.vmap(lambda xi: self.apply(self.params, xi))(x) if self.per_sample else (
            self.apply(self.params, x))


def wrap_graph(
    apply: Callable[[Params, Array], Array],
    params: Params,
    x_example: Float[ArrayLike, "batch ..."],
    *,
    per_sample: bool = False,
    rebuild: Callable[[Params], Any] | None = None,
) -> GraphModel:
    """Wrap a forward pass that marks its latents with [`pccore.node`][].

    **Arguments:**

    - `apply`: the pure native forward `apply(params, x) -> output` (Haiku `f.apply`, Linen
        `lambda p, x: m.apply({"params": p}, x)`, NNX `lambda p, x: nnx.merge(g, p, rest)(x)`,
        Equinox `lambda p, x: eqx.combine(p, static)(x)` with `per_sample=True`).
    - `params`: its trainable parameters (optax trains this tree).
    - `x_example`: an example batch (shapes and dtype only; nothing is computed).
    - `per_sample`: `apply` takes one sample (Equinox); the batch is vmapped outside it, and
        the node collector lives inside the vmap.
    - `rebuild`: `params -> native model`, for `unwrap()` (default: return the params).

    **Returns:** a [`pccore.GraphModel`][].
    """
    x_example = jnp.asarray(x_example)
    names: list[str] = []

    def discover(p, x):
        with collecting(None) as c:
            out = apply(p, x)
        names[:] = list(c.preds)
        return dict(c.preds), out

    fn = jax.vmap(discover, in_axes=(None, 0)) if per_sample else discover
    preds, out = jax.eval_shape(fn, params, x_example)
    if not names:
        raise ValueError(
            "`apply` visited no `pccore.node` marker; mark each latent in the forward pass with "
            "`h = pccore.node('h', h)` (or wrap a chain model with pccore.wrap)."
        )
    sds = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return GraphModel(
        apply=apply,
        params=params,
        in_shape=sds(x_example),
        out_shape=sds(out),
        names=tuple(names),
        node_shapes=tuple(sds(preds[n]) for n in names),
        per_sample=per_sample,
        rebuild=rebuild if rebuild is not None else (lambda p: p),
    )


class GraphPC(AbstractEnergy):
    r"""Predictive coding on a [`pccore.GraphModel`][] (see module docs).

    The input `x` is clamped; every node is a free latent; the output `y` is clamped (or free
    with `y=None`). Per-layer energies are the node terms in visit order, then the output term.

    **Arguments:**

    - `loss`: the output loss ([`pccore.MSE`][] or [`pccore.CrossEntropy`][]).
    - `output_precision`: $\lambda$, the weight of the output term.
    - `activity_decay`: a prior $\frac\alpha2\lVert z_n\rVert^2$ on every latent.

    Parameterisations and weight regularisers need layer shapes a graph does not expose;
    a graph model has neither (this energy has no such options).
    """

    loss: AbstractLoss = MSE()
    output_precision: float | ArrayLike = 1.0
    activity_decay: float | ArrayLike = 0.0

    def __check_init__(self) -> None:
        check_option("GraphPC", "output_precision", self.output_precision)
        check_option("GraphPC", "activity_decay", self.activity_decay)
        check_energy_parts("GraphPC", self)

    def _model(self, model: AbstractPCModel) -> GraphModel:
        if not isinstance(model, GraphModel):
            raise TypeError(
                "`energy=GraphPC()` needs a pccore.GraphModel (build it with pccore.wrap_graph); "
                f"got {type(model).__name__}."
            )
        return model

    def variable_shapes(self, model: AbstractPCModel, x_clamped: bool
                        ) -> tuple[jax.ShapeDtypeStruct, ...]:
        if not x_clamped:
            raise ValueError("`x`: a graph model needs a clamped input `x`; got None.")
        return self._model(model).node_shapes

    def data_shapes(self, model: AbstractPCModel) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m = self._model(model)
        return m.in_shape.shape, m.out_shape.shape

    def layer_energies(self, model: GraphModel, variables: Activities, x: Array | None,
                       y: Array | None) -> Float[Array, "batch terms"]:
        preds, out = model.predict(tuple(variables), x)
        terms = [sq_norm(z - u) for z, u in zip(variables, preds)]
        terms.append(output_term(self.loss, self.output_precision, y, lambda: out, out))
        return jnp.stack(terms, axis=1)

    def per_sample(self, model: GraphModel, variables: Activities, x: Array | None,
                   y: Array | None) -> Float[Array, " batch"]:
        total = self.layer_energies(model, variables, x, y).sum(axis=1)
        return add_activity_decay(total, self.activity_decay, variables)

    def init(self, model: AbstractPCModel, x: Array | None, y: Array | None,
             initialiser: AbstractInit, key: PRNGKeyArray | None) -> Activities:
        model = self._model(model)
        if isinstance(initialiser, FeedForward):
            if x is None:
                raise ValueError("`x`: a graph model needs a clamped input `x`; got None.")
            return model.predict(None, x)[0]
        return initialiser(model, self.variable_shapes(model, x is not None), x, y, key)

    def predict(self, model: GraphModel, x: Array) -> Array:
        return model(x)

    def output_loss(self, prediction: Array, y: Array) -> Float[Array, " batch"]:
        return self.loss(prediction, y)

    def check_target(self, name: str, y: Array) -> None:
        self.loss.check_target(name, np.asarray(y))
