"""Result codes of an inference solve."""

import equinox as eqx


class RESULTS(eqx.Enumeration):
    """How an inference solve ended (`InferenceSolution.result`).

    - `completed`: ran its whole budget (`t1`, or `max_steps` optimiser steps); no
        steady-state test was asked for.
    - `converged`: stopped at a steady state: the vector field met the tolerance.
    - `not_converged`: a steady-state test was asked for, and `t1` came first.
    - `max_steps_reached`: the step budget ran out before `t1` or before convergence.
    - `diverged`: the activities or the energy became non-finite (NaN/inf).
    - `minimiser_failed`: an optimistix minimiser reported a failure.
    - `energy_increased`: the solve ended with a higher energy than it started from (beyond
        rounding): the steps are too large for the model's stiffest direction, so the
        discretised flow is unstable (normalisation layers such as LayerNorm make the energy
        stiff). Gradient flow never raises the energy.
    """

    completed = "Inference ran its whole budget (`t1`, or `max_steps` optimiser steps)."
    converged = "Inference stopped at a steady state: the vector field met the tolerance."
    not_converged = (
        "Inference reached `t1` before the vector field met the steady-state tolerance. "
        "Increase `t1`, or loosen `SteadyState(rtol, atol)`."
    )
    max_steps_reached = (
        "Inference used all `max_steps` steps before reaching `t1` or a steady state. Increase "
        "`max_steps`, or use a larger step size."
    )
    diverged = (
        "Inference diverged: the activities or the energy became non-finite (NaN/inf). Lower "
        "the step size (`dt0`, or the optax learning rate), use an adaptive stepsize_controller, "
        "or check the data and weights for NaN/inf."
    )
    minimiser_failed = (
        "The optimistix minimiser reported a failure (e.g. its line search found no decrease, "
        "or a non-finite value). Check `solution.result`; try another minimiser "
        "(optx.NonlinearCG, optx.BFGS) or looser tolerances."
    )
    energy_increased = (
        "Inference raised the energy above its starting value: the steps are too large for "
        "this model (stiff layers such as LayerNorm or BatchNorm make the energy stiff), so the "
        "discretised flow is unstable. Use a smaller `dt0` (or optax learning rate), an adaptive "
        "solver (`solver=pccore.AdaptiveEuler()` with "
        "`stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3)`); for a deep network "
        "in the standard parameterisation, muPC (`pccore.PC(parameterisation=pccore.MuPC())`), "
        "and with muPC already, a smaller `gamma` or more, smaller steps."
    )
