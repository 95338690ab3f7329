"""Shared model builders for cross-framework tests.

`FRAMEWORKS` is the conformance list: a new adapter adds one line to `BUILDERS`, and every
parametrised test that uses it covers the new adapter.

Three architectures are built from framework-neutral weights:

- `"mlp"`: Dense/Linear layers with an activation between them (`canonical_mlp`);
- `"cnn"`: conv 3x3 (VALID) -> relu -> 2x2 average pool -> flatten -> dense, on 8x8 images
  with one channel (`canonical_cnn`); inputs are NHWC except for Equinox (NCHW, see
  `cnn_input`), and every framework flattens in HWC order so that the latents agree;
- `"mid"`: an MLP with a parameter-free LayerNorm module (no scale, no offset) after the
  first activation, which must fold into the first layer.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import pccore
from pccore.testing import EPS, Built, Weights, canonical_cnn, canonical_mlp, equinox_reference

__all__ = ["EPS", "Built", "Weights", "canonical_cnn", "canonical_mlp"]  # re-exported for tests


def linear_network(key, widths: Sequence[int]) -> pccore.PCModel:
    """A deep linear network (Equinox Linear layers, no biases): its equilibrium has a
    closed form (`pccore.theory`)."""
    import equinox as eqx

    keys = jax.random.split(key, len(widths) - 1)
    return pccore.wrap([eqx.nn.Linear(a, b, use_bias=False, key=k)
                        for a, b, k in zip(widths[:-1], widths[1:], keys)])


def cnn_input(framework: str, x_nhwc: jax.Array) -> jax.Array:
    """The CNN input in the framework's layout (NCHW for Equinox, NHWC otherwise)."""
    return jnp.transpose(x_nhwc, (0, 3, 1, 2)) if framework == "equinox" else x_nhwc


def _flatten_hwc(x):  # batched NHWC -> (B, H*W*C)
    return x.reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------------- Equinox
def _equinox(weights: Weights, activation: Callable = jnp.tanh, *, kind: str = "mlp",
             native: bool = False):
    built = equinox_reference(kind, weights, activation)  # pccore.testing's reference
    return built if native else built.model


