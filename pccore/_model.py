"""The model form the core consumes: a chain of pure layer functions and their parameters."""

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from equinox import AbstractVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._custom_types import EnergyParams, Params

LayerFn = Callable[..., Array]
"""`apply_l(params_l, z) -> y`: pure, batched on axis 0, jit/grad/vmap safe. A layer flagged in
`PCModel.reads_input` is `apply_l(params_l, z, x) -> y`: it also reads the clamped model input
`x` (a transformer block building its attention mask from the tokens)."""


class WeightSpec(eqx.Module):
    """Where a layer's weight matrix (or kernel) lives and how to read it as `W (out, in)`.

    **Arguments:**

    - `index`: position of the weight among `jax.tree_util.tree_leaves(params_l)`.
    - `out_axis`: the axis of the weight that indexes outputs: `0` for Equinox's
        `(out, in, ...)` layout, `-1` for Haiku/Flax's `(..., in, out)` kernels.
    - `out_ndim`: how many axes index outputs (default `1`): the `out_ndim` axes that start
        at `out_axis` and run inwards (`0`: the leading axes; `-1`: the trailing ones). Flax's
        `LinearGeneral`/`DenseGeneral` kernels of attention's query, key and value
        projections are `(in, heads, head_dim)`: `WeightSpec(i, -1, out_ndim=2)`.

    The matricised weight moves the output axes to the front and reshapes, `W =
    w.reshape(prod(out_shape), -1)` after the move, so its fan-in is `w.size //
    prod(out_shape)` (for a convolution, `in_channels * prod(kernel)`; for an
    `(in, heads, head_dim)` kernel, `in`; for attention's `(heads, head_dim, out)` output
    projection, `heads * head_dim`).
    """

    index: int = eqx.field(static=True)
    out_axis: int = eqx.field(static=True)
    out_ndim: int = eqx.field(static=True, default=1)

    def __check_init__(self) -> None:
        if not isinstance(self.out_ndim, int) or self.out_ndim < 1:
            raise ValueError(
                f"`out_ndim` must be a positive number of output axes; got {self.out_ndim!r}. "
                "Use 1 for an ordinary (in, out) kernel, 2 for (in, heads, head_dim)."
            )


def _out_axes(ndim: int, out_axis: int, out_ndim: int) -> tuple[int, ...]:
    """The output axes of a weight with `ndim` axes (see [`pccore.WeightSpec`][])."""
    if -ndim <= out_axis < ndim and out_ndim < ndim:
        a = out_axis % ndim
        first = a - out_ndim + 1 if out_axis < 0 else a
        if first >= 0 and first + out_ndim <= ndim:
            return tuple(range(first, first + out_ndim))
    raise ValueError(
        f"unsupported weight layout: out_axis={out_axis}, out_ndim={out_ndim} for a {ndim}-d "
        "weight (the output axes must fit in it and leave at least one input axis)."
    )


def matricise(w: Array, out_axis: int, out_ndim: int = 1) -> Float[Array, "out in"]:
    """The weight `w` as a matrix in `(out, in)` layout (see [`pccore.WeightSpec`][])."""
    axes = _out_axes(w.ndim, out_axis, out_ndim)
    w = jnp.moveaxis(w, axes, tuple(range(out_ndim)))
    return w.reshape(int(np.prod(w.shape[:out_ndim])), -1)


def fan_in(shape: Sequence[int], out_axis: int, out_ndim: int = 1) -> int:
    """The fan-in of a weight of `shape` (see [`pccore.WeightSpec`][]): its size over the
    product of its output axes."""
    axes = _out_axes(len(shape), out_axis, out_ndim)
    return int(np.prod(shape)) // int(np.prod([shape[a] for a in axes]))


