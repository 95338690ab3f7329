"""Validation at the public entry points: clear errors with got vs expected and the fix.

**Dtypes.** Data, activities and parameters must be float32 or float64. Integers are refused
(cast, or one-hot encode labels). float16 and bfloat16 are refused too: inference sums
squared errors over many small steps, and in half precision the energy overflows (max 65504)
and small updates vanish below the 3-digit mantissa, so a solve silently stalls or turns
into inf. Keep the model and the data in float32 (bfloat16 matmuls inside a layer, with
float32 parameters and activities, are the layer's own business).

**NaN/inf.** Data on the host (NumPy arrays, lists) is scanned at every entry point: that
costs one pass over host memory and no device synchronisation. Arrays already on a device
are scanned by the utilities ([`pccore.energy`][], [`pccore.evaluate`][], ...), but not by the
hot paths [`pccore.train_step`][] and [`pccore.infer`][]: a scan there would block JAX's
asynchronous dispatch at every step. There non-finite data shows up as
`RESULTS.diverged`: `infer` raises (with `throw=True`) and `train_step` skips the update
(`stats.updated` False). Inside `jax.jit` nothing is scanned (tracers have no values) and no
host callback is inserted.
"""

import math
import numbers
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._model import AbstractPCModel, PCModel

MAX_FIXED_STEPS = 1_000_000
"""The largest `t1 / dt0` accepted without an explicit `max_steps` (guards against hangs)."""

_IS_FLOAT: dict = {}


def _is_float(dtype) -> bool:
    """`jnp.issubdtype(dtype, jnp.floating)`, memoised (it is slow on every call)."""
    ok = _IS_FLOAT.get(dtype)
    if ok is None:
        ok = _IS_FLOAT[dtype] = bool(jnp.issubdtype(dtype, jnp.floating))
    return ok


def _shape_of(a: Any) -> tuple[int, ...]:
    return tuple(np.shape(a))


def is_concrete(a: Any) -> bool:
    """Whether `a` has a value now (not a tracer inside `jit`/`grad`/`vmap`)."""
    return not isinstance(a, jax.core.Tracer)


def check_dtype(name: str, dtype: Any) -> None:
    """Refuse non-floating and half-precision dtypes (see the module docstring)."""
    if not _is_float(dtype):
        raise TypeError(
            f"`{name}` has dtype {dtype}; expected float32 or float64. Cast it first, e.g. "
            f"`{name}.astype(jnp.float32)` (one-hot encode integer labels with "
            f"`jax.nn.one_hot({name}, num_classes)`)."
        )
    if jnp.dtype(dtype).itemsize < 4:
        raise TypeError(
            f"`{name}` has dtype {dtype}; expected float32 or float64. Half precision is not "
            "supported: the energy overflows and small inference updates vanish. Cast with "
            f"`{name}.astype(jnp.float32)`."
        )


def check_finite(name: str, a: Any, scan_device: bool) -> None:
    """Raise if a concrete `a` holds NaN/inf (host data always, device arrays if asked)."""
    if isinstance(a, jax.Array):
        if not (scan_device and is_concrete(a)):
            return
        with jax.ensure_compile_time_eval():  # concrete data inside an outer jit trace
            bad = int((~jnp.isfinite(a)).sum())
    elif isinstance(a, np.ndarray):
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    else:
        return
    if bad:
        raise ValueError(
            f"`{name}` contains {bad} non-finite value(s) (NaN or inf) out of {np.size(a)}; "
            f"expected finite data. Clean the data first, e.g. find them with "
            f"`np.argwhere(~np.isfinite({name}))`."
        )


def as_batch(
    name: str, a: Any, per_sample: tuple[int, ...], batch: int | None = None,
    scan_device: bool = False,
):
    """`a` as a float array of shape `(batch, *per_sample)`, or a clear error."""
    if a is None:
        return None
    if isinstance(a, jax.ShapeDtypeStruct):
        raise TypeError(f"`{name}` must be an array; got a ShapeDtypeStruct.")
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        try:
            a = np.asarray(a)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"`{name}` must be an array of shape (batch, ...); got {type(a).__name__} that "
                f"NumPy cannot read as one ({e}). Pass a NumPy or JAX array."
            ) from None
        dtype = a.dtype
    check_dtype(name, dtype)
    shape = _shape_of(a)
    dims = ("batch" if batch is None else str(batch), *map(str, per_sample))
    expected_txt = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
    if len(shape) != len(per_sample) + 1 or shape[1:] != tuple(per_sample) or (
        batch is not None and shape[0] != batch
    ):
        raise ValueError(
            f"`{name}` has shape {shape}; expected {expected_txt} (a batch on axis 0 of "
            f"per-sample shape {tuple(per_sample)} for this model). Reshape `{name}` or wrap "
            "a model whose shapes match the data."
        )
    if shape[0] == 0:
        raise ValueError(
            f"`{name}` is an empty batch (shape {shape}); expected at least one sample. Pass a "
            "non-empty batch (drop empty trailing batches in the data loader)."
        )
    if not isinstance(a, jax.Array):
        a = np.asarray(a)
    check_finite(name, a, scan_device)
    return a if isinstance(a, jax.Array) else jnp.asarray(a)


