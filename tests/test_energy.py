"""Energy and gradients against an independently written energy and finite differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import ArrayLike

import pccore


def _mlp(key, sizes=(5, 7, 6, 3)):
    layers = []
    keys = jax.random.split(key, len(sizes) - 1)
    for i, k in enumerate(keys):
        layers.append(eqx.nn.Linear(sizes[i], sizes[i + 1], key=k))
        if i < len(keys) - 1:
            layers.append(eqx.nn.Lambda(jnp.tanh))
    return eqx.nn.Sequential(layers)


def _hand_energy(seq, zs, x, y, loss):
    """Independent PC energy: sum over samples of 1/2 ||z_l - tanh(W z_{l-1} + b)||^2 + E_out."""
    lin = [l for l in seq.layers if isinstance(l, eqx.nn.Linear)]
    chain = ([x] if x is not None else []) + list(zs)
    total = 0.0
    for i in range(1, len(chain)):
        pred = jnp.tanh(chain[i - 1] @ lin[i - 1].weight.T + lin[i - 1].bias)
        total = total + 0.5 * jnp.sum((chain[i] - pred) ** 2)
    out = chain[-1] @ lin[-1].weight.T + lin[-1].bias
    if loss == "mse":
        total = total + 0.5 * jnp.sum((y - out) ** 2)
    else:
        total = total - jnp.sum(y * jax.nn.log_softmax(out, axis=-1))
    return total


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("free_bottom", [False, True])
def test_energy_and_gradients_match_hand_written(x64, getkey, loss, free_bottom):
    seq = _mlp(getkey())
    model = pccore.wrap(seq)
    B = 4
    x = jax.random.normal(getkey(), (B, 5))
    if loss == "mse":
        y = jax.random.normal(getkey(), (B, 3))
        energy = pccore.PC(loss=pccore.MSE())
    else:
        y = jax.nn.softmax(jax.random.normal(getkey(), (B, 3)))
        energy = pccore.PC(loss=pccore.CrossEntropy())
    shapes = [(B, 5)] if free_bottom else []
    shapes += [(B, 7), (B, 6)]
    zs = tuple(jax.random.normal(getkey(), s) for s in shapes)
    xc = None if free_bottom else x

    got = pccore.energy(model, zs, x=xc, y=y, energy=energy)
    want = _hand_energy(seq, zs, xc, y, loss)
    np.testing.assert_allclose(got, want, rtol=1e-12)

    # Activity gradients: pccore's energy vs the hand-written one, and finite differences.
    g = jax.grad(lambda z: pccore.energy(model, z, x=xc, y=y, energy=energy))(zs)
    g_hand = jax.grad(lambda z: _hand_energy(seq, z, xc, y, loss))(zs)
    for a, b in zip(g, g_hand):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    d = tuple(jax.random.normal(getkey(), z.shape) for z in zs)
    eps = 1e-6
    plus = pccore.energy(model, tuple(z + eps * v for z, v in zip(zs, d)), x=xc, y=y, energy=energy)
    minus = pccore.energy(model, tuple(z - eps * v for z, v in zip(zs, d)), x=xc, y=y, energy=energy)
    fd = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(fd, sum(jnp.sum(a * v) for a, v in zip(g, d)), rtol=1e-6)

    # Parameter gradients are of the batch mean: (1/B) d(hand energy)/d(theta).
    pg = pccore.param_grads(model, zs, x=xc, y=y, energy=energy)
    hand = eqx.filter_grad(lambda s: _hand_energy(s, zs, xc, y, loss) / B)(seq)
    hand_leaves = jax.tree_util.tree_leaves(eqx.filter(hand, eqx.is_inexact_array))
    assert len(hand_leaves) == len(jax.tree_util.tree_leaves(pg)) == 6
    for p, h in zip(jax.tree_util.tree_leaves(pg), hand_leaves):
        np.testing.assert_allclose(p, h, rtol=1e-10, atol=1e-12)


def test_feedforward_init_gives_output_loss_and_zero_hidden_errors(getkey):
    model = pccore.wrap(_mlp(getkey()))
    x = jax.random.normal(getkey(), (6, 5))
    y = jax.random.normal(getkey(), (6, 3))
    z = pccore.init_activities(model, x)
    per_layer = pccore.layer_energies(model, z, x=x, y=y)
    assert per_layer.shape == (3,)
    np.testing.assert_array_equal(per_layer[:2], 0.0)
    want = 0.5 * jnp.sum((model(x) - y) ** 2)
    np.testing.assert_allclose(per_layer[2], want, rtol=1e-6)
    np.testing.assert_allclose(pccore.energy(model, z, x=x, y=y), want, rtol=1e-6)


def test_layer_energies_in_layer_order(getkey):
    model = pccore.wrap(_mlp(getkey()))
    x = jax.random.normal(getkey(), (3, 5))
    y = jax.random.normal(getkey(), (3, 3))
    z1 = jax.random.normal(getkey(), (3, 7))
    z2 = jax.random.normal(getkey(), (3, 6))
    E = pccore.layer_energies(model, (z1, z2), x=x, y=y)
    want = [
        0.5 * jnp.sum((z1 - model.predict_layer(0, x)) ** 2),
        0.5 * jnp.sum((z2 - model.predict_layer(1, z1)) ** 2),
        0.5 * jnp.sum((y - model.predict_layer(2, z2)) ** 2),
    ]
    np.testing.assert_allclose(E, jnp.stack(want), rtol=1e-6)


def test_bad_inputs_get_clear_errors(getkey):
    model = pccore.wrap(_mlp(getkey()))
    x = jnp.ones((4, 5))
    y = jnp.ones((4, 3))
    z = pccore.init_activities(model, x)
    with pytest.raises(ValueError, match=r"`x` has shape \(4, 6\); expected \(batch, 5\)"):
        pccore.energy(model, z, x=jnp.ones((4, 6)), y=y)
    with pytest.raises(ValueError, match=r"`y` has shape \(5, 3\); expected \(4, 3\)"):
        pccore.energy(model, z, x=x, y=jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"`activities` has 1 arrays; expected 2"):
        pccore.energy(model, z[:1], x=x, y=y)
    with pytest.raises(ValueError, match=r"`activities\[1\]` has shape \(4, 5\); expected \(4, 6\)"):
        pccore.energy(model, (z[0], jnp.ones((4, 5))), x=x, y=y)
    with pytest.raises(TypeError, match=r"`y` has dtype int32; expected float32 or float64"):
        pccore.energy(model, z, x=x, y=jnp.ones((4, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"`init=FeedForward\(\)` needs a clamped input"):
        pccore.init_activities(model, None, y=y)
    with pytest.raises(ValueError, match=r"`key`: `init=RandomNormal\(\)`"):
        pccore.init_activities(model, None, y=y, init=pccore.RandomNormal())


class PrecisionPC(pccore.AbstractChainEnergy):
    """The variant of docs/writing-a-variant.md, written with the public kit only."""

    precisions: tuple[float, ...]
    loss: pccore.AbstractLoss = pccore.MSE()
    parameterisation: pccore.AbstractParameterisation = pccore.SP()
    activity_decay: float | ArrayLike = 0.0
    regularisers: tuple[pccore.AbstractRegulariser, ...] = ()

    def layer_energies(self, model, variables, x, y):
        z = (x, *variables)
        terms = [p * pccore.sq_norm(z[l + 1] - model.predict_layer(l, z[l], x=x))
                 for l, p in enumerate(self.precisions)]
        terms.append(self.output(model, z[-1], x, y))
        return jnp.stack(terms, axis=1)

    def init(self, model, x, y, initialiser, key):
        return initialiser(model, self.variable_shapes(model, True), x, y, key)

    def layer_inputs(self, model, variables, x):
        return (x, *variables)


@pytest.mark.slow
def test_a_variant_written_with_the_kit_trains(x64):
    """Oracle: its energy written by hand from the Equinox layers; then it trains on
    digits above chance through the one update path."""
    import equinox as eqx
    import optax

    k = jax.random.split(jax.random.key(0), 3)
    mlp = eqx.nn.MLP(64, 10, 32, 2, activation=jnp.tanh, key=k[0], dtype=jnp.float64)
    model = pccore.wrap(mlp)
    energy = PrecisionPC(precisions=(1.0, 0.5), loss=pccore.CrossEntropy())
    data = pccore.datasets.load_digits()
    x, y = jnp.asarray(data.x_train, jnp.float64), jnp.asarray(data.y_train, jnp.float64)
    z = tuple(jax.random.normal(kk, (16, 32), jnp.float64) for kk in k[1:])
    L = mlp.layers
    f = lambda l, v: jnp.tanh(jax.vmap(L[l])(v))
    logits = jax.vmap(L[2])(z[1])
    want = (0.5 * jnp.sum((z[0] - f(0, x[:16])) ** 2)
            + 0.5 * 0.5 * jnp.sum((z[1] - f(1, z[0])) ** 2)
            - jnp.sum(y[:16] * jax.nn.log_softmax(logits)))
    np.testing.assert_allclose(pccore.energy(model, z, x=x[:16], y=y[:16], energy=energy), want,
                               rtol=1e-12)
    step = pccore.TrainStep(optax.adam(3e-3), energy=energy)
    opt_state = step.init(model)
    for epoch in range(3):
        for i in range(0, len(x) - 31, 32):
            model, opt_state, stats = step(model, opt_state, x=x[i:i + 32], y=y[i:i + 32])
    acc = pccore.evaluate(model, jnp.asarray(data.x_test, jnp.float64),
                          jnp.asarray(data.y_test, jnp.float64), energy=energy).accuracy
    assert float(acc) > 0.8, float(acc)