class AbstractStatefulLayer(eqx.Module):
    r"""A layer function whose training forward differs from its evaluation forward.

    Train-mode BatchNorm normalises with the statistics of the batch it is given and updates
    running averages; train-mode Dropout multiplies by a random mask. An adapter gives such a
    layer as a subclass of this class, holding the layer's non-trainable state (the
    framework's running averages) as arrays in its own fields.

    - `layer(params_l, z)` (or `layer(params_l, z, x)` for a layer that reads the clamped
        input) is the evaluation forward: running averages, no dropout. It is the plain
        layer-function contract of [`pccore.PCModel`][].
    - `layer.train(params_l, z, key, x)` is the training forward on the batch `z`: batch
        statistics of `z`, dropout masks drawn from `key` (the same key gives the same
        masks), and returns `(y, new_layer)` where `new_layer` holds the state updated from
        this batch (the running averages after one more batch).

    In a training step ([`pccore.train_step`][]) of a model in training mode
    ([`pccore.PCModel.train`][]), every inference step and the parameter gradient run
    `train` with one key per step, so inference descends one fixed energy: the masks are
    fixed, and the batch statistics are those of the current activities (they couple the
    samples of a batch, so a sample's energy depends on the others; batch invariance holds
    in evaluation mode only). The state is updated once per step, at the equilibrium.
    """

    stochastic: AbstractVar[bool]
    """Whether `train` draws random numbers from its key (Dropout); a layer with only batch
    statistics needs no key."""

    @abc.abstractmethod
    def __call__(self, params: Params, z: Array, x: Array | None = None) -> Array:
        """The evaluation forward (running averages, no dropout)."""

    @abc.abstractmethod
    def train(self, params: Params, z: Array, key: PRNGKeyArray | None,
              x: Array | None = None) -> "tuple[Array, AbstractStatefulLayer]":
        """The training forward on the batch `z`, and this layer with its state updated."""


class AbstractPCModel(eqx.Module):
    """What the engine needs of a model: trainable `params`, and a way to swap and unwrap them.

    [`pccore.PCModel`][] (a chain of layers), [`pccore.Bidirectional`][] (two chains over the
    same latents) and [`pccore.GraphModel`][] (latents marked inside any forward pass) are the
    model forms; each energy states which form it runs on. Subclasses provide a `params`
    attribute (the tree an optax optimiser is initialised with) and the methods below.
    """

    @abc.abstractmethod
    def with_params(self, params: Any) -> "AbstractPCModel":
        """A copy of this model with `params` in place of its parameters."""

    @property
    def trainable(self) -> Any:
        """Everything a training step differentiates and updates, the tree an optax optimiser
        is initialised with: `optim.init(model.trainable)`. Here, `model.params`;
        [`pccore.PCModel.trainable`][] adds the energy's own parameters when it holds any."""
        return getattr(self, "params")

    def with_trainable(self, trainable: Any) -> "AbstractPCModel":
        """A copy of this model with `trainable` (structured as `model.trainable`) in place of
        everything it trains: the inverse of `trainable`."""
        return self.with_params(trainable)

    @abc.abstractmethod
    def unwrap(self) -> Any:
        """The user's own model object(s), with the current parameters."""


