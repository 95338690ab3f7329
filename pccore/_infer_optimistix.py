r"""The third solver family: minimise $\mathcal F$ over the activities with optimistix.

Predictive coding's equilibrium is a minimum of the energy in the activities, so any
optimistix minimiser (`optx.BFGS`, `optx.NonlinearCG`, `optx.GradientDescent`, a custom
`optx.AbstractGradientDescent` with a line search, `optx.OptaxMinimiser`) can find it.
Quasi-Newton and conjugate-gradient methods need far fewer gradients than gradient flow on
ill-conditioned energies (deep networks), which crawls along the flat directions.

Each sample is minimised on its own (`jax.vmap` over the batch). The energy is a sum of
per-sample terms, so its Hessian is block-diagonal over the batch: one joint BFGS would
keep a dense $(Bn)^2$ inverse-Hessian estimate (38 400² floats, 5.9 GB, for a
784-300-300-10 MLP at batch 64) full of meaningless cross-sample terms, and one line
search for all samples. Per sample it is $B n^2$ (92 MB there), each sample gets its own
line search and stops on its own, and a sample's equilibrium does not depend on its batch,
as with the other families.

The solver is driven through its `init`/`step`/`terminate` protocol in one
`lax.while_loop`, so the same stopping rule as the other families applies: with a
[`pccore.SteadyState`][] a sample stops once its vector field meets it; without one it
stops by the minimiser's own `rtol`/`atol` (a Cauchy test on the iterates and the energy).
The batched loop runs until every sample has stopped; `num_steps` and `num_grad_evals`
report the slowest sample (each evaluation then covers the whole batch).

optimistix is imported only here, and only when such a solver is passed (the family check
in `_infer.py` looks optimistix up in `sys.modules` and never imports it).
"""

import jax
import jax.numpy as jnp

from ._infer import _finish, is_steady
from ._results import RESULTS


def _accepted_grad(optx, solver, state):
    """The gradient at the current iterate, if the solver keeps it (no extra evaluation)."""
    if isinstance(solver, optx.AbstractGradientDescent | optx.AbstractQuasiNewton):
        return state.f_info.grad
    return None


def solve_optimistix(solver, energy, model, z0, x, y, n, steady):
    """Minimise each sample's energy from `z0` with an optimistix minimiser; at most `n` steps."""
    import optimistix as optx

    one = lambda z, x, y: _solve_one(optx, solver, energy, model, z, x, y, n, steady)
    k, z, done, failed, extra = jax.vmap(one)(z0, x, y)
    k = jnp.max(k)
    result = RESULTS.where(jnp.all(done), RESULTS.converged, RESULTS.max_steps_reached)
    result = RESULTS.where(jnp.any(failed), RESULTS.minimiser_failed, result)
    return _finish(energy, model, z, x, y, k, k, result, k * (1 + extra[0]))


def _solve_one(optx, solver, energy, model, z0, x, y, n, steady):
    """One sample (no batch axis) through the solver's init/step/terminate loop."""
    batch = lambda a: None if a is None else a[None]
    x, y = batch(x), batch(y)

    def fn(z, _):
        return energy.per_sample(model, tuple(a[None] for a in z), x, y)[0], None

    dtype = jax.eval_shape(fn, z0, None)[0].dtype
    f_struct = jax.ShapeDtypeStruct((), dtype)
    options, tags = {}, frozenset()
    state0 = solver.init(fn, z0, None, options, f_struct, None, tags)
    grad = lambda z: jax.grad(lambda z: fn(z, None)[0])(z)
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
        batched = lambda t: tuple(a[None] for a in t)
        return is_steady(steady, batched(g), batched(z)) | failed, failed

    def cond(c):
        k, _, _, done, _ = c
        return (k < n) & ~done

    def body(c):
        k, z, state, _, _ = c
        z, state, _ = solver.step(fn, z, None, options, state, tags)
        done, failed = stop(z, state)
        return k + 1, z, state, done, failed

    c0 = (0, z0, state0, jnp.array(False), jnp.array(False))
    k, z, state, done, failed = jax.lax.while_loop(cond, body, c0)
    z, _, _ = solver.postprocess(fn, z, None, None, options, state, tags, optx.RESULTS.successful)
    return k, z, done, failed, jnp.asarray(extra)
