r"""Bidirectional predictive coding (bPC; Oliviers et al., arXiv 2505.23415).

A forward network $f_l: z_{l-1} \to z_l$ ($l = 1..L$) and a backward network
$g_l: z_{l+1} \to z_l$ ($l = 0..L-1$) predict the same activities:
$$F = \alpha_f \Big[\sum_{l=1}^{L-1} \tfrac12\lVert z_l - f_l(z_{l-1})\rVert^2
        + \tfrac{\lambda}2\lVert y - f_L(z_{L-1})\rVert^2\Big]
    + \alpha_b \Big[\tfrac{\lambda}2\lVert z_0 - g_0(z_1)\rVert^2
        + \sum_{l=1}^{L-1} \tfrac12\lVert z_l - g_l(z_{l+1})\rVert^2\Big]$$
with $z_0 = x$ (clamped, or a free variable when `x=None`) and $z_L = y$ (clamped). The
forward output term reads $z_{L-1}$ and the backward input term reads $z_1$. With
$\alpha_b = 0$ this is $\alpha_f$ times [`pccore.PC`][] on $f$; with $\alpha_f = 0$ it is
$\alpha_b$ times PC on $g$ with the roles of $x$ and $y$ swapped (so $\lambda$ weighs each
network's own output term).
"""

# BPC's methods take a Bidirectional, not the PCModel of AbstractEnergy's signatures
# pyright: reportIncompatibleMethodOverride=false

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._check import check_option
from ._parts import check_energy_parts
from .._custom_types import Activities, Params, Scalar
from ._abstract import AbstractEnergy
from ._base import add_activity_decay, chain_variable_shapes, sq_norm
from ._init import AbstractInit, Amortised
from ._loss import MSE
from .._model import AbstractPCModel, PCModel
from ._parameterisation import SP, AbstractParameterisation
from ._regularise import AbstractRegulariser, penalty


class Bidirectional(AbstractPCModel):
    """A forward and a backward network over the same activities, trained together.

    **Arguments:**

    - `forward`: a [`pccore.PCModel`][] $x = z_0 \\to z_1 \\to \\dots \\to z_L = y$.
    - `backward`: a [`pccore.PCModel`][] $y = z_L \\to z_{L-1} \\to \\dots \\to z_0$, with as
        many layers; its layer $j$ is $g_{L-1-j}$.

    `params` is `(forward.params, backward.params)`, the tree an optimiser trains, and
    `unwrap()` returns both native models. The backward network is also the model's
    `amortiser`: `init=pccore.Amortised()` starts inference at its sweep down from `y`, with
    the weights the model has at that call.
    """

    forward: PCModel
    backward: PCModel

    def __check_init__(self) -> None:
        f, b = self.forward, self.backward
        if not (isinstance(f, PCModel) and isinstance(b, PCModel)):
            raise TypeError(
                "`forward` and `backward` must be pccore.PCModel (use pccore.wrap); got "
                f"{type(f).__name__} and {type(b).__name__}."
            )
        want = tuple(s.shape for s in (f.in_shape, *f.out_shapes))
        got = tuple(s.shape for s in (b.in_shape, *b.out_shapes))[::-1]
        if got != want:
            raise ValueError(
                f"`backward` maps through shapes {got[::-1]}; expected the forward shapes "
                f"reversed, {want[::-1]} (the backward network maps y back to x through the "
                "same latents)."
            )

    @property
    def params(self) -> tuple[tuple[Params, ...], tuple[Params, ...]]:
        return (self.forward.params, self.backward.params)

    @property
    def num_layers(self) -> int:
        return self.forward.num_layers

    @property
    def amortiser(self) -> PCModel:
        """The backward network, which [`pccore.Amortised`][]`()` initialises from.

        Its sweep from the top, $\\hat z_L = y$, $\\hat z_l = g_l(\\hat z_{l+1})$, guesses every
        latent; read at every call, so the guesses use the current backward weights.
        """
        return self.backward

    def with_params(self, params: tuple[tuple[Params, ...], tuple[Params, ...]]
                    ) -> "Bidirectional":
        return Bidirectional(
            self.forward.with_params(params[0]), self.backward.with_params(params[1])
        )

    def unwrap(self) -> tuple[Any, Any]:
        """`(forward, backward)` as the user's native objects."""
        return self.forward.unwrap(), self.backward.unwrap()

    def __call__(self, x: Float[Array, "batch ..."]) -> Float[Array, "batch ..."]:
        """The forward network's feed-forward prediction."""
        return self.forward(x)


