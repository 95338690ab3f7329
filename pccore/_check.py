"""Validation at the public entry points: clear errors with got vs expected and the fix.

**Dtypes.** Data, activities and parameters must be float32 or float64. Integers are refused
(cast, or one-hot encode labels). float16 and bfloat16 are refused too: inference sums
squared errors over many small steps, and in half precision the energy overflows (max 65504)
and small updates vanish below the 3-digit mantissa, so a solve silently stalls or turns
into inf. Keep the model and the data in float32 (bfloat16 matmuls inside a layer, with
float32 parameters and activities, are the layer's own business).

**Integer inputs.** A clamped input `x` is never differentiated, so a model whose
`in_shape.dtype` is an integer (token ids for a first embedding layer; wrap it with
`dtype=jnp.int32`) takes integer `x`, and a float model float `x`; a mismatch is refused,
naming both dtypes. Targets `y`, activities and parameters stay float.

**NaN/inf.** Data on the host (NumPy arrays, lists) is scanned at every entry point: that
costs one pass over host memory and no device synchronisation. Arrays already on a device
are scanned by the utilities ([`pccore.energy`][], [`pccore.evaluate`][], ...), but not by the
hot paths [`pccore.train_step`][] and [`pccore.infer`][]: a scan there would block JAX's
asynchronous dispatch at every step. There non-finite data shows up as
`RESULTS.diverged`: `infer` raises (with `throw=True`) and `train_step` skips the update
(`stats.updated` False). Inside `jax.jit` nothing is scanned (tracers have no values) and no
host callback is inserted.
"""

import dataclasses
import math
import numbers
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._energy._abstract import AbstractEnergy
from ._energy._init import AbstractInit
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


def is_readable(a: Any) -> bool:
    """Whether this process can read `a`'s values: concrete, and (a `jax.Array`) held whole
    by this process's devices. With several processes (`jax.distributed`), a batch sharded
    over every process's devices is not: each process holds its own rows only."""
    return is_concrete(a) and (not isinstance(a, jax.Array) or a.is_fully_addressable)


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


def check_input_dtype(name: str, dtype: Any, expected: Any) -> None:
    """A clamped input's `dtype` against the model's input dtype `expected` (its
    `in_shape.dtype`): integer (or bool) inputs for an integer (bool) model, float32/float64
    for a float model (see the module docstring)."""
    expected = jnp.dtype(expected)
    if _is_float(expected):
        if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
            raise TypeError(
                f"`{name}` has dtype {dtype}; expected float32 or float64. Cast it first, e.g. "
                f"`{name}.astype(jnp.float32)`: this model takes {expected} inputs (its "
                f"`in_shape.dtype`). If `{name}` holds token ids for an embedding layer, wrap the "
                "model with `dtype=jnp.int32` (and its `input_shape=`)."
            )
        check_dtype(name, dtype)
        return
    kind = jnp.bool_ if expected == jnp.bool_ else jnp.integer
    if not jnp.issubdtype(dtype, kind):
        what = "boolean" if kind is jnp.bool_ else "integer (token ids)"
        raise TypeError(
            f"`{name}` has dtype {dtype}; expected {expected}: this model takes {what} inputs "
            f"(its `in_shape.dtype` is {expected}). Pass `{name}` as {expected}, e.g. "
            f"`{name}.astype(jnp.{expected.name})`, or wrap a model that takes {dtype} inputs."
        )


def check_finite(name: str, a: Any, scan_device: bool) -> None:
    """Raise if a concrete `a` holds NaN/inf (host data always, device arrays if asked)."""
    if isinstance(a, jax.Array):
        if not (scan_device and is_readable(a)):
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
    scan_device: bool = False, dtype_of_model: Any = None,
):
    """`a` as a float array of shape `(batch, *per_sample)`, or a clear error.

    `dtype_of_model`: for a clamped input, the model's input dtype (an integer dtype admits
    integer data, see `check_input_dtype`); None: float data only."""
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
    if dtype_of_model is None:
        check_dtype(name, dtype)
    else:
        check_input_dtype(name, dtype, dtype_of_model)
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
    check_params(model.params)


