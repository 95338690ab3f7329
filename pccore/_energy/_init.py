"""Activity initialisers: where inference starts."""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .._model import PCModel


class AbstractInit(eqx.Module):
    """Chooses the initial free activities $z_l(0)$ of inference."""

    @abc.abstractmethod
    def __call__(
        self,
        model: PCModel,
        shapes: tuple[jax.ShapeDtypeStruct, ...],
        x: Array | None,
        y: Array | None,
        key: PRNGKeyArray | None,
    ) -> tuple[Array, ...]:
        """Initial values for variables of per-sample `shapes` (the batch comes from x/y)."""


class FeedForward(AbstractInit):
    r"""The feed-forward pass from the clamped input: $z_l = \mu_l(z_{l-1})$, $z_0 = x$.

    Every hidden error is then zero and the energy equals the output loss.
    Needs `x`; for a free bottom use [`pccore.RandomNormal`][].
    """

    def __call__(self, model: PCModel, shapes: tuple[jax.ShapeDtypeStruct, ...], x: Array | None,
                 y: Array | None, key: PRNGKeyArray | None) -> tuple[Array, ...]:
        if x is None:
            raise ValueError(
                "`init=FeedForward()` needs a clamped input `x`, but `x` is None (a free "
                "bottom, as in unsupervised or generative inference). Use "
                "`init=pccore.RandomNormal()` with a `key`."
            )
        zs, z = [], x
        for l in range(model.num_layers - 1):
            z = model.predict_layer(l, z, x=x)
            zs.append(z)
        return tuple(zs)


class RandomNormal(AbstractInit):
    r"""Independent $\sigma\,\mathcal{N}(0, 1)$ draws for every free variable (needs a `key`)."""

    std: float = 0.05

    def __call__(self, model: PCModel, shapes: tuple[jax.ShapeDtypeStruct, ...], x: Array | None,
                 y: Array | None, key: PRNGKeyArray | None) -> tuple[Array, ...]:
        if key is None:
            raise ValueError(
                "`key`: `init=RandomNormal()` draws random activities and needs a PRNG key, "
                "e.g. `key=jax.random.key(0)`."
            )
        B = (x if x is not None else y).shape[0]
        keys = jax.random.split(key, max(len(shapes), 1))
        return tuple(
            self.std * jax.random.normal(k, (B, *s.shape), s.dtype) for k, s in zip(keys, shapes)
        )


class Zeros(AbstractInit):
    """All free variables start at zero."""

    def __call__(self, model: PCModel, shapes: tuple[jax.ShapeDtypeStruct, ...], x: Array | None,
                 y: Array | None, key: PRNGKeyArray | None) -> tuple[Array, ...]:
        B = (x if x is not None else y).shape[0]
        return tuple(jnp.zeros((B, *s.shape), s.dtype) for s in shapes)


def amortise(amortiser: PCModel, y: Array) -> tuple[Array, ...]:
    r"""The amortiser's guesses $(\hat a_0, \hat a_1, \dots, \hat a_{L-1})$ of the latents from `y`.

    **Arguments:**

    - `amortiser`: a [`pccore.PCModel`][] mapping the top $y$ back through every latent
        ($\hat a_L = y$, $\hat a_{L-k} = h_k(\hat a_{L-k+1})$).
    - `y`: a batch of observations.

    **Returns:** the guesses bottom first, each with the batch axis.
    """
    guesses = [y]
    for l in range(amortiser.num_layers):
        guesses.append(amortiser.predict_layer(l, guesses[-1], x=y))
    return tuple(guesses[1:][::-1])


def _model_amortiser(model: Any) -> PCModel:
    """The amortiser a model carries (its `amortiser` attribute), or a ValueError saying why not."""
    amortiser = getattr(model, "amortiser", None)
    if isinstance(amortiser, PCModel):
        return amortiser
    got = type(model).__name__
    if amortiser is not None:
        got += f" whose `amortiser` is a {type(amortiser).__name__}"
    else:
        got += " without an `amortiser`"
    raise ValueError(
        "`init=pccore.Amortised()` (no `amortiser` argument) reads the amortiser from the model "
        f"it initialises, at every call; got a {got}. Expected a model that carries one, such "
        "as a pccore.Bidirectional (its `backward` network) under `energy=pccore.BPC()`. For "
        "hybrid PC's generator pass the current amortiser where inference runs: "
        "`init=pccore.Amortised(amortiser)` built at that call (not once before a training "
        "loop), or use pccore.hybrid_train_step / pccore.hybrid_evaluate, which take the "
        "amortiser at every call."
    )


class Amortised(AbstractInit):
    r"""Initialise inference at an amortiser's guesses $\hat a$ of the latents (from `y`).

    Two forms:

    - `Amortised()`: reads the amortiser **from the model it initialises, at every call**, so
        it always uses the weights the model has now. The model must carry one as its
        `amortiser` (a [`pccore.Bidirectional`][] does: its `backward` network, with the
        parameterisation of [`pccore.BPC`][] applied). Build it once, e.g.
        `pccore.TrainStep(optim, energy=pccore.BPC(), init=pccore.Amortised())`, and it never
        goes stale while the backward network trains.
    - `Amortised(amortiser)`: a **snapshot** of that amortiser. Like every JAX pytree it holds
        the weights it was built with; training the amortiser afterwards does not change it.
        Build it where inference runs, from the current amortiser,
        `pccore.infer(generator, y=y, init=pccore.Amortised(amortiser))` (this does not
        recompile: the amortiser's weights are arrays of the jitted call), not once before a
        training loop. [`pccore.hybrid_train_step`][] and [`pccore.hybrid_evaluate`][] take the
        amortiser at every call and build it themselves.

    **Arguments:**

    - `amortiser`: a [`pccore.PCModel`][] mapping the generator's top back to its bottom
        through every latent (shapes: the generator's, reversed), or None (the default) to
        read the model's own at call time.
    """

    amortiser: PCModel | None = None

    def __check_init__(self) -> None:
        if self.amortiser is not None and not isinstance(self.amortiser, PCModel):
            raise TypeError(
                "`amortiser` must be a pccore.PCModel (use pccore.wrap) or None (read the "
                f"model's own at call time); got {type(self.amortiser).__name__}."
            )

    def __call__(self, model: PCModel, shapes: tuple[jax.ShapeDtypeStruct, ...], x: Array | None,
                 y: Array | None, key: PRNGKeyArray | None) -> tuple[Array, ...]:
        if y is None:
            raise ValueError("`init=Amortised(...)` maps `y` to the latents; `y` is None.")
        amortiser = _model_amortiser(model) if self.amortiser is None else self.amortiser
        guesses = amortise(amortiser, y)
        if len(guesses) < len(shapes):
            raise ValueError(
                f"`Amortised`: the amortiser has {len(guesses)} layers, so it guesses "
                f"{len(guesses)} latents; the energy has {len(shapes)} inference variables. "
                "Use an amortiser with one layer per generator layer (the generator's shapes "
                "reversed)."
            )
        guesses = guesses[len(guesses) - len(shapes):]
        for i, (g, s) in enumerate(zip(guesses, shapes)):
            if g.shape[1:] != s.shape:
                raise ValueError(
                    f"`Amortised`: the amortiser's guess for variable {i} has per-sample shape "
                    f"{g.shape[1:]}; the energy expects {s.shape}."
                )
        return tuple(g.astype(s.dtype) for g, s in zip(guesses, shapes))
