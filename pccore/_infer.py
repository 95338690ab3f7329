r"""The one inference engine: gradient flow $\dot z = -\nabla_z \mathcal F$, or optimiser steps.

Three routes, one contract (an [`pccore.InferenceSolution`][]):

- Euler or an explicit Runge-Kutta solver with `ConstantStepSize` and no saved trajectory:
  a compiled loop over `solver.step` (no per-step bookkeeping beyond the solver's own);
- the same solvers with an adaptive controller and no saved trajectory: the solver's own
  `step` and the controller's `adapt_step_size` in a plain while loop, the steady-state test
  reading a vector field the Runge-Kutta step already evaluated;
- a saved trajectory (`saveat`), or any other diffrax solver (implicit ones take their root
  finder's tolerances from the controller there): `diffrax.diffeqsolve`, with a
  `diffrax.Event` on the vector field for the steady state;
- an optax `GradientTransformation`: $z \leftarrow z + \mathrm{update}(\nabla_z \mathcal F)$,
  state re-initialised per solve; `optax.sgd(η)` is Euler with `dt0 = η`;
- an optimistix minimiser (`optx.BFGS`, `optx.NonlinearCG`, ...): direct minimisation of
  $\mathcal F$ over the activities (`_infer_optimistix.py`).

Cost: with a constant step and no steady-state test, T steps of an explicit solver cost
exactly T evaluations per stage of $\nabla_z \mathcal F$; a steady-state test reuses the
gradient of the step (Euler, explicit Runge-Kutta methods, optax, optimistix), so it adds
one evaluation per solve, not one per step.
`InferenceSolution.num_grad_evals` counts them.
"""

import functools as ft
import math
import numbers
import sys
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import PRNGKeyArray

from ._check import (
    as_number,
    check_activities,
    check_data,
    check_hyper,
    check_init,
    is_concrete,
    thread_error,
)
from ._compiled import compiled
from ._custom_types import Activities, BatchArray, StepSizeController
from ._inference import AbstractInference, Fields, OptaxInference, drive, split_key
from ._energy import PC, AbstractEnergy
from ._init import AbstractInit, FeedForward
from ._model import PCModel
from ._results import RESULTS
from ._solution import InferenceSolution, SteadyState

_FAMILIES = (
    "one of three families: a diffrax ODE solver (gradient flow, e.g. diffrax.Euler(), "
    "diffrax.Heun(), diffrax.Tsit5()); an optax GradientTransformation stepping the "
    "activities (e.g. optax.sgd(0.1), optax.adam(0.1)); or an optimistix minimiser (e.g. "
    "optx.BFGS(rtol=1e-6, atol=1e-6), optx.NonlinearCG(...), needs `pip install "
    '"pccore[optimistix]"`); or an inference method of your own, a pccore.AbstractInference'
)


def energy_and_grad(energy: AbstractEnergy, model: PCModel, z, x, y):
    r"""$(\sum_i F_i, \nabla_z \sum_i F_i)$ on a prepared model, from one evaluation."""
    return jax.value_and_grad(lambda z: energy.per_sample(model, z, x, y).sum())(z)


def activity_grad(energy: AbstractEnergy, model: PCModel, z, x, y):
    r"""$\nabla_z \sum_i F_i$ on a prepared model (`jit` drops the unused energy)."""
    return energy_and_grad(energy, model, z, x, y)[1]


def _block_max(a):
    return jnp.max(jnp.abs(a).reshape(a.shape[0], -1), axis=1, initial=0.0)


def is_steady(steady: SteadyState, g, z):
    """Per-sample, per-variable max-norm test of the vector field (see SteadyState)."""
    ok = jnp.array(True)
    for gl, zl in zip(jtu.tree_leaves(g), jtu.tree_leaves(z)):
        ok = ok & jnp.all(_block_max(gl) <= steady.atol + steady.rtol * _block_max(zl))
    return ok


def field_norm(g):
    leaves = jtu.tree_leaves(g)
    if not leaves:
        return jnp.zeros(())
    return jnp.max(jnp.stack([jnp.max(jnp.abs(a)) for a in leaves]))


def all_finite(tree):
    leaves = jtu.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves])) if leaves else True


def is_optax(solver: Any) -> bool:
    return isinstance(solver, optax.GradientTransformation)


def is_stepped(solver: Any) -> bool:
    """A method of the step driver: an `AbstractInference`, or an optax optimiser (its
    shorthand). Its budget is a number of steps, not a time horizon."""
    return is_optax(solver) or isinstance(solver, AbstractInference)


def is_optimistix(solver: Any) -> bool:
    """An optimistix minimiser? Never imports optimistix: if it is not loaded, no."""
    optx = sys.modules.get("optimistix")
    return optx is not None and isinstance(solver, optx.AbstractMinimiser)


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


