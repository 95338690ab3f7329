"""Bidirectional PC (R10): hand-written energy, reduction to PC, free x, parameterisations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pccore
from tests import cases

B = 3


def _nets(sizes, key):
    kf, kb = jax.random.split(key)
    wf = cases.canonical_mlp(sizes, kf)
    wb = cases.canonical_mlp(sizes[::-1], kb)
    model = pccore.Bidirectional(cases.build_mlp("equinox", wf), cases.build_mlp("equinox", wb))
    return model, wf, wb


def _mlp_layer(weights, j, z, scale=1.0):
    W, b = weights[j]
    h = scale * (z @ W) + b
    return h if j == len(weights) - 1 else jnp.tanh(h)


def _hand_energy(wf, wb, z, alpha_f, alpha_b, lam=1.0, scales_f=None, scales_b=None):
    """z = [z_0, ..., z_L]; forward layer l-1 maps z_{l-1} -> z_l; backward layer j is g_{L-1-j}."""
    L = len(wf)
    sf = scales_f or [1.0] * L
    sb = scales_b or [1.0] * L
    sq = lambda a: 0.5 * jnp.sum(a**2)
    Ef = sum(sq(z[l] - _mlp_layer(wf, l - 1, z[l - 1], sf[l - 1])) for l in range(1, L))
    Ef += lam * sq(z[L] - _mlp_layer(wf, L - 1, z[L - 1], sf[L - 1]))  # reads z_{L-1}
    Eb = lam * sq(z[0] - _mlp_layer(wb, L - 1, z[1], sb[L - 1]))  # g_0 reads z_1
    Eb += sum(sq(z[l] - _mlp_layer(wb, L - 1 - l, z[l + 1], sb[L - 1 - l])) for l in range(1, L))
    return alpha_f * Ef + alpha_b * Eb


def _random_state(sizes, key):
    keys = jax.random.split(key, len(sizes))
    return [jax.random.normal(k, (B, n)) for k, n in zip(keys, sizes)]


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [1, 2, 3, 4])
def test_energy_matches_hand_written(getkey, hidden):
    sizes = [4] + [5] * hidden + [3]
    model, wf, wb = _nets(sizes, getkey())
    z = _random_state(sizes, getkey())
    energy = pccore.BPC(alpha_f=0.7, alpha_b=1.3)
    got = pccore.energy(model, tuple(z[1:-1]), x=z[0], y=z[-1], energy=energy)
    np.testing.assert_allclose(got, _hand_energy(wf, wb, z, 0.7, 1.3), rtol=1e-5)
    # an unclamped x is its own variable
    got = pccore.energy(model, tuple(z[:-1]), x=None, y=z[-1], energy=energy)
    np.testing.assert_allclose(got, _hand_energy(wf, wb, z, 0.7, 1.3), rtol=1e-5)
    # per-layer terms add up, in the documented order
    le = pccore.layer_energies(model, tuple(z[1:-1]), x=z[0], y=z[-1], energy=energy)
    assert le.shape == (2 * len(wf),)
    np.testing.assert_allclose(le.sum(), got, rtol=1e-5)
    np.testing.assert_allclose(le[len(wf)], _hand_energy(wf, wb, z, 0.0, 1.3) - 1.3 * sum(
        0.5 * jnp.sum((z[l] - _mlp_layer(wb, len(wf) - 1 - l, z[l + 1])) ** 2)
        for l in range(1, len(wf))), rtol=1e-5)


def test_reduces_to_pc(getkey):
    sizes = [4, 5, 5, 3]
    model, _, _ = _nets(sizes, getkey())
    z = _random_state(sizes, getkey())
    x, y, hidden = z[0], z[-1], tuple(z[1:-1])
    sp = pccore.SP(output_precision=2.0)
    # alpha_b = 0: alpha_f * PC on the forward network
    got = pccore.energy(model, hidden, x=x, y=y, energy=pccore.BPC(2.5, 0.0, parameterisation=sp))
    pc = pccore.energy(model.forward, hidden, x=x, y=y, energy=pccore.PC(parameterisation=sp))
    np.testing.assert_allclose(got, 2.5 * pc, rtol=1e-6)
    # alpha_f = 0: alpha_b * PC on the backward network with x and y swapped
    got = pccore.energy(model, hidden, x=x, y=y, energy=pccore.BPC(0.0, 0.4, parameterisation=sp))
    pc = pccore.energy(model.backward, hidden[::-1], x=y, y=x, energy=pccore.PC(parameterisation=sp))
    np.testing.assert_allclose(got, 0.4 * pc, rtol=1e-6)


def test_parameterisation_is_applied(getkey):
    sizes = [4, 6, 6, 3]
    model, wf, wb = _nets(sizes, getkey())
    z = _random_state(sizes, getkey())
    param = pccore.MuPC(gamma=0.5)
    energy = pccore.BPC(1.0, 1.0, parameterisation=param)
    scales = lambda s: [1 / np.sqrt(s[0]), 1 / np.sqrt(s[1]), 1 / (s[2] * 0.5)]
    expected = _hand_energy(wf, wb, z, 1.0, 1.0, scales_f=scales(sizes), scales_b=scales(sizes[::-1]))
    got = pccore.energy(model, tuple(z[1:-1]), x=z[0], y=z[-1], energy=energy)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_errors(getkey):
    f = cases.build_mlp("equinox", cases.canonical_mlp([4, 5, 3], getkey()))
    b = cases.build_mlp("equinox", cases.canonical_mlp([3, 6, 4], getkey()))
    with pytest.raises(ValueError, match="expected the forward shapes"):
        pccore.Bidirectional(f, b)
    with pytest.raises(TypeError, match="needs a pccore.Bidirectional"):
        pccore.energy(f, (jnp.zeros((2, 5)),), x=jnp.zeros((2, 4)), y=jnp.zeros((2, 3)),
                      energy=pccore.BPC())
    model, _, _ = _nets([4, 5, 3], getkey())
    with pytest.raises(ValueError, match="needs a clamped output"):
        pccore.energy(model, (jnp.zeros((2, 5)),), x=jnp.zeros((2, 4)), y=None, energy=pccore.BPC())