def check_model(model: Any, energy: Any) -> None:
    """`model` must be a float32/float64 pccore model and `energy` an AbstractEnergy."""
    from ._energy import AbstractEnergy

    if not isinstance(model, AbstractPCModel):
        raise TypeError(
            f"`model` must be a pccore.PCModel (or another pccore.AbstractPCModel); got "
            f"{type(model).__name__}. Wrap your model first: `model = pccore.wrap(my_model)`."
        )
    if not isinstance(energy, AbstractEnergy):
        raise TypeError(
            f"`energy` must be a pccore.AbstractEnergy such as pccore.PC(); got "
            f"{type(energy).__name__}."
        )
    for leaf in jtu.tree_leaves(model.params):  # fast path: no key paths unless needed
        if eqx.is_inexact_array(leaf) and leaf.dtype.itemsize < 4:
            for path, bad in jtu.tree_leaves_with_path(model.params):
                if eqx.is_inexact_array(bad) and bad.dtype.itemsize < 4:
                    check_dtype(f"model.params{jtu.keystr(path)}", bad.dtype)


def check_data(model: PCModel, energy, x, y, *, scan_device: bool = False):
    """Validate `x` and `y` against `model` and `energy`; returns them as arrays."""
    check_model(model, energy)
    x_shape, y_shape = energy.data_shapes(model)
    x = as_batch("x", x, x_shape, scan_device=scan_device)
    batch = None if x is None else x.shape[0]
    y = as_batch("y", y, y_shape, batch, scan_device=scan_device)
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


def check_activities(model: PCModel, energy, activities, x, y, *, scan_device: bool = False) -> tuple:
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
        out.append(as_batch(f"activities[{i}]", a, e.shape, B, scan_device))
    return tuple(out)


def _positive(name: str, value: Any, example: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(
            f"`{name}` must be a finite positive number; got {value!r}. E.g. {example}."
        )


def check_tolerances(owner: str, rtol: Any, atol: Any) -> None:
    """`rtol`, `atol` finite, >= 0, and not both zero (concrete numbers only)."""
    vals = (rtol, atol)
    if not all(isinstance(v, numbers.Real) for v in vals):
        return  # arrays: checked by their owner's maths, not here
    if not (all(math.isfinite(v) and v >= 0 for v in vals) and (rtol > 0 or atol > 0)):
        raise ValueError(
            f"`{owner}`: got rtol={rtol}, atol={atol}; expected both finite and >= 0 and at "
            f"least one > 0, e.g. {owner}(rtol=1e-3, atol=1e-3)."
        )


def check_hyper(solver, stepsize_controller, t1, dt0, max_steps, steady_state) -> None:
    """Hyper-parameters of a solve: finite, positive, and a bounded number of steps."""
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1
    ):
        raise ValueError(f"`max_steps` must be a positive int or None; got {max_steps!r}.")
    if isinstance(solver, diffrax.AbstractSolver):
        _positive("t1", t1, "t1=2.0 (the integration runs over [0, t1])")
        _positive("dt0", dt0, "dt0=0.1", allow_none=True)
    if isinstance(stepsize_controller, diffrax.PIDController):
        check_tolerances("PIDController", stepsize_controller.rtol, stepsize_controller.atol)
    if (
        isinstance(solver, diffrax.AbstractSolver)
        and isinstance(stepsize_controller, diffrax.ConstantStepSize)
        and dt0 is not None
        and max_steps is None
        and t1 / dt0 > MAX_FIXED_STEPS
    ):
        raise ValueError(
            f"`t1 / dt0` = {t1}/{dt0} asks for {t1 / dt0:.3g} steps, more than "
            f"{MAX_FIXED_STEPS} without an explicit `max_steps` (this would run for a very long "
            "time). Raise `dt0` or lower `t1`; if you do mean it, pass `max_steps`."
        )


def thread_error(result, tree, bad):
    """`result.error_if(tree, bad)` that keeps `tree`'s sharding.

    `eqx.error_if` passes its operand through a callback, whose output is replicated: on a
    sharded batch that would gather every activity onto every device. Thread the error
    through one scalar instead, and make `tree` depend on it with an exact `- 0.0`.
    """
    token = result.error_if(jnp.zeros((), jnp.int32), bad)
    return jtu.tree_map(
        lambda a: a - token.astype(a.dtype) if eqx.is_inexact_array(a) else a, tree
    )


def check_option(owner: str, name: str, value: Any, *, strict: bool = False) -> None:
    """A concrete option of a variant is finite and >= 0 (> 0 if `strict`)."""
    if isinstance(value, jax.Array | np.ndarray):
        if not is_concrete(value) or np.ndim(value) != 0:
            return  # traced or per-layer arrays: the owner's business
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        return
    bound = "> 0" if strict else ">= 0"
    if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
        raise ValueError(f"`{owner}`: `{name}` must be finite and {bound}; got {value!r}.")
