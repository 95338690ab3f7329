"""A downstream package written on pccore's public API, type-checked with `pyright --strict`
in CI (`.ci/typecheck`): every name here must have a known type. Not run by pytest."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import ArrayLike

import pccore
import pccore.testing
from pccore import datasets, theory


class ScaledPC(pccore.AbstractChainEnergy):
    """A downstream variant: PC with its hidden errors scaled."""

    scale: float = 2.0
    loss: pccore.AbstractLoss = pccore.MSE()
    parameterisation: pccore.AbstractParameterisation = pccore.SP()
    activity_decay: float | ArrayLike = 0.0
    regularisers: tuple[pccore.AbstractRegulariser, ...] = ()

    def layer_energies(self, model: pccore.PCModel, variables: tuple[jax.Array, ...],
                       x: jax.Array | None, y: jax.Array | None) -> jax.Array:
        z = (x, *variables) if x is not None else variables
        terms = [self.scale * pccore.sq_norm(z[l + 1] - model.predict_layer(l, z[l], x=x))
                 for l in range(model.num_layers - 1)]
        terms.append(self.output(model, z[-1], x, y))
        return jnp.stack(terms, axis=1)

    def init(self, model: pccore.PCModel, x: jax.Array | None, y: jax.Array | None,
             initialiser: pccore.AbstractInit, key: jax.Array | None) -> tuple[jax.Array, ...]:
        return initialiser(model, self.variable_shapes(model, x is not None), x, y, key)

    def layer_inputs(self, model: pccore.PCModel, variables: tuple[jax.Array, ...],
                     x: jax.Array | None) -> tuple[jax.Array, ...]:
        return ((x, *variables) if x is not None else variables)[: model.num_layers]


class LearnedScalePC(ScaledPC):
    """A downstream variant with a trainable parameter of its own (`model.energy_params`)."""

    def init_params(self, model: pccore.PCModel) -> np.ndarray:
        return np.zeros((), np.float32)  # the log of the scale

    def layer_energies(self, model: pccore.PCModel, variables: tuple[jax.Array, ...],
                       x: jax.Array | None, y: jax.Array | None) -> jax.Array:
        log_scale: jax.Array = model.energy_params
        return jnp.exp(log_scale) * super().layer_energies(model, variables, x, y)


def train_energy_params(x: jax.Array, y: jax.Array) -> jax.Array:
    energy = LearnedScalePC()
    model = pccore.wrap(eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(0)))
    model = model.with_energy_params(energy.init_params(model))
    optim = optax.sgd(1e-2)
    opt_state = optim.init(model.trainable)
    model, opt_state, _ = pccore.train_step(model, optim, opt_state, x=x, y=y, energy=energy)
    model = model.with_trainable(model.trainable)
    return model.energy_params


def train(x: jax.Array, y: jax.Array) -> float:
    mlp = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(0))
    model = pccore.wrap(mlp)
    energy = pccore.PC(loss=pccore.CrossEntropy(), parameterisation=pccore.MuPC())
    step = pccore.TrainStep(optax.adam(1e-3), energy=energy, solver=pccore.AdaptiveEuler(),
                            stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3),
                            steady_state=pccore.SteadyState(1e-3, 1e-3))
    opt_state = step.init(model)
    model, opt_state, stats = step(model, opt_state, x=x, y=y)
    ok = bool(stats.updated) and bool(stats.result == pccore.RESULTS.converged)
    sol = pccore.infer(model, x=x, y=y, energy=ScaledPC())
    e = pccore.energy(model, sol.activities, x=x, y=y)
    grads = pccore.param_grads(model, sol.activities, x=x, y=y)
    model = model.with_params(grads).eval().train()
    ev = pccore.evaluate(model, x, y)
    pccore.clear_caches()
    mlp_back = model.unwrap()
    state = model.unwrap_state()
    del mlp_back, state
    return float(stats.energy) + float(e) + float(ev.accuracy) + float(ok)


def data() -> tuple[np.ndarray, np.ndarray]:
    d = datasets.load_digits(seed=0)
    return d.x_train, d.y_train


def linear_equilibrium(model: pccore.PCModel, x: jax.Array, y: jax.Array) -> jax.Array:
    return theory.linear_equilibrium_activities(model, x, y)[0]


def conformance() -> None:
    def build(kind: str, weights: pccore.testing.Weights,
              activation: pccore.testing.Activation) -> pccore.testing.Built:  # noqa
        return pccore.testing.equinox_reference(kind, weights, activation)

    pccore.testing.check_conformance(build, "mlp")


class HalfMSE(pccore.AbstractLoss):
    """A downstream output loss."""

    def __call__(self, prediction: jax.Array, target: jax.Array) -> jax.Array:
        return 0.25 * jnp.sum(jnp.square(target - prediction).reshape(target.shape[0], -1), axis=1)


class Ones(pccore.AbstractInit):
    """A downstream initialiser."""

    def __call__(self, model: pccore.PCModel, shapes: tuple[jax.ShapeDtypeStruct, ...],
                 x: jax.Array | None, y: jax.Array | None,
                 key: jax.Array | None) -> tuple[jax.Array, ...]:
        return tuple(z + 1.0 for z in pccore.Zeros()(model, shapes, x, y, key))


class L1(pccore.AbstractRegulariser):
    """A downstream regulariser."""

    coef: float = 1e-3

    def matrix_penalty(self, W: jax.Array) -> jax.Array:
        return self.coef * jnp.sum(jnp.abs(W))


class Halved(pccore.AbstractParameterisation):
    """A downstream parameterisation."""

    output_precision: float | ArrayLike = 1.0

    def scaling(self, fan_in: int, position: str, skip: bool, num_layers: int) -> float:
        return 0.5


def configured() -> list[pccore.AbstractEnergy]:
    """Every public configuration object built with keyword arguments."""
    pc = pccore.PC(loss=HalfMSE(), parameterisation=pccore.NTP(output_precision=2.0),
                   activity_decay=0.1,
                   regularisers=(pccore.WeightDecay(coef=1e-4), pccore.SpectralPenalty(coef=1e-3),
                                 L1(coef=1e-2)))
    epc = pccore.EPC(loss=pccore.MSE(), parameterisation=pccore.MuPC(gamma=2.0, output_precision=1.0))
    bpc = pccore.BPC(alpha_f=1.0, alpha_b=0.5, parameterisation=Halved(), activity_decay=0.0)
    graph = pccore.GraphPC(loss=pccore.CrossEntropy(), output_precision=1.0, activity_decay=0.0)
    inits: list[pccore.AbstractInit] = [pccore.RandomNormal(std=0.1), pccore.Zeros(),
                                        pccore.FeedForward(), pccore.Amortised(amortiser=None), Ones()]
    steady = pccore.SteadyState(rtol=1e-3, atol=1e-4)
    del inits, steady
    return [pc, epc, bpc, graph, ScaledPC(scale=3.0, activity_decay=0.1)]
