"""Predictive coding variants, each an energy object for the same engine.

- discriminative PC: image clamped at the bottom, label at the top; predict feed-forward;
- supervised generative PC: label at the bottom, image at the top; infer the label from an
  image with the bottom free;
- unsupervised PC: the bottom latent is free (random initialisation), the image at the top;
- error-reparameterised PC (ePC): the errors are the inference variables;
- bidirectional PC: a forward (image -> label) and a backward (label -> image) network;
- hybrid PC: an amortiser (image -> label) initialises a generator's inference.

    python examples/variants.py [--quick]
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import QUICK, digits

import pccore

x_train, y_train, x_test, y_test = digits(limit=256 if QUICK else None)
epochs = 1 if QUICK else 10
batch = 32
key = jax.random.key(0)


def mlp(n_in, n_out, key):
    return pccore.wrap(eqx.nn.MLP(n_in, n_out, 64, 2, activation=jnp.tanh, key=key))


def fit(model, energy, bottom, top, *, init=pccore.FeedForward(), t1=2.0, lr=3e-3):
    optim = optax.adam(lr)
    state = optim.init(model.params)
    rng = np.random.default_rng(0)
    keys = iter(jax.random.split(jax.random.key(1), 10_000))
    for _ in range(epochs):
        perm = rng.permutation(len(top))
        for b in range(len(top) // batch):
            idx = perm[b * batch:(b + 1) * batch]
            model, state, stats = pccore.train_step(
                model, optim, state, x=None if bottom is None else bottom[idx], y=top[idx],
                energy=energy, init=init, key=next(keys), t1=t1, dt0=0.1)
    return model, stats


# 1. discriminative: x = image, y = label
energy = pccore.PC(loss=pccore.CrossEntropy())
model, _ = fit(mlp(64, 10, key), energy, x_train, y_train)
acc = pccore.evaluate(model, x_test, y_test, energy=energy).accuracy
print(f"discriminative PC: test accuracy {100 * float(acc):.1f}%")

# 2. supervised generative: x = label, y = image; infer the label with x free
energy = pccore.PC(loss=pccore.MSE())
model, _ = fit(mlp(10, 64, key), energy, y_train, x_train, t1=5.0)
gen_acc = float(pccore.generative_evaluate(
    model, x_test, y_test, energy=energy, init=pccore.RandomNormal(0.05), key=jax.random.key(2),
    t1=20.0 if QUICK else 100.0, dt0=0.1).accuracy)
print(f"supervised generative PC: labels inferred from images, accuracy {100 * gen_acc:.1f}% "
      "(chance 10%)")

# 3. unsupervised: a free 10-d code with a Gaussian prior (activity decay), image at the top
energy = pccore.PC(loss=pccore.MSE(), activity_decay=1.0)
model = mlp(10, 64, key)
init = pccore.RandomNormal(0.05)
probe = dict(x=None, y=x_test[:64], energy=energy, init=init, key=jax.random.key(3), t1=5.0,
             dt0=0.1)
before = float(pccore.infer(model, **probe).energy)
model, _ = fit(model, energy, None, x_train, init=init, t1=5.0)
after = float(pccore.infer(model, **probe).energy)
print(f"unsupervised PC: equilibrium energy on test images {before / 64:.3f} -> {after / 64:.3f}")
assert after < before

# 4. ePC: same equilibrium as PC, errors as variables; a feed-forward start is epsilon = 0
energy = pccore.EPC(loss=pccore.CrossEntropy())
model, _ = fit(mlp(64, 10, key), energy, x_train, y_train)
acc = pccore.evaluate(model, x_test, y_test, energy=energy).accuracy
print(f"ePC: test accuracy {100 * float(acc):.1f}%")

# 5. bidirectional: forward image -> label and backward label -> image over the same latents
k1, k2 = jax.random.split(key)
both = pccore.Bidirectional(mlp(64, 10, k1), pccore.wrap(
    eqx.nn.MLP(10, 64, 64, 2, activation=jnp.tanh, key=k2)))
model, _ = fit(both, pccore.BPC(alpha_f=1.0, alpha_b=0.1), x_train, y_train)
acc = float(jnp.mean(jnp.argmax(model(x_test), -1) == jnp.argmax(y_test, -1)))
print(f"bidirectional PC: forward-network test accuracy {100 * acc:.1f}%")

# 6. hybrid: generator label -> image, amortiser image -> label (its guesses start inference)
energy = pccore.PC(loss=pccore.MSE())
generator, amortiser = mlp(10, 64, k1), mlp(64, 10, k2)
optim = optax.adam(3e-3)
g_state, a_state = optim.init(generator.params), optim.init(amortiser.params)
rng = np.random.default_rng(0)
for _ in range(epochs):
    perm = rng.permutation(len(x_train))
    for b in range(len(x_train) // batch):
        idx = perm[b * batch:(b + 1) * batch]
        generator, g_state, amortiser, a_state, _ = pccore.hybrid_train_step(
            generator, amortiser, optim, g_state, optim, a_state, x=y_train[idx],
            y=x_train[idx], energy=energy, t1=5.0, dt0=0.1)
ev = pccore.hybrid_evaluate(generator, amortiser, x_test, y_test, energy=energy,
                            key=jax.random.key(4), t1=20.0, dt0=0.1)
print(f"hybrid PC: amortised guess {100 * float(ev.amortised):.1f}%, amortised init + inference "
      f"{100 * float(ev.amortised_inference):.1f}%, inference alone {100 * float(ev.inference):.1f}%")
if not QUICK:
    assert float(ev.amortised_inference) > 0.5
