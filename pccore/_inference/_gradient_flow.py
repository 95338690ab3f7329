r"""The gradient-flow family: $\dot z = -\nabla_z \mathcal F$ integrated by a diffrax solver.

[`pccore.GradientFlow`][] holds the solver and its options (step-size controller, horizon,
first step). It implements the step contract of [`pccore.AbstractInference`][] (one solver
step; an adaptive step rejects itself by returning the same point with a smaller step), so
the driver can run it like any method. The engine runs it on fused routes that do the same
steps with less work per step, and which the tests check against the driver:

- Euler or an explicit Runge-Kutta solver with `ConstantStepSize` and no saved trajectory:
  a compiled loop over `solver.step` (Euler's update written out as one fused update per
  activity);
- the same solvers with an adaptive controller and no saved trajectory: the solver's own
  `step` and the controller's `adapt_step_size` in a plain while loop, the steady-state test
  reading a vector field the Runge-Kutta step already evaluated (its first or, for
  first-same-as-last tableaus, last stage) instead of evaluating it again;
- a saved trajectory, or any other diffrax solver (implicit ones take their root finder's
  tolerances from the controller there): `diffrax.diffeqsolve`, with a `diffrax.Event` on
  the vector field for the steady state. The energy at each saved point is computed when it
  is saved, so saving costs in proportion to the points saved.

Cost: with a constant step and no steady-state test, T steps of an explicit solver cost
exactly T evaluations per stage of $\nabla_z \mathcal F$; a steady-state test reuses the
gradient of the step, so it adds one evaluation per solve, not one per step.
"""

import math
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from .._custom_types import Activities, StepSizeController
from .._results import RESULTS
from ._base import AbstractInference, Fields
from ._common import Raw, activity_grad, energy_and_grad, erk_evals, is_steady, keep


