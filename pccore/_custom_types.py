"""Type aliases shared by pccore's modules (jaxtyping)."""

from typing import TYPE_CHECKING, Any, TypeAlias

import diffrax
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

if TYPE_CHECKING:  # a pytree of arrays of any structure: static checkers see `Any`
    Params: TypeAlias = Any
    EnergyParams: TypeAlias = Any
else:
    Params: TypeAlias = PyTree[Array]
    EnergyParams: TypeAlias = PyTree[Array]
"""The trainable parameters of one layer, in the framework's own structure."""

Activities: TypeAlias = tuple[Float[Array, "batch ..."], ...]
"""The free inference variables: one array per latent, batch on axis 0."""

BatchArray: TypeAlias = Float[ArrayLike, "batch ..."]
Scalar: TypeAlias = Float[Array, ""]
IntScalar: TypeAlias = Int[Array, ""]
StepSizeController: TypeAlias = diffrax.AbstractStepSizeController[Any, Any]
"""A diffrax step-size controller (`diffrax.ConstantStepSize()`, `diffrax.PIDController(...)`)."""
Model: TypeAlias = Any
"""A user's native model object (an Equinox module, a Haiku transform, ...)."""

__all__ = ["Activities", "BatchArray", "EnergyParams", "IntScalar", "Model", "Params", "Scalar",
           "StepSizeController"]
