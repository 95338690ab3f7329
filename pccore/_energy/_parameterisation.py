r"""Parameterisations: the per-layer scalings $a_l$ of the affine maps, and the output precision.

The prediction of layer $l$ uses the effective weight $a_l W_l$ (biases are not scaled), so
with the post-activation convention $\mu_l = \phi_l(a_l W_l z_{l-1} + b_l) + s_l(z_{l-1})$.
The fan-ins come from the wrapped model's weight shapes (any framework, any layer with a
weight matrix or kernel); $L$ is the number of layers.

| type | $a_1$ | $a_l$, $1<l<L$ | with a skip | $a_L$ |
| --- | --- | --- | --- | --- |
| [`pccore.SP`][] | 1 | 1 | 1 | 1 |
| [`pccore.NTP`][] | $1/\sqrt{D}$ | $1/\sqrt{N}$ | $1/\sqrt{NL}$ | $1/\sqrt{N}$ |
| [`pccore.MuPC`][] | $1/\sqrt{D}$ | $1/\sqrt{N}$ | $1/\sqrt{NL}$ | $1/(N\gamma)$ |

`output_precision` $\lambda$ multiplies the output energy.
"""

import abc
import math

import equinox as eqx
from jaxtyping import ArrayLike

from .._check import check_option
from .._model import PCModel, scale_weights


class AbstractParameterisation(eqx.Module):
    """Per-layer weight scalings and an output precision.

    Subclasses implement `scaling(fan_in, position, skip, num_layers)`.
    """

    output_precision: eqx.AbstractVar[float | ArrayLike]

    @abc.abstractmethod
    def scaling(self, fan_in: int, position: str, skip: bool, num_layers: int) -> float:
        """The scale $a_l$ of a weight with `fan_in`, in a layer at `position`
        (`"first"`, `"hidden"` or `"last"`) that carries a residual `skip` or not."""

    def scalings(self, model: PCModel) -> tuple[tuple[float, ...], ...]:
        """The scale of every weight of every layer of `model` (from shapes alone)."""
        L = model.num_layers
        out = []
        for l in range(L):
            position = "last" if l == L - 1 else ("first" if l == 0 else "hidden")
            out.append(
                tuple(self.scaling(n, position, model.skips[l], L) for n in model.fan_ins(l))
            )
        return tuple(out)

    def apply(self, model: PCModel) -> PCModel:
        """`model` with every weight multiplied by its scale."""
        return scale_weights(model, self.scalings(model))


class SP(AbstractParameterisation):
    """Standard parameterisation: every $a_l = 1$."""

    output_precision: float | ArrayLike = 1.0

    def __check_init__(self) -> None:
        check_option("SP", "output_precision", self.output_precision)

    def scaling(self, fan_in: int, position: str, skip: bool, num_layers: int) -> float:
        return 1.0

    def apply(self, model: PCModel) -> PCModel:
        return model


class NTP(AbstractParameterisation):
    r"""Neural tangent parameterisation: $a_l = 1/\sqrt{\text{fan-in}}$ ($1/\sqrt{NL}$ with skips)."""

    output_precision: float | ArrayLike = 1.0

    def __check_init__(self) -> None:
        check_option("NTP", "output_precision", self.output_precision)

    def scaling(self, fan_in: int, position: str, skip: bool, num_layers: int) -> float:
        if position == "hidden" and skip:
            return 1.0 / math.sqrt(fan_in * num_layers)
        return 1.0 / math.sqrt(fan_in)


class MuPC(AbstractParameterisation):
    r"""μPC (Innocenti et al., 2025): as [`pccore.NTP`][] but $a_L = 1/(N\gamma)$.

    **Arguments:**

    - `gamma`: the output scaling $\gamma$ (divides $a_L$).
    - `output_precision`: $\lambda$, the weight of the output energy.
    """

    gamma: float = 1.0
    output_precision: float | ArrayLike = 1.0

    def __check_init__(self) -> None:
        check_option("MuPC", "gamma", self.gamma, strict=True)
        check_option("MuPC", "output_precision", self.output_precision)

    def scaling(self, fan_in: int, position: str, skip: bool, num_layers: int) -> float:
        if position == "last":
            return 1.0 / (fan_in * self.gamma)
        if position == "hidden" and skip:
            return 1.0 / math.sqrt(fan_in * num_layers)
        return 1.0 / math.sqrt(fan_in)
