r"""The one inference entry point: validate, build the inference method, solve, package.

The solver families are inference-method objects (`pccore/_inference/`):
[`pccore.GradientFlow`][] (a diffrax solver integrating $\dot z = -\nabla_z \mathcal F$),
[`pccore.OptaxInference`][] (an optax optimiser stepping the activities),
[`pccore.OptimistixInference`][] (an optimistix minimiser), or any
[`pccore.AbstractInference`][] of your own, run by the one driver. A bare diffrax solver,
optax `GradientTransformation` or optimistix minimiser given as `solver=` is the shorthand
for the object (`as_method`), with `stepsize_controller`, `t1` and `dt0` the gradient flow's
options. `InferenceSolution.num_grad_evals` counts the gradient evaluations of every route.
"""

import functools as ft
import math
import numbers
import sys
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import PRNGKeyArray

from .._check import (
    as_number,
    check_activities,
    check_data,
    check_hyper,
    check_init,
    is_concrete,
    thread_error,
)
from .._compiled import compiled
from .._custom_types import Activities, BatchArray, StepSizeController
from ._base import AbstractInference, Fields, split_key
from ._driver import drive
from ._gradient_flow import GradientFlow
from ._optax import OptaxInference
from ._optimistix import OptimistixInference
from ._common import (
    Raw,
    activity_grad,
    all_finite,
    energy_and_grad,
    erk_evals,
    field_norm,
    is_steady,
)
from ._gradient_flow import solve_flow
from .._energy._abstract import AbstractEnergy
from .._energy._base import PC
from .._energy._init import AbstractInit, FeedForward
from .._model import PCModel
from .._results import RESULTS
from .._solution import InferenceSolution, SteadyState

_FAMILIES = (
    "one of three families: a diffrax ODE solver (gradient flow, e.g. diffrax.Euler(), "
    "diffrax.Heun(), diffrax.Tsit5()); an optax GradientTransformation stepping the "
    "activities (e.g. optax.sgd(0.1), optax.adam(0.1)); or an optimistix minimiser (e.g. "
    "optx.BFGS(rtol=1e-6, atol=1e-6), optx.NonlinearCG(...), needs `pip install "
    '"pccore[optimistix]"`); or an inference method of your own, a pccore.AbstractInference'
)


def is_optax(solver: Any) -> bool:
    return isinstance(solver, optax.GradientTransformation)


def is_stepped(solver: Any) -> bool:
    """A method whose budget is a number of steps and whose save times are step counts (not
    a time horizon): an optax optimiser (shorthand or object), or an `AbstractInference` of
    the step driver other than the gradient-flow and optimistix families."""
    return is_optax(solver) or (isinstance(solver, AbstractInference)
                                and not isinstance(solver, GradientFlow | OptimistixInference))


def is_optimistix(solver: Any) -> bool:
    """An optimistix minimiser (bare or in its object)? Never imports optimistix."""
    if isinstance(solver, OptimistixInference):
        return True
    optx = sys.modules.get("optimistix")
    return optx is not None and isinstance(solver, optx.AbstractMinimiser)


def as_method(solver: Any, controller: Any, t1: Any, dt0: Any) -> AbstractInference:
    """The inference-method object for a validated `solver=` (the shorthands built)."""
    if isinstance(solver, AbstractInference):
        return solver
    if is_optax(solver):
        return OptaxInference(solver)
    if is_optimistix(solver):
        return OptimistixInference(solver)
    return GradientFlow(solver, controller, 2.0 if t1 is None else t1, dt0)


def with_method(method: Any, solver: Any, controller: Any, t1: Any, dt0: Any) -> Any:
    """What `solver=` means for the engine: `method` when given (the shorthand keywords must
    then be left at their defaults), else `solver`."""
    if method is None:
        return solver
    if not isinstance(method, AbstractInference):
        raise TypeError(
            "`method` must be a pccore.AbstractInference: pccore.GradientFlow(...), "
            "pccore.OptaxInference(...), pccore.OptimistixInference(...) or one of your own; "
            f"got {type(method).__name__}. A bare diffrax solver, optax optimiser or "
            "optimistix minimiser is the shorthand `solver=`."
        )
    given = ([f"solver={type(solver).__name__}(...)"] if type(solver) is not diffrax.Euler
             else []) + _flow_keywords(controller, t1, dt0)
    if given:
        raise ValueError(
            f"`{', '.join(given)}` given with `method={type(method).__name__}(...)`; expected "
            "one or the other. The keywords are the shorthand that builds a method: put their "
            "options on the method object (e.g. method=pccore.GradientFlow(diffrax.Tsit5(), "
            "diffrax.PIDController(rtol=1e-3, atol=1e-3), t1=10.0, dt0=None)) and drop them."
        )
    return method


def _flow_keywords(controller: Any, t1: Any, dt0: Any) -> list[str]:
    """The gradient-flow keywords of the shorthand set away from their defaults."""
    given = []
    if not isinstance(controller, diffrax.ConstantStepSize):
        given.append(f"stepsize_controller={type(controller).__name__}(...)")
    if t1 is not None:
        given.append(f"t1={t1!r}")
    if dt0 is not None and dt0 != 0.1:
        given.append(f"dt0={dt0!r}")
    return given


