r"""Hybrid (amortised) predictive coding (Tschantz et al., 2023).

A generator $x \to y$ is trained as ordinary PC. An *amortiser* $h_1, \dots, h_L$ (any
[`pccore.PCModel`][], from any adapter) maps the observation back through guesses of the
latents, $\hat a_L = y$, $\hat a_{L-k} = h_k(\hat a_{L-k+1})$, and these guesses initialise the
generator's inference. One training step ([`pccore.hybrid_train_step`][]):

1. initialise the generator's free activities at $\hat a$ ([`pccore.Amortised`][]);
2. equilibrate, giving $z^*$; 3. update the generator with its PC gradients at $z^*$;
4. update the amortiser on
$$F_{\mathrm{amort}} = \sum_{k=1}^{L} \tfrac12 \lVert t_{L-k} - h_k(\hat a_{L-k+1}) \rVert^2,
  \qquad t_l = z^*_l\ (l \ge 1), \quad t_0 = x \text{ if given, else } z^*_0,$$
with $z^*$ and the guesses $\hat a$ held constant (for a variant that infers something other
than the activities, such as [`pccore.EPC`][], $z^*$ are the activities its variables stand
for, `energy.activities`): each amortiser layer regresses the
generator's equilibrium from the amortiser's own feed-forward guess (a local update, as in
JPC). The factor $\tfrac12$ is included (JPC omits it; that only rescales the learning rate
by 2). The parameter objective is the batch mean of $F_{\mathrm{amort}}$.
"""

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from .._check import as_batch, check_data, check_opt_state
from .._custom_types import Activities, BatchArray, Scalar, StepSizeController
from .._energy._abstract import AbstractEnergy
from .._energy._base import PC, sq_norm
from ._generative import generative_evaluate
from .._inference._infer import check_solver, with_method
from .._inference import AbstractInference
from .._energy._init import AbstractInit, Amortised, RandomNormal, amortise
from ._learn import guarded_update, update
from .._model import PCModel
from .._solution import SteadyState, TrainStats


def _check_amortiser(amortiser: Any, generator_shapes: tuple, where: str = "amortiser") -> None:
    if not isinstance(amortiser, PCModel):
        raise TypeError(f"`{where}` must be a pccore.PCModel (use pccore.wrap); got "
                        f"{type(amortiser).__name__}.")
    want = tuple(generator_shapes)
    got = tuple(s.shape for s in (amortiser.in_shape, *amortiser.out_shapes))[::-1]
    if got != want:
        raise ValueError(
            f"`{where}` maps through shapes {got[::-1]}; expected the generator's shapes "
            f"reversed, {want[::-1]} (layer k maps the guess of z_(L-k+1) to one of z_(L-k))."
        )


def _amortiser_per_sample(amortiser, z, x, y):
    L = amortiser.num_layers
    targets = z if x is None else (x, *z)  # t_0 .. t_{L-1}
    if len(targets) != L:
        raise ValueError(
            f"`activities`: got {len(targets) - (x is not None)} arrays; the amortiser has {L} "
            "layers, so expected the generator's free activities (z_1..z_(L-1), plus z_0 when "
            "`x` is None)."
        )
    guesses = jax.lax.stop_gradient(amortise(amortiser, y))  # a_0 .. a_{L-1}
    inputs = (*guesses[1:], y)  # a_1 .. a_L
    targets = jax.lax.stop_gradient(targets)
    terms = [
        sq_norm(targets[L - k] - amortiser.predict_layer(k - 1, inputs[L - k], x=y))
        for k in range(1, L + 1)
    ]
    return sum(terms)


def amortiser_energy(
    amortiser: PCModel, activities: Activities, *, x: BatchArray | None = None, y: BatchArray
) -> Scalar:
    r"""$\sum_i F_{\mathrm{amort}, i}$ (a batch sum) at the generator's activities (see module docs).

    **Arguments:**

    - `amortiser`: the amortiser network.
    - `activities`: the generator's free activities $z^*$ (with $z_0$ first when `x` is None).
    - `x`: the clamped generator input (the target of $h_L$), or None.
    - `y`: the observation.
    """
    y = jnp.asarray(y)
    x = None if x is None else jnp.asarray(x)
    return _amortiser_energy(amortiser, tuple(activities), x, y)


@eqx.filter_jit
def _amortiser_energy(amortiser, z, x, y):
    return _amortiser_per_sample(amortiser, z, x, y).sum()


class HybridStats(eqx.Module):
    """What one [`pccore.hybrid_train_step`][] did.

    **Fields:** `generator` (the generator's [`pccore.TrainStats`][], whose `loss` is the
    energy at the amortised initialisation), and `amortiser_loss` (batch mean of
    $F_{\\mathrm{amort}}$ before the amortiser update).

    All are batch **means** (see [Units](../concepts.md#units)): `amortiser_loss` times the
    batch size is [`pccore.amortiser_energy`][] (a batch sum) at the equilibrium activities,
    and `generator.loss` times the batch size is [`pccore.energy`][] at the guesses
    `pccore.amortise(amortiser, y)` of the amortiser this step was given.
    """

    generator: TrainStats
    amortiser_loss: Float[Array, ""]


