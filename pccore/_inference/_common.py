r"""The leaf helpers every inference route shares: the energy and its activity gradient on a
prepared model, the steady-state test, finiteness, and what a route hands back (`Raw`).

Imports nothing else of the inference engine, so each family's module can use it.
"""

from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu


def energy_and_grad(energy: Any, model: Any, z: Any, x: Any, y: Any) -> tuple[Any, Any]:
    r"""$(\sum_i F_i, \nabla_z \sum_i F_i)$ on a prepared model, from one evaluation."""
    return jax.value_and_grad(lambda z: energy.per_sample(model, z, x, y).sum())(z)


def activity_grad(energy: Any, model: Any, z: Any, x: Any, y: Any) -> Any:
    r"""$\nabla_z \sum_i F_i$ on a prepared model (`jit` drops the unused energy)."""
    return energy_and_grad(energy, model, z, x, y)[1]


def _block_max(a):
    return jnp.max(jnp.abs(a).reshape(a.shape[0], -1), axis=1, initial=0.0)


def is_steady(steady: Any, g: Any, z: Any) -> Any:
    """Per-sample, per-variable max-norm test of the vector field (see SteadyState)."""
    ok = jnp.array(True)
    for gl, zl in zip(jtu.tree_leaves(g), jtu.tree_leaves(z)):
        ok = ok & jnp.all(_block_max(gl) <= steady.atol + steady.rtol * _block_max(zl))
    return ok


def field_norm(g: Any) -> Any:
    leaves = jtu.tree_leaves(g)
    if not leaves:
        return jnp.zeros(())
    return jnp.max(jnp.stack([jnp.max(jnp.abs(a)) for a in leaves]))


def all_finite(tree: Any) -> Any:
    leaves = jtu.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves])) if leaves else True


def keep(done: Any, new: Any, old: Any) -> Any:
    """`old` where `done`, else `new` (leafwise)."""
    return jtu.tree_map(lambda a, b: jnp.where(done, b, a), new, old)


def erk_evals(solver: Any) -> tuple[int, int]:
    """(evaluations at init, evaluations per step) of an explicit Runge-Kutta solver.

    First-same-as-last tableaus reuse the last stage, so they cost one evaluation at
    `init` and `num_stages - 1` per step; Euler costs one per step. `(-1, -1)` if unknown.
    """
    if isinstance(solver, diffrax.Euler):
        return 0, 1
    if isinstance(solver, diffrax.AbstractERK) and not isinstance(
        solver.tableau, diffrax.MultiButcherTableau
    ):
        tab = solver.tableau
        return int(tab.fsal), tab.num_stages - int(tab.fsal)
    return -1, -1


class Raw(NamedTuple):
    """What a solver route hands back before packaging: the final state, steps, time, the
    result code of the loop (finiteness not yet tested), gradient evaluations, and the
    gradient at the final state / saved trajectory where the loop has them."""

    z: Any
    k: Any
    t: Any
    result: Any
    evals: Any
    g: Any = None
    ts: Any = None
    traj: Any = None
    e0: Any = None  # the energy at the start, where the loop's first evaluation gives it
    descends: bool = True  # whether ending above the start is reported (not for a sampler)
    energies: Any = None  # the energy at the save times, where the loop recorded it
    accepted: Any = None  # accepted steps (adaptive steps); None: every step was accepted