# ---------------------------------------------------------------------------------- Haiku
def _haiku(weights: Weights, activation: Callable = jnp.tanh, *, kind: str = "mlp",
           native: bool = False):
    import haiku as hk

    if kind == "cnn":
        (K, bk), (W, b) = weights

        def fn(x):
            x = hk.Conv2D(K.shape[-1], 3, padding="VALID", name="conv")(x)
            x = hk.avg_pool(jax.nn.relu(x), (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            return hk.Linear(W.shape[1], name="head")(_flatten_hwc(x))

        params = {"conv": {"w": K, "b": bk}, "head": {"w": W, "b": b}}
        options = {"input_shape": (8, 8, 1)}
    else:
        sizes = [W.shape[1] for W, _ in weights]
        bias = weights[0][1] is not None

        def fn(x):
            for i, n in enumerate(sizes):
                x = hk.Linear(n, with_bias=bias, name=f"linear_{i}")(x)
                if i < len(sizes) - 1:
                    x = activation(x)
                if kind == "mid" and i == 0:
                    x = hk.LayerNorm(-1, create_scale=False, create_offset=False, eps=EPS)(x)
            return x

        params = {
            f"linear_{i}": ({"w": W, "b": b} if b is not None else {"w": W})
            for i, (W, b) in enumerate(weights)
        }
        options = {}
    f = hk.without_apply_rng(hk.transform(fn))
    model = pccore.wrap(f, params, **options)
    return Built(model, f.apply) if native else model


# ---------------------------------------------------------------------------------- Linen
def _linen(weights: Weights, activation: Callable = jnp.tanh, *, kind: str = "mlp",
           native: bool = False):
    import flax.linen as nn

    if kind == "cnn":
        (K, bk), (W, b) = weights

        class CNN(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = nn.Conv(K.shape[-1], (3, 3), padding="VALID")(x)
                x = nn.avg_pool(nn.relu(x), (2, 2), (2, 2))
                return nn.Dense(W.shape[1])(_flatten_hwc(x))

        module = CNN()
        variables = {"params": {"Conv_0": {"kernel": K, "bias": bk}, "Dense_0": {"kernel": W, "bias": b}}}
        options = {"input_shape": (8, 8, 1)}
    else:
        layers, params = [], {}
        for i, (W, b) in enumerate(weights):
            params[f"layers_{len(layers)}"] = {"kernel": W} if b is None else {"kernel": W, "bias": b}
            layers.append(nn.Dense(W.shape[1], use_bias=b is not None))
            if i < len(weights) - 1:
                layers.append(activation)
            if kind == "mid" and i == 0:
                layers.append(nn.LayerNorm(epsilon=EPS, use_scale=False, use_bias=False))
        module = nn.Sequential(layers)
        variables = {"params": params}
        options = {}
    model = pccore.wrap(module, variables, **options)
    return Built(model, module.apply) if native else model


# ---------------------------------------------------------------------------------- NNX
def _nnx(weights: Weights, activation: Callable = jnp.tanh, *, kind: str = "mlp",
         native: bool = False):
    import flax.linen as nn
    from flax import nnx

    rngs = nnx.Rngs(0)

    def linear(W, b):
        lin = nnx.Linear(W.shape[0], W.shape[1], use_bias=b is not None, param_dtype=W.dtype, rngs=rngs)
        lin.kernel[...] = W
        if b is not None:
            lin.bias[...] = b
        return lin

    if kind == "cnn":
        (K, bk), (W, b) = weights

        class CNN(nnx.Module):  # a custom module holding its layers as attributes
            def __init__(self):
                self.conv = nnx.Conv(1, K.shape[-1], (3, 3), padding="VALID", param_dtype=K.dtype,
                                     rngs=rngs)
                self.conv.kernel[...] = K
                self.conv.bias[...] = bk
                self.head = linear(W, b)

            def __call__(self, x):
                x = nn.avg_pool(jax.nn.relu(self.conv(x)), (2, 2), (2, 2))
                return self.head(_flatten_hwc(x))

        module = CNN()
        options = {"input_shape": (8, 8, 1)}
    else:
        layers = []
        for i, (W, b) in enumerate(weights):
            layers.append(linear(W, b))
            if i < len(weights) - 1:
                layers.append(activation)
            if kind == "mid" and i == 0:
                layers.append(nnx.LayerNorm(W.shape[1], epsilon=EPS, use_scale=False, use_bias=False,
                                            param_dtype=W.dtype, rngs=rngs))
        module = nnx.Sequential(*layers)
        options = {}
    model = pccore.wrap(module, **options)
    return Built(model, lambda m, x: m(x)) if native else model


BUILDERS: dict[str, Callable[..., Any]] = {
    "equinox": _equinox,
    "haiku": _haiku,
    "flax.linen": _linen,
    "flax.nnx": _nnx,
}
FRAMEWORKS = list(BUILDERS)


def build(framework: str, kind: str, weights: Weights, activation: Callable = jnp.tanh) -> Built:
    """The `kind` model ("mlp", "cnn", "mid") with these weights, built natively in
    `framework` and wrapped by pccore, with the native forward `(unwrapped, x) -> y`."""
    return BUILDERS[framework](weights, activation, kind=kind, native=True)


def build_mlp(framework: str, weights: Weights, activation: Callable = jnp.tanh) -> pccore.PCModel:
    """The MLP with these weights, built natively in `framework` and wrapped by pccore."""
    return BUILDERS[framework](weights, activation)


def build_cnn(framework: str, weights: Weights) -> pccore.PCModel:
    """The CNN (`canonical_cnn` weights) built natively in `framework` and wrapped."""
    return BUILDERS[framework](weights, jax.nn.relu, kind="cnn")


def build_mid_fn(framework: str, weights: Weights, activation: Callable = jnp.tanh) -> pccore.PCModel:
    """The MLP with a parameter-free LayerNorm after the first activation, wrapped."""
    return BUILDERS[framework](weights, activation, kind="mid")


def digits_accuracy(method, *, epochs: int = 3, keyed: bool = False, **step_options) -> float:
    """Train a 64-64-64-10 tanh MLP on digits with `pccore.TrainStep(adam(1e-3),
    method=method)` (cross-entropy, batches of 32, a new key per step if `keyed`) and return
    its test accuracy."""
    import equinox as eqx
    import optax

    data = pccore.datasets.load_digits()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    model = pccore.wrap(eqx.nn.MLP(64, 10, 64, 2, activation=jnp.tanh, key=jax.random.key(0)))
    energy = pccore.PC(loss=pccore.CrossEntropy())
    step = pccore.TrainStep(optax.adam(1e-3), energy=energy, method=method, **step_options)
    opt_state, k = step.init(model), 0
    for _ in range(epochs):
        for i in range(0, len(x) - 31, 32):
            key = jax.random.fold_in(jax.random.key(0), k) if keyed else None
            model, opt_state, _ = step(model, opt_state, x=x[i:i + 32], y=y[i:i + 32], key=key)
            k += 1
    return float(pccore.evaluate(model, jnp.asarray(data.x_test), jnp.asarray(data.y_test),
                                 energy=energy).accuracy)
