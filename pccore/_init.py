"""Activity initialisers: where inference starts."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ._model import PCModel


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

    def __call__(self, model, shapes, x, y, key):
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

    def __call__(self, model, shapes, x, y, key):
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

    def __call__(self, model, shapes, x, y, key):
        B = (x if x is not None else y).shape[0]
        return tuple(jnp.zeros((B, *s.shape), s.dtype) for s in shapes)
