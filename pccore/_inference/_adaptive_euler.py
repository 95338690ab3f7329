"""An adaptive Euler method: the cheapest error-controlled solver for a gradient flow."""

from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import numpy as np

# Euler's step as the solution, Heun's (the trapezoidal rule) as the embedded comparison.
# The second stage is evaluated at the Euler solution itself, so it is the next step's
# first stage: first same as last.
_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([1.0]),),
    b_sol=np.array([1.0, 0.0]),
    b_error=np.array([0.5, -0.5]),
    c=np.array([1.0]),
)


class AdaptiveEuler(diffrax.AbstractERK):
    r"""Euler's method with an embedded error estimate: one vector-field evaluation per step.

    A diffrax solver (use it with `diffrax.PIDController`, like `diffrax.Heun()`). The step
    is explicit Euler,
    $$z_{n+1} = z_n + h\,f(z_n),$$
    and the local error is estimated by the difference to Heun's (trapezoidal) step,
    $$e_{n+1} = \tfrac{h}{2}\bigl(f(z_n) - f(z_{n+1})\bigr) = O(h^2).$$
    $f(z_{n+1})$ is also the first stage of the next step (first same as last), so an
    accepted step costs one gradient of the energy, as a constant Euler step does, where
    `diffrax.Heun()` costs two (it advances with the second-order solution and so cannot
    reuse its last stage). With a constant step size it takes exactly Euler's steps.

    On the stiff energies of predictive coding an explicit method's step is bounded by
    stability, not accuracy, and Heun's interval of stability on the real axis is no wider
    than Euler's: paying for a second-order solution buys nothing there. As with every
    explicit adaptive solver, set the controller's tolerances about 10x below the
    steady-state test's (see [`pccore.SteadyState`][]).

    Order 1; the error estimate is of order 2 (what the step-size controller uses). ODEs
    only.
    """

    tableau: ClassVar[diffrax.ButcherTableau] = _tableau
    interpolation_cls: ClassVar[
        Callable[..., diffrax.ThirdOrderHermitePolynomialInterpolation]
    ] = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms: Any) -> int:
        return 1

    def error_order(self, terms: Any) -> int:
        # diffrax's default assumes the embedded method is the lower-order one (order
        # `order`); here it is the higher: the estimate is Euler's local error, O(h^2).
        return 2
