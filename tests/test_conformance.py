"""Cross-framework conformance: every adapter in `cases.FRAMEWORKS` against Equinox.

Same architecture, same weights: energies, activity gradients, equilibrated activities,
parameter gradients, one optax update and ten training steps agree with the Equinox
reference (float64: 1e-10 relative; float32: 1e-5), for an MLP with unequal widths, a CNN
on 8x8 digits, and a model with a parameter-free layer in the middle. After training,
`unwrap()` gives a native object whose own forward pass equals pccore's prediction.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pccore
import pccore.testing
from tests import cases

KINDS = pccore.testing.KINDS


def _builder(framework):
    return lambda kind, w, act: cases.build(framework, kind, w, act)


def _compare(framework, kind, dtype, rtol):
    """`pccore.testing.check_conformance`, the suite shipped for third-party adapters."""
    return pccore.testing.check_conformance(_builder(framework), kind, dtype=dtype, rtol=rtol,
                                            channels_first=framework == "equinox")


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


@pytest.mark.slow
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
