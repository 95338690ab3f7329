"""Validation at the public entry points: clear errors with got vs expected and the fix."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._model import PCModel

_IS_FLOAT: dict = {}


def _is_float(dtype) -> bool:
    """`jnp.issubdtype(dtype, jnp.floating)`, memoised (it is slow on every call)."""
    ok = _IS_FLOAT.get(dtype)
    if ok is None:
        ok = _IS_FLOAT[dtype] = bool(jnp.issubdtype(dtype, jnp.floating))
    return ok


def _shape_of(a: Any) -> tuple[int, ...]:
    return tuple(np.shape(a))


def as_batch(name: str, a: Any, per_sample: tuple[int, ...], batch: int | None = None):
    """`a` as a float array of shape `(batch, *per_sample)`, or a clear error."""
    if a is None:
        return None
    if isinstance(a, jax.ShapeDtypeStruct):
        raise TypeError(f"`{name}` must be an array; got a ShapeDtypeStruct.")
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        a = np.asarray(a)
        dtype = a.dtype
    if not _is_float(dtype):
        raise TypeError(
            f"`{name}` has dtype {dtype}; expected a floating dtype. Cast it first, e.g. "
            f"`{name}.astype(jnp.float32)` (one-hot encode integer labels with "
            f"`jax.nn.one_hot({name}, num_classes)`)."
        )
    shape = _shape_of(a)
    expected = ("batch", *per_sample) if batch is None else (batch, *per_sample)
    if len(shape) != len(per_sample) + 1 or shape[1:] != tuple(per_sample) or (
        batch is not None and shape[0] != batch
    ):
        raise ValueError(
            f"`{name}` has shape {shape}; expected {tuple(expected)} (a batch on axis 0 of "
            f"per-sample shape {tuple(per_sample)} for this model). Reshape `{name}` or wrap "
            "a model whose shapes match the data."
        )
    if shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch (shape {shape}); pass at least one sample.")
    return a if isinstance(a, jax.Array) else jnp.asarray(a)


def check_data(model: PCModel, energy, x, y):
    """Validate `x` and `y` against `model` and `energy`; returns them as arrays."""
    x_shape, y_shape = energy.data_shapes(model)
    x = as_batch("x", x, x_shape)
    batch = None if x is None else x.shape[0]
    y = as_batch("y", y, y_shape, batch)
    return x, y


def batch_size(x, y) -> int:
    if x is not None:
        return x.shape[0]
    if y is not None:
        return y.shape[0]
    raise ValueError(
        "`x` and `y` are both None: at least one clamped value is needed to know the batch "
        "size. Pass `y` (the observation) for a free bottom."
    )


def check_activities(model: PCModel, energy, activities, x, y) -> tuple:
    """Validate the inference variables against the shapes the energy expects."""
    expected = energy.variable_shapes(model, x is not None)
    if not isinstance(activities, tuple | list):
        raise TypeError(
            f"`activities` must be a tuple of arrays (one per free latent); got "
            f"{type(activities).__name__}. Build them with `pccore.init_activities`."
        )
    if len(activities) != len(expected):
        raise ValueError(
            f"`activities` has {len(activities)} arrays; expected {len(expected)} (one per free "
            f"latent: {'z_1..z_{L-1}' if x is not None else 'z_0..z_{L-1} (x is free)'} for a "
            f"{model.num_layers}-layer model). Build them with `pccore.init_activities`."
        )
    B = batch_size(x, y)
    out = []
    for i, (a, e) in enumerate(zip(activities, expected)):
        got = _shape_of(a)
        if got != (B, *e.shape):
            raise ValueError(
                f"`activities[{i}]` has shape {got}; expected {(B, *e.shape)} (batch {B}, "
                f"per-sample shape {e.shape}). Build them with `pccore.init_activities`."
            )
        out.append(jnp.asarray(a))
    return tuple(out)
