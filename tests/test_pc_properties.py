"""Properties R1-R6 of the PC energy and engine (pc-family.md), per-layer energies in layer
order, energies recorded along a trajectory, and how far errors travel in k Euler steps,
against independent oracles."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from tests import cases

SIZES = [4, 6, 6, 6, 3]  # L = 4: hidden->hidden layers can carry skips
B = 5
PARAMS = {"SP": pccore.SP(), "NTP": pccore.NTP(),
          "MuPC": pccore.MuPC(gamma=0.5, output_precision=2.0)}
LOSSES = {"MSE": pccore.MSE(), "CE": pccore.CrossEntropy()}


def _data(key, loss="MSE"):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (B, SIZES[0]))
    y = jax.random.normal(ky, (B, SIZES[-1]))
    return x, (jax.nn.softmax(y) if loss == "CE" else y)


@pytest.mark.slow
@pytest.mark.parametrize("framework", cases.FRAMEWORKS)
def test_r1_feedforward_init_energy_is_output_loss(framework, getkey):
    base = cases.build_mlp(framework, cases.canonical_mlp(SIZES, getkey()))
    for lname, loss in LOSSES.items():
        x, y = _data(getkey(), lname)
        for param in PARAMS.values():
            for skips in (False, True):
                model = base.with_skips(skips)
                energy = pccore.PC(loss=loss, parameterisation=param)
                z = pccore.init_activities(model, x, energy=energy)
                le = pccore.layer_energies(model, z, x=x, y=y, energy=energy)
                np.testing.assert_array_equal(le[:-1], 0.0)  # every hidden error exactly 0
                ev = pccore.evaluate(model, x, y, energy=energy)  # feed-forward output loss
                np.testing.assert_allclose(le[-1], param.output_precision * B * ev.loss, rtol=1e-5)
                np.testing.assert_allclose(pccore.energy(model, z, x=x, y=y, energy=energy),
                                           le[-1], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(LOSSES))
def test_r2_matching_or_free_output_is_stationary(loss, getkey):
    model = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey())).with_skips(True)
    x, _ = _data(getkey())
    energy = pccore.PC(loss=LOSSES[loss], parameterisation=PARAMS["NTP"])
    y_hat = pccore.PC(parameterisation=PARAMS["NTP"]).parameterisation.apply(model)(x)
    y = jax.nn.softmax(y_hat) if loss == "CE" else y_hat
    z = pccore.init_activities(model, x, energy=energy)
    for target in (y, None):
        g = jax.grad(lambda z, t=target: pccore.energy(model, z, x=x, y=t, energy=energy))(z)
        for a in g:
            np.testing.assert_allclose(a, 0.0, atol=1e-6)
        sol = pccore.infer(model, x=x, y=target, energy=energy, t1=1.0, dt0=0.1)
        for a, b in zip(sol.activities, z):
            np.testing.assert_allclose(a, b, atol=1e-6)


def _hand_energy(weights, scales, skips, lam, z, x, y):
    """F = sum_l 1/2 ||z_l - mu_l||^2 + lam * 1/2 ||y - mu_L||^2, written out; per layer."""
    zs = [x, *z]
    L = len(weights)
    terms = []
    for l in range(1, L + 1):
        W, b = weights[l - 1]
        h = scales[l - 1] * (zs[l - 1] @ W) + b
        mu = (h if l == L else jnp.tanh(h)) + (zs[l - 1] if skips[l - 1] else 0.0)
        target = y if l == L else zs[l]
        terms.append((lam if l == L else 1.0) * 0.5 * jnp.sum((target - mu) ** 2))
    return jnp.stack(terms)


def test_r3_hand_written_energy_gradients_and_layer_order(getkey):
    weights = cases.canonical_mlp(SIZES, getkey())
    model = cases.build_mlp("equinox", weights).with_skips(True)
    x, y = _data(getkey())
    param = PARAMS["MuPC"]
    energy = pccore.PC(parameterisation=param)
    scales = [s[0] for s in param.scalings(model)]
    np.testing.assert_allclose(scales, [1 / 2, 1 / np.sqrt(6 * 4), 1 / np.sqrt(6 * 4), 1 / (6 * 0.5)])
    z = tuple(jax.random.normal(k, (B, 6)) * (l + 1)  # distinct magnitudes per layer
              for l, k in enumerate(jax.random.split(getkey(), 3)))
    hand = lambda z: _hand_energy(weights, scales, model.skips, 2.0, z, x, y)
    le = pccore.layer_energies(model, z, x=x, y=y, energy=energy)
    np.testing.assert_allclose(le, hand(z), rtol=1e-5)  # layer order [E_1, ..., E_L]
    assert len(set(np.round(np.asarray(le), 3))) == len(le)
    np.testing.assert_allclose(pccore.energy(model, z, x=x, y=y, energy=energy), hand(z).sum(),
                               rtol=1e-5)
    g = jax.grad(lambda z: pccore.energy(model, z, x=x, y=y, energy=energy))(z)
    g_hand = jax.grad(lambda z: hand(z).sum())(z)
    for a, b in zip(g, g_hand):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # finite differences on one coordinate
    eps = 1e-2
    bump = lambda s: (z[0].at[1, 2].add(s), *z[1:])
    fd = (pccore.energy(model, bump(eps), x=x, y=y, energy=energy)
          - pccore.energy(model, bump(-eps), x=x, y=y, energy=energy)) / (2 * eps)
    np.testing.assert_allclose(fd, g[0][1, 2], rtol=1e-2)
    # parameter gradients (batch mean) against the hand-written energy
    gp = pccore.param_grads(model, z, x=x, y=y, energy=energy)
    gw = jax.grad(lambda ws: _hand_energy(ws, scales, model.skips, 2.0, z, x, y).sum() / B)(weights)
    for l in range(len(weights)):
        np.testing.assert_allclose(gp[l][0].weight, gw[l][0].T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pname", list(PARAMS))
def test_r4_modes_share_the_scalings(pname, getkey):
    """With z_0 free and equal to x, the energy equals the clamped one (a_1 applied)."""
    model = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey())).with_skips(True)
    x, y = _data(getkey())
    energy = pccore.PC(parameterisation=PARAMS[pname])
    z = pccore.init_activities(model, x, energy=energy, init=pccore.RandomNormal(1.0), key=getkey())
    clamped = pccore.energy(model, z, x=x, y=y, energy=energy)
    free = pccore.energy(model, (x, *z), x=None, y=y, energy=energy)
    np.testing.assert_allclose(free, clamped, rtol=1e-6)
    le_free = pccore.layer_energies(model, (x, *z), x=None, y=y, energy=energy)
    le = pccore.layer_energies(model, z, x=x, y=y, energy=energy)
    np.testing.assert_allclose(le_free, le, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["euler", "adam"])
def test_r5_sample_trajectory_is_batch_independent(solver, getkey):
    model = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey()))
    x, y = _data(getkey())
    opts = (dict(solver=diffrax.Euler(), t1=2.0, dt0=0.1) if solver == "euler"
            else dict(solver=optax.adam(0.05), max_steps=20))
    batched = pccore.infer(model, x=x, y=y, **opts)
    alone = pccore.infer(model, x=x[2:3], y=y[2:3], **opts)
    for a, b in zip(batched.activities, alone.activities):
        np.testing.assert_allclose(a[2:3], b, rtol=1e-5, atol=1e-6)


def test_r6_steady_state_tests_the_vector_field(getkey):
    # (b) zero state, non-zero field: linear, no bias, x = 0, y != 0
    model = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey(), bias=False),
                            lambda z: z)
    x = jnp.zeros((B, SIZES[0]))
    y = 5.0 * jnp.ones((B, SIZES[-1]))
    steady = pccore.SteadyState(rtol=1e-3, atol=1e-3)
    opts = dict(solver=diffrax.Euler(), t1=100.0, dt0=0.1, max_steps=1000, steady_state=steady)
    sol = pccore.infer(model, x=x, y=y, **opts)
    assert int(sol.num_steps) > 10
    assert sol.result == pccore.RESULTS.converged
    assert float(sol.vector_field_norm) <= 1e-3 + 1e-3 * max(float(jnp.abs(a).max()) for a in sol.activities)
    # (c) a feed-forward start with a large output error is not steady, at B = 64 and width 64
    wide = cases.build_mlp("equinox", cases.canonical_mlp([64, 64, 64, 64, 10], getkey()))
    xb = jax.random.normal(getkey(), (64, 64))
    yb = 3.0 * jax.nn.one_hot(jnp.arange(64) % 10, 10)
    sol = pccore.infer(wide, x=xb, y=yb, solver=diffrax.Euler(), t1=1.0, dt0=0.1,
                       steady_state=steady, throw=False)
    assert int(sol.num_steps) == 10


@pytest.mark.parametrize("route", ["diffrax", "optax"])
def test_recorded_energies_along_a_trajectory(route, getkey):
    weights = cases.canonical_mlp(SIZES, getkey())
    model = cases.build_mlp("equinox", weights)
    x, y = _data(getkey())
    if route == "diffrax":
        ts = jnp.array([0.0, 0.5, 1.0, 2.0])
        opts = dict(solver=diffrax.Heun(), t1=2.0, dt0=0.1, saveat=diffrax.SaveAt(ts=ts))
    else:
        ts = jnp.array([0, 3, 10])
        opts = dict(solver=optax.sgd(0.1), max_steps=10, saveat=diffrax.SaveAt(ts=ts))
    sol = pccore.infer(model, x=x, y=y, **opts)
    assert sol.energies.shape == (len(ts),)
    scales = [1.0] * len(weights)
    for k in range(len(ts)):
        z = tuple(a[k] for a in sol.trajectory)
        hand = _hand_energy(weights, scales, model.skips, 1.0, z, x, y)
        np.testing.assert_allclose(sol.energies[k], hand.sum(), rtol=1e-5)
    # the first record is the feed-forward start, the last the final state
    np.testing.assert_allclose(sol.energies[0], pccore.evaluate(model, x, y).loss * B, rtol=1e-5)
    np.testing.assert_allclose(sol.energies[-1], sol.energy, rtol=1e-5)
    assert np.all(np.diff(np.asarray(sol.energies)) < 0)  # gradient flow decreases the energy


@pytest.mark.slow
@pytest.mark.parametrize("framework", cases.FRAMEWORKS)
def test_errors_travel_one_layer_per_euler_step(framework, getkey):
    # From the feed-forward start every hidden error is exactly zero (R1), and the gradient
    # of F at z_l reads only e_l and e_{l+1}: k Euler steps move z_{L-k}..z_{L-1} and leave
    # the errors below exactly zero, so the parameters of layers 1..L-1-k get an exactly zero
    # gradient. Checked through infer + param_grads, and through train_step (whose first
    # Euler step is taken outside its loop) with SGD: those layers do not move.
    model = cases.build_mlp(framework, cases.canonical_mlp(SIZES, getkey()))
    x, y = _data(getkey())
    L = len(SIZES) - 1
    optim = optax.sgd(0.1)
    for k in range(L + 1):
        sol = pccore.infer(model, x=x, y=y, t1=0.1 * k, dt0=0.1) if k else None
        z = sol.activities if k else pccore.init_activities(model, x)
        grads = pccore.param_grads(model, z, x=x, y=y)
        stepped = None
        if k:
            stepped = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                        t1=0.1 * k, dt0=0.1)[0]
        for layer in range(L):  # layer l + 1 maps z_l to z_{l+1} (z_0 = x)
            g = jax.tree_util.tree_leaves(grads[layer])
            still = layer + 1 <= L - 1 - k
            assert all(bool(jnp.all(a == 0)) for a in g) == still, (k, layer)
            if stepped is not None:
                before = jax.tree_util.tree_leaves(model.params[layer])
                after = jax.tree_util.tree_leaves(stepped.params[layer])
                same = all(bool(jnp.all(a == b)) for a, b in zip(before, after))
                assert same == still, (k, layer)
