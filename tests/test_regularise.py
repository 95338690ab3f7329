"""Regularisers change gradients by exactly the analytic amount, or raise (R13)."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import pccore
from pccore._model import matricise
from tests import cases

SIZES = [5, 7, 6, 3]
B = 4


def _analytic(W, wd, sp):
    """dR/dW in (out, in) layout."""
    return wd * W + 2 * sp * W @ (W.T @ W - jnp.eye(W.shape[1]))


def _native(dW, like, out_axis):
    """A (out, in) matrix back in the layout of the native weight `like`."""
    moved = jnp.moveaxis(like, out_axis, 0)
    return jnp.moveaxis(dW.reshape(moved.shape), 0, out_axis)


def _problem(model, key):
    kx, ky, kz = jax.random.split(key, 3)
    x = jax.random.normal(kx, (B, *model.in_shape.shape))
    y = jax.random.normal(ky, (B, *model.out_shapes[-1].shape))
    z = pccore.init_activities(model, x)
    z = tuple(a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(z, jax.random.split(kz, len(z))))
    return x, y, z


def _check_delta(model, x, y, z, wd, sp):
    base = pccore.PC()
    regs = pccore.PC(regularisers=(pccore.WeightDecay(wd), pccore.SpectralPenalty(sp)))
    g0 = pccore.param_grads(model, z, x=x, y=y, energy=base)
    g1 = pccore.param_grads(model, z, x=x, y=y, energy=regs)
    for l in range(model.num_layers):
        leaves0, leaves1 = jtu.tree_leaves(g0[l]), jtu.tree_leaves(g1[l])
        params = jtu.tree_leaves(model.params[l])
        weight_idx = {s.index: s for s in model.weights[l]}
        for i, (a, b, p) in enumerate(zip(leaves0, leaves1, params)):
            if i in weight_idx:
                s = weight_idx[i]
                expected = _native(_analytic(matricise(p, s.out_axis), wd, sp), p, s.out_axis)
                np.testing.assert_allclose(b - a, expected, rtol=1e-5, atol=1e-6)
            else:  # biases are never penalised
                np.testing.assert_array_equal(b, a)
    # the penalty value itself
    R = regs.penalty(model)
    expected = 0.0
    for l in range(model.num_layers):
        for W in model.weight_matrices(l):
            expected += 0.5 * wd * jnp.sum(W**2)
            expected += 0.5 * sp * jnp.sum((W.T @ W - jnp.eye(W.shape[1])) ** 2)
    np.testing.assert_allclose(R, expected, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("framework", cases.FRAMEWORKS)
def test_weight_regularisers_change_gradients_analytically(framework, getkey):
    model = cases.build_mlp(framework, cases.canonical_mlp(SIZES, getkey()))
    x, y, z = _problem(model, getkey())
    _check_delta(model, x, y, z, wd=0.3, sp=0.05)


def _hand_built_in_out(key):
    """A PCModel as Haiku/Flax adapters build it: kernels K (in, out), WeightSpec(out_axis=-1)."""
    weights = cases.canonical_mlp(SIZES, key)
    fn = lambda p, h: jnp.tanh(h @ p["w"] + p["b"])
    last = lambda p, h: h @ p["w"] + p["b"]
    L = len(weights)
    return pccore.PCModel(
        layers=tuple(fn if l < L - 1 else last for l in range(L)),
        params=tuple({"w": W, "b": b} for W, b in weights),
        in_shape=jax.ShapeDtypeStruct((SIZES[0],), jnp.float32),
        out_shapes=tuple(jax.ShapeDtypeStruct((n,), jnp.float32) for n in SIZES[1:]),
        names=tuple(f"linear_{l}" for l in range(L)),
        weights=tuple((pccore.WeightSpec(1, -1),) for _ in range(L)),  # leaves: [b, w]
        skips=(False,) * L,
        framework="hand-built",
        rebuild=lambda p: p,
    ), weights


@pytest.mark.slow
def test_in_out_layout_is_transposed(getkey):
    model, weights = _hand_built_in_out(getkey())
    for l, (W, _) in enumerate(weights):
        (M,) = model.weight_matrices(l)
        np.testing.assert_array_equal(M, W.T)  # (out, in)
    x, y, z = _problem(model, getkey())
    _check_delta(model, x, y, z, wd=0.2, sp=0.1)
    # the same maths as the Equinox model with the same weights
    ref = cases.build_mlp("equinox", weights)
    energy = pccore.PC(regularisers=(pccore.WeightDecay(0.2), pccore.SpectralPenalty(0.1)))
    np.testing.assert_allclose(energy.penalty(model), energy.penalty(ref), rtol=1e-6)
    g, g_ref = (pccore.param_grads(m, z, x=x, y=y, energy=energy) for m in (model, ref))
    for l in range(model.num_layers):
        np.testing.assert_allclose(g[l]["w"], g_ref[l][0].weight.T, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_conv_kernels_are_matricised(getkey):
    conv = eqx.nn.Conv2d(2, 3, kernel_size=3, padding=1, key=getkey())
    seq = eqx.nn.Sequential([conv, eqx.nn.Lambda(jnp.tanh), eqx.nn.Lambda(jnp.ravel),
                             eqx.nn.Linear(3 * 4 * 4, 2, key=getkey())])
    model = pccore.wrap(seq, input_shape=(2, 4, 4))
    (W,) = model.weight_matrices(0)
    assert W.shape == (3, 2 * 3 * 3)
    np.testing.assert_array_equal(W, conv.weight.reshape(3, -1))
    x, y, z = _problem(model, getkey())
    _check_delta(model, x, y, z, wd=0.1, sp=0.02)


def test_traced_coefficients(getkey):
    model = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey()))
    x, y, z = _problem(model, getkey())
    g0 = pccore.param_grads(model, z, x=x, y=y)

    def grads(c):
        return pccore.param_grads(model, z, x=x, y=y,
                                  energy=pccore.PC(regularisers=(pccore.WeightDecay(c),)))

    cs = jnp.array([0.0, 0.5, 2.0])
    gs = jax.vmap(grads)(cs)
    for l in range(model.num_layers):
        W = model.params[l][0].weight
        for i, c in enumerate(cs):
            np.testing.assert_allclose(gs[l][0].weight[i] - g0[l][0].weight, c * W,
                                       rtol=1e-5, atol=1e-6)


def test_activity_decay_changes_activity_gradients(getkey):
    model = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey()))
    x, y, z = _problem(model, getkey())
    ad = 0.7
    g0 = jax.grad(lambda z: pccore.energy(model, z, x=x, y=y))(z)
    g1 = jax.grad(lambda z: pccore.energy(model, z, x=x, y=y,
                                          energy=pccore.PC(activity_decay=ad)))(z)
    for a, b, zl in zip(g0, g1, z):
        np.testing.assert_allclose(b - a, ad * zl, rtol=1e-5, atol=1e-6)


def test_unidentified_weights_raise(getkey):
    model, _ = _hand_built_in_out(getkey())
    model = dataclasses.replace(model, weights=((),) + model.weights[1:])
    energy = pccore.PC(regularisers=(pccore.WeightDecay(0.1),))
    with pytest.raises(ValueError, match="identified no weight matrix"):
        energy.penalty(model)
    x, y, z = _problem(model, getkey())
    with pytest.raises(ValueError, match="identified no weight matrix"):
        pccore.param_grads(model, z, x=x, y=y, energy=energy)


def test_bad_regulariser_is_rejected(getkey):
    model = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey()))
    with pytest.raises(TypeError, match=r"`PC`: `regularisers\[0\]` must be an instance of "
                                        r"pccore\.AbstractRegulariser; got a float"):
        pccore.PC(regularisers=(0.1,))
    # a regulariser smuggled past the constructor is still refused where it is used
    smuggled = pccore.PC()
    object.__setattr__(smuggled, "regularisers", (0.1,))
    with pytest.raises(TypeError, match="`regularisers` must hold pccore regularisers"):
        smuggled.penalty(model)
