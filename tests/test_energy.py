"""Energy and gradients against an independently written energy and finite differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
