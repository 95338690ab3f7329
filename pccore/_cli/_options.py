"""What the command-line names mean: variants, parameterisations, losses and solvers as objects.

Each registry maps a CLI name to a small factory, so a new variant or solver is one entry.
"""

import abc
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._custom_types import StepSizeController
from .._energy._bidirectional import BPC, Bidirectional
from .._energy._abstract import AbstractEnergy
from .._energy._base import PC
from .._energy._epc import EPC
from .._train._evaluate import evaluate
from .._train._hybrid import Amortised, hybrid_evaluate, hybrid_train_step
from .._inference._infer import infer
from .._inference import AbstractInference, GradientFlow, OptaxInference
from .._energy._init import AbstractInit, FeedForward, RandomNormal
from .._train._train_step import train_step
from .._energy._loss import MSE, CrossEntropy
from .._model import PCModel
from .._energy._parameterisation import NTP, SP, MuPC
from .._inference._adaptive_euler import AdaptiveEuler


class CLIError(Exception):
    """A bad command-line value: printed as `pccore: error: ...`, exit status `status` (2)."""

    status: int = 2


class TrainingFailed(CLIError):
    """The run went through but learnt nothing (every update skipped): exit status 1."""

    status = 1


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """The inference method the CLI chose (`--solver` and its options) and its step budget."""

    name: str
    method: AbstractInference
    max_steps: int | None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(solver=self.method, max_steps=self.max_steps)

    @property
    def flow(self) -> GradientFlow | None:
        return self.method if isinstance(self.method, GradientFlow) else None

    @property
    def adaptive(self) -> bool:
        return self.flow is not None and self.flow.adaptive

    @property
    def is_optax(self) -> bool:
        return self.flow is None

    @property
    def t1(self) -> float:
        assert self.flow is not None
        return self.flow.t1

    @property
    def dt0(self) -> float:
        assert self.flow is not None and self.flow.dt0 is not None
        return self.flow.dt0

    def save_times(self, points: int = 21) -> jax.Array:
        """Times at which to record the energy along a solve (update counts for optax)."""
        import jax.numpy as jnp

        if self.is_optax:
            assert self.max_steps is not None
            return jnp.arange(self.max_steps + 1)
        if self.adaptive:
            return jnp.linspace(0.0, self.t1, points)
        n = round(self.t1 / self.dt0)
        return jnp.minimum(jnp.arange(n + 1) * self.dt0, self.t1)


_ODE = {"euler": diffrax.Euler, "heun": diffrax.Heun, "tsit5": diffrax.Tsit5,
        "adaptive-euler": AdaptiveEuler}
_ADAPTIVE = ("tsit5", "adaptive-euler")
_OPTAX = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.5),
    "adam": lambda lr: optax.adam(lr),
}
SOLVERS = (*_ODE, *_OPTAX)
"""Solver names: diffrax ODE solvers (Tsit5 and AdaptiveEuler with adaptive steps) and optax
optimisers."""


