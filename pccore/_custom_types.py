"""Type aliases shared by pccore's modules (jaxtyping)."""

from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Float, Int, PyTree

Params: TypeAlias = PyTree[Array]
"""The trainable parameters of one layer, in the framework's own structure."""

Activities: TypeAlias = tuple[Float[Array, "batch ..."], ...]
"""The free inference variables: one array per latent, batch on axis 0."""

BatchArray: TypeAlias = Float[ArrayLike, "batch ..."]
Scalar: TypeAlias = Float[Array, ""]
IntScalar: TypeAlias = Int[Array, ""]
Model: TypeAlias = Any
"""A user's native model object (an Equinox module, a Haiku transform, ...)."""

__all__ = ["Activities", "BatchArray", "IntScalar", "Model", "Params", "Scalar"]
