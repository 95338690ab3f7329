"""The one driver loop: it runs any inference method's steps (see `_base.py`)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PRNGKeyArray

from .._custom_types import Activities
from .._results import RESULTS
from ._base import AbstractInference, Fields


def _counted(fields: Fields, calls: list[int]) -> Fields:
    """`fields` whose gradient adds its calls to `calls` while a step is traced."""

    def grad(z: Any) -> Any:
        calls[0] += 1
        return fields.grad(z)

    return fields._replace(grad=grad)


def drive(method: AbstractInference, fields: Fields, z0: Activities, n: int,
          is_steady: Callable[[Activities, Activities], Any] | None, ts: Any,
          key: PRNGKeyArray | None = None, *, state0: Any = None,
          fields_at: Callable[[Any], Fields] | None = None):
    """The loop: `n` steps of `method` or fewer (a steady state by `is_steady(g, z)`, or the
    method's own end, `method.finished`), saving at the step counts `ts`.

    `state0`: the method's starting state (default `method.init(fields, z0, key)`);
    `fields_at(state)`: the fields at the parameters a joint method's state holds (default:
    `fields` throughout).

    **Returns** `(z, k, result, evals, g, saved, e0, state)`: the end, the steps taken, the
    result code, gradient evaluations, the gradient at the end (None on the fast path), the
    buffer of saved activities, the starting energy (or None) and the method's final state.
    """
    calls = [0]
    at = (lambda s: fields) if fields_at is None else fields_at
    if state0 is None:
        init_calls = [0]
        s0 = method.init(_counted(fields, init_calls), z0, key)
    else:
        init_calls, s0 = [0], state0
    # Only the array leaves of the state are carried through the loop; anything else in it
    # (a minimiser's traced operator, a function) is static, taken from the initial state.
    dyn0, static = eqx.partition(s0, eqx.is_array_like)
    whole = lambda d: eqx.combine(d, static)
    part = lambda s: eqx.filter(s, eqx.is_array_like)
    has_end = method.finished(s0) is not None
    if is_steady is None and ts is None and not has_end:
        # No test, nothing saved, no end but the budget: the gradient at the start of each
        # step is all it needs.
        def body(_, c):
            z, d = c
            s = whole(d)
            f = at(s)
            z, s = method.step(_counted(f, calls), z, f.grad(z), s)
            return z, part(s)

        z, d = jax.lax.fori_loop(0, n, body, (z0, dyn0))
        evals = init_calls[0] + n * (1 + calls[0])
        return z, n, RESULTS.completed, evals, None, None, None, whole(d)

    def save(buf, z, k):
        if buf is None:
            return None
        hit = ts == k
        return jtu.tree_map(
            lambda b, a: jnp.where(hit.reshape((-1,) + (1,) * a.ndim), a[None], b), buf, z
        )

    # a save time the solve does not reach (after a steady-state stop) holds inf, as in diffrax
    buf0 = None if ts is None else jtu.tree_map(
        lambda a: jnp.full((ts.size, *a.shape), jnp.inf, a.dtype), z0)
    buf0 = save(buf0, z0, 0)
    check = (lambda g, z: jnp.array(False)) if is_steady is None else is_steady
    ended = (lambda s: jnp.array(False)) if not has_end else method.finished

    # The carry holds the gradient at the current point: one evaluation per step, and the
    # steady-state test reads the same gradient as the next step.
    def cond(c):
        k, _, d, _, done, _ = c
        return (k < n) & ~done & ~ended(whole(d))

    def body(c):
        k, z, d, g, _, buf = c
        s = whole(d)
        z, s = method.step(_counted(at(s), calls), z, g, s)
        g = at(s).grad(z)
        return k + 1, z, part(s), g, check(g, z), save(buf, z, k + 1)

    e0, g0 = jax.value_and_grad(at(s0).energy)(z0)
    c0 = (0, z0, dyn0, g0, check(g0, z0), buf0)
    k, z, d, g, done, buf = jax.lax.while_loop(cond, body, c0)
    s = whole(d)
    if is_steady is None:
        result = RESULTS.completed
    else:
        result = RESULTS.where(done, RESULTS.converged, RESULTS.max_steps_reached)
    if has_end:
        fin = ended(s) & ~done
        result = RESULTS.where(fin, RESULTS.completed if is_steady is None
                               else RESULTS.not_converged, result)
        if is_steady is None:
            result = RESULTS.where(fin, result, RESULTS.max_steps_reached)
    return z, k, result, init_calls[0] + 1 + k * (1 + calls[0]), g, buf, e0, s


__all__ = ["drive"]