def make_solver(name: str, *, steps: int, dt0: float, t1: float | None, rtol: float,
                atol: float) -> SolverConfig:
    """The solver `name` with `steps` steps of size `dt0` (`t1 = steps * dt0` unless given).

    `euler`, `heun`: constant steps. `tsit5`, `adaptive-euler` ([`pccore.AdaptiveEuler`][]):
    a PID controller with `rtol`/`atol`, starting from `dt0`, up to `t1`. `sgd`, `momentum`,
    `adam`: `steps` optax updates with learning rate `dt0` (`sgd` is then Euler with the same
    `dt0`).
    """
    if steps < 1:
        raise CLIError(f"--steps must be a positive integer; got {steps}.")
    if not (dt0 > 0 and math.isfinite(dt0)):
        raise CLIError(f"--dt0 must be a finite positive number; got {dt0}.")
    if t1 is not None and not (t1 > 0 and math.isfinite(t1)):
        raise CLIError(f"--t1 must be a finite positive number; got {t1}.")
    horizon = steps * dt0 if t1 is None else t1
    if not math.isfinite(horizon):
        raise CLIError(
            f"--steps {steps} x --dt0 {dt0:g} overflows to t1 = {horizon:g}; expected a finite "
            "horizon. Lower --dt0 or --steps."
        )
    if not math.isfinite(horizon / dt0):
        raise CLIError(
            f"--t1 {horizon:g} holds too many steps of --dt0 {dt0:g} (t1 / dt0 = "
            f"{horizon / dt0:g}); expected a finite number. Lower --t1 or raise --dt0."
        )
    if name in _OPTAX:
        if t1 is not None:
            raise CLIError(
                f"--t1 {t1:g}: the optax solver {name!r} takes --steps updates of the activities "
                "and has no time horizon; drop --t1 and set --steps."
            )
        return SolverConfig(name, OptaxInference(_OPTAX[name](dt0)), steps)
    if name not in _ODE:
        raise CLIError(f"--solver: unknown solver {name!r}; choose from {', '.join(SOLVERS)}.")
    if name in _ADAPTIVE:
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        return SolverConfig(name, GradientFlow(_ODE[name](), controller, horizon, dt0), 4096)
    if t1 is not None:
        steps = max(1, round(t1 / dt0))
        dt0 = t1 / steps
    return SolverConfig(name, GradientFlow(_ODE[name](), t1=horizon, dt0=dt0), None)


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

    `roles(x, y)` says what is clamped at the bottom and the top during training,
    `layer_sizes` the widths from bottom to top, `step` runs one training step and `accuracy`
    scores the model on labelled data (`x` the inputs, `y` one-hot labels).
    """

    energy: eqx.AbstractVar[AbstractEnergy]
    init: eqx.AbstractVar[AbstractInit]

    #: whether a backprop reference on the same network makes sense (`pccore compare`)
    has_backprop_reference: ClassVar[bool] = True

    @property
    def backprop_energy(self) -> AbstractEnergy:
        """The energy whose `prepare`, `predict` and `output_loss` train and score the backprop
        reference of `pccore compare`, on a plain network with `network(model)`'s layout."""
        return self.energy

    def roles(self, x, y):
        return x, y

    def layer_sizes(self, num_features: int, hidden: Sequence[int], num_classes: int):
        return (num_features, *hidden, num_classes)

    def make_model(self, build: Callable[[Sequence[int], int], PCModel], sizes: Sequence[int]):
        """The model to train; `build(sizes, k)` wraps a native MLP with the `k`-th weights."""
        return build(sizes, 0)

    def network(self, model) -> PCModel:
        """The network whose weights `pccore compare` reports and compares."""
        return model

    def init_opt(self, optim, model):
        return optim.init(model.params)

    def inference_setup(self, model):
        """The model and initialiser one inference solve runs on (for the energy trace)."""
        return model, self.init

    def step(self, model: PCModel, optim, opt_state, x, y, solver: SolverConfig, key):
        bottom, top = self.roles(x, y)
        return train_step(model, optim, opt_state, x=bottom, y=top, energy=self.energy,
                          init=self.init, key=key, **solver.kwargs)

    @abc.abstractmethod
    def accuracy(self, model: PCModel, x, y) -> float:
        """Test accuracy on inputs `x` and one-hot labels `y`."""


class Discriminative(AbstractVariant):
    """Standard PC: input clamped at the bottom, label at the top; feed-forward prediction."""

    energy: AbstractEnergy
    init: AbstractInit = FeedForward()

    def accuracy(self, model, x, y):
        return float(evaluate(model, x, y, energy=self.energy).accuracy)


class Generative(AbstractVariant):
    r"""Supervised generative PC: the label is clamped at the bottom ($z_0$), the image at the top.

    To classify, the image is clamped, $z_0$ is freed and initialised with
    [`pccore.RandomNormal`][], inference runs for `eval_t1` with Euler steps `eval_dt0`, and
    the prediction is $\arg\max z_0$.
    """

    energy: AbstractEnergy
    init: AbstractInit = FeedForward()
    eval_t1: float = 100.0
    eval_dt0: float = 0.1

    has_backprop_reference: ClassVar[bool] = False

    def roles(self, x, y):
        return y, x

    def layer_sizes(self, num_features, hidden, num_classes):
        return (num_classes, *hidden, num_features)

    def accuracy(self, model, x, y):
        sol = infer(model, x=None, y=x, energy=self.energy, init=RandomNormal(0.05),
                    key=jax.random.key(0), t1=self.eval_t1, dt0=self.eval_dt0)
        labels = jnp.argmax(sol.activities[0], axis=-1)
        return float(jnp.mean(labels == jnp.argmax(y, axis=-1)))


