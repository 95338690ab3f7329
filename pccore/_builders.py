"""The same MLP built natively in Equinox, Haiku, Flax Linen and Flax NNX, from one set of weights.

Used by `pccore compare`: every framework starts from identical weights, written into the
framework's own model object in its own layout, and is then wrapped with [`pccore.wrap`][].
Frameworks are imported only when their builder runs (each through
`pccore.adapters.require`, which names the pip extra when one is missing).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._model import PCModel
from ._wrap import wrap

Weights = list[tuple[np.ndarray, np.ndarray]]
"""Per layer `(W, b)` with `W` in `(in, out)` layout (Haiku/Flax's), float32."""

ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "sigmoid": jax.nn.sigmoid,
}

FRAMEWORK_EXTRAS = {"equinox": None, "haiku": "haiku", "linen": "flax", "nnx": "flax"}
"""The CLI's framework names and the pip extra each needs (`None`: always installed)."""


def canonical_mlp(sizes: Sequence[int], seed: int) -> Weights:
    r"""Framework-neutral starting weights: $W, b \sim U(\pm 1/\sqrt{\text{fan-in}})$.

    This is Equinox's default initialisation for `eqx.nn.Linear`, drawn with NumPy so that it
    does not depend on any framework's initialiser.
    """
    rng = np.random.default_rng(seed)
    out = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / np.sqrt(n_in)
        W = rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32)
        b = rng.uniform(-bound, bound, (n_out,)).astype(np.float32)
        out.append((W, b))
    return out


def _equinox(weights: Weights, activation: Callable):
    import equinox as eqx

    layers = []
    for i, (W, b) in enumerate(weights):
        lin = eqx.nn.Linear(W.shape[0], W.shape[1], key=jax.random.key(0))
        lin = eqx.tree_at(lambda m: (m.weight, m.bias), lin, (jnp.asarray(W.T), jnp.asarray(b)))
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(eqx.nn.Lambda(activation))
    return eqx.nn.Sequential(layers), None


def _haiku(weights: Weights, activation: Callable):
    from pccore.adapters import require

    hk = require("haiku")
    widths = [W.shape[1] for W, _ in weights]
    transformed = hk.transform(lambda x: hk.nets.MLP(widths, activation=activation)(x))
    params = {
        f"mlp/~/linear_{i}": {"w": jnp.asarray(W), "b": jnp.asarray(b)}
        for i, (W, b) in enumerate(weights)
    }
    return transformed, params


def _linen(weights: Weights, activation: Callable):
    from pccore.adapters import require

    nn = require("flax.linen")
    layers, params = [], {}
    for i, (W, b) in enumerate(weights):
        params[f"layers_{len(layers)}"] = {"kernel": jnp.asarray(W), "bias": jnp.asarray(b)}
        layers.append(nn.Dense(W.shape[1]))
        if i < len(weights) - 1:
            layers.append(activation)
    return nn.Sequential(layers), {"params": params}


def _nnx(weights: Weights, activation: Callable):
    from pccore.adapters import require

    nnx = require("flax.nnx")
    rngs = nnx.Rngs(0)
    layers = []
    for i, (W, b) in enumerate(weights):
        lin = nnx.Linear(W.shape[0], W.shape[1], rngs=rngs)
        lin.kernel[...] = jnp.asarray(W)
        lin.bias[...] = jnp.asarray(b)
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(activation)
    return nnx.Sequential(*layers), None


NATIVE_BUILDERS: dict[str, Callable] = {
    "equinox": _equinox,
    "haiku": _haiku,
    "linen": _linen,
    "nnx": _nnx,
}
"""`builder(weights, activation) -> (native model, variables or None)` per framework."""


def native_mlp(framework: str, weights: Weights, activation: Callable):
    """The MLP as the framework's own object: `(model, variables)` (`variables` may be None)."""
    if framework not in NATIVE_BUILDERS:
        raise ValueError(
            f"`framework`: unknown framework {framework!r}; expected one of "
            f"{sorted(NATIVE_BUILDERS)}."
        )
    return NATIVE_BUILDERS[framework](weights, activation)


def build_mlp(framework: str, weights: Weights, activation: Callable) -> PCModel:
    """The MLP built natively in `framework` with these weights, wrapped by [`pccore.wrap`][]."""
    model, variables = native_mlp(framework, weights, activation)
    n_in = int(weights[0][0].shape[0])
    if framework == "equinox":
        return wrap(model)
    return wrap(model, variables, input_shape=(n_in,))


def canonical_weights(model: PCModel) -> Weights:
    """Read `(W (in, out), b)` per layer back from a wrapped MLP of any framework.

    Weights come from [`pccore.PCModel.weight_matrices`][] (so layouts are handled by the
    adapter's [`pccore.WeightSpec`][]s); the bias is the layer's one other leaf.
    """
    out = []
    for l, p in enumerate(model.params):
        (W,) = model.weight_matrices(l)
        weight_leaves = {s.index for s in model.weights[l]}
        (b,) = [a for i, a in enumerate(jtu.tree_leaves(p)) if i not in weight_leaves]
        out.append((np.asarray(W).T, np.asarray(b)))
    return out


def max_weight_difference(a: Weights, b: Weights) -> float:
    """The largest absolute difference between two weight sets (weights and biases)."""
    return max(
        float(np.max(np.abs(x - y))) for la, lb in zip(a, b) for x, y in zip(la, lb)
    )
