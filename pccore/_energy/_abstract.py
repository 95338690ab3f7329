"""The base of every energy variant: the methods the engine calls (a leaf module)."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import Activities, EnergyParams, Scalar
from .._model import PCModel
from ._init import AbstractInit


class AbstractEnergy(eqx.Module):
    """A predictive coding variant: its inference variables and its per-sample energy.

    The engine ([`pccore.infer`][], [`pccore.train_step`][]) only calls these methods, so a
    new variant plugs into every solver and the one update path by subclassing this.
    Methods other than `prepare` receive the *prepared* model (parameterisation applied).
    """

    @abc.abstractmethod
    def variable_shapes(
        self, model: PCModel, x_clamped: bool
    ) -> tuple[jax.ShapeDtypeStruct, ...]:
        """Per-sample shapes of the inference variables."""

    @abc.abstractmethod
    def data_shapes(
        self, model: PCModel
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sample shapes of the clamped bottom `x` and top `y`."""

    @abc.abstractmethod
    def layer_energies(
        self, model: PCModel, variables: Activities, x: Array | None, y: Array | None
    ) -> Float[Array, "batch terms"]:
        """Per-sample energy of every term, in layer order (no regularisers)."""

    @abc.abstractmethod
    def init(
        self,
        model: PCModel,
        x: Array | None,
        y: Array | None,
        initialiser: AbstractInit,
        key: PRNGKeyArray | None,
    ) -> Activities:
        """Initial inference variables."""

    @abc.abstractmethod
    def predict(self, model: PCModel, x: Array) -> Array:
        """The feed-forward prediction of the top from `x` (for losses and evaluation)."""

    @abc.abstractmethod
    def output_loss(self, prediction: Array, y: Array) -> Float[Array, " batch"]:
        """The per-sample output loss of a prediction (without the output precision)."""

    def prepare(self, model: PCModel) -> PCModel:
        """Apply the parameterisation (done once per solve, outside the inference loop)."""
        return model

    def per_sample(
        self, model: PCModel, variables: Activities, x: Array | None, y: Array | None
    ) -> Float[Array, " batch"]:
        """Per-sample total energy $F_i$ (with activity regularisers, without parameter ones)."""
        return self.layer_energies(model, variables, x, y).sum(axis=1)

    def penalty(self, model: PCModel) -> Scalar:
        """Parameter regulariser $R(\\theta)$, added once to the batch-mean objective."""
        return jnp.zeros(())

    def init_params(self, model: PCModel) -> EnergyParams | None:
        r"""The initial values of this variant's own trainable parameters (learnable precisions,
        say), or None (the default) for a variant without any.

        A variant with parameters overrides this; the user stores them in the model once,
        `model = model.with_energy_params(energy.init_params(model))`, and the variant reads
        them back as `model.energy_params` in `per_sample`, `layer_energies` or `penalty`.
        A training step ([`pccore.TrainStep`][]) then differentiates the batch-mean objective
        $\mathcal L$ in them and updates them with the network's parameters
        ([`pccore.PCModel.trainable`][]); inference holds them constant, as it does the
        network's parameters.

        **Arguments:**

        - `model`: the [`pccore.PCModel`][] (unprepared) the parameters are for, e.g. for
            its number of layers or its dtype.

        **Returns:** a pytree of float32/float64 arrays, e.g.
        `jnp.zeros(model.num_layers - 1)` for one log-precision per hidden layer, or None.
        """
        return None

    def check_target(self, name: str, y: Array) -> None:
        """Raise a clear error if the values of a concrete clamped top `y` are invalid for this
        variant's output loss (e.g. CrossEntropy rows that are not distributions). Called at
        the entry points; by default every finite value is valid."""

    def activities(self, model: PCModel, variables: Activities, x: Array | None) -> Activities:
        """The free activities (as [`pccore.PC`][] orders them) that the inference variables
        stand for: the variables themselves, unless a variant reparameterises them
        ([`pccore.EPC`][] infers errors). `model` is not prepared."""
        return tuple(variables)


__all__ = ["AbstractEnergy"]