class BidirectionalVariant(Discriminative):
    """Bidirectional PC: a forward network x -> y and a backward network y -> x over the same
    latents; classification is the forward network's feed-forward pass.

    The backprop reference of `pccore compare` trains the forward network alone (same
    starting weights, squared error, parameterisation), the network that classifies."""

    def make_model(self, build, sizes):
        return Bidirectional(build(sizes, 0), build(tuple(sizes)[::-1], 1))

    def network(self, model):
        return model.forward

    @property
    def backprop_energy(self):
        # BPC predicts with the parameterised forward network and scores it with MSE: PC on
        # the forward network alone does the same
        return PC(loss=MSE(), parameterisation=self.energy.parameterisation)

    def accuracy(self, model, x, y):
        return float(evaluate(model.forward, x, y, energy=self.backprop_energy).accuracy)


class Hybrid(Generative):
    r"""Hybrid (amortised) PC: a generator label -> image and an amortiser image -> label that
    initialises inference. Accuracy is that of amortised initialisation plus inference."""

    init: AbstractInit = RandomNormal(0.05)
    has_backprop_reference: ClassVar[bool] = False

    def make_model(self, build, sizes):
        return HybridPair(build(sizes, 0), build(tuple(sizes)[::-1], 1))

    def network(self, model):
        return model.generator

    def init_opt(self, optim, model):
        return optim.init(model.generator.params), optim.init(model.amortiser.params)

    def inference_setup(self, model):
        return model.generator, Amortised(model.amortiser)

    def step(self, model, optim, opt_state, x, y, solver, key):
        bottom, top = self.roles(x, y)
        gen, s_gen, amort, s_amort, stats = hybrid_train_step(
            model.generator, model.amortiser, optim, opt_state[0], optim, opt_state[1],
            x=bottom, y=top, energy=self.energy, **solver.kwargs,
        )
        return HybridPair(gen, amort), (s_gen, s_amort), stats.generator

    def accuracy(self, model, x, y):
        ev = hybrid_evaluate(model.generator, model.amortiser, x, y, energy=self.energy,
                             key=jax.random.key(0), t1=self.eval_t1, dt0=self.eval_dt0)
        return float(ev.amortised_inference)


class HybridPair(eqx.Module):
    """The generator and amortiser of a hybrid run, kept together by the CLI."""

    generator: PCModel
    amortiser: PCModel


def _epc(loss, parameterisation) -> AbstractVariant:
    return Discriminative(EPC(loss=LOSSES[loss or "ce"](), parameterisation=parameterisation))


def _bidirectional(loss, parameterisation) -> AbstractVariant:
    if loss == "ce":
        raise CLIError("--loss ce: bidirectional PC uses squared errors; use --loss mse (the "
                       "default for this variant).")
    return BidirectionalVariant(BPC(parameterisation=parameterisation))


def _hybrid(loss, parameterisation) -> AbstractVariant:
    if loss == "ce":
        raise CLIError("--loss ce: a generative model predicts images; use --loss mse (the default).")
    return Hybrid(PC(loss=MSE(), parameterisation=parameterisation))


def _pc(loss, parameterisation) -> AbstractVariant:
    return Discriminative(PC(loss=LOSSES[loss or "ce"](), parameterisation=parameterisation))


def _generative(loss, parameterisation) -> AbstractVariant:
    if loss == "ce":
        raise CLIError("--loss ce: a generative model predicts images; use --loss mse (the default).")
    return Generative(PC(loss=MSE(), parameterisation=parameterisation))


VARIANT_NAMES = ("pc", "generative", "hybrid", "bidirectional", "epc")
"""Every variant the CLI knows by name."""

VARIANTS: dict[str, Callable[..., AbstractVariant]] = {
    "pc": _pc,
    "generative": _generative,
    "hybrid": _hybrid,
    "bidirectional": _bidirectional,
    "epc": _epc,
}
"""`factory(loss name or None, parameterisation) -> AbstractVariant` per variant in this build
(None: the variant's own default loss)."""


def make_variant(name: str, *, loss: str | None, parameterisation) -> AbstractVariant:
    if name not in VARIANT_NAMES:
        raise CLIError(f"--variant: unknown variant {name!r}; choose from {', '.join(VARIANT_NAMES)}.")
    if name not in VARIANTS:
        raise CLIError(
            f"--variant {name}: this build of pccore does not provide the {name!r} variant yet; "
            f"available: {', '.join(VARIANTS)}."
        )
    return VARIANTS[name](loss, parameterisation)
