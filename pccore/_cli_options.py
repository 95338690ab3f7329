"""What the command-line names mean: variants, parameterisations, losses and solvers as objects.

Each registry maps a CLI name to a small factory, so a new variant or solver is one entry.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import optax

from ._energy import PC, AbstractEnergy
from ._evaluate import evaluate
from ._init import AbstractInit, FeedForward
from ._learn import train_step
from ._loss import MSE, CrossEntropy
from ._model import PCModel
from ._parameterisation import NTP, SP, MuPC


class CLIError(Exception):
    """A bad command-line value: printed as `pccore: error: ...`, exit status 2."""


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Everything [`pccore.infer`][] needs about the solver, as the CLI chose it."""

    name: str
    solver: Any
    stepsize_controller: diffrax.AbstractStepSizeController
    t1: float
    dt0: float | None
    max_steps: int | None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(
            solver=self.solver, stepsize_controller=self.stepsize_controller, t1=self.t1,
            dt0=self.dt0, max_steps=self.max_steps,
        )

    @property
    def adaptive(self) -> bool:
        return isinstance(self.stepsize_controller, diffrax.AbstractAdaptiveStepSizeController)

    @property
    def is_optax(self) -> bool:
        return isinstance(self.solver, optax.GradientTransformation)

    def save_times(self, points: int = 21) -> jax.Array:
        """Times at which to record the energy along a solve (update counts for optax)."""
        import jax.numpy as jnp

        if self.is_optax:
            return jnp.arange(self.max_steps + 1)
        if self.adaptive:
            return jnp.linspace(0.0, self.t1, points)
        n = round(self.t1 / self.dt0)
        return jnp.minimum(jnp.arange(n + 1) * self.dt0, self.t1)


_ODE = {"euler": diffrax.Euler, "heun": diffrax.Heun, "tsit5": diffrax.Tsit5}
_OPTAX = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.5),
    "adam": lambda lr: optax.adam(lr),
}
SOLVERS = (*_ODE, *_OPTAX)
"""Solver names: diffrax ODE solvers (Tsit5 with adaptive steps) and optax optimisers."""


def make_solver(name: str, *, steps: int, dt0: float, t1: float | None, rtol: float,
                atol: float) -> SolverConfig:
    """The solver `name` with `steps` steps of size `dt0` (`t1 = steps * dt0` unless given).

    `euler`, `heun`: constant steps. `tsit5`: a PID controller with `rtol`/`atol`, starting
    from `dt0`, up to `t1`. `sgd`, `momentum`, `adam`: `steps` optax updates with learning rate
    `dt0` (`sgd` is then Euler with the same `dt0`).
    """
    if steps < 1:
        raise CLIError(f"--steps must be a positive integer; got {steps}.")
    if dt0 <= 0:
        raise CLIError(f"--dt0 must be positive; got {dt0}.")
    if t1 is not None and t1 <= 0:
        raise CLIError(f"--t1 must be positive; got {t1}.")
    if name in _OPTAX:
        return SolverConfig(name, _OPTAX[name](dt0), diffrax.ConstantStepSize(), steps * dt0,
                            None, steps)
    if name not in _ODE:
        raise CLIError(f"--solver: unknown solver {name!r}; choose from {', '.join(SOLVERS)}.")
    horizon = steps * dt0 if t1 is None else t1
    if name == "tsit5":
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        return SolverConfig(name, diffrax.Tsit5(), controller, horizon, dt0, 4096)
    if t1 is not None:
        steps = max(1, round(t1 / dt0))
        dt0 = t1 / steps
    return SolverConfig(name, _ODE[name](), diffrax.ConstantStepSize(), horizon, dt0, None)


LOSSES = {"ce": CrossEntropy, "mse": MSE}
PARAMETERISATIONS = ("sp", "ntp", "mupc")


def make_parameterisation(name: str, *, gamma: float, output_precision: float):
    """`sp`, `ntp` or `mupc` (with its `gamma`), each with the output precision λ."""
    if name == "sp":
        return SP(output_precision=output_precision)
    if name == "ntp":
        return NTP(output_precision=output_precision)
    if name == "mupc":
        return MuPC(gamma=gamma, output_precision=output_precision)
    raise CLIError(
        f"--parameterisation: unknown value {name!r}; choose from {', '.join(PARAMETERISATIONS)}."
    )


class AbstractVariant(eqx.Module):
    """How the CLI trains and scores one predictive coding variant.

    `step` runs one training step on a batch, `accuracy` scores the model on labelled data.
    A variant whose roles of `x` and `y` differ (generative PC) or that trains a second network
    (hybrid PC) overrides them.
    """

    energy: eqx.AbstractVar[AbstractEnergy]
    init: eqx.AbstractVar[AbstractInit]

    def step(self, model: PCModel, optim, opt_state, x, y, solver: SolverConfig, key):
        return train_step(model, optim, opt_state, x=x, y=y, energy=self.energy, init=self.init,
                          key=key, **solver.kwargs)

    def accuracy(self, model: PCModel, x, y) -> float:
        return float(evaluate(model, x, y, energy=self.energy).accuracy)


class Discriminative(AbstractVariant):
    """Standard PC: input clamped at the bottom, label at the top; feed-forward prediction."""

    energy: AbstractEnergy
    init: AbstractInit = FeedForward()


def _pc(loss, parameterisation) -> AbstractVariant:
    return Discriminative(PC(loss=loss, parameterisation=parameterisation))


VARIANT_NAMES = ("pc", "generative", "hybrid", "bidirectional", "epc")
"""Every variant the CLI knows by name."""

VARIANTS: dict[str, Callable[..., AbstractVariant]] = {"pc": _pc}
"""`factory(loss, parameterisation) -> AbstractVariant` per variant in this build."""


def make_variant(name: str, *, loss: str, parameterisation) -> AbstractVariant:
    if name not in VARIANT_NAMES:
        raise CLIError(f"--variant: unknown variant {name!r}; choose from {', '.join(VARIANT_NAMES)}.")
    if name not in VARIANTS:
        raise CLIError(
            f"--variant {name}: this build of pccore does not provide the {name!r} variant yet; "
            f"available: {', '.join(VARIANTS)}."
        )
    return VARIANTS[name](LOSSES[loss](), parameterisation)