class PCModel(AbstractPCModel):
    r"""A model as predictive coding sees it: a chain of layers $f_l(\cdot; \theta_l)$.

    Layer $l$ maps the activity $z_{l-1}$ to a prediction of $z_l$,
    $\mu_l = f_l(z_{l-1}; \theta_l) + s_l(z_{l-1})$, where $s_l$ is an identity skip when
    `skips[l]` is set. Build one with [`pccore.wrap`][] from an Equinox, Haiku or Flax model;
    the core never needs to know which framework it came from.

    **Fields:**

    - `layers`: per-layer pure functions `apply_l(params_l, x) -> y`, batched on axis 0.
        A layer function may be a pytree (an `eqx.Module`) holding frozen, non-trainable
        state such as BatchNorm running averages; it is never differentiated.
    - `params`: per-layer trainable parameter pytrees, in the framework's own structure.
        With no `energy_params`, this is the tree an optax optimiser is initialised with:
        `optim.init(model.params)` (in general `optim.init(model.trainable)`).
    - `in_shape`: per-sample shape and dtype of the input $z_0$.
    - `out_shapes`: per-sample shape and dtype of each layer's output $z_1, \dots, z_L$.
    - `names`: a readable name per layer (module paths in the source framework).
    - `weights`: per layer, the [`pccore.WeightSpec`][]s of its weight matrices/kernels
        (used by parameterisations, regularisers and the linear theory). Biases and other
        parameters are not listed.
    - `skips`: per layer, whether an identity skip is added to its prediction.
    - `reads_input`: per layer, whether its function also reads the clamped model input
        `x`, as `apply_l(params_l, z, x)` (e.g. an attention block that builds its mask from
        the tokens). Reading the clamped input skips no latent, so the chain stays a chain;
        such a model needs `x` (it cannot run with a free bottom). `()` (the default): no
        layer reads it.
    - `framework`: the adapter's name (`"equinox"`, `"haiku"`, ...).
    - `rebuild`: `params -> native object`; use [`pccore.PCModel.unwrap`][]. For a model
        with `restate`, it also takes `state=` (the native state form) and puts that state
        into the object it returns where the framework keeps them together (Linen
        variables, an NNX module).
    - `training`: whether the [`pccore.AbstractStatefulLayer`][]s run their training
        forward (batch statistics, dropout). Set by the adapter from the wrapped model's mode;
        switch with [`pccore.PCModel.train`][] and [`pccore.PCModel.eval`][].
    - `step_key`: the key of the current training step, from which the dropout masks are
        drawn ([`pccore.train_step`][] sets it from its `key`); None outside a step.
    - `restate`: `layers -> native state` (an `eqx.nn.State`, Haiku state, Linen's
        non-parameter collections, NNX's non-parameter state) for a model whose layers
        hold state that training updates; None for a model without state. Use
        [`pccore.PCModel.unwrap_state`][].
    - `energy_params`: the trainable parameters of the energy (the variant), not of the
        network: a pytree of float arrays, e.g. one log-precision per layer, or None (the
        default: the variant has none). Set it once with
        `model = model.with_energy_params(energy.init_params(model))`
        ([`pccore.AbstractEnergy.init_params`][]); the variant reads `model.energy_params` in
        its energy. Training updates it with the network's parameters
        ([`pccore.PCModel.trainable`][]); inference holds it constant. It is not part of the
        native model: `unwrap()` returns the network alone.
    """

    layers: tuple[LayerFn, ...]
    params: tuple[Params, ...]
    in_shape: jax.ShapeDtypeStruct = eqx.field(static=True)
    out_shapes: tuple[jax.ShapeDtypeStruct, ...] = eqx.field(static=True)
    names: tuple[str, ...] = eqx.field(static=True)
    weights: tuple[tuple[WeightSpec, ...], ...] = eqx.field(static=True)
    skips: tuple[bool, ...] = eqx.field(static=True)
    framework: str = eqx.field(static=True)
    rebuild: Callable[[tuple[Params, ...]], Any] = eqx.field(static=True)
    reads_input: tuple[bool, ...] = eqx.field(static=True, default=())
    training: bool = eqx.field(static=True, default=False)
    step_key: PRNGKeyArray | None = None
    restate: Callable[[tuple[LayerFn, ...]], Any] | None = eqx.field(static=True, default=None)
    energy_params: EnergyParams = None  # None (an empty pytree): the energy has none

    def __check_init__(self) -> None:
        if self.energy_params is not None:
            check_energy_params(self.energy_params)
        n = len(self.layers)
        for name in ("params", "out_shapes", "names", "weights", "skips", "reads_input"):
            if name == "reads_input" and not self.reads_input:
                continue
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"`PCModel.{name}` has {len(getattr(self, name))} entries but there are "
                    f"{n} layers; an adapter must give one entry per layer."
                )
        if n == 0:
            raise ValueError("A `PCModel` needs at least one layer; got none.")

    @property
    def num_layers(self) -> int:
        """The number of layers $L$."""
        return len(self.layers)

    def unwrap(self) -> Any:
        """The user's own model object (same type and structure), with the current parameters
        (and, where the framework keeps them in the same object, the current state)."""
        if self.restate is None:
            return self.rebuild(self.params)
        return self.rebuild(self.params, state=self.unwrap_state())

    def unwrap_state(self) -> Any:
        """The model's non-trainable state in the framework's own form, as training left it
        (BatchNorm running averages): an `eqx.nn.State`, Haiku state, Linen's non-parameter
        collections (`{"batch_stats": ...}`) or NNX's non-parameter `nnx.State`. None for a
        model without state."""
        return None if self.restate is None else self.restate(self.layers)

    @property
    def stateful(self) -> bool:
        """Whether a layer runs differently in training (a [`pccore.AbstractStatefulLayer`][])."""
        return any(isinstance(f, AbstractStatefulLayer) for f in self.layers)

    @property
    def stochastic(self) -> bool:
        """Whether a layer draws random numbers in training (Dropout), so that a training step
        needs a key."""
        return any(isinstance(f, AbstractStatefulLayer) and f.stochastic for f in self.layers)

    def train(self, mode: bool = True) -> "PCModel":
        """A copy whose [`pccore.AbstractStatefulLayer`][]s run their training forward (batch
        statistics, dropout masks from the step's key); `mode=False` is
        [`pccore.PCModel.eval`][]. A model without such layers is the same in both modes."""
        return dataclasses.replace(self, training=bool(mode))

    def eval(self) -> "PCModel":
        """A copy in evaluation mode: running averages, no dropout (what
        [`pccore.evaluate`][] uses)."""
        return dataclasses.replace(self, training=False, step_key=None)

    def with_step_key(self, key: PRNGKeyArray | None) -> "PCModel":
        """A copy whose training-mode layers draw their masks from `key` (held fixed until the
        next call: one key per training step)."""
        return dataclasses.replace(self, step_key=key)

    def update_state(self, inputs: tuple[Array, ...], x: Array | None = None) -> "PCModel":
        r"""The model with each stateful layer's state updated from one batch: layer `l`'s
        training forward on `inputs[l]` (its input activity, e.g. $z_{l-1}$ at the
        equilibrium), with this model's step key. Stateless layers are kept."""
        layers = list(self.layers)
        for l, f in enumerate(self.layers):
            if isinstance(f, AbstractStatefulLayer):
                xin = x if (self.reads_input and self.reads_input[l]) else None
                layers[l] = f.train(self.params[l], inputs[l], self._key(l), xin)[1]
        return dataclasses.replace(self, layers=tuple(layers))

    def _key(self, l: int) -> PRNGKeyArray | None:
        f = self.layers[l]
        if self.step_key is None and isinstance(f, AbstractStatefulLayer) and f.stochastic:
            raise ValueError(
                f"`key`: this model is in training mode and draws random numbers (Dropout) "
                f"in layer {l} ({self.names[l]!r}), but it has no step key. Pass `key=` to `pccore.train_step` (a new key "
                "every step, e.g. `jax.random.fold_in(key, step)`), use "
                "`model.with_step_key(key)` to call the energy or `pccore.infer` yourself, or "
                "`model.eval()` to run without dropout."
            )
        return self.step_key

    def with_params(self, params: tuple[Params, ...]) -> "PCModel":
        """A copy of this model with `params` in place of its parameters (the energy's
        parameters, `energy_params`, are kept)."""
        return eqx.tree_at(lambda m: m.params, self, tuple(params))

    def with_energy_params(self, energy_params: EnergyParams | None) -> "PCModel":
        """A copy of this model holding `energy_params`, the energy's own trainable parameters.

        **Arguments:**

        - `energy_params`: a pytree of float32/float64 arrays (at least one), usually
            `energy.init_params(model)` ([`pccore.AbstractEnergy.init_params`][]); None
            removes them.

        **Returns:** the model with `energy_params` set; its [`pccore.PCModel.trainable`][]
        becomes `(params, energy_params)`, so start the optimiser again with
        `optim.init(model.trainable)` (or `step.init(model)`).
        """
        if energy_params is not None:
            check_energy_params(energy_params)
        return dataclasses.replace(self, energy_params=energy_params)

    @property
    def trainable(self) -> Any:
        """What a training step differentiates and updates, and the tree an optax optimiser is
        initialised with (`optim.init(model.trainable)`, as [`pccore.TrainStep.init`][] does).

        **Returns:** `model.params` when `energy_params` is None (so an optimiser state made
        with `optim.init(model.params)` fits), else the pair
        `(model.params, model.energy_params)`.
        """
        if self.energy_params is None:
            return self.params
        return (self.params, self.energy_params)

    def with_trainable(self, trainable: Any) -> "PCModel":
        """A copy of this model with `trainable`, a tree structured as
        [`pccore.PCModel.trainable`][] (the parameters, or the pair `(params, energy_params)`
        when the model holds energy parameters), in place of what it trains: the inverse of
        `trainable`. Gradients of the training objective have this structure."""
        if self.energy_params is None:
            return self.with_params(trainable)
        params, energy_params = trainable
        return dataclasses.replace(self, params=tuple(params), energy_params=energy_params)

    def with_skips(self, skips: bool | tuple[bool, ...] = True) -> "PCModel":
        """A copy with identity residual skips.

        `skips=True` adds one to every hidden-to-hidden layer $l = 2, \\dots, L-1$ (these
        need equal input and output shapes); `False` removes them; a tuple sets each layer.
        """
        L = self.num_layers
        if isinstance(skips, bool):
            skips = tuple(skips and 0 < l < L - 1 for l in range(L))
        skips = tuple(bool(s) for s in skips)
        if len(skips) != L:
            raise ValueError(f"`skips` has {len(skips)} entries; expected one per layer ({L}).")
        shapes = (self.in_shape, *self.out_shapes)
        for l, s in enumerate(skips):
            if s and shapes[l].shape != shapes[l + 1].shape:
                raise ValueError(
                    f"`skips`: layer {l} ({self.names[l]!r}) maps shape {shapes[l].shape} to "
                    f"{shapes[l + 1].shape}; an identity skip needs equal shapes. Set `skips` "
                    "only on layers whose input and output shapes match."
                )
        return dataclasses.replace(self, skips=skips)

    def predict_layer(
        self, l: int, z: Array, params: Params | None = None, *, x: Array | None = None
    ) -> Array:
        r"""The prediction $\mu_{l+1} = f_{l+1}(z) + s_{l+1}(z)$ of layer `l` (0-based).

        `x` is the clamped model input, passed to a layer that reads it (`reads_input[l]`)
        and ignored by the others.
        """
        p = self.params[l] if params is None else params
        f = self.layers[l]
        reads = bool(self.reads_input and self.reads_input[l])
        if reads and x is None:
            raise ValueError(self._free_bottom_message(l))
        if self.training and isinstance(f, AbstractStatefulLayer):
            out = f.train(p, z, self._key(l), x if reads else None)[0]
        elif reads:
            out = f(p, z, x)
        else:
            out = f(p, z)
        return out + z if self.skips[l] else out

    def _free_bottom_message(self, l: int) -> str:
        return (
            f"`x`: layer {l} ({self.names[l]!r}) reads the clamped model input `x` (e.g. an "
            "attention mask built from the tokens), but `x` is None (a free bottom). A model "
            "whose layers read the input can only run with `x` clamped: pass `x`."
        )

    def __call__(self, x: Float[Array, "batch ..."]) -> Float[Array, "batch ..."]:
        """The feed-forward prediction of a batch `x` (skips included), compiled (`eqx.filter_jit`;
        inside a traced function it is inlined)."""
        return _forward(self, x)

    def weight_matrices(self, l: int, params: Params | None = None) -> list[Array]:
        """Layer `l`'s weight matrices in `(out, in)` layout (see [`pccore.WeightSpec`][])."""
        leaves = jtu.tree_leaves(self.params[l] if params is None else params)
        return [matricise(leaves[s.index], s.out_axis, s.out_ndim) for s in self.weights[l]]

    def fan_ins(self, l: int) -> tuple[int, ...]:
        """Fan-in of each weight of layer `l`, from shapes alone (no arrays are read)."""
        leaves = jtu.tree_leaves(self.params[l])
        return tuple(fan_in(leaves[s.index].shape, s.out_axis, s.out_ndim) for s in self.weights[l])