_SAVE_Y = diffrax.SaveAt(t1=True).subs.fn  # diffrax's default: save the state itself


def _check_saveat(saveat) -> None:
    if saveat is None:
        return
    if not isinstance(saveat, diffrax.SaveAt):
        raise TypeError(
            f"`saveat` must be a diffrax.SaveAt or None; got {type(saveat).__name__}. E.g. "
            "saveat=diffrax.SaveAt(ts=jnp.linspace(0, 2, 11))."
        )
    if not isinstance(saveat.subs, diffrax.SubSaveAt) or saveat.subs.fn is not _SAVE_Y:
        raise ValueError(
            "`saveat`: pass one diffrax.SaveAt(ts=..., t0=..., t1=..., steps=...) saving the "
            "activities themselves; several `subs` and a custom `fn` are not supported (the "
            "solution records the activities and their energy)."
        )
    if saveat.dense:
        raise ValueError(
            "`saveat`: dense=True is not supported; the solution records the activities at "
            "the save times. Pass the times you need as ts=..."
        )
    sub = saveat.subs
    if sub.ts is None and not (sub.t0 or sub.t1 or sub.steps):
        raise ValueError("`saveat` saves nothing; pass ts=..., t0=True, t1=True or steps=True.")


def check_solver(solver, stepsize_controller, t1, dt0, max_steps, steady_state, saveat):
    """Validate the solver options once, at the entry point.

    **Returns:** `(n, t1, dt0)`: the step budget, and the horizon and step size as numbers
    (`t1=None` is 2.0 for a diffrax solver; it stays None for the other families,
    which have no time axis).
    """
    t1, dt0 = as_number("t1", t1), as_number("dt0", dt0)
    ode = isinstance(solver, diffrax.AbstractSolver)
    if not (ode or is_stepped(solver) or is_optimistix(solver)):
        raise TypeError(f"`solver` must be {_FAMILIES}; got {type(solver).__name__}.")
    if ode:
        t1 = 2.0 if t1 is None else t1
        _check_ode_solver(solver)
    else:
        family = ("optax optimiser" if is_optax(solver) else "optimistix minimiser"
                  if is_optimistix(solver) else f"inference method ({type(solver).__name__})")
        if t1 is not None:
            raise ValueError(
                f"`t1={t1!r}`: `solver` is an {family}, which has no time horizon; expected "
                "t1=None (`t1` is the horizon of a diffrax ODE solver). Drop `t1`; set the "
                "number of steps with `max_steps=`."
            )
        if not isinstance(stepsize_controller, diffrax.ConstantStepSize):
            raise ValueError(
                f"`stepsize_controller={type(stepsize_controller).__name__}(...)`: `solver` is an "
                f"{family}, which takes no step-size controller (it would be ignored); expected "
                "the default diffrax.ConstantStepSize(). Drop "
                "`stepsize_controller`, or use a diffrax solver (e.g. diffrax.Tsit5()) for "
                "adaptive steps."
            )
    return _check_budget(solver, stepsize_controller, t1, dt0, max_steps, steady_state,
                         saveat), t1, dt0


def _check_ode_solver(solver) -> None:
    """A diffrax solver the engine can run: one ODE term (no SDE or split solvers)."""
    ts = solver.term_structure
    if not (isinstance(ts, type) and issubclass(diffrax.ODETerm, ts)):
        raise TypeError(
            f"`solver={type(solver).__name__}()` solves an equation with several terms (a "
            "stochastic or split solver); inference is one ODE, "
            "dz/dt = -dF/dz. Use an ODE solver: diffrax.Euler(), diffrax.Heun(), "
            "diffrax.Tsit5(), pccore.AdaptiveEuler() or an implicit one such as "
            "diffrax.Kvaerno5()."
        )


