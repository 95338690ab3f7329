r"""Output losses $E_{\mathrm{out}}(y, \mu_L)$, per sample."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _sum_features(a: Array) -> Array:
    return a.reshape(a.shape[0], -1).sum(axis=1)


class AbstractLoss(eqx.Module):
    """An output loss. `loss(prediction, target)` returns one value per sample, shape `(B,)`."""

    @abc.abstractmethod
    def __call__(
        self, prediction: Float[Array, "batch ..."], target: Float[Array, "batch ..."]
    ) -> Float[Array, " batch"]:
        """The per-sample loss, summed over every non-batch axis."""


class MSE(AbstractLoss):
    r"""Squared error $E = \tfrac12 \lVert y - \mu_L \rVert^2$ per sample (a sum, not a mean)."""

    def __call__(self, prediction, target):
        return 0.5 * _sum_features(jnp.square(target - prediction))


class CrossEntropy(AbstractLoss):
    r"""Softmax cross-entropy $E = -\sum_k y_k \log \mathrm{softmax}(\mu_L)_k$ per sample.

    `prediction` are logits; `target` is one-hot or a distribution over the last axis.
    Computed with `log_softmax`, so saturated logits never give `0 * log 0 = nan`.
    """

    def __call__(self, prediction, target):
        return -_sum_features(target * jax.nn.log_softmax(prediction, axis=-1))