def check_energy_params(energy_params: Any) -> None:
    """`energy_params` is a pytree of float32/float64 arrays with at least one array."""
    leaves = jtu.tree_leaves(energy_params)
    fix = ("Pass a pytree of float arrays, e.g. `jnp.zeros(model.num_layers)`, usually "
           "`model.with_energy_params(energy.init_params(model))`; None for none.")
    if not leaves:
        raise ValueError(
            f"`energy_params` holds no arrays (got {energy_params!r}): an energy's trainable "
            f"parameters need at least one array. {fix}"
        )
    for path, leaf in jtu.tree_leaves_with_path(energy_params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            raise TypeError(
                f"`energy_params{jtu.keystr(path)}` is a {type(leaf).__name__}, not an array. "
                f"{fix}"
            )
        if not jnp.issubdtype(dtype, jnp.floating) or jnp.dtype(dtype).itemsize < 4:
            raise TypeError(
                f"`energy_params{jtu.keystr(path)}` has dtype {dtype}; expected float32 or "
                f"float64 (training takes gradient steps on it). {fix}"
            )


@eqx.filter_jit
def _forward(model: PCModel, x: Array) -> Array:
    z = x
    for l in range(model.num_layers):
        z = model.predict_layer(l, z, x=x)
    return z


def scale_weights(model: PCModel, scales: tuple[tuple[float, ...], ...]) -> PCModel:
    """Multiply each weight leaf of each layer by its scale; other leaves stay as they are."""
    new = []
    for l, p in enumerate(model.params):
        leaves, treedef = jtu.tree_flatten(p)
        leaves = list(leaves)
        for spec, a in zip(model.weights[l], scales[l], strict=True):
            if not (isinstance(a, float | int) and a == 1):
                leaves[spec.index] = leaves[spec.index] * a
        new.append(jtu.tree_unflatten(treedef, leaves))
    return model.with_params(tuple(new))