def _check_budget(solver, stepsize_controller, t1, dt0, max_steps, steady_state, saveat):
    """The step budget of a validated family (see `check_solver`)."""
    check_hyper(solver, stepsize_controller, t1, dt0, max_steps, steady_state)
    if steady_state is not None and not isinstance(steady_state, SteadyState):
        raise TypeError(
            f"`steady_state` must be a pccore.SteadyState or None; got "
            f"{type(steady_state).__name__}. E.g. steady_state=pccore.SteadyState(1e-3, 1e-3)."
        )
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1
    ):
        raise ValueError(f"`max_steps` must be a positive int; got {max_steps!r}.")
    max_steps = None if max_steps is None else int(max_steps)
    _check_saveat(saveat)
    if is_stepped(solver):
        n = 20 if max_steps is None else max_steps
        if saveat is not None:
            sub = saveat.subs
            if sub.ts is None or sub.steps or sub.t0 or sub.t1:
                raise ValueError(
                    "`saveat`: with an optax solver, times are update counts: pass "
                    "diffrax.SaveAt(ts=jnp.array([0, 5, 10])) with integer step numbers "
                    "(0 is the start; t0=, t1= and steps= have no meaning here)."
                )
            ts = np.asarray(sub.ts) if is_concrete(sub.ts) else None
            if ts is not None and (np.any(ts != np.round(ts)) or np.any(ts < 0) or np.any(ts > n)):
                raise ValueError(
                    f"`saveat`: with an optax solver, save times are update counts 0..max_steps "
                    f"= 0..{n}; got ts={ts.tolist()}. Pass whole numbers in that range."
                )
        return n
    if is_optimistix(solver):
        if saveat is not None:
            raise ValueError(
                "`saveat` is not supported with an optimistix minimiser (it has no time axis); "
                "use a diffrax or optax solver to record a trajectory, or pass saveat=None."
            )
        return 256 if max_steps is None else max_steps
    if not (isinstance(t1, int | float) and t1 > 0):
        raise ValueError(f"`t1` must be a positive number; got {t1!r}.")
    adaptive = isinstance(stepsize_controller, diffrax.AbstractAdaptiveStepSizeController)
    if adaptive and not isinstance(solver, diffrax.AbstractAdaptiveSolver):
        raise ValueError(
            f"`solver={type(solver).__name__}()` gives no error estimate, so it cannot be used "
            f"with `stepsize_controller={type(stepsize_controller).__name__}(...)`. Use a solver "
            "with an embedded error estimate (pccore.AdaptiveEuler(), diffrax.Heun(), "
            "diffrax.Tsit5()), or "
            "`stepsize_controller=diffrax.ConstantStepSize()` with `dt0`."
        )
    if not adaptive:
        if not isinstance(stepsize_controller, diffrax.ConstantStepSize):
            raise TypeError(
                "`stepsize_controller` must be diffrax.ConstantStepSize() or an adaptive "
                f"controller such as diffrax.PIDController(rtol, atol); got "
                f"{type(stepsize_controller).__name__}."
            )
        if not (isinstance(dt0, int | float) and dt0 > 0):
            raise ValueError(
                f"`dt0` must be a positive number with ConstantStepSize; got {dt0!r}. E.g. "
                "dt0=0.1 (t1/dt0 steps are taken)."
            )
        n = max(1, math.ceil(t1 / dt0 - 1e-9))
        if max_steps is not None and n > max_steps:
            raise ValueError(
                f"`t1 / dt0` = {t1}/{dt0} needs {n} steps, more than max_steps={max_steps}. "
                "Raise `max_steps`, raise `dt0`, or lower `t1`."
            )
        return n
    if dt0 is not None and not (isinstance(dt0, int | float) and dt0 > 0):
        raise ValueError(f"`dt0` must be a positive number or None; got {dt0!r}.")
    return 4096 if max_steps is None else max_steps


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


def raised(e, e0):
    r"""Whether the final energy `e` exceeds the starting energy `e0` beyond rounding: by more
    than $\sqrt{\epsilon}\,|F_0|$ of the dtype (a sum's rounding is far below that; a real
    instability raises the energy by orders of magnitude more)."""
    tol = jnp.sqrt(jnp.finfo(jnp.result_type(e)).eps)
    return jnp.isfinite(e) & (e > e0 + tol * jnp.abs(e0))


def with_stability(result, e, e0):
    """`result`, or `energy_increased` if the solve raised the energy (and did not diverge)."""
    bad = raised(e, e0) & (result != RESULTS.diverged)
    return RESULTS.where(bad, RESULTS.energy_increased, result)


def _finish(energy, model, z0, x, y, raw: Raw) -> InferenceSolution:
    """Package a solve. `raw.g` is the gradient at `raw.z` if the loop has it (else one more
    evaluation, which `jit` removes when `vector_field_norm` is not used); `raw.e0` the
    energy at the start `z0` if the loop has it (else one more energy evaluation)."""
    z, g, traj = raw.z, raw.g, raw.traj
    if g is None:
        g = activity_grad(energy, model, z, x, y)
    e = energy.per_sample(model, z, x, y).sum()
    e0 = raw.e0 if raw.e0 is not None else energy.per_sample(model, z0, x, y).sum()
    finite = all_finite(z) & jnp.isfinite(e)
    result = RESULTS.where(finite, raw.result, RESULTS.diverged)
    if raw.descends:
        result = with_stability(result, e, e0)
    energies = None
    if traj is not None and not jtu.tree_leaves(traj):  # no variables: the energy is constant
        energies = jnp.where(jnp.isinf(raw.ts), jnp.inf, e)
    elif traj is not None:
        energies = jax.vmap(lambda zz: energy.per_sample(model, zz, x, y).sum())(traj)
        # save times the solve did not reach hold inf states (diffrax's convention): inf
        unreached = jnp.all(jtu.tree_leaves(traj)[0] == jnp.inf,
                            axis=tuple(range(1, jtu.tree_leaves(traj)[0].ndim)))
        energies = jnp.where(unreached, jnp.inf, energies)
    return InferenceSolution(
        activities=z,
        num_steps=jnp.asarray(raw.k, jnp.int32),
        energy=e,
        num_grad_evals=jnp.asarray(raw.evals, jnp.int32),
        result=result,
        t=jnp.asarray(raw.t, e.dtype),
        vector_field_norm=field_norm(g),
        ts=raw.ts,
        trajectory=traj,
        energies=energies,
    )


