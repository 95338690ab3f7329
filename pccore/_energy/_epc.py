r"""Error-reparameterised predictive coding (ePC; Goemaere et al., arXiv 2505.20137).

The inference variables are the errors $\epsilon_1, \dots, \epsilon_{L-1}$ (plus $z_0$ when the
bottom is free); the activities are rebuilt from them in one feed-forward sweep,
$$\tilde z_0 = x, \qquad \tilde z_l = \mu_l(\tilde z_{l-1}) + \epsilon_l \ (l = 1..L-1), \qquad
  \hat y = \mu_L(\tilde z_{L-1}),$$
$$F_{\mathrm{ePC}}(\epsilon) = \sum_{l=1}^{L-1} \tfrac12 \lVert \epsilon_l \rVert^2
  + \lambda E_{\mathrm{out}}(y, \hat y) + \tfrac{\alpha}{2} \sum_{l\ \mathrm{free}} \lVert \tilde z_l \rVert^2
  = F_{\mathrm{PC}}(\tilde z(\epsilon)).$$

Every inference variable is penalised: there is no free output error (an unpenalised
$\epsilon_L$ would cancel the output term, and converged ePC would learn nothing). The map
$\epsilon \mapsto \tilde z$ is a bijection with unit-diagonal triangular Jacobian, so ePC and
PC share their equilibria, equilibrium energies and (envelope theorem) parameter gradients.
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._custom_types import Activities
from ._base import AbstractChainEnergy, add_activity_decay, sq_norm
from ._init import AbstractInit
from ._loss import MSE, AbstractLoss
from .._model import PCModel
from ._parameterisation import SP, AbstractParameterisation
from ._regularise import AbstractRegulariser


class EPC(AbstractChainEnergy):
    r"""Error-reparameterised PC: the errors are the inference variables (see module docs).

    With a clamped input the variables are $(\epsilon_1..\epsilon_{L-1})$; with `x=None` they
    are $(z_0, \epsilon_1..\epsilon_{L-1})$, and $z_0$ gets the same prior as in
    [`pccore.PC`][] (`activity_decay`, none by default). Initialisers produce activities as for
    PC and are converted to errors, $\epsilon_l = z_l - \mu_l(z_{l-1})$: the feed-forward
    initialisation is $\epsilon = 0$.

    **Arguments:** `loss`, `parameterisation`, `activity_decay` (a prior on every free
    *activity* $\tilde z_l$, so that $F_{\mathrm{ePC}} = F_{\mathrm{PC}} \circ \tilde z$) and
    `regularisers`, as in [`pccore.PC`][].
    """

    loss: AbstractLoss = MSE()
    parameterisation: AbstractParameterisation = SP()
    activity_decay: float | ArrayLike = 0.0
    regularisers: tuple[AbstractRegulariser, ...] = ()

    def layer_inputs(self, model: PCModel, variables: Activities, x: Array | None) -> tuple[Array, ...]:
        return self.states(model, tuple(variables), x)

    def _split(self, variables: Activities, x: Array | None) -> tuple[Array, Activities]:
        return (variables[0], tuple(variables[1:])) if x is None else (x, tuple(variables))

    def states(self, model: PCModel, variables: Activities, x: Array | None) -> tuple[Array, ...]:
        r"""The activities $(\tilde z_0, \dots, \tilde z_{L-1})$ of the errors, on a prepared model."""
        z0, eps = self._split(variables, x)
        zs = [z0]
        for l, e in enumerate(eps):
            zs.append(model.predict_layer(l, zs[-1], x=x) + e)
        return tuple(zs)

    def activities(self, model: PCModel, errors: Activities, x: Array | None) -> Activities:
        """The free activities (as [`pccore.PC`][] orders them) that `errors` stand for.

        **Arguments:** `model` (not prepared: the parameterisation is applied here), the
        ePC inference variables `errors`, and the clamped input `x` (or None).
        """
        zs = self.states(self.prepare(model), tuple(errors), x)
        return zs if x is None else zs[1:]

    def layer_energies(self, model: PCModel, variables: Activities, x: Array | None,
                       y: Array | None) -> Float[Array, "batch terms"]:
        _, eps = self._split(variables, x)
        zs = self.states(model, variables, x)
        L = model.num_layers
        terms = [sq_norm(e) for e in eps]
        terms.append(self.output(model, zs[L - 1], x, y))
        return jnp.stack(terms, axis=1)

    def per_sample(self, model: PCModel, variables: Activities, x: Array | None,
                   y: Array | None) -> Float[Array, " batch"]:
        total = self.layer_energies(model, variables, x, y).sum(axis=1)
        if isinstance(self.activity_decay, int | float) and self.activity_decay == 0:
            return total  # skip rebuilding the activities
        zs = self.states(model, variables, x)
        return add_activity_decay(total, self.activity_decay, zs if x is None else zs[1:])

    def init(self, model: PCModel, x: Array | None, y: Array | None, initialiser: AbstractInit,
             key: PRNGKeyArray | None) -> Activities:
        z = initialiser(model, self.variable_shapes(model, x is not None), x, y, key)
        chain = tuple(z) if x is None else (x, *z)
        eps = tuple(chain[l + 1] - model.predict_layer(l, chain[l], x=x)
                    for l in range(len(chain) - 1))
        return (chain[0], *eps) if x is None else eps