def _unpack_flow(flow: GradientFlow, controller, t1, dt0):
    """A `GradientFlow`'s own options; the keywords must not set them too."""
    given = _flow_keywords(controller, t1, dt0)
    if given:
        raise ValueError(
            f"`{', '.join(given)}` given with `solver=GradientFlow(...)`, which holds its own "
            "step-size controller, horizon and step; expected them on the object only. Set "
            "them there, e.g. solver=pccore.GradientFlow(diffrax.Tsit5(), "
            "diffrax.PIDController(rtol=1e-3, atol=1e-3), t1=10.0, dt0=None), and drop the "
            "keywords."
        )
    return (flow.solver, flow.stepsize_controller, as_number("t1", flow.t1),
            as_number("dt0", flow.dt0))


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
    if isinstance(solver, GradientFlow):
        solver, stepsize_controller, t1, dt0 = _unpack_flow(solver, stepsize_controller, t1,
                                                            dt0)
        if not isinstance(solver, diffrax.AbstractSolver):
            raise TypeError(
                "`GradientFlow(solver)`: `solver` must be a diffrax ODE solver (e.g. "
                f"diffrax.Euler(), diffrax.Tsit5()); got {type(solver).__name__}."
            )
    elif isinstance(solver, OptimistixInference):
        solver = solver.minimiser
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
        needed = solver.steps_needed() if isinstance(solver, AbstractInference) else None
        n = max(20, needed or 0) if max_steps is None else max_steps
        if needed is not None and n < needed:
            raise ValueError(
                f"`max_steps={n}`: `solver={type(solver).__name__}(...)` needs {needed} steps "
                f"to complete; expected max_steps >= {needed}. Raise `max_steps` or leave it "
                "unset.")
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
    elif traj is not None and raw.energies is not None:
        energies = raw.energies  # recorded at each save: unreached slots hold inf already
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
        num_accepted_steps=jnp.asarray(raw.k if raw.accepted is None else raw.accepted,
                                       jnp.int32),
    )


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
              key=None, progress=False) -> Raw:
    """Run the route for `solver` on a prepared model (traceable); unpackaged. `key`: the
    solve's own key, for an inference method that draws random numbers; `progress`: draw a
    tqdm bar (gradient flow only)."""
    if not jtu.tree_leaves(z0):
        return _no_variables(z0, saveat, is_stepped(solver), n)
    method = as_method(solver, controller, t1, dt0)
    if isinstance(method, GradientFlow):
        return solve_flow(method, energy, model, z0, x, y, n, steady, saveat, progress)
    if isinstance(method, OptimistixInference):
        from ._optimistix import solve_optimistix

        return solve_optimistix(method.minimiser, energy, model, z0, x, y, n, steady)
    return _solve_method(method, energy, model, z0, x, y, n, steady, saveat, key)


def _solve(model, z0, x, y, energy, solver, controller, t1, dt0, n, steady, saveat, key=None,
           progress=False):
    raw = solve_raw(model, z0, x, y, energy, solver, controller, t1, dt0, n, steady, saveat, key,
                    progress)
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
    method: AbstractInference | None = None,
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
    progress: bool = False,
) -> InferenceSolution:
    r"""Equilibrate the activities: integrate $\dot z = -\nabla_z \sum_i F_i(z)$ or step an optimiser.

    **Arguments:**

    - `model`: a [`pccore.PCModel`][].
    - `activities`: where to start; `None` initialises them with `init`.
    - `x`, `y`: the clamped bottom and top (see [`pccore.energy`][]).
    - `energy`: the variant, e.g. [`pccore.PC`][].
    - `method`: the inference method, an object holding its own options:
        [`pccore.GradientFlow`][] (a diffrax solver with its step-size controller, horizon
        and step), [`pccore.OptaxInference`][], [`pccore.OptimistixInference`][], or an
        [`pccore.AbstractInference`][] of your own. When given, leave `solver`,
        `stepsize_controller`, `t1` and `dt0` (the shorthand below) at their defaults.
    - `solver`: the shorthand that builds the method (or the method object itself): one of
        three families. Any diffrax ODE solver (gradient flow); any optax
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

    - `progress`: draw a progress bar (tqdm, on stderr, in simulated time) for a long
        gradient-flow solve; nothing is drawn when stderr is not a terminal. Gradient flow
        only (it then runs on diffrax's own loop, which reports its progress).

    **Returns:** an [`pccore.InferenceSolution`][].
    """
    x, y = check_data(model, energy, x, y)
    solver = with_method(method, solver, stepsize_controller, t1, dt0)
    if progress and not (isinstance(solver, GradientFlow | diffrax.AbstractSolver)):
        raise ValueError(
            f"`progress=True`: the solver is a {type(solver).__name__}, but only gradient flow "
            "(a diffrax solver, or pccore.GradientFlow) reports its progress; expected "
            "progress=False with this solver, or a diffrax solver.")
    progress = bool(progress) and sys.stderr.isatty()
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
        steady_state, saveat, solve_key, progress,
    )
    if throw:
        bad = ((sol.result == RESULTS.diverged) | (sol.result == RESULTS.max_steps_reached)
               | (sol.result == RESULTS.energy_increased))
        sol = thread_error(sol.result, sol, bad)  # every field: under jax.jit, any one read raises
    return sol