class GradientFlow(AbstractInference):
    r"""Gradient flow $\dot z = -\nabla_z \mathcal F(z)$ from $t = 0$ to `t1`, integrated by a
    diffrax solver: the inference of predictive coding in continuous time.

    `GradientFlow(diffrax.Euler(), dt0=0.1, t1=2.0)` takes 20 Euler steps
    $z \leftarrow z - 0.1\,\nabla_z \mathcal F$ (the usual discrete PC inference);
    `GradientFlow(diffrax.Tsit5(), diffrax.PIDController(rtol=1e-3, atol=1e-3), t1=20.0,
    dt0=None)` adapts its steps. `solver=diffrax.Euler()` with the keywords
    `stepsize_controller=`, `t1=`, `dt0=` of [`pccore.infer`][] is the shorthand for it.

    **Arguments:**

    - `solver`: a diffrax ODE solver (default `diffrax.Euler()`); implicit solvers such as
        `diffrax.Kvaerno5()` take their root finder's tolerances from the controller.
    - `stepsize_controller`: `diffrax.ConstantStepSize()` (the default; `dt0` is then the
        step) or an adaptive one such as `diffrax.PIDController(rtol, atol)` (needs a solver
        with an error estimate: `pccore.AdaptiveEuler()`, `diffrax.Heun()`,
        `diffrax.Tsit5()`).
    - `t1`: the horizon (default 2.0).
    - `dt0`: the step with a constant step size (default 0.1); the first step of an adaptive
        one (None lets the controller choose it from the vector field).

    The step budget (`max_steps`), the steady-state stop and the save times stay options of
    the solve ([`pccore.infer`][], [`pccore.TrainStep`][]): the driver owns them.
    """

    solver: diffrax.AbstractSolver[Any] = diffrax.Euler()
    stepsize_controller: StepSizeController = diffrax.ConstantStepSize()
    t1: float = 2.0
    dt0: float | None = 0.1

    @property
    def adaptive(self) -> bool:
        """Whether the step size adapts (an adaptive step-size controller)."""
        return isinstance(self.stepsize_controller, diffrax.AbstractAdaptiveStepSizeController)

    @property
    def num_constant_steps(self) -> int:
        r"""With a constant step: the steps to `t1`, $\lceil t_1 / \mathrm{dt0} \rceil$ (the last
        one ends at `t1`)."""
        if self.adaptive or self.dt0 is None:
            raise ValueError("`GradientFlow.num_constant_steps`: the step size adapts; the "
                             "number of steps is known only after the solve.")
        return max(1, math.ceil(self.t1 / self.dt0 - 1e-9))

    def _time(self, k: Any) -> Any:
        assert self.dt0 is not None
        return jnp.minimum(k * self.dt0, self.t1)

    def init(self, fields: Fields, z0: Activities, key: PRNGKeyArray | None) -> Any:
        terms = _terms(fields)
        if not self.adaptive:
            s = self.solver.init(terms, 0.0, self._time(1), z0, None)
            return jnp.asarray(0), s
        order = self.solver.error_order(terms)
        tnext, cs = self.stepsize_controller.init(terms, 0.0, self.t1, z0, self.dt0, None,
                                                  self.solver.func, order)
        tnext = jnp.minimum(tnext, self.t1)
        s = self.solver.init(terms, 0.0, tnext, z0, None)
        return jnp.zeros((), tnext.dtype), tnext, s, cs, jnp.array(False)

    def step(self, fields: Fields, z: Activities, g: Activities,
             state: Any) -> tuple[Activities, Any]:
        terms = _terms(fields)
        if not self.adaptive:
            k, s = state
            ta, tb = self._time(k), self._time(k + 1)
            if isinstance(self.solver, diffrax.Euler):
                z1 = _euler(z, g, tb - ta)  # the gradient the driver has: no evaluation
            else:
                z1, _, _, s, _ = self.solver.step(terms, ta, tb, z, None, s, False)
            return z1, (k + 1, s)
        tprev, tnext, s, cs, jump = state
        z1, err, _, s1, _ = self.solver.step(terms, tprev, tnext, z, None, s, jump)
        err = jtu.tree_map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), err)
        order = self.solver.error_order(terms)
        ok, tprev1, tnext1, jump1, cs1, _ = self.stepsize_controller.adapt_step_size(
            tprev, tnext, z, z1, None, err, order, cs)
        tprev1, tnext1 = _clip(ok, tprev1, tnext1, self.t1)
        z1, s1 = keep(~ok, z1, z), keep(~ok, s1, s)
        return z1, (tprev1, tnext1, s1, cs1, jnp.where(ok, jump1, jump))

    def finished(self, state: Any) -> Array | None:
        if not self.adaptive:
            return state[0] >= self.num_constant_steps
        return state[0] >= self.t1

    def time(self, state: Any) -> Array:
        """The time a state of this method's steps has reached."""
        return self._time(state[0]) if not self.adaptive else state[0]


def _terms(fields: Fields) -> diffrax.ODETerm[Any]:
    return diffrax.ODETerm(lambda t, z, args: jtu.tree_map(jnp.negative, fields.grad(z)))


def _euler(z: Any, g: Any, h: Any) -> Any:
    # Euler's step written out, z + h * (-g): one fused update per activity. Going through
    # diffrax's term machinery adds elementwise passes (negate, scale, add) per activity
    # per step, which cost real time on deep, narrow networks.
    return jtu.tree_map(lambda a, b: a - (h * b).astype(a.dtype), z, g)


def _clip(ok: Any, tprev1: Any, tnext1: Any, t1: float) -> tuple[Any, Any]:
    """The controller's next interval, ending exactly at `t1` near it (as diffrax does)."""
    tprev1 = jnp.minimum(tprev1, t1)
    clipped = jnp.where(ok, t1, tprev1 + 0.5 * (t1 - tprev1))
    return tprev1, jnp.where(tnext1 > _t1_floor(t1), clipped, tnext1)


