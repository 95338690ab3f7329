"""Shared model builders for cross-framework tests.

`FRAMEWORKS` is the conformance list: a new adapter adds one line here (and one builder
in `BUILDERS`), and every parametrised test that uses it covers the new adapter.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

import pccore

Weights = list[tuple[jax.Array, jax.Array | None]]  # per layer: W (in, out), b (out,) or None


def canonical_mlp(sizes: Sequence[int], key, dtype=jnp.float32, bias: bool = True) -> Weights:
    """Framework-neutral weights for an MLP `sizes[0] -> ... -> sizes[-1]` (W in (in, out))."""
    out = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        kw, kb = jax.random.split(k)
        W = jax.random.normal(kw, (n_in, n_out), dtype) / jnp.sqrt(n_in)
        b = 0.1 * jax.random.normal(kb, (n_out,), dtype) if bias else None
        out.append((W, b))
    return out


def _equinox_mlp(weights: Weights, activation: Callable) -> pccore.PCModel:
    import equinox as eqx

    layers = []
    for i, (W, b) in enumerate(weights):
        lin = eqx.nn.Linear(W.shape[0], W.shape[1], use_bias=b is not None, key=jax.random.key(0))
        lin = eqx.tree_at(lambda m: m.weight, lin, W.T.astype(W.dtype))
        if b is not None:
            lin = eqx.tree_at(lambda m: m.bias, lin, b)
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(eqx.nn.Lambda(activation))
    return pccore.wrap(eqx.nn.Sequential(layers))


BUILDERS: dict[str, Callable[[Weights, Callable], pccore.PCModel]] = {
    "equinox": _equinox_mlp,
}
FRAMEWORKS = list(BUILDERS)


def build_mlp(framework: str, weights: Weights, activation: Callable = jnp.tanh) -> pccore.PCModel:
    """The MLP with these weights, built natively in `framework` and wrapped by pccore."""
    return BUILDERS[framework](weights, activation)
