r"""The third solver family: minimise $\mathcal F$ over the activities with optimistix.

Predictive coding's equilibrium is a minimum of the energy in the activities, so any
optimistix minimiser (`optx.BFGS`, `optx.NonlinearCG`, `optx.GradientDescent`, a custom
`optx.AbstractGradientDescent` with a line search, `optx.OptaxMinimiser`) can find it.
Quasi-Newton and conjugate-gradient methods need far fewer gradients than gradient flow on
ill-conditioned energies (deep networks), which crawls along the flat directions.

Dense quasi-Newton minimisers (`optx.BFGS`, `optx.DFP`) minimise each sample on its own
(`jax.vmap` over the batch). The energy is a sum of per-sample terms, so its Hessian is
block-diagonal over the batch: one joint BFGS would keep a dense $(Bn)^2$ inverse-Hessian
estimate (38 400² floats, 5.9 GB, for a 784-300-300-10 MLP at batch 64) full of
meaningless cross-sample terms. Per sample it is $B n^2$ (92 MB there), and each sample
gets its own line search and stops on its own. Every other minimiser (`optx.LBFGS`,
`optx.NonlinearCG`, `optx.GradientDescent`, `optx.OptaxMinimiser`) runs on the whole batch
at once: that is 10–15× faster per step on CPU than a batched per-sample loop (whose
branches and scalar line-search work are repeated per sample), at the price that a line
search or a conjugate direction is shared by the batch.

The solver is driven through its `init`/`step`/`terminate` protocol in one
`lax.while_loop`, so the same stopping rule as the other families applies: with a
[`pccore.SteadyState`][] a sample stops once its vector field meets it; without one it
stops by the minimiser's own `rtol`/`atol` (a Cauchy test on the iterates and the energy).
A per-sample loop runs until every sample has stopped; `num_steps` and `num_grad_evals`
then report the slowest sample (each evaluation covers the whole batch).

optimistix is imported only here, and only when such a solver is passed (the family check
in `_infer.py` looks optimistix up in `sys.modules` and never imports it).

[`pccore.OptimistixInference`][] holds the minimiser. It implements the step contract (one
`step` of the minimiser on the whole batch), so the driver can run it like any method; the
engine runs the fused loop below, which also stops by the minimiser's own tolerances and
keeps dense quasi-Newton estimates per sample.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PRNGKeyArray

from .._custom_types import Activities
from .._results import RESULTS
from ._base import AbstractInference, Fields
from ._common import Raw, activity_grad, is_steady


class OptimistixInference(AbstractInference):
    r"""Minimise $\mathcal F$ over the activities with an optimistix minimiser.

    `OptimistixInference(optx.BFGS(rtol=1e-6, atol=1e-6))`; `solver=optx.BFGS(...)` is the
    shorthand. It stops at a [`pccore.SteadyState`][] if the solve has one, else by the
    minimiser's own `rtol`/`atol`; `max_steps` defaults to 256. Dense quasi-Newton
    minimisers (BFGS, DFP) work on each sample separately, the others (L-BFGS,
    NonlinearCG, ...) on the whole batch at once. Needs `pip install "pccore[optimistix]"`.

    **Arguments:** `minimiser`, an `optimistix.AbstractMinimiser`.
    """

    minimiser: Any

    def __check_init__(self) -> None:
        import sys

        optx = sys.modules.get("optimistix")
        if optx is None or not isinstance(self.minimiser, optx.AbstractMinimiser):
            raise TypeError(
                "`OptimistixInference(minimiser)`: `minimiser` must be an optimistix "
                f"minimiser (e.g. optx.BFGS(rtol=1e-6, atol=1e-6)); got "
                f"{type(self.minimiser).__name__}."
            )

    def init(self, fields: Fields, z0: Activities, key: PRNGKeyArray | None) -> Any:
        f_struct = jax.eval_shape(fields.energy, z0)
        return self.minimiser.init(_objective(fields), z0, None, {}, f_struct, None,
                                   frozenset())

    def step(self, fields: Fields, z: Activities, g: Activities,
             state: Any) -> tuple[Activities, Any]:
        z, state, _ = self.minimiser.step(_objective(fields), z, None, {}, state, frozenset())
        return z, state


def _objective(fields: Fields) -> Any:
    return lambda z, _: (fields.energy(z), None)


def _accepted_grad(optx, solver, state):
    """The gradient at the current iterate, if the solver keeps it (no extra evaluation)."""
    if isinstance(solver, optx.AbstractGradientDescent | optx.AbstractQuasiNewton):
        return state.f_info.grad
    return None


def _per_sample(optx, solver) -> bool:
    return isinstance(solver, optx.AbstractQuasiNewton) and not isinstance(
        solver, optx.AbstractLBFGS
    )


def solve_optimistix(solver, energy, model, z0, x, y, n, steady):
    """Minimise the energy from `z0` with an optimistix minimiser; at most `n` steps."""
    import optimistix as optx

    loop = lambda z, x, y: _loop(optx, solver, energy, model, z, x, y, n, steady)
    if _per_sample(optx, solver):
        batch = lambda t: None if t is None else jtu.tree_map(lambda a: a[None], t)
        one = lambda z, x, y: loop(batch(z), batch(x), batch(y))
        k, z, done, failed, extra = jax.vmap(one)(z0, x, y)
        z = jtu.tree_map(lambda a: a[:, 0], z)
        k, done, failed, extra = jnp.max(k), jnp.all(done), jnp.any(failed), extra[0]
    else:
        k, z, done, failed, extra = loop(z0, x, y)
    result = RESULTS.where(done, RESULTS.converged, RESULTS.max_steps_reached)
    result = RESULTS.where(failed, RESULTS.minimiser_failed, result)
    return Raw(z, k, k, result, k * (1 + extra))


def _loop(optx, solver, energy, model, z0, x, y, n, steady):
    """The solver's init/step/terminate loop on a batch (possibly of one sample)."""

    def fn(z, _):
        return energy.per_sample(model, z, x, y).sum(), None

    dtype = jax.eval_shape(fn, z0, None)[0].dtype
    f_struct = jax.ShapeDtypeStruct((), dtype)
    options, tags = {}, frozenset()
    state0 = solver.init(fn, z0, None, options, f_struct, None, tags)
    grad = lambda z: activity_grad(energy, model, z, x, y)
    # Quasi-Newton and gradient-descent solvers keep the gradient at their iterate; other
    # minimisers (e.g. OptaxMinimiser) need one more evaluation per step for the test.
    extra = int(steady is not None and _accepted_grad(optx, solver, state0) is None)

    def stop(z, state):
        done, res = solver.terminate(fn, z, None, options, state, tags)
        failed = res != optx.RESULTS.successful
        if steady is None:
            return done | failed, failed
        g = _accepted_grad(optx, solver, state)
        g = grad(z) if g is None else g
        return is_steady(steady, g, z) | failed, failed

    # Only the arrays of the state are carried; the rest (e.g. the jaxpr of L-BFGS's
    # operator) is static, taken from `init`, as optimistix's own `iterative_solve` does.
    dyn0, static = eqx.partition(state0, eqx.is_array)

    def cond(c):
        k, _, _, done, _ = c
        return (k < n) & ~done

    def body(c):
        k, z, dyn, _, _ = c
        z, state, _ = solver.step(fn, z, None, options, eqx.combine(dyn, static), tags)
        done, failed = stop(z, state)
        return k + 1, z, eqx.filter(state, eqx.is_array), done, failed

    c0 = (0, z0, dyn0, jnp.array(False), jnp.array(False))
    k, z, dyn, done, failed = jax.lax.while_loop(cond, body, c0)
    state = eqx.combine(dyn, static)
    z, _, _ = solver.postprocess(fn, z, None, None, options, state, tags, optx.RESULTS.successful)
    return k, z, done, failed, jnp.asarray(extra)


__all__ = ["OptimistixInference", "solve_optimistix"]
