"""Typed results of inference and training."""

import equinox as eqx
from jaxtyping import Array, Float, Int

from ._check import check_tolerances
from ._custom_types import Activities
from ._results import RESULTS


class SteadyState(eqx.Module):
    r"""Stop inference at a steady state of the vector field $f(z) = -\nabla_z \mathcal F$.

    Inference stops once, for every sample $i$ and every inference variable $l$,
    $$\lVert f_{l,i} \rVert_\infty \le \mathrm{atol} + \mathrm{rtol}\,\lVert z_{l,i} \rVert_\infty .$$
    The test is on the vector field, never on the state. Taking the max norm per sample
    and per variable makes it mean the same at any batch size and width, and a large
    output error felt by one layer is not diluted by many quiet ones.

    With an adaptive `stepsize_controller`, set these about 10x above the controller's
    tolerances: an explicit adaptive solver settles at its stability limit with a residual
    oscillation of about the controller's tolerance, which a tighter test never sees end.

    **Arguments:**

    - `rtol`, `atol`: relative and absolute tolerances (`atol > 0` or `rtol > 0`).
    """

    rtol: float = 1e-3
    atol: float = 1e-3

    def __check_init__(self) -> None:
        check_tolerances("SteadyState", self.rtol, self.atol)


class InferenceSolution(eqx.Module):
    """The outcome of [`pccore.infer`][].

    **Fields:**

    - `activities`: the final inference variables.
    - `num_steps`: steps taken (optimiser updates, or solver steps including rejected ones).
    - `energy`: the final energy $\\sum_i F_i$, a batch **sum** (as [`pccore.energy`][]);
        `mean_energy` is the batch mean, the unit of [`pccore.TrainStats`][] (see
        [Units](../concepts.md#units)).
    - `result`: a [`pccore.RESULTS`][] code.
    - `t`: the final time (for optax solvers, the number of updates).
    - `vector_field_norm`: the largest per-sample, per-variable max-norm of
        $\\nabla_z \\mathcal F$ at the final state.
    - `num_grad_evals`: evaluations of $\\nabla_z \\mathcal F$ the solver made (every stage
        of every step, rejected steps and the steady-state test included, but not an adaptive
        controller's choice of `dt0=None`;
        the final diagnostics of this solution are not counted). Exact for Euler, explicit
        Runge-Kutta solvers, optax and optimistix minimisers; -1 for other diffrax solvers.
    - `num_accepted_steps`: the steps an adaptive step-size controller accepted (equal to
        `num_steps` for every other route). A trajectory saved with
        `diffrax.SaveAt(steps=True)` holds accepted steps only: index it with this count
        (`trajectory[:num_accepted_steps]`); the slots after it hold inf.
    - `ts`, `trajectory`, `energies`: the save times, the variables at those times (each
        with a leading time axis) and the energy there (batch sums); `None` unless `saveat`
        was given.
    """

    activities: Activities
    num_steps: Int[Array, ""]
    energy: Float[Array, ""]
    result: RESULTS
    t: Float[Array, ""]
    vector_field_norm: Float[Array, ""]
    num_grad_evals: Int[Array, ""]
    ts: Float[Array, " times"] | None = None
    trajectory: Activities | None = None
    energies: Float[Array, " times"] | None = None
    num_accepted_steps: Int[Array, ""] | None = None

    @property
    def batch_size(self) -> int:
        """The number of samples $B$: the leading axis of the inference variables.

        Raises a ValueError for a solution without inference variables (a one-layer model
        with both ends clamped), which does not know its batch; divide by `x.shape[0]` there.
        """
        if not self.activities:
            raise ValueError(
                "`InferenceSolution.batch_size`: this solution has no inference variables (a "
                "one-layer model with both ends clamped), so it does not know its batch size; "
                "divide `energy` by the batch size of your data, `x.shape[0]`."
            )
        return self.activities[0].shape[0]

    @property
    def mean_energy(self) -> Float[Array, ""]:
        r"""The final energy as a batch mean, $\frac1B \sum_i F_i$ = `energy / batch_size`.

        The unit of [`pccore.TrainStats`][]`.energy`: after `pccore.train_step` with the same
        initialisation and solver options, the two are equal.
        """
        return self.energy / self.batch_size


class TrainStats(eqx.Module):
    """What one [`pccore.train_step`][] did.

    Both energies are batch **means** (see [Units](../concepts.md#units)): times the batch
    size they are [`pccore.energy`][] (a batch sum) at the same activities. Neither includes
    the parameter regularisers $R(\\theta)$; activity regularisers are included.

    **Fields:**

    - `loss`: the energy at the initial activities, batch mean, before the update. With the
        feed-forward initialisation every hidden error is zero, so this is the output loss
        of the feed-forward prediction (times the output precision, plus the activity prior
        if there is one).
    - `energy`: the energy at the inferred activities, batch mean $\\frac1B\\sum_i F_i$.
    - `num_steps`: inference steps taken.
    - `num_grad_evals`: activity-gradient evaluations of inference (see
        [`pccore.InferenceSolution`][]).
    - `result`: the inference [`pccore.RESULTS`][] code (`diverged` if the energy at the
        inferred activities is not finite).
    - `updated`: False when the update was skipped because inference diverged or the
        parameter objective was non-finite (the parameters and optimiser state are then
        unchanged).
    """

    loss: Float[Array, ""]
    energy: Float[Array, ""]
    num_steps: Int[Array, ""]
    result: RESULTS
    updated: Array
    num_grad_evals: Int[Array, ""]
