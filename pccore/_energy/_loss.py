r"""Output losses $E_{\mathrm{out}}(y, \mu_L)$, per sample."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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

    def check_target(self, name: str, target: np.ndarray) -> None:
        """Raise a clear error if concrete `target` values are not valid for this loss (any
        finite value is valid by default). Called at the entry points on host data."""


class MSE(AbstractLoss):
    r"""Squared error $E = \tfrac12 \lVert y - \mu_L \rVert^2$ per sample (a sum, not a mean)."""

    def __call__(self, prediction: Float[Array, "batch ..."], target: Float[Array, "batch ..."]
                 ) -> Float[Array, " batch"]:
        return 0.5 * _sum_features(jnp.square(target - prediction))


class CrossEntropy(AbstractLoss):
    r"""Softmax cross-entropy $E = -\sum_k y_k \log \mathrm{softmax}(\mu_L)_k$ per sample.

    `prediction` are logits; `target` is one-hot or a distribution over the last axis.
    Computed with `log_softmax`, so saturated logits never give `0 * log 0 = nan`.
    """

    def __call__(self, prediction: Float[Array, "batch ..."], target: Float[Array, "batch ..."]
                 ) -> Float[Array, " batch"]:
        return -_sum_features(target * jax.nn.log_softmax(prediction, axis=-1))

    def check_target(self, name: str, target: np.ndarray) -> None:
        r"""Every target row is a distribution over the last axis: no negative entry, and a
        sum of 1 to within $\sqrt{\epsilon}$ of its dtype (an all-zero row, as one-hot
        encoding gives a label beyond the model's classes, would train on nothing)."""
        t = np.asarray(target)
        if t.size == 0 or t.ndim < 2:
            return
        tol = float(np.sqrt(np.finfo(t.dtype).eps)) if np.issubdtype(t.dtype, np.floating) else 0
        sums = t.sum(axis=-1)
        bad = (np.abs(sums - 1.0) > tol) | np.any(t < 0, axis=-1)
        if not bad.any():
            return
        rows = np.argwhere(bad)
        first = tuple(int(i) for i in rows[0])
        K = t.shape[-1]
        zero = bool(np.any(np.all(t == 0, axis=-1)))
        why = (f" All-zero rows are what one-hot encoding gives a label >= {K}: the labels have "
               f"more classes than the model's {K} outputs; wrap a model with one output per "
               "class." if zero else "")
        raise ValueError(
            f"`{name}`: with CrossEntropy every target row must be a distribution over the "
            f"{K} outputs (one-hot, or probabilities >= 0 summing to 1); got {len(rows)} of "
            f"{int(np.prod(sums.shape))} rows that are not, the first at index {first} "
            f"(sum {float(sums[first]):.4g}, min {float(t[first].min()):.4g}).{why} For "
            f"regression targets use pccore.MSE()."
        )
