"""The wrap algorithm shared by the adapters that cut a model by intercepting its module calls
(Haiku, Flax Linen, Flax NNX).

An adapter subclasses `AbstractInterceptingAdapter`: its `wrap` declares the framework's
options and calls `wrap_intercepted`, and its `intercept` hook checks the model and its
variables and returns an `InterceptedModel`, the per-wrap object holding the framework's
hooks (the adapter itself is one shared instance, so nothing of one model lives on it).
`wrap_intercepted` does the rest, the same for every framework: discover the layer chain by
intercepting module calls (inferring the input shape and dtype where not given), build the
layers (train-mode state layers where there is a training call), the weight specs, the
layer names, and the `PCModel`.
"""

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from pccore._adapter import AbstractAdapter
from pccore._model import PCModel

from ._chain import (
    Intercepted,
    Plan,
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


@dataclasses.dataclass(frozen=True)
class Options:
    """The options every intercepting adapter takes (see the adapters' docstrings).

    `train_args`/`train_kwargs`: the training call's extra arguments; giving either puts the
    model in training mode (`training`).
    """

    input_shape: Sequence[int] | None = None
    boundaries: Sequence[str] | None = None
    dtype: Any = None
    args: tuple = ()
    kwargs: dict | None = None
    train_args: tuple | None = None
    train_kwargs: dict | None = None

    @property
    def training(self) -> bool:
        return self.train_args is not None or self.train_kwargs is not None

    def calls(self) -> tuple[tuple, dict, tuple, dict]:
        """`(args, kwargs, train_args, train_kwargs)`, as a tuple and a dict each."""
        return (tuple(self.args), dict(self.kwargs or {}), tuple(self.train_args or ()),
                dict(self.train_kwargs or {}))


class InterceptedModel(Intercepted):
    """One model being wrapped: the framework's hooks.

    Besides `Intercepted`'s (`params`, `frozen`, `what`, `run`, `owner`, `leaf_keys`,
    `refuse`), a subclass sets `training` (the model has a training call, `train_run`) and
    `has_state` (its frozen state is given back by `unwrap_state()` in training mode), and
    implements `rebuild`. The other hooks have defaults.
    """

    training: bool = False
    has_state: bool = False
    weight_names: tuple[str, ...] = ("kernel",)
    """Names of the weight leaves (Dense/Linear/Conv kernels) listed as `WeightSpec`s."""
    first_layer: str = ""
    """The layer input shapes are inferred from (`"hk.Linear"`), shown in errors."""
    how: str = ""
    """The call with `input_shape=`, shown in errors."""

    shape_what: str | None = None
    """How errors about the input shape name the model (default: `what`)."""

    @abc.abstractmethod
    def train_run(self, params: Any, frozen: Any, x: Any, icpt: Any, key: Any) -> tuple[Any, Any]:
        """The training call, with the step's key: `(output, new frozen state)`."""

    def state_owner(self, keys: tuple) -> str:
        """The module owning a leaf of the frozen state, from its key path."""
        return self.owner(keys)

    def state_layers(self, plan: Plan) -> tuple[int, ...]:
        """Per leaf of the frozen state, the layer that updates it (-1: none)."""
        return state_layers(plan, self.frozen, self.state_owner)

    def input_candidates(self) -> list[tuple[tuple[int, ...], str]]:
        """`(input shape, module)` guesses of the per-sample input shape (see
        `infer_input_shape`)."""
        return []

    def probe(self, called: set) -> Callable:
        """The run of discovery's own traces (see `discover`)."""
        return recording(self.run, called)

    def find_plan(self, dtype: Any, input_shape: Sequence[int] | None,
                  boundaries: Sequence[str] | None) -> tuple[Plan, jax.ShapeDtypeStruct]:
        """Discover the chain on inputs of `dtype`, and of `input_shape` or, if `None`, the
        first of `input_candidates()` that fits a first-called `first_layer`."""

        def trace(shape, called):
            in_shape = jax.ShapeDtypeStruct(tuple(shape), dtype)
            return discover(self, in_shape, boundaries, probe=self.probe(called)), in_shape

        if input_shape is not None:
            return trace(input_shape, set())
        return infer_input_shape(
            trace, self.input_candidates(), lambda plan: owners_by_layer(plan, self),
            self.shape_what or self.what, self.first_layer, self.how,
        )

    def discovery_error(self, e: Exception, boundaries: Sequence[str] | None) -> BaseException | None:
        """An error to raise instead of `e`, raised while discovering the chain (or `None`)."""
        return None

    def check(self, plan: Plan, in_shape: jax.ShapeDtypeStruct) -> None:
        """Refuse, after discovery, what the chain cannot run."""

    def needs_key(self, e: Exception) -> bool:
        """Whether the training call failed with `e` because it was given no random key."""
        return False

    def stochastic(self, in_shape: jax.ShapeDtypeStruct) -> bool:
        """Whether the training call draws random numbers (dropout): it fails without a key."""
        x = jax.ShapeDtypeStruct((2, *in_shape.shape), in_shape.dtype)
        try:
            jax.eval_shape(
                lambda p, s, x: self.train_run(p, s, x, lambda n, m, nf, a, k: nf(*a, **k), None),
                self.params, self.frozen, x)
        except Exception as e:
            if not self.needs_key(e):
                raise
            return True
        return False

    def weight_out_axis(self, keys: tuple) -> int:
        """The output axis of a weight leaf, from its key path (-1: `(..., in, out)`)."""
        return -1

    def weight_out_ndim(self, keys: tuple) -> int:
        """How many axes of a weight leaf index outputs, from its key path (default 1; a
        subclass reads it from the module owning the leaf, e.g. 2 for a Flax
        `LinearGeneral`/`DenseGeneral` kernel `(in, heads, head_dim)`)."""
        return 1

    @abc.abstractmethod
    def rebuild(self, params: Any, state: Any = None) -> Any:
        """The user's native object from the whole trainable tree (and the frozen state)."""


class AbstractInterceptingAdapter(AbstractAdapter):
    """An adapter that cuts a model into layers by intercepting its module calls.

    A subclass implements `matches`, `intercept` and a `wrap` whose keyword-only arguments
    are the framework's options, calling `wrap_intercepted`.
    """

    @abc.abstractmethod
    def intercept(self, model: Any, variables: Any, options: Options, **extra: Any) -> InterceptedModel:
        """Check `model` and `variables` and give the model's hooks; `extra` holds the
        framework's own options."""

    def wrap_intercepted(self, model: Any, variables: Any, options: Options, **extra: Any) -> PCModel:
        """The common wrap: `intercept`, discover the chain, and build the `PCModel`."""
        m = self.intercept(model, variables, options, **extra)
        require_params(m.params, m.what)
        float_dtype = jnp.result_type(jtu.tree_leaves(m.params)[0])
        try:
            plan, in_shape = with_input_dtype(
                lambda dt: m.find_plan(dt, options.input_shape, options.boundaries),
                options.dtype, float_dtype)
        except Exception as e:
            err = m.discovery_error(e, options.boundaries)
            if err is None:
                raise
            raise err from e
        m.check(plan, in_shape)
        owners: tuple[int, ...] = ()
        stochastic = False
        if m.training:
            owners = m.state_layers(plan)
            stochastic = m.stochastic(in_shape)
        layers = chain_layers(plan, m.frozen, m.train_run if m.training else None, owners,
                              stochastic)
        per_layer = plan.slicer.params
        merge = plan.slicer.merge
        return PCModel(
            layers=layers,
            params=per_layer,
            in_shape=in_shape,
            out_shapes=plan.out_shapes,
            names=layer_names(plan, owners_by_layer(plan, m)),
            weights=tuple(weight_specs(p, m.weight_names, m.weight_out_axis, m.weight_out_ndim)
                          for p in per_layer),
            skips=(False,) * len(layers),
            framework=self.name,
            rebuild=lambda new_params, state=None: m.rebuild(merge(new_params), state),
            reads_input=plan.reads_input,
            training=m.training,
            restate=(lambda fs: merged_state(fs, owners)) if m.training and m.has_state else None,
        )
