r"""Energies: the objective predictive coding minimises over activities and parameters.

**Batch convention.** Every energy is defined per sample, $F_i$. Inference follows the
gradient of the batch *sum* $\mathcal F = \sum_i F_i$, so that
$\partial \mathcal F / \partial z_i = \partial F_i / \partial z_i$ and a sample's dynamics do
not depend on the batch it is in. Parameters follow the batch *mean*
$\mathcal L(\theta) = \frac1B \sum_i F_i(z_i^*, \theta) + R(\theta)$, so learning rates carry
over across batch sizes as in ordinary training.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._check import _is_float, check_option
from .._custom_types import Activities, EnergyParams, Scalar
from .._model import PCModel
from ._abstract import AbstractEnergy
from ._init import AbstractInit, FeedForward
from ._loss import MSE, AbstractLoss
from ._parameterisation import SP, AbstractParameterisation
from ._parts import check_energy_parts
from ._regularise import AbstractRegulariser, penalty


def sq_norm(a: Array) -> Float[Array, " batch"]:
    r"""Per-sample $\tfrac12 \lVert a_i \rVert^2$ of a batch `a` (the sum over every axis but
    the first): the squared-error term of an energy."""
    return 0.5 * jnp.square(a).reshape(a.shape[0], -1).sum(axis=1)



def output_term(loss: "AbstractLoss", precision: Any, y: Array | None, predict: Callable[[], Array],
                like: Array) -> Float[Array, " batch"]:
    r"""Per-sample $\lambda E_{\mathrm{out}}(y, \mu_L)$, with `predict()` giving $\mu_L$;
    zeros shaped like `like`'s batch when the output is free (`y` is None)."""
    if y is None:
        return jnp.zeros(like.shape[:1], like.dtype)
    return precision * loss(predict(), y)


def add_activity_decay(total: Array, decay: Any, activities: Activities) -> Float[Array, " batch"]:
    r"""`total` plus the prior $\frac\alpha2 \sum_l \lVert z_l \rVert^2$ per sample
    (no work when $\alpha$ is a literal zero)."""
    if isinstance(decay, int | float) and decay == 0:
        return total
    return total + decay * sum(sq_norm(v) for v in activities)


def chain_variable_shapes(model: PCModel, x_clamped: bool) -> tuple[jax.ShapeDtypeStruct, ...]:
    """One variable per layer input of a chain, `z_0` only when the bottom is free."""
    shapes = (model.in_shape, *model.out_shapes[:-1])
    if not x_clamped:
        check_free_bottom(model)
    return shapes[1:] if x_clamped else shapes


def check_free_bottom(model: PCModel) -> None:
    """Refuse a free bottom latent `z_0` (`x=None`) for a model that cannot have one: an
    integer (token) input, which no gradient can move, or layers that read the clamped input."""
    dtype = model.in_shape.dtype
    if not _is_float(dtype):
        raise ValueError(
            f"`x` is None (a free bottom latent z_0), but this model takes {jnp.dtype(dtype)} "
            "inputs (token ids, e.g. a first embedding layer): a token model cannot have a free "
            "input latent, since inference moves latents along real gradients. Pass the input "
            "tokens as `x`."
        )
    if any(model.reads_input):
        raise ValueError(model._free_bottom_message(model.reads_input.index(True)))


def chain_data_shapes(model: PCModel) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The chain's input and output per-sample shapes."""
    return model.in_shape.shape, model.out_shapes[-1].shape