def check_params(params: Any) -> None:
    """Every parameter array is float32 or float64."""
    for leaf in jtu.tree_leaves(params):  # fast path: no key paths unless needed
        if _bad_param(leaf):
            for path, bad in jtu.tree_leaves_with_path(params):
                if _bad_param(bad):
                    raise TypeError(
                        f"`model.params{jtu.keystr(path)}` has dtype {bad.dtype}; expected "
                        "float32 or float64 (predictive coding descends a real energy: integer "
                        "and complex parameters have no gradient step, half precision "
                        "overflows). Cast the model's parameters before wrapping, e.g. "
                        "`jax.tree.map(lambda a: a.astype(jnp.float32), params)`."
                    )


def _bad_param(leaf: Any) -> bool:
    """A parameter array that is not float32/float64 (half precision, complex, integer)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
        return False
    return not _is_float(dtype) or dtype.itemsize < 4


def check_data(model: PCModel, energy, x, y, *, scan_device: bool = False,
               scan_targets: bool = False):
    """Validate `x` and `y` against `model` and `energy`; returns them as arrays.

    The values of `y` are checked against the energy's loss (`energy.check_target`, e.g.
    CrossEntropy targets must be distributions) on host data, and on device data when
    `scan_device` or `scan_targets` (a one-time scan, as on `train_step`'s first call).
    """
    check_model(model, energy)
    x_shape, y_shape = energy.data_shapes(model)
    x = as_batch("x", x, x_shape, scan_device=scan_device, dtype_of_model=_input_dtype(model))
    batch = None if x is None else x.shape[0]
    host = not isinstance(y, jax.Array)
    y = as_batch("y", y, y_shape, batch, scan_device=scan_device)
    if y is not None and is_readable(y) and (host or scan_device or scan_targets):
        energy.check_target("y", y)
    return x, y


def _input_dtype(model: Any) -> Any:
    """The dtype of the model's clamped input (its `in_shape`, or its forward chain's)."""
    in_shape = getattr(model, "in_shape", None)
    if in_shape is None:
        in_shape = getattr(getattr(model, "forward", None), "in_shape", None)
    return getattr(in_shape, "dtype", None)


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

    def thread(a):
        if not eqx.is_array(a) or not (jnp.issubdtype(a.dtype, jnp.number)):
            return a  # booleans, keys and non-arrays pass as they are
        return a - token.astype(a.dtype)

    return jtu.tree_map(thread, tree)


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


def check_part(owner: str, name: str, value: Any, base: type, examples: str) -> None:
    """`value` must be an instance of `base` (a pccore object, not a string or a class).

    `examples` lists instances to suggest, e.g. `"pccore.MSE(), pccore.CrossEntropy()"`.
    """
    if isinstance(value, base):
        return
    if isinstance(value, type) and issubclass(value, base):
        raise TypeError(
            f"`{owner}`: `{name}` must be an instance of pccore.{base.__name__}; got the class "
            f"{value.__name__} itself. Call it: `{name}={value.__name__}()`."
        )
    got = f"the string {value!r}" if isinstance(value, str) else f"a {type(value).__name__}"
    where = f"`{name}`" if owner == name else f"`{owner}`: `{name}`"
    raise TypeError(
        f"{where} must be an instance of pccore.{base.__name__}; got {got}. Pass "
        f"an object, one of: {examples}."
    )


def check_init(init: Any, key: Any) -> None:
    """`init` is an AbstractInit and `key`, if given, a JAX PRNG key."""
    check_part("init", "init", init, AbstractInit,
               "pccore.FeedForward(), pccore.RandomNormal(), pccore.Zeros()")
    if key is None:
        return
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and np.shape(key)[-1:] == (2,)
    if not (typed or raw):
        got = f"{type(key).__name__} {key!r}" if dtype is None else f"an array of dtype {dtype}"
        raise TypeError(
            f"`key` must be a JAX PRNG key; got {got}. Make one with `key=jax.random.key(0)`."
        )


def as_number(name: str, value: Any) -> Any:
    """A concrete 0-d array (NumPy or JAX) as a Python float; anything else unchanged.

    Horizons and step sizes fix the number of steps at compile time, so they must be
    concrete: a traced `t1` is refused with the reason.
    """
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        if not is_concrete(value):
            raise TypeError(
                f"`{name}` is a traced array; it must be a concrete number, because the "
                "number of inference steps is fixed when the step is compiled. Pass a "
                f"Python float, e.g. `{name}=2.0` (not a value computed inside `jax.jit`)."
            )
        if np.ndim(value) != 0:
            raise ValueError(
                f"`{name}` must be a number; got an array of shape {np.shape(value)}. Pass a "
                f"Python float, e.g. `{name}=2.0`."
            )
        if not np.issubdtype(np.asarray(value).dtype, np.number):
            return value
        return float(value)
    return value


def check_devices(model: Any, x: Any, y: Any) -> None:
    """Data and parameters on the same devices (a mesh mismatch is named, not left to jit).

    Only arrays committed to devices are compared (an uncommitted array follows the others).
    """
    committed = lambda a: isinstance(a, jax.Array) and is_concrete(a) and a.committed
    leaves = [a for a in jtu.tree_leaves(model.params) if committed(a)]
    if not leaves:
        return
    params = leaves[0].sharding.device_set
    for name, a in (("x", x), ("y", y)):
        if committed(a) and a.sharding.device_set != params:
            raise ValueError(
                f"`{name}` lives on devices {_devices(a.sharding.device_set)} but the model's "
                f"parameters on {_devices(params)}; expected the same devices (one mesh). "
                "Place both on one mesh: `mesh, model, opt_state = pccore.data_parallel(model, "
                "opt_state)` and `x, y = pccore.shard_batch((x, y), mesh)`."
            )


def _devices(ds: Any) -> str:
    return "[" + ", ".join(str(d) for d in sorted(ds, key=lambda d: d.id)) + "]"


def _describe_state(state: Any) -> str:
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return "(" + ", ".join(type(s).__name__ for s in state) + ")"
    return type(state).__name__


def check_opt_state(optim: Any, opt_state: Any, params: Any, name: str = "opt_state") -> None:
    """`opt_state` is `optim`'s state for `params`: the structure, shapes and dtypes that
    `optim.init(params)` gives (compared abstractly, without running `init`)."""
    if opt_state is None:
        raise TypeError(
            f"`{name}` is None; expected the optimiser's state for this model. Start it with "
            f"`{name} = optim.init(model.params)` and pass back the state each call returns."
        )
    try:
        expected = jax.eval_shape(optim.init, params)
    except Exception:  # an optimiser that cannot init abstractly: nothing to compare with
        return
    fix = (f"Pass `{name} = optim.init(model.params)` made with this optimiser for this model "
           "(a state from another optimiser or another model does not fit).")
    exp_paths, exp_def = jtu.tree_flatten_with_path(expected)
    got_paths, got_def = jtu.tree_flatten_with_path(opt_state)
    if exp_def != got_def:
        got, want = _describe_state(opt_state), _describe_state(expected)
        what = (f"a state of {got} with {len(got_paths)} leaves; expected {want} with "
                f"{len(exp_paths)} leaves" if got != want or len(got_paths) != len(exp_paths)
                else f"a state of {got} whose parameter structure differs from "
                "`model.params` (a state made for another model)")
        raise ValueError(
            f"`{name}` does not match its optimiser and model: got {what} (compared "
            f"with `optim.init(model.params)`). {fix}"
        )
    for (path, e), (_, g) in zip(exp_paths, got_paths):
        g_shape, g_dtype = np.shape(g), getattr(g, "dtype", None)
        if g_shape != e.shape or (g_dtype is not None and g_dtype != e.dtype):
            raise ValueError(
                f"`{name}{jtu.keystr(path)}` has shape {g_shape} and dtype {g_dtype}; "
                f"expected {e.shape} and {e.dtype} (from `optim.init(model.params)`). {fix}"
            )