@eqx.filter_jit
def _hybrid_step(gen, amort, optim, opt_state, a_optim, a_state, x, y, energy, solver,
                 controller, t1, dt0, n, steady):
    new_gen, opt_state, stats, z = update(gen, optim, opt_state, x, y, energy, solver,
                                          controller, t1, dt0, n, steady, Amortised(amort), None)
    z = energy.activities(gen, z, x)  # the targets are activities (ePC infers errors)

    def loss(params):
        return _amortiser_per_sample(amort.with_params(params), z, x, y).mean()

    a_loss, grads = jax.value_and_grad(loss)(amort.params)
    # the amortiser's update is guarded as the generator's: skipped when the generator's
    # inference diverged (its targets are then not finite) or the update would overflow
    params, a_state, _ = guarded_update(a_optim, grads, a_state, amort.params,
                                        stats.updated & jnp.isfinite(a_loss))
    return new_gen, opt_state, amort.with_params(params), a_state, HybridStats(stats, a_loss)


def hybrid_train_step(
    generator: PCModel,
    amortiser: PCModel,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    amortiser_optim: optax.GradientTransformation,
    amortiser_state: optax.OptState,
    *,
    x: BatchArray | None = None,
    y: BatchArray,
    energy: AbstractEnergy = PC(),
    method: AbstractInference | None = None,
    solver: Any = diffrax.Euler(),
    stepsize_controller: StepSizeController = diffrax.ConstantStepSize(),
    t1: float | None = None,
    dt0: float | None = 0.1,
    max_steps: int | None = None,
    steady_state: SteadyState | None = None,
) -> tuple[PCModel, optax.OptState, PCModel, optax.OptState, HybridStats]:
    """One jitted hybrid PC step: amortised init, inference, generator and amortiser updates.

    Inference starts at the guesses of `amortiser` as given to this call (never a copy held
    from an earlier step): pass the amortiser the previous step returned.

    **Arguments:** `generator`, `optim`, `opt_state`, `x`, `y`, `energy`, `method` and the
    solver options as in [`pccore.train_step`][] (the initialiser is `pccore.Amortised(amortiser)`, built
    here); `amortiser` and its optax `amortiser_optim` and `amortiser_state`.

    **Returns:** `(generator, opt_state, amortiser, amortiser_state, stats)` with a
    [`pccore.HybridStats`][].
    """
    x, y = check_data(generator, energy, x, y)
    if y is None:
        raise ValueError("`y`: hybrid PC amortises from the observation `y`; got None.")
    x_shape, _ = energy.data_shapes(generator)
    shapes = (x_shape, *(s.shape for s in energy.variable_shapes(generator, True)),
              energy.data_shapes(generator)[1])
    _check_amortiser(amortiser, shapes)
    solver = with_method(method, solver, stepsize_controller, t1, dt0)
    n, t1, dt0 = check_solver(solver, stepsize_controller, t1, dt0, max_steps, steady_state,
                              None)
    for name, o in (("optim", optim), ("amortiser_optim", amortiser_optim)):
        if not isinstance(o, optax.GradientTransformation):
            raise TypeError(f"`{name}` must be an optax GradientTransformation (e.g. "
                            f"optax.adam(1e-3)); got {type(o).__name__}.")
    states = (("opt_state", optim, opt_state, generator),
              ("amortiser_state", amortiser_optim, amortiser_state, amortiser))
    for name, o, state, m in states:
        if state is None:
            check_opt_state(o, None, m.params, name)
    try:
        return _hybrid_step(generator, amortiser, optim, opt_state, amortiser_optim,
                            amortiser_state, x, y, energy, solver, stepsize_controller, t1, dt0, n,
                            steady_state)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        for name, o, state, m in states:  # a state of another optimiser or model: name it
            check_opt_state(o, state, m.params, name)
        raise


class HybridEvaluation(eqx.Module):
    """Label accuracies of a hybrid model ([`pccore.hybrid_evaluate`][]).

    **Fields:** `amortised` (the amortiser's guess $\\hat a_0$ alone), `amortised_inference`
    (inference from the amortised initialisation), `inference` (inference from a random
    initialisation).
    """

    amortised: Float[Array, ""]
    amortised_inference: Float[Array, ""]
    inference: Float[Array, ""]


def hybrid_evaluate(
    generator: PCModel,
    amortiser: PCModel,
    y: BatchArray,
    labels: BatchArray,
    *,
    energy: AbstractEnergy = PC(),
    init: AbstractInit = RandomNormal(),
    key: PRNGKeyArray | None = None,
    **solver_options: Any,
) -> HybridEvaluation:
    """The three accuracies of a supervised hybrid model (generator: label $\\to$ data).

    **Arguments:** `generator`, `amortiser` (its current weights are used); observations `y`
    and one-hot `labels`; `energy`; `init` and `key` for the inference-alone run;
    `**solver_options` (`solver`, `t1`, `dt0`, ...) as in [`pccore.generative_evaluate`][].

    **Returns:** a [`pccore.HybridEvaluation`][].
    """
    x_shape, y_shape = energy.data_shapes(generator)
    y = as_batch("y", y, y_shape)
    labels = as_batch("labels", labels, x_shape, y.shape[0])
    shapes = (x_shape, *(s.shape for s in energy.variable_shapes(generator, True)), y_shape)
    _check_amortiser(amortiser, shapes)
    guess = amortise(amortiser, y)[0]
    amortised = jnp.mean(jnp.argmax(guess, axis=-1) == jnp.argmax(labels, axis=-1))
    with_amort = generative_evaluate(generator, y, labels, energy=energy,
                                     init=Amortised(amortiser), **solver_options)
    alone = generative_evaluate(generator, y, labels, energy=energy, init=init, key=key,
                                **solver_options)
    return HybridEvaluation(amortised, with_amort.accuracy, alone.accuracy)