class AbstractChainEnergy(AbstractEnergy):
    r"""The base of energies on a chain of layers ([`pccore.PC`][], [`pccore.EPC`][], your
    own variant): an output loss, a parameterisation, a prior on the free activities and
    parameter regularisers, and everything that follows from them.

    A subclass declares the four fields and writes its own maths: `layer_energies`, `init`,
    `layer_inputs` (and `per_sample` or `activities` where it reparameterises the
    activities). The inference variables are one per layer input (`z_0` only with a free
    bottom, as [`pccore.PC`][] has them), the prepared model is the parameterisation applied
    once per solve, the prediction is the feed-forward pass and the penalty is the sum of the
    regularisers. See "Writing a variant" in the docs.

    **Fields:** `loss` ($E_{\mathrm{out}}$), `parameterisation` (its `output_precision` is
    $\lambda$), `activity_decay` ($\alpha$), `regularisers` ($R(\theta)$).
    """

    loss: eqx.AbstractVar[AbstractLoss]
    parameterisation: eqx.AbstractVar[AbstractParameterisation]
    activity_decay: eqx.AbstractVar[float | ArrayLike]
    regularisers: eqx.AbstractVar[tuple[AbstractRegulariser, ...]]

    def __check_init__(self) -> None:
        name = type(self).__name__
        check_option(name, "activity_decay", self.activity_decay)
        check_energy_parts(name, self)

    def variable_shapes(self, model: PCModel, x_clamped: bool) -> tuple[jax.ShapeDtypeStruct, ...]:
        return chain_variable_shapes(model, x_clamped)

    def data_shapes(self, model: PCModel) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return chain_data_shapes(model)

    def prepare(self, model: PCModel) -> PCModel:
        return self.parameterisation.apply(model)

    def penalty(self, model: PCModel) -> Scalar:
        return penalty(self.regularisers, model)

    def predict(self, model: PCModel, x: Array) -> Array:
        return model(x)

    def output_loss(self, prediction: Array, y: Array) -> Float[Array, " batch"]:
        return self.loss(prediction, y)

    def check_target(self, name: str, y: Array) -> None:
        self.loss.check_target(name, np.asarray(y))

    def output(self, model: PCModel, z_top: Array, x: Array | None, y: Array | None
               ) -> Float[Array, " batch"]:
        r"""The output term $\lambda E_{\mathrm{out}}(y, \mu_L(z_{L-1}))$ per sample (zeros
        with a free output), from the top latent `z_top` on a prepared model."""
        L = model.num_layers
        return output_term(self.loss, self.parameterisation.output_precision, y,
                           lambda: model.predict_layer(L - 1, z_top, x=x), z_top)

    @abc.abstractmethod
    def layer_inputs(self, model: PCModel, variables: Activities, x: Array | None
                     ) -> tuple[Array, ...]:
        """The input of every layer, `(z_0, ..., z_{L-1})`, that the variables stand for (on a
        prepared model): what training-mode layers update their running averages from."""


class PC(AbstractChainEnergy):
    r"""Standard predictive coding (discriminative, supervised generative or unsupervised).

    $$F(z) = \sum_{l=1}^{L-1} \tfrac12 \lVert z_l - \mu_l(z_{l-1}) \rVert^2
        + \lambda\, E_{\mathrm{out}}(y, \mu_L(z_{L-1}))
        + \tfrac{\alpha}{2} \sum_{l\ \mathrm{free}} \lVert z_l \rVert^2$$

    with $\mu_l(z) = a_l$-scaled $f_l(z) + s_l(z)$ (see [`pccore.PCModel`][] and the
    parameterisations). $z_0 = x$ when `x` is given (clamped input); with `x=None` the
    bottom latent $z_0$ is free (generative/unsupervised). With `y=None` the output is
    free and its term vanishes.

    **Arguments:**

    - `loss`: the output loss $E_{\mathrm{out}}$, [`pccore.MSE`][] or [`pccore.CrossEntropy`][].
    - `parameterisation`: [`pccore.SP`][] (default), [`pccore.NTP`][] or [`pccore.MuPC`][];
        its `output_precision` is $\lambda$.
    - `activity_decay`: $\alpha \ge 0$, a Gaussian prior on every free activity.
    - `regularisers`: parameter regularisers $R(\theta)$ such as
        `(pccore.WeightDecay(1e-4), pccore.SpectralPenalty(1e-3))`, added once to the
        batch-mean parameter objective (see [`pccore.param_grads`][]).
    """

    loss: AbstractLoss = MSE()
    parameterisation: AbstractParameterisation = SP()
    activity_decay: float | ArrayLike = 0.0
    regularisers: tuple[AbstractRegulariser, ...] = ()

    def _chain(self, variables: Activities, x: Array | None) -> tuple[Array, ...]:
        return variables if x is None else (x, *variables)

    def layer_inputs(self, model: PCModel, variables: Activities, x: Array | None
                     ) -> tuple[Array, ...]:
        return tuple(self._chain(variables, x))[: model.num_layers]

    def layer_energies(self, model: PCModel, variables: Activities, x: Array | None,
                       y: Array | None) -> Float[Array, "batch terms"]:
        z = self._chain(variables, x)
        L = model.num_layers
        terms = [sq_norm(z[l] - model.predict_layer(l - 1, z[l - 1], x=x)) for l in range(1, L)]
        terms.append(self.output(model, z[L - 1], x, y))
        return jnp.stack(terms, axis=1)

    def per_sample(self, model: PCModel, variables: Activities, x: Array | None,
                   y: Array | None) -> Float[Array, " batch"]:
        total = self.layer_energies(model, variables, x, y).sum(axis=1)
        return add_activity_decay(total, self.activity_decay, variables)

    def init(self, model: PCModel, x: Array | None, y: Array | None, initialiser: AbstractInit,
             key: PRNGKeyArray | None) -> Activities:
        return initialiser(model, self.variable_shapes(model, x is not None), x, y, key)