def _keep(done, new, old):
    return jtu.tree_map(lambda a, b: jnp.where(done, b, a), new, old)


def _solve_method(method: AbstractInference, energy, model, z0, x, y, n, steady, saveat,
                  key=None) -> Raw:
    """An inference method's steps, run by the one driver (`_inference.drive`)."""
    fields = Fields(
        grad=lambda z: activity_grad(energy, model, z, x, y),
        energy=lambda z: energy.per_sample(model, z, x, y).sum(),
    )
    ts = None if saveat is None else jnp.asarray(saveat.subs.ts)
    test = None if steady is None else ft.partial(is_steady, steady)
    z, k, result, evals, g, buf, e0, _ = drive(method, fields, z0, n, test, ts, key)
    return Raw(z, k, k, result, evals, g, ts, buf, e0, method.descends)


def _vector_field(t, z, args):
    energy, model, x, y = args
    return jtu.tree_map(jnp.negative, activity_grad(energy, model, z, x, y))


def _solve_fixed(solver, energy, model, z0, x, y, t1, dt0, n, steady):
    terms = diffrax.ODETerm(_vector_field)
    args = (energy, model, x, y)
    t_of = lambda k: jnp.minimum(k * dt0, t1)
    s0 = solver.init(terms, 0.0, t_of(1), z0, args)
    at_init, per_step = erk_evals(solver)

    def step(k, z, s):
        z, _, _, s, _ = solver.step(terms, t_of(k), t_of(k + 1), z, args, s, False)
        return z, s

    grad = lambda z: activity_grad(energy, model, z, x, y)
    euler = isinstance(solver, diffrax.Euler)

    # When t1 is a whole number of steps, every step is dt0: a constant the loop body does not
    # have to compute from the step counter (the last step then ends within rounding of t1).
    uniform = abs(n * dt0 - t1) <= 1e-9 * t1

    def euler_step(k, z, g):
        # Euler's step written out, z + h * (-g): one fused update per activity. Going through
        # diffrax's term machinery adds elementwise passes (negate, scale, add) per activity
        # per step, which cost real time on deep, narrow networks.
        h = dt0 if uniform else t_of(k + 1) - t_of(k)
        return jtu.tree_map(lambda a, b: a - (h * b).astype(a.dtype), z, g)

    if steady is None:
        if euler:
            # The first step is taken outside the loop: its evaluation also gives the energy
            # at the start (a training step reports it), with no separate pass over z0.
            e0, g0 = energy_and_grad(energy, model, z0, x, y)
            z = euler_step(0, z0, g0)
            z = jax.lax.fori_loop(1, n, lambda k, z: euler_step(k, z, grad(z)), z)
            return Raw(z, n, t1, RESULTS.completed, n, e0=e0)
        else:
            z, _ = jax.lax.fori_loop(0, n, lambda k, c: step(k, *c), (z0, s0))
        evals = at_init + n * per_step if per_step >= 0 else -1
        return Raw(z, n, t1, RESULTS.completed, evals)

    # The carry holds the gradient at the current state. Euler steps with it (one
    # evaluation per step, shared with the steady-state test), and a first-same-as-last
    # Runge-Kutta step leaves it in its state. Any other explicit Runge-Kutta step evaluates
    # the field at its starting state as its first stage: the test reads that, and a steady
    # state found there is kept (the step taken from it discarded). Other solvers evaluate
    # the field once more per step for the test.
    if not euler and _stage0(solver):

        def body(c):
            k, z, s, g, _ = c
            ta, tb = t_of(k), t_of(k + 1)
            z1, _, dense, s1, _ = solver.step(terms, ta, tb, z, args, s, False)
            g = _field_at_start(dense, tb - ta)
            here = is_steady(steady, g, z)
            z, s = _keep(here, z1, z), _keep(here, s1, s)
            return jnp.where(here, k, k + 1), z, s, g, here

        g0 = jtu.tree_map(jnp.zeros_like, z0)  # replaced by the first step's stage
        k, z, _, g, done = jax.lax.while_loop(
            lambda c: (c[0] < n) & ~c[4], body, (0, z0, s0, g0, jnp.array(False)))
        # The state the loop ended on untested (n steps taken): one more evaluation.
        g = jax.lax.cond(done, lambda: g, lambda: grad(z))
        final = done | is_steady(steady, g, z)
        result = RESULTS.where(final, RESULTS.converged, RESULTS.not_converged)
        evals = at_init + (k + done) * per_step + jnp.where(done, 0, 1)
        return Raw(z, k, t_of(k), result, evals, g)

    fsal = not euler and _fsal(solver)

    def body(c):
        k, z, s, g, _ = c
        if euler:
            z = euler_step(k, z, g)
        else:
            z, s = step(k, z, s)
        # A first-same-as-last solver's state holds the field at the new state.
        g = _fsal_grad(s) if fsal else grad(z)
        return k + 1, z, s, g, is_steady(steady, g, z)

    e0, g0 = energy_and_grad(energy, model, z0, x, y)
    if fsal:
        s0 = _fsal_state(s0, g0)  # and it need not evaluate the field at the start again
    c0 = (0, z0, s0, g0, is_steady(steady, g0, z0))
    k, z, _, g, done = jax.lax.while_loop(lambda c: (c[0] < n) & ~c[4], body, c0)
    result = RESULTS.where(done, RESULTS.converged, RESULTS.not_converged)
    if euler:
        evals = k + 1
    elif fsal:
        evals = 1 + k * per_step
    else:
        evals = at_init + k * (per_step + 1) + 1 if per_step >= 0 else -1
    return Raw(z, k, t_of(k), result, evals, g, e0=e0)