class BPC(AbstractEnergy):
    r"""Bidirectional PC on a [`pccore.Bidirectional`][] model (see module docs).

    **Arguments:**

    - `alpha_f`, `alpha_b`: weights of the forward and backward energies.
    - `parameterisation`: applied to each network separately, with the layer positions of
        that network (its output precision $\lambda$ weighs each network's output term).
    - `activity_decay`: a prior $\frac{\alpha}{2}\lVert z\rVert^2$ on every free activity.
    - `regularisers`: parameter regularisers, on the weights of both networks.

    Per-layer energies come back as $[\alpha_f E^f_1, \dots, \alpha_f E^f_L,
    \alpha_b E^b_0, \dots, \alpha_b E^b_{L-1}]$. The output `y` must be clamped.

    Initialisers see the forward network ([`pccore.FeedForward`][] is its feed-forward
    pass), except [`pccore.Amortised`][], which sees the whole model: `Amortised()` starts
    at the backward network's sweep from `y` (with this energy's parameterisation applied),
    read at every call.
    """

    alpha_f: float | ArrayLike = 1.0
    alpha_b: float | ArrayLike = 1.0
    parameterisation: AbstractParameterisation = SP()
    activity_decay: float | ArrayLike = 0.0
    regularisers: tuple[AbstractRegulariser, ...] = ()

    def __check_init__(self) -> None:
        for name in ("alpha_f", "alpha_b", "activity_decay"):
            check_option("BPC", name, getattr(self, name))
        check_energy_parts("BPC", self)

    def _model(self, model: AbstractPCModel) -> Bidirectional:
        if not isinstance(model, Bidirectional):
            raise TypeError(
                "`energy=BPC(...)` needs a pccore.Bidirectional(forward, backward) model; got "
                f"{type(model).__name__}."
            )
        return model

    def variable_shapes(self, model: AbstractPCModel, x_clamped: bool
                        ) -> tuple[jax.ShapeDtypeStruct, ...]:
        return chain_variable_shapes(self._model(model).forward, x_clamped)

    def data_shapes(self, model: AbstractPCModel) -> tuple[tuple[int, ...], tuple[int, ...]]:
        f = self._model(model).forward
        return f.in_shape.shape, f.out_shapes[-1].shape

    def prepare(self, model: AbstractPCModel) -> Bidirectional:
        model = self._model(model)
        p = self.parameterisation
        return Bidirectional(p.apply(model.forward), p.apply(model.backward))

    def penalty(self, model: Bidirectional) -> Scalar:
        return penalty(self.regularisers, model.forward) + penalty(self.regularisers, model.backward)

    def layer_energies(self, model: Bidirectional, variables: Activities,
                       x: Array | None, y: Array | None) -> Float[Array, "batch terms"]:
        if y is None:
            raise ValueError("`y`: bidirectional PC needs a clamped output `y`; got None.")
        f, g = model.forward, model.backward
        z = (*((x,) if x is not None else ()), *variables, y)  # z_0 .. z_L
        L = f.num_layers
        lam = self.parameterisation.output_precision
        fwd = [sq_norm(z[l] - f.predict_layer(l - 1, z[l - 1], x=x)) for l in range(1, L)]
        fwd.append(lam * sq_norm(y - f.predict_layer(L - 1, z[L - 1], x=x)))
        bwd = [sq_norm(z[l] - g.predict_layer(L - 1 - l, z[l + 1], x=y)) for l in range(L)]
        bwd[0] = lam * bwd[0]
        terms = [self.alpha_f * t for t in fwd] + [self.alpha_b * t for t in bwd]
        return jnp.stack(terms, axis=1)

    def per_sample(self, model: Bidirectional, variables: Activities,
                   x: Array | None, y: Array | None) -> Float[Array, " batch"]:
        total = self.layer_energies(model, variables, x, y).sum(axis=1)
        return add_activity_decay(total, self.activity_decay, variables)

    def init(self, model: Bidirectional, x: Array | None, y: Array | None,
             initialiser: AbstractInit, key: PRNGKeyArray | None) -> Activities:
        if y is None:
            raise ValueError("`y`: bidirectional PC needs a clamped output `y`; got None.")
        # Amortised() reads the backward network from the model at call time; every other
        # initialiser sees the forward network, as before
        net = model if isinstance(initialiser, Amortised) else model.forward
        return initialiser(net, self.variable_shapes(model, x is not None), x, y, key)

    def predict(self, model: Bidirectional, x: Array) -> Array:
        return model.forward(x)

    def output_loss(self, prediction: Array, y: Array) -> Float[Array, " batch"]:
        return MSE()(prediction, y)
