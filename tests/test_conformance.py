"""Cross-framework conformance: every adapter in `cases.FRAMEWORKS` against Equinox.

Same architecture, same weights: energies, activity gradients, equilibrated activities,
parameter gradients, one optax update and ten training steps agree with the Equinox
reference (float64: 1e-10 relative; float32: 1e-5), for an MLP with unequal widths, a CNN
on 8x8 digits, and a model with a parameter-free layer in the middle. After training,
`unwrap()` gives a native object whose own forward pass equals pccore's prediction.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from tests import cases

KINDS = ("mlp", "cnn", "mid")
STEPS = 10


def _data(kind, dtype):
    if kind == "cnn":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = jnp.asarray(d.images[:16, :, :, None] / 16.0, dtype)  # NHWC
        y = jax.nn.one_hot(d.target[:16], 10, dtype=dtype)
        return x, y
    x = jax.random.normal(jax.random.key(1), (6, 5), dtype)
    y = jax.random.normal(jax.random.key(2), (6, 3), dtype)
    return x, y


def _weights(kind, dtype):
    if kind == "cnn":
        return cases.canonical_cnn(jax.random.key(0), dtype)
    return cases.canonical_mlp([5, 9, 4, 3], jax.random.key(0), dtype)


def _canonical(model, template):
    """`model`'s parameters in the Equinox reference's layout, as a flat list of arrays."""
    return jax.tree_util.tree_leaves(pccore.transfer_weights(model, template).params)


def _run(framework, kind, dtype):
    w = _weights(kind, dtype)
    act = jax.nn.relu if kind == "cnn" else jnp.tanh
    built = cases.build(framework, kind, w, act)
    template = cases.build("equinox", kind, w, act).model
    model = built.model
    x, y = _data(kind, dtype)
    x = cases.cnn_input(framework, x) if kind == "cnn" else x
    energy = pccore.PC()
    z0 = pccore.init_activities(model, x=x, y=y, energy=energy)
    keys = jax.random.split(jax.random.key(3), len(z0))  # off the feed-forward pass: all errors non-zero
    z0 = tuple(z + 0.3 * jax.random.normal(k, z.shape, z.dtype) for z, k in zip(z0, keys))
    E, gz = jax.jit(jax.value_and_grad(lambda z: pccore.energy(model, z, x=x, y=y, energy=energy)))(z0)
    sol = pccore.infer(model, x=x, y=y, energy=energy, t1=1.0, dt0=0.1)
    gp = pccore.param_grads(model, sol.activities, x=x, y=y, energy=energy)
    optim = optax.sgd(0.05, momentum=0.9)
    state = optim.init(model.params)
    out = {
        "energy": [E],
        "activity_grads": list(gz),
        "activities": list(sol.activities),
        "param_grads": _canonical(model.with_params(gp), template),
    }
    losses = []
    for k in range(STEPS):
        model, state, stats = pccore.train_step(model, optim, state, x=x, y=y, energy=energy,
                                                t1=1.0, dt0=0.1)
        losses.append(stats.loss)
        if k == 0:
            out["one_update"] = _canonical(model, template)
    out["ten_steps"] = _canonical(model, template)
    out["losses"] = [jnp.stack(losses)]
    native = model.unwrap()
    return out, (built.forward(native, x), model(x))


@functools.cache
def _cached(framework, kind, dtype_name):
    return _run(framework, kind, jnp.dtype(dtype_name))


def _compare(framework, kind, dtype, rtol):
    name = jnp.dtype(dtype).name
    out, (native_y, pc_y) = _cached(framework, kind, name) if framework == "equinox" else _run(
        framework, kind, dtype)
    ref = _cached("equinox", kind, name)[0]
    for key, vals in ref.items():
        assert len(out[key]) == len(vals), key
        scale = max(float(jnp.max(jnp.abs(b))) for b in vals)
        for a, b in zip(out[key], vals):
            err = float(jnp.max(jnp.abs(jnp.asarray(a) - b))) / scale
            assert err <= rtol, f"{framework}/{kind}: {key} differs from Equinox by {err:.2e} (rel)"
    # unwrap() gives a native object whose own forward pass equals pccore's prediction
    np.testing.assert_allclose(native_y, pc_y, rtol=rtol, atol=rtol * float(jnp.abs(pc_y).max()))
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("framework", cases.FRAMEWORKS)
def test_conformance_float64(framework, kind, x64):
    ref = _compare(framework, kind, jnp.float64, 1e-10)
    if kind == "cnn":  # the CNN trains on the digits: the loss falls over ten steps
        losses = ref["losses"][0]
        assert losses[-1] < 0.9 * losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("framework", cases.FRAMEWORKS)
def test_conformance_float32(framework):
    _compare(framework, "mlp", jnp.float32, 1e-5)


@pytest.mark.slow
def test_mupc_scalings_identical_across_frameworks():
    """WeightSpecs make the μPC scalings a_l framework-independent (Equinox (out, in) vs
    Haiku/Flax (in, out)); the oracle is 1/sqrt(fan_in) (first, hidden) and 1/fan_in (last)."""
    w = cases.canonical_mlp([5, 9, 4, 3], jax.random.key(0))
    expected = ((1 / np.sqrt(5),), (1 / np.sqrt(9),), (1 / 4,))
    for fw in cases.FRAMEWORKS:
        got = pccore.MuPC().scalings(cases.build_mlp(fw, w))
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-12, err_msg=fw)
    wc = cases.canonical_cnn(jax.random.key(0))
    cnn = [pccore.MuPC().scalings(cases.build_cnn(fw, wc)) for fw in cases.FRAMEWORKS]
    assert all(s == ((1 / 3.0,), (1 / 27,)) for s in cnn), cnn  # conv fan-in 1*3*3; dense 9*3


@pytest.mark.parametrize("framework", cases.FRAMEWORKS)
def test_layer_functions_are_pure(framework):
    """Each apply_l agrees eagerly, under jax.jit, jax.vmap (an extra batch axis) and jax.grad
    (the jitted gradient against the eager one), at a batch size unlike the wrap-time example."""
    w = cases.canonical_mlp([5, 9, 4, 3], jax.random.key(0))
    model = cases.build_mlp(framework, w)
    x = jax.random.normal(jax.random.key(1), (6, 5))
    for l in range(model.num_layers):
        layer, p = model.layers[l], model.params[l]
        f = lambda p, x, layer=layer: layer(p, x)  # a layer may hold frozen arrays: not a jit key
        eager = f(p, x)
        np.testing.assert_allclose(jax.jit(f)(p, x), eager, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(jax.vmap(f, (None, 0))(p, x.reshape(2, 3, -1)).reshape(eager.shape),
                                   eager, rtol=1e-6, atol=1e-6)
        loss = lambda p, x, f=f: jnp.sum(jnp.sin(f(p, x)))
        g_eager = jax.grad(loss)(p, x)
        g_jit = jax.jit(jax.grad(loss))(p, x)
        for a, b in zip(jax.tree_util.tree_leaves(g_jit), jax.tree_util.tree_leaves(g_eager)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        x = eager
