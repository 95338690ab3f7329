"""Wrap a model you already have, in Equinox, Haiku, Flax Linen and Flax NNX.

One MLP (64-32-10, tanh) is written natively in each framework with the same weights; pccore
wraps each, trains it one step through the same engine, and hands back the framework's own
object. The four agree to float32 rounding.

    python examples/wrap_each_framework.py [--quick]
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import digits

import pccore

x_train, y_train, _, _ = digits(limit=64)
x, y = x_train[:16], y_train[:16]
rng = np.random.default_rng(0)
W1, b1 = rng.normal(size=(64, 32)).astype(np.float32) / 8, np.zeros(32, np.float32)
W2, b2 = rng.normal(size=(32, 10)).astype(np.float32) / 6, np.zeros(10, np.float32)

# --- Equinox: an eqx.nn.Sequential (weights are (out, in)) ---------------------------------
eqx_model = eqx.nn.Sequential([
    eqx.nn.Linear(64, 32, key=jax.random.key(0)), eqx.nn.Lambda(jnp.tanh),
    eqx.nn.Linear(32, 10, key=jax.random.key(1)),
])
eqx_model = eqx.tree_at(
    lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[2].weight, m.layers[2].bias),
    eqx_model, (jnp.asarray(W1.T), jnp.asarray(b1), jnp.asarray(W2.T), jnp.asarray(b2)))
wrapped = {"equinox": pccore.wrap(eqx_model)}

# --- Haiku: a transformed function and its params ----------------------------------------
import haiku as hk  # noqa: E402

mlp = hk.transform(lambda x: hk.nets.MLP([32, 10], activation=jnp.tanh)(x))
hk_params = {"mlp/~/linear_0": {"w": W1, "b": b1}, "mlp/~/linear_1": {"w": W2, "b": b2}}
wrapped["haiku"] = pccore.wrap(mlp, hk_params)

# --- Flax Linen: a module and its variables ----------------------------------------------
import flax.linen as nn  # noqa: E402

linen_model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(10)])
linen_vars = {"params": {"layers_0": {"kernel": W1, "bias": b1},
                         "layers_2": {"kernel": W2, "bias": b2}}}
wrapped["linen"] = pccore.wrap(linen_model, linen_vars)

# --- Flax NNX: the module itself ---------------------------------------------------------
from flax import nnx  # noqa: E402

nnx_model = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.tanh,
                           nnx.Linear(32, 10, rngs=nnx.Rngs(1)))
for layer, W, b in ((nnx_model.layers[0], W1, b1), (nnx_model.layers[2], W2, b2)):
    layer.kernel[...] = W
    layer.bias[...] = b
wrapped["nnx"] = pccore.wrap(nnx_model)

# --- one engine for all: infer, one training step, unwrap -------------------------------
energy = pccore.PC(loss=pccore.CrossEntropy())
optim = optax.sgd(0.1)
energies, outputs = {}, {}
for name, model in wrapped.items():
    sol = pccore.infer(model, x=x, y=y, energy=energy, t1=2.0, dt0=0.1)
    model, _, stats = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                        energy=energy, t1=2.0, dt0=0.1)
    energies[name], outputs[name] = float(sol.energy), np.asarray(model(x))
    native = model.unwrap()  # your own object back: a Sequential, Haiku params, Linen variables, ...
    print(f"{name:>8}: energy after inference {energies[name]:.6f}; unwrap() -> "
          f"{type(native).__module__}.{type(native).__name__}")
for name in wrapped:
    assert abs(energies[name] - energies["equinox"]) < 1e-4 * abs(energies["equinox"])
    assert np.allclose(outputs[name], outputs["equinox"], atol=1e-5)