def _fsal(solver) -> bool:
    """Whether `solver`'s state carries the vector field at the current state (an explicit
    Runge-Kutta tableau with first-same-as-last)."""
    return isinstance(solver, diffrax.AbstractERK) and erk_evals(solver)[0] == 1


# A first-same-as-last Runge-Kutta solver's state is diffrax's `(first_step, f)`: `f` the
# vector field at the current state, `first_step` whether the next step must evaluate it.


def _fsal_state(s0, g0):
    """The initial state `s0` with the vector field at the start, `f = -g0`, already known."""
    first_step, f0 = s0
    f = jtu.tree_map(lambda a, b: (-b).astype(a.dtype), f0, g0)
    return jnp.zeros_like(first_step), f


def _fsal_grad(s):
    """$\nabla_z F$ at the current state, from the state."""
    return jtu.tree_map(jnp.negative, s[1])


def _fsal_first_stage(s, jump):
    """Whether the next step evaluates its first stage (none known yet, or after a jump)."""
    return s[0] | jump


def _stage0(solver) -> bool:
    """Whether `solver`'s step hands back the vector field at the state it steps from: an
    explicit Runge-Kutta method without first-same-as-last evaluates it as its first stage,
    and diffrax returns the stage increments `k_i = h f_i` as dense output."""
    return isinstance(solver, diffrax.AbstractERK) and erk_evals(solver)[0] == 0


def _field_at_start(dense, h):
    """$\nabla_z F$ at the state a Runge-Kutta step started from, from its first stage."""
    return jtu.tree_map(lambda k: -k[0] / h, dense["k"])


def _t1_floor(t1):
    """diffrax's clip floor: steps ending within ~100 ULPs of `t1` end at `t1`."""
    t = np.asarray(t1, jnp.asarray(t1, float).dtype)
    for _ in range(100):
        t = np.nextafter(t, -np.inf)
    return t


