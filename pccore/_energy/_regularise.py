r"""Parameter regularisers $R(\theta)$ on weight matrices, added once to the parameter objective.

$$R(\theta) = \tfrac{w}{2} \sum_l \lVert W_l \rVert_F^2 \quad\text{or}\quad
  \tfrac{s}{2} \sum_l \lVert W_l^\top W_l - I \rVert_F^2$$

with every weight matrix (or matricised kernel) $W_l$ of every layer in `(out, in)` layout
(see [`pccore.PCModel.weight_matrices`][]); biases are never penalised. A layer that has
trainable parameters but no identified weight raises an error: a regulariser never silently
does nothing.
"""

import abc
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Float

from .._check import check_option
from .._custom_types import Scalar


def _weight_matrices(model: Any) -> list[Array]:
    """Every weight matrix of a chain model, or a clear error when a layer has none."""
    mats = []
    for l in range(len(model.params)):
        n_leaves = len([a for a in jtu.tree_leaves(model.params[l]) if eqx.is_inexact_array(a)])
        if n_leaves and not model.weights[l]:
            raise ValueError(
                f"`regularisers`: layer {l} ({model.names[l]!r}) has {n_leaves} trainable "
                "arrays but its adapter identified no weight matrix in them, so a weight "
                "regulariser cannot act on it. Give the layer a `WeightSpec` (adapter "
                "`weights=`), or drop the regulariser."
            )
        mats.extend(model.weight_matrices(l))
    return mats


class AbstractRegulariser(eqx.Module):
    """A penalty $R(\\theta)$ on a model's weight matrices (one scalar per model)."""

    @abc.abstractmethod
    def matrix_penalty(self, W: Float[Array, "out in"]) -> Scalar:
        """The penalty of one weight matrix in `(out, in)` layout."""

    def __call__(self, model: Any) -> Scalar:
        """$R(\\theta)$: the sum of `matrix_penalty` over every weight matrix of `model`.

        `model` is a [`pccore.PCModel`][] (variants with several networks sum over them).
        """
        total = jnp.zeros(())
        for W in _weight_matrices(model):
            total = total + self.matrix_penalty(W)
        return total


class WeightDecay(AbstractRegulariser):
    r"""$R = \tfrac{w}{2}\sum_l \lVert W_l\rVert_F^2$, so $\partial R/\partial W_l = w W_l$.

    **Arguments:**

    - `coef`: $w \ge 0$; a Python number or an array (it may be traced, e.g. under `vmap`).
    """

    coef: float | ArrayLike

    def __check_init__(self) -> None:
        check_option("WeightDecay", "coef", self.coef)

    def matrix_penalty(self, W: Float[Array, "out in"]) -> Scalar:
        return 0.5 * self.coef * jnp.sum(jnp.square(W))


class SpectralPenalty(AbstractRegulariser):
    r"""$R = \tfrac{s}{2}\sum_l \lVert W_l^\top W_l - I\rVert_F^2$, with
    $\partial R/\partial W_l = 2 s\, W_l (W_l^\top W_l - I)$.

    Pushes every weight matrix towards orthonormal columns (singular values 1). Haiku and
    Flax kernels $K = W^\top$ are transposed first, so $W^\top W = K K^\top$.

    **Arguments:**

    - `coef`: $s \ge 0$; a Python number or an array (it may be traced).
    """

    coef: float | ArrayLike

    def __check_init__(self) -> None:
        check_option("SpectralPenalty", "coef", self.coef)

    def matrix_penalty(self, W: Float[Array, "out in"]) -> Scalar:
        G = W.T @ W - jnp.eye(W.shape[1], dtype=W.dtype)
        return 0.5 * self.coef * jnp.sum(jnp.square(G))


def penalty(regularisers: tuple[AbstractRegulariser, ...], model: Any) -> Scalar:
    """The sum of `regularisers` on `model` (0 when there are none)."""
    total = jnp.zeros(())
    for r in regularisers:
        if not isinstance(r, AbstractRegulariser):
            raise TypeError(
                f"`regularisers` must hold pccore regularisers (pccore.WeightDecay(coef), "
                f"pccore.SpectralPenalty(coef)); got {type(r).__name__}. Activity decay is "
                "the energy's `activity_decay=` option."
            )
        total = total + r(model)
    return total