def solve_flow(flow: GradientFlow, energy: Any, model: Any, z0: Any, x: Any, y: Any, n: int,
               steady: Any, saveat: Any, progress: bool = False) -> Raw:
    """The fused route for `flow` (see the module docs); `n` the step budget; `progress`:
    diffrax's loop with a tqdm progress meter."""
    solver, controller, t1, dt0 = flow.solver, flow.stepsize_controller, flow.t1, flow.dt0
    # pccore's own loops run explicit Runge-Kutta steps; anything else (implicit solvers,
    # whose root finders take their tolerances from the controller) goes through diffrax.
    own = (saveat is None and not progress
           and isinstance(solver, diffrax.Euler | diffrax.AbstractERK))
    if flow.adaptive and own:
        return _solve_adaptive(solver, controller, energy, model, z0, x, y, t1, dt0, n, steady)
    if flow.adaptive or not own:
        return _solve_diffrax(solver, controller, energy, model, z0, x, y, t1, dt0, n, steady,
                              saveat, progress)
    return _solve_fixed(solver, energy, model, z0, x, y, t1, dt0, n, steady)


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
        return _euler(z, g, dt0 if uniform else t_of(k + 1) - t_of(k))

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
            z, s = keep(here, z1, z), keep(here, s1, s)
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
        k, tprev, _, _, _, _, _, done, bad, _, _ = c
        return (k < n) & (tprev < t1) & ~done & ~bad

    def body(c):
        k, tprev, tnext, z, s, cs, jump, _, _, ev, acc = c
        # Gradients this attempt costs: its stages, and for a first-same-as-last solver the
        # first stage too where it has no valid one (its first step, or after a jump).
        ev = ev + per_step + (jnp.asarray(_fsal_first_stage(s, jump), jnp.int32) if fsal else 0)
        z1, err, dense, s1, sres = solver.step(terms, tprev, tnext, z, args, s, jump)
        err = jtu.tree_map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), err)
        keep, tprev1, tnext1, jump1, cs1, cres = controller.adapt_step_size(
            tprev, tnext, z, z1, args, err, order, cs)
        tprev1, tnext1 = _clip(keep, tprev1, tnext1, t1)
        sel = lambda a, b: jnp.where(keep, a, b)
        z1 = jtu.tree_map(sel, z1, z)
        s1 = jtu.tree_map(sel, s1, s)
        jump1 = jnp.where(keep, jump1, jump)
        bad = (keep & (sres != diffrax.RESULTS.successful)) | (cres != diffrax.RESULTS.successful)
        new = (k + 1, tprev1, tnext1, z1, s1, cs1, jump1, keep & check(z1, s1), bad, ev,
               acc + keep)
        if not stage0:
            return new
        here = is_steady(steady, _field_at_start(dense, tnext - tprev), z)
        old = (k, tprev, tnext, z, s, cs, jump, jnp.array(True), jnp.array(False), ev, acc)
        return jtu.tree_map(lambda a, b: jnp.where(here, a, b), old, new)

    init = (0, jnp.asarray(0.0, tnext.dtype), tnext, z0, s0, cs0, jnp.array(False), check0,
            jnp.array(False), jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.int32))
    k, t, _, z, s, _, _, done, bad, ev, acc = jax.lax.while_loop(cond, body, init)
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
    return Raw(z, k, t, result, evals, accepted=acc)


def _solve_diffrax(solver, controller, energy, model, z0, x, y, t1, dt0, n, steady, saveat,
                   progress=False):
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
    if saveat is None:
        save = diffrax.SaveAt(subs=final)
    else:
        # The energy of each saved point, computed when it is saved: the cost follows the
        # points saved, not the size of the buffer (`steps=True` holds `max_steps` slots).
        sub = saveat.subs
        record = diffrax.SubSaveAt(
            t0=sub.t0, t1=sub.t1, ts=sub.ts, steps=sub.steps,
            fn=lambda t, z, args: (z, energy.per_sample(model, z, x, y).sum()))
        save = diffrax.SaveAt(subs=(final, record))
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
        progress_meter=diffrax.TqdmProgressMeter() if progress else diffrax.NoProgressMeter(),
    )
    ys, ts_ = (sol.ys, sol.ts) if saveat is None else (sol.ys[0], sol.ts[0])
    z = jtu.tree_map(lambda a: a[-1], ys)
    traj, energies = (None, None) if saveat is None else sol.ys[1]
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
    return Raw(z, k, ts_[-1], result, evals, None, ts, traj, energies=energies,
               accepted=sol.stats["num_accepted_steps"])



__all__ = ["GradientFlow", "solve_flow"]