def _solve_adaptive(solver, controller, energy, model, z0, x, y, t1, dt0, n, steady):
    """An adaptive solve without a saved trajectory: diffrax's solver step and step-size
    controller in a plain while loop.

    `diffrax.diffeqsolve` would do the same steps, with a general loop around them (saving,
    events, dense output, progress) that costs about a millisecond per solve on small
    networks. The steady-state test reads a vector field the step already evaluated: the
    last stage of a first-same-as-last solver (Tsit5, Dopri5, Bosh3) at the accepted state,
    or the first stage of any other explicit Runge-Kutta method at the state it steps from;
    other solvers evaluate it once per step.
    """
    terms = diffrax.ODETerm(_vector_field)
    args = (energy, model, x, y)
    order = solver.error_order(terms)
    tnext, cs0 = controller.init(terms, 0.0, t1, z0, dt0, args, solver.func, order)
    tnext = jnp.minimum(tnext, t1)
    s0 = solver.init(terms, 0.0, tnext, z0, args)
    fsal = _fsal(solver)
    # Without first-same-as-last, an explicit Runge-Kutta step's first stage is the field at
    # the state it steps from: the test reads it there, and a steady state is kept (the step
    # attempted from it discarded), so the test costs no evaluation per step.
    stage0 = steady is not None and _stage0(solver)
    floor = _t1_floor(t1)
    # After a step, a first-same-as-last solver's state holds f(z) = -grad at the new state
    # (diffrax's initial state holds zeros instead: the start is tested with a gradient).
    grad = lambda z, s: _fsal_grad(s) if fsal else activity_grad(energy, model, z, x, y)
    check = (lambda z, s: jnp.array(False)) if (steady is None or stage0) else (
        lambda z, s: is_steady(steady, grad(z, s), z))
    if steady is None or stage0:
        check0 = jnp.array(False)
    else:
        g0 = activity_grad(energy, model, z0, x, y)
        check0 = is_steady(steady, g0, z0)
        if fsal:
            # The field at the start is known: hand it to the solver as the first step's
            # first stage (diffrax evaluates it on its first step, and again after each
            # rejection of that step, unless told it has it).
            s0 = _fsal_state(s0, g0)
    per_step = erk_evals(solver)[1]

    def cond(c):
        k, tprev, _, _, _, _, _, done, bad, _ = c
        return (k < n) & (tprev < t1) & ~done & ~bad

    def body(c):
        k, tprev, tnext, z, s, cs, jump, _, _, ev = c
        # Gradients this attempt costs: its stages, and for a first-same-as-last solver the
        # first stage too where it has no valid one (its first step, or after a jump).
        ev = ev + per_step + (jnp.asarray(_fsal_first_stage(s, jump), jnp.int32) if fsal else 0)
        z1, err, dense, s1, sres = solver.step(terms, tprev, tnext, z, args, s, jump)
        err = jtu.tree_map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), err)
        keep, tprev1, tnext1, jump1, cs1, cres = controller.adapt_step_size(
            tprev, tnext, z, z1, args, err, order, cs)
        tprev1 = jnp.minimum(tprev1, t1)
        clipped = jnp.where(keep, t1, tprev1 + 0.5 * (t1 - tprev1))
        tnext1 = jnp.where(tnext1 > floor, clipped, tnext1)
        sel = lambda a, b: jnp.where(keep, a, b)
        z1 = jtu.tree_map(sel, z1, z)
        s1 = jtu.tree_map(sel, s1, s)
        jump1 = jnp.where(keep, jump1, jump)
        bad = (keep & (sres != diffrax.RESULTS.successful)) | (cres != diffrax.RESULTS.successful)
        new = (k + 1, tprev1, tnext1, z1, s1, cs1, jump1, keep & check(z1, s1), bad, ev)
        if not stage0:
            return new
        here = is_steady(steady, _field_at_start(dense, tnext - tprev), z)
        old = (k, tprev, tnext, z, s, cs, jump, jnp.array(True), jnp.array(False), ev)
        return jtu.tree_map(lambda a, b: jnp.where(here, a, b), old, new)

    init = (0, jnp.asarray(0.0, tnext.dtype), tnext, z0, s0, cs0, jnp.array(False), check0,
            jnp.array(False), jnp.asarray(0, jnp.int32))
    k, t, _, z, s, _, _, done, bad, ev = jax.lax.while_loop(cond, body, init)
    found = done
    if stage0:
        # The state the loop ended on (at t1, or after max_steps) untested: one evaluation.
        done = done | jax.lax.cond(
            done, lambda: jnp.array(True),
            lambda: is_steady(steady, activity_grad(energy, model, z, x, y), z))
    if steady is None:
        good = RESULTS.completed
    else:
        good = RESULTS.where(done, RESULTS.converged, RESULTS.not_converged)
    result = RESULTS.where(done | (t >= t1), good, RESULTS.max_steps_reached)
    result = RESULTS.where(bad, RESULTS.diverged, result)
    if per_step < 0:
        evals = -1
    elif stage0:
        # every iteration's stages (also the one that found the steady state: it keeps its
        # state but counts its stages), and the final test unless the loop found it
        evals = ev + jnp.where(found, 0, 1)
    else:
        # the steady-state test: at the start, then after every step unless the state has it
        test = 0 if steady is None else 1 + (0 if fsal else k)
        evals = ev + test
    return Raw(z, k, t, result, evals)


