"""Hybrid (amortised) PC (R9): the amortiser energy, its gradient flow, the amortised init."""

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import pccore
from tests import cases

GEN = [3, 6, 7, 8]  # label -> ... -> data
B = 4


def _models(key, dtype=jnp.float32):
    kg, ka = jax.random.split(key)
    wg, wa = cases.canonical_mlp(GEN, kg, dtype), cases.canonical_mlp(GEN[::-1], ka, dtype)
    return cases.build_mlp("equinox", wg), cases.build_mlp("equinox", wa), wa


def _layer(weights, j, h):
    W, b = weights[j]
    out = h @ W + b
    return out if j == len(weights) - 1 else jnp.tanh(out)


def _hand_amort(wa, z, x, y):
    """sum_k 1/2 ||t_{L-k} - h_k(a_{L-k+1})||^2 with a the amortiser's own feed-forward guesses."""
    L = len(wa)
    a = {L: y}
    for k in range(1, L + 1):
        a[L - k] = _layer(wa, k - 1, a[L - k + 1])
    a = {i: jax.lax.stop_gradient(v) for i, v in a.items()}
    t = dict(enumerate(z if x is None else (x, *z)))
    return sum(0.5 * jnp.sum((t[L - k] - _layer(wa, k - 1, a[L - k + 1])) ** 2) for k in range(1, L + 1))


@pytest.mark.slow
@pytest.mark.parametrize("clamped", [True, False])
def test_amortiser_energy_matches_hand_written(getkey, clamped):
    gen, amort, wa = _models(getkey())
    x = jax.random.normal(getkey(), (B, GEN[0]))
    y = jax.random.normal(getkey(), (B, GEN[-1]))
    shapes = GEN[1:-1] if clamped else GEN[:-1]
    z = tuple(jax.random.normal(k, (B, n)) for k, n in zip(jax.random.split(getkey(), 3), shapes))
    xc = x if clamped else None
    np.testing.assert_allclose(pccore.amortiser_energy(amort, z, x=xc, y=y),
                               _hand_amort(wa, z, xc, y), rtol=1e-5)
    # gradient flow: no gradient into the targets (activities); amortiser gradient as by hand
    gz = jax.grad(lambda z: pccore.amortiser_energy(amort, z, x=xc, y=y))(z)
    for g in gz:
        np.testing.assert_array_equal(g, 0.0)
    ga = jax.grad(lambda p: pccore.amortiser_energy(amort.with_params(p), z, x=xc, y=y))(amort.params)

    def hand(ws):
        return _hand_amort(ws, z, xc, y)

    gw = jax.grad(hand)([(W, b) for W, b in wa])
    for l in range(len(wa)):
        np.testing.assert_allclose(ga[l][0].weight, gw[l][0].T, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ga[l][0].bias, gw[l][1], rtol=1e-4, atol=1e-6)
    # the guesses are the amortiser's feed-forward pass, reversed
    guesses = pccore.amortise(amort, y)
    np.testing.assert_allclose(guesses[0], amort(y), rtol=1e-6)


def _constant_amortiser(values):
    """A hand-built amortiser whose guesses are fixed arrays (one per latent, bottom first)."""
    outs = list(values[::-1])
    L = len(outs)
    return pccore.PCModel(
        layers=tuple((lambda p, h: p) for _ in range(L)),
        params=tuple(outs),
        in_shape=jax.ShapeDtypeStruct((GEN[-1],), outs[0].dtype),
        out_shapes=tuple(jax.ShapeDtypeStruct(o.shape[1:], o.dtype) for o in outs),
        names=tuple(f"c{l}" for l in range(L)), weights=((),) * L, skips=(False,) * L,
        framework="hand-built", rebuild=lambda p: p,
    )


@pytest.mark.slow
def test_inference_from_the_equilibrium_does_not_move(x64, getkey):
    # float64: the restarted solve tests the field at its start in another program than the
    # one that stopped there; the two roundings of g (a difference of O(1) terms near the
    # equilibrium) differ by ~eps |z|, in float32 ~1e-7 against the 1e-4 threshold, so a
    # last step landing that close to it would take one more step on some CPUs.
    f64 = jnp.float64
    gen, _, _ = _models(getkey(), f64)
    x = jax.nn.one_hot(jnp.arange(B) % 3, 3, dtype=f64)
    y = jax.random.normal(getkey(), (B, GEN[-1]), f64)
    steady = pccore.SteadyState(rtol=0.0, atol=1e-4)
    opts = dict(solver=diffrax.Euler(), t1=200.0, dt0=0.1, max_steps=2000, steady_state=steady)
    sol = pccore.infer(gen, x=x, y=y, **opts)
    amort = _constant_amortiser((x, *sol.activities))
    again = pccore.infer(gen, x=x, y=y, init=pccore.Amortised(amort), **opts)
    assert int(again.num_steps) == 0
    for a, b in zip(again.activities, sol.activities):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["PC", "EPC"])
def test_hybrid_step_updates(getkey, variant):
    """The generator update is the variant's own from the amortised init; the amortiser's is
    sgd on F_amort at the equilibrium activities. ePC infers the errors: its activities are
    z_l = mu_l(z_(l-1)) + eps_l, rebuilt here by hand from the generator's weights."""
    kg, ka = jax.random.split(getkey())
    wg, wa = cases.canonical_mlp(GEN, kg), cases.canonical_mlp(GEN[::-1], ka)
    gen, amort = cases.build_mlp("equinox", wg), cases.build_mlp("equinox", wa)
    x = jax.nn.one_hot(jnp.arange(B) % 3, 3)
    y = jax.random.normal(getkey(), (B, GEN[-1]))
    opt, a_opt = optax.sgd(0.1), optax.sgd(0.05)
    energy = pccore.EPC() if variant == "EPC" else pccore.PC()
    opts = dict(solver=diffrax.Euler(), t1=1.0, dt0=0.1, energy=energy)
    g2, _, a2, _, stats = pccore.hybrid_train_step(
        gen, amort, opt, opt.init(gen.params), a_opt, a_opt.init(amort.params), x=x, y=y, **opts)
    g_ref, _, _ = pccore.train_step(gen, opt, opt.init(gen.params), x=x, y=y,
                                    init=pccore.Amortised(amort), **opts)
    for a, b in zip(jtu.tree_leaves(g2.params), jtu.tree_leaves(g_ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    z = pccore.infer(gen, x=x, y=y, init=pccore.Amortised(amort), **opts).activities
    if variant == "EPC":
        eps, z, h = z, [], x
        for l, e in enumerate(eps):
            h = _layer(wg, l, h) + e
            z.append(h)
        assert max(float(jnp.abs(a - b).max()) for a, b in zip(z, eps)) > 0.1  # not the errors
    grads = jax.grad(lambda p: pccore.amortiser_energy(amort.with_params(p), z, x=x, y=y) / B)(
        amort.params)
    for new, old, g in zip(jtu.tree_leaves(a2.params), jtu.tree_leaves(amort.params),
                           jtu.tree_leaves(grads)):
        np.testing.assert_allclose(new, old - 0.05 * g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.amortiser_loss, _hand_amort(wa, z, x, y) / B, rtol=1e-5)


def test_amortiser_shape_errors(getkey):
    gen, _, _ = _models(getkey())
    bad = cases.build_mlp("equinox", cases.canonical_mlp([8, 5, 6, 3], getkey()))
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match="expected the generator's shapes reversed"):
        pccore.hybrid_train_step(gen, bad, opt, opt.init(gen.params), opt, opt.init(bad.params),
                                 x=jnp.zeros((2, 3)), y=jnp.zeros((2, 8)))
