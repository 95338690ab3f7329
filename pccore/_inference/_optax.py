"""The optax family: an optax optimiser stepping the activities."""

from typing import Any

import equinox as eqx
import optax
from jaxtyping import PRNGKeyArray

from .._custom_types import Activities
from ._base import AbstractInference, Fields


class OptaxInference(AbstractInference):
    r"""An optax optimiser on the activities: $z \leftarrow z + \mathrm{update}(\nabla_z \mathcal F)$.

    `OptaxInference(optax.sgd(0.1))` is Euler's method with step 0.1; momentum, Adam and
    noise injection (`optax.add_noise`) are descents of their own. `solver=optim` with an
    optax `GradientTransformation` is the shorthand for `solver=OptaxInference(optim)`.

    **Arguments:** `optim`, an optax `GradientTransformation`.
    """

    optim: optax.GradientTransformation = eqx.field(static=True)

    def init(self, fields: Fields, z0: Activities, key: PRNGKeyArray | None) -> Any:
        return self.optim.init(z0)

    def step(self, fields: Fields, z: Activities, g: Activities,
             state: Any) -> tuple[Activities, Any]:
        updates, state = self.optim.update(g, state, z)
        return optax.apply_updates(z, updates), state


__all__ = ["OptaxInference"]