def _solve_diffrax(solver, controller, energy, model, z0, x, y, t1, dt0, n, steady, saveat):
    event = None
    if steady is not None:

        def cond_fn(t, z, args, **kwargs):
            return is_steady(steady, activity_grad(energy, model, z, x, y), z)

        event = diffrax.Event(cond_fn)
    if isinstance(controller, diffrax.ConstantStepSize):
        # The steps of pccore's own loop, min(k dt0, t1): diffrax's ConstantStepSize spreads a
        # t1 that is not a whole number of steps differently, and saving must not change them.
        grid = np.minimum(np.arange(n + 1) * dt0, t1)
        grid[-1] = t1
        controller, dt0 = diffrax.StepTo(ts=jnp.asarray(grid)), None
    # The final state in a sub-save of its own: with a steady-state stop diffrax writes it
    # into the next free slot of the user's save times and leaves the later ones inf.
    final = diffrax.SubSaveAt(t1=True)
    save = diffrax.SaveAt(subs=final if saveat is None else (final, saveat.subs))
    terms = diffrax.ODETerm(_vector_field)
    args = (energy, model, x, y)
    state = None
    if _fsal(solver):
        # The field at the start, given to the solver: diffrax would evaluate it on the first
        # step, and again after each rejection of that step (one gradient, counted exactly).
        state = _fsal_state(solver.init(terms, 0.0, t1, z0, args),
                            activity_grad(energy, model, z0, x, y))
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        0.0,
        t1,
        dt0,
        z0,
        args=args,
        saveat=save,
        stepsize_controller=controller,
        max_steps=n,
        event=event,
        throw=False,
        solver_state=state,
    )
    ys, ts_ = (sol.ys, sol.ts) if saveat is None else (sol.ys[0], sol.ts[0])
    z = jtu.tree_map(lambda a: a[-1], ys)
    traj = None if saveat is None else sol.ys[1]
    ts = None if saveat is None else sol.ts[1]
    hit = sol.result == diffrax.RESULTS.event_occurred
    ok = (sol.result == diffrax.RESULTS.successful) | hit
    if steady is None:
        good = RESULTS.completed
    else:
        good = RESULTS.where(hit, RESULTS.converged, RESULTS.not_converged)
    maxed = sol.result == diffrax.RESULTS.max_steps_reached
    bad = RESULTS.where(maxed, RESULTS.max_steps_reached, RESULTS.diverged)
    result = RESULTS.where(ok, good, bad)
    k = sol.stats["num_steps"]
    at_init, per_step = erk_evals(solver)
    if per_step < 0:
        evals = -1
    else:
        # + 1 + k for the steady-state event (diffrax tests it at t0 and after each step)
        evals = at_init + k * per_step + (0 if steady is None else 1 + k)
    return Raw(z, k, ts_[-1], result, evals, None, ts, traj)


def _no_variables(z0, saveat, optax_times: bool, n: int) -> Raw:
    """A solve with no inference variables (e.g. a one-layer model with `x` and `y` clamped):
    the start is the equilibrium, reached in 0 steps and 0 gradient evaluations. Save times
    after the start are not reached and hold inf, as after any steady-state stop."""
    ts = None
    if saveat is not None:
        sub = saveat.subs
        parts = []
        if not optax_times and sub.t0:
            parts.append(jnp.zeros((1,)))
        if sub.ts is not None:
            times = jnp.asarray(sub.ts, float)
            parts.append(jnp.where(times <= 0, times, jnp.inf))
        if not optax_times and sub.steps:
            parts.append(jnp.full((n,), jnp.inf))
        if not optax_times and sub.t1:
            parts.append(jnp.zeros((1,)))
        ts = jnp.concatenate(parts)
    return Raw(z0, 0, 0.0, RESULTS.converged, 0, g=z0, ts=ts, traj=None if ts is None else ())


def solve_raw(model, z0, x, y, energy, solver, controller, t1, dt0, n, steady, saveat,
              key=None) -> Raw:
    """Run the route for `solver` on a prepared model (traceable); unpackaged. `key`: the
    solve's own key, for an inference method that draws random numbers."""
    if not jtu.tree_leaves(z0):
        return _no_variables(z0, saveat, is_stepped(solver), n)
    if is_optax(solver):
        solver = OptaxInference(solver)
    if isinstance(solver, AbstractInference):
        return _solve_method(solver, energy, model, z0, x, y, n, steady, saveat, key)
    if is_optimistix(solver):
        from ._infer_optimistix import solve_optimistix

        return solve_optimistix(solver, energy, model, z0, x, y, n, steady)
    adaptive = isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)
    # pccore's own loops run explicit Runge-Kutta steps; anything else (implicit solvers,
    # whose root finders take their tolerances from the controller) goes through diffrax.
    own = saveat is None and isinstance(solver, diffrax.Euler | diffrax.AbstractERK)
    if adaptive and own:
        return _solve_adaptive(solver, controller, energy, model, z0, x, y, t1, dt0, n, steady)
    if adaptive or not own:
        return _solve_diffrax(solver, controller, energy, model, z0, x, y, t1, dt0, n, steady, saveat)
    return _solve_fixed(solver, energy, model, z0, x, y, t1, dt0, n, steady)


def _solve(model, z0, x, y, energy, solver, controller, t1, dt0, n, steady, saveat, key=None):
    raw = solve_raw(model, z0, x, y, energy, solver, controller, t1, dt0, n, steady, saveat, key)
    return _finish(energy, model, z0, x, y, raw)


