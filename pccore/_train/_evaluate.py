"""Feed-forward evaluation."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._check import check_data
from .._custom_types import BatchArray
from .._energy._abstract import AbstractEnergy
from .._energy._base import PC
from .._model import AbstractPCModel, PCModel


class Evaluation(eqx.Module):
    """Feed-forward `loss` (batch mean of the output loss) and `accuracy` (argmax match)."""

    loss: Float[Array, ""]
    accuracy: Float[Array, ""]


def evaluate(model: AbstractPCModel, x: BatchArray, y: BatchArray, *,
             energy: AbstractEnergy = PC()) -> Evaluation:
    """Evaluate the feed-forward prediction of `model` on a labelled batch.

    At test time a discriminative PC network's prediction is its feed-forward pass (with the
    output free, that is its equilibrium). `accuracy` compares `argmax` over the last axis
    of prediction and target (one-hot `y`). A model in training mode is evaluated in
    evaluation mode ([`pccore.PCModel.eval`][]: BatchNorm running averages, no dropout).

    **Arguments:** `model` a [`pccore.PCModel`][]; `x`, `y` a batch; `energy` supplies the
    loss and parameterisation (default [`pccore.PC`][] with MSE).
    """
    x, y = check_data(model, energy, x, y, scan_device=True)
    if x is None or y is None:
        raise ValueError("`evaluate` needs both `x` and `y`.")
    if isinstance(model, PCModel) and model.training:
        model = model.eval()
    return _evaluate(model, x, y, energy)


@eqx.filter_jit
def _evaluate(model, x, y, energy):
    pred = energy.predict(energy.prepare(model), x)
    loss = energy.output_loss(pred, y).mean()
    acc = jnp.mean(jnp.argmax(pred, axis=-1) == jnp.argmax(y, axis=-1))
    return Evaluation(loss=loss, accuracy=acc)
