"""A training loop written by hand with `pccore.infer` and `pccore.param_grads`.

`pccore.train_step` does exactly this in one jitted call; writing it out shows the pieces:
initialise the activities, equilibrate them, take the parameter gradient at the equilibrium,
apply an optax update. The step is compiled with `eqx.filter_jit`, as any JAX training step
should be (the model is a pytree: its arrays are traced, its functions static); under jit
`pccore.infer` still raises if inference diverges, whichever field of its solution is used.
The script checks that its loop gives the same weights as `train_step`, then trains on
digits.

    python examples/custom_training_loop.py [--quick]
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import QUICK, digits

import pccore

x_train, y_train, x_test, y_test = digits(limit=256 if QUICK else None)
mlp = eqx.nn.MLP(64, 10, width_size=64, depth=2, activation=jnp.tanh, key=jax.random.key(0))
model = pccore.wrap(mlp)
energy = pccore.PC(loss=pccore.CrossEntropy())
optim = optax.adam(3e-3)
solver = dict(t1=2.0, dt0=0.1)  # 20 Euler steps of the gradient flow dz/dt = -dF/dz


@eqx.filter_jit  # compile the whole step once: eagerly, each call would re-trace every piece
def my_step(model, opt_state, x, y):
    z0 = pccore.init_activities(model, x, y=y, energy=energy)  # feed-forward start
    sol = pccore.infer(model, z0, x=x, y=y, energy=energy, **solver)  # equilibrate
    grads = pccore.param_grads(model, sol.activities, x=x, y=y, energy=energy)
    updates, opt_state = optim.update(grads, opt_state, model.params)
    return model.with_params(optax.apply_updates(model.params, updates)), opt_state, sol


# 1. the hand-written step equals pccore.train_step
x, y = x_train[:32], y_train[:32]
state = optim.init(model.params)
mine, _, sol = my_step(model, state, x, y)
theirs, _, stats = pccore.train_step(model, optim, state, x=x, y=y, energy=energy, **solver)
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
           zip(jax.tree.leaves(mine.params), jax.tree.leaves(theirs.params)))
print(f"hand-written step vs train_step: max weight difference {diff:.1e}")
assert diff < 1e-5

# 2. train with the hand-written loop
epochs, batch = (2, 32) if QUICK else (20, 32)
state = optim.init(model.params)
rng = np.random.default_rng(0)
for epoch in range(epochs):
    perm = rng.permutation(len(x_train))
    for b in range(len(x_train) // batch):
        idx = perm[b * batch:(b + 1) * batch]
        model, state, sol = my_step(model, state, x_train[idx], y_train[idx])
    acc = pccore.evaluate(model, x_test, y_test, energy=energy).accuracy
    print(f"epoch {epoch + 1}: energy {float(sol.energy) / batch:.4f}, test accuracy {100 * acc:.1f}%")

trained = model.unwrap()  # your own eqx.nn.MLP back, with the trained weights
assert isinstance(trained, eqx.nn.MLP)
assert jnp.allclose(jax.vmap(trained)(x_test), model(x_test), atol=1e-5)
assert QUICK or acc > 0.9