solve = compiled(_solve)
solve.__doc__ = """Inference on a *prepared* model from `z0`; everything validated. Jittable.

`solve(prepared_model, z0, x, y, energy, solver, controller, t1, dt0, n, steady, saveat)`.
"""


def infer(
    model: PCModel,
    activities: Activities | None = None,
    *,
    x: BatchArray | None = None,
    y: BatchArray | None,
    energy: AbstractEnergy = PC(),
    solver: Any = diffrax.Euler(),
    stepsize_controller: StepSizeController = diffrax.ConstantStepSize(),
    t1: float | None = None,
    dt0: float | None = 0.1,
    max_steps: int | None = None,
    steady_state: SteadyState | None = None,
    saveat: diffrax.SaveAt | None = None,
    init: AbstractInit = FeedForward(),
    key: PRNGKeyArray | None = None,
    throw: bool = True,
) -> InferenceSolution:
    r"""Equilibrate the activities: integrate $\dot z = -\nabla_z \sum_i F_i(z)$ or step an optimiser.

    **Arguments:**

    - `model`: a [`pccore.PCModel`][].
    - `activities`: where to start; `None` initialises them with `init`.
    - `x`, `y`: the clamped bottom and top (see [`pccore.energy`][]).
    - `energy`: the variant, e.g. [`pccore.PC`][].
    - `solver`: one of three families. Any diffrax ODE solver (gradient flow); any optax
        `GradientTransformation` (stepping $z \leftarrow z + \mathrm{update}(\nabla_z\mathcal F)$;
        `optax.sgd(η)` equals Euler with `dt0=η`); or any optimistix minimiser such as
        `optx.BFGS(rtol, atol)` or `optx.NonlinearCG(rtol, atol)`, which minimises
        $\mathcal F$ directly and stops by its own tolerances, or at `steady_state` if given
        (`t1`, `dt0`, `stepsize_controller` are then unused; `max_steps` defaults to 256).
        Dense quasi-Newton minimisers (BFGS, DFP) work on each sample separately; the
        others (L-BFGS, NonlinearCG, ...) on the whole batch at once.
    - `stepsize_controller`: `diffrax.ConstantStepSize()` (with `dt0`) or an adaptive one such
        as `diffrax.PIDController(rtol=1e-3, atol=1e-3)` (needs a solver with an error estimate).
        Diffrax solvers only: an adaptive controller with an optax or optimistix solver is
        refused.
    - `t1`: the time horizon of a diffrax solver (default 2.0); the integration starts at 0.
        A number or a concrete 0-d array. Optax and optimistix solvers have no horizon:
        passing `t1` to them is refused (set `max_steps`).
    - `dt0`: the (initial) step size; required with `ConstantStepSize`.
    - `max_steps`: the step budget. For an optax solver, the number of steps (default 20);
        for adaptive diffrax solves, default 4096. No buffer of `max_steps` states is kept.
    - `steady_state`: a [`pccore.SteadyState`][] to stop early once the vector field meets
        its tolerance; `None` runs the whole budget.
    - `saveat`: `diffrax.SaveAt(ts=..., t0=..., t1=..., steps=...)` to record the
        activities and energy at some times (for optax solvers only `ts`, as update counts
        0..max_steps). Memory grows with the number of save times only. Save times a solve
        does not reach (after a steady-state stop, or unused `steps=True` slots) hold inf, as
        in diffrax, and so does their energy.
    - `init`, `key`: the initialiser used when `activities` is None.
    - `throw`: raise if the solve diverged, raised the energy above its start (an unstable
        step size: `RESULTS.energy_increased`, whose message names the remedies) or ran out
        of `max_steps`. Inside `jax.jit` the error is raised when any field of the solution
        is used (the activities, the energy, the step counts, the saved trajectory); with
        `False` check `solution.result` instead.

    **Returns:** an [`pccore.InferenceSolution`][].
    """
    x, y = check_data(model, energy, x, y)
    n, t1, dt0 = check_solver(solver, stepsize_controller, t1, dt0, max_steps, steady_state,
                              saveat)
    check_init(init, key)
    if x is None and y is None:
        raise ValueError("`x` and `y` are both None; pass at least one clamped value.")
    prepared = energy.prepare(model)
    key, solve_key = split_key(solver, key)
    if activities is None:
        activities = energy.init(prepared, x, y, init, key)
    else:
        activities = check_activities(model, energy, activities, x, y)
    sol = solve(
        prepared, tuple(activities), x, y, energy, solver, stepsize_controller, t1, dt0, n,
        steady_state, saveat, solve_key,
    )
    if throw:
        bad = ((sol.result == RESULTS.diverged) | (sol.result == RESULTS.max_steps_reached)
               | (sol.result == RESULTS.energy_increased))
        sol = thread_error(sol.result, sol, bad)  # every field: under jax.jit, any one read raises
    return sol
