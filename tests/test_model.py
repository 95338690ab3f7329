"""`pccore.PCModel`: the compiled feed-forward pass and initial activities."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pccore


def _counting_model():
    """An MLP whose activation counts how often it is traced (a Python side effect)."""
    traces = []

    def act(h):
        traces.append(1)
        return jnp.tanh(h)

    k1, k2 = jax.random.split(jax.random.key(0))
    seq = eqx.nn.Sequential([eqx.nn.Linear(4, 6, key=k1), eqx.nn.Lambda(act),
                             eqx.nn.Linear(6, 3, key=k2)])
    model = pccore.wrap(seq)
    traces.clear()  # wrap traces it once for the layer shapes
    return seq, model, traces


def test_the_forward_pass_is_compiled_once_and_equals_the_native_one():
    seq, model, traces = _counting_model()
    x = jax.random.normal(jax.random.key(1), (5, 4))
    for _ in range(3):
        out = model(x)
    assert len(traces) == 1  # eager, every call would trace the activation again
    model(jnp.ones((7, 4)))  # a new shape compiles once more
    assert len(traces) == 2
    np.testing.assert_allclose(out, jax.vmap(seq)(x), rtol=1e-6)


def test_init_activities_is_compiled_once_and_is_the_feed_forward_pass():
    seq, model, traces = _counting_model()
    x = jax.random.normal(jax.random.key(1), (5, 4))
    for _ in range(3):
        (z1,) = pccore.init_activities(model, x)
    assert len(traces) == 1
    np.testing.assert_allclose(z1, jax.vmap(lambda v: jnp.tanh(seq.layers[0](v)))(x), rtol=1e-6)


def test_weight_spec_out_ndim_reads_multi_axis_kernels():
    """`out_ndim` output axes from `out_axis` inwards: W has them as rows, the rest as columns;
    the default (one output axis) reads conv kernels as before."""
    from pccore._model import fan_in, matricise

    w = np.arange(6 * 2 * 4.0).reshape(6, 2, 4)  # (in, heads, head_dim)
    np.testing.assert_array_equal(matricise(jnp.asarray(w), -1, 2), w.reshape(6, 8).T)
    assert fan_in(w.shape, -1, 2) == 6 and fan_in(w.shape, -1) == 12
    o = np.arange(8 * 3 * 5.0).reshape(8, 3, 5)  # (out, heads, head_dim) with out_axis 0
    np.testing.assert_array_equal(matricise(jnp.asarray(o), 0), o.reshape(8, 15))
    np.testing.assert_array_equal(matricise(jnp.asarray(w.transpose(1, 2, 0)), 0, 2), w.reshape(6, 8).T)
    assert fan_in((3, 3, 2, 8), -1) == 18 and fan_in((8, 2, 3, 3), 0) == 18
    assert pccore.WeightSpec(0, -1).out_ndim == 1
    with pytest.raises(ValueError, match=r"`out_ndim` must be a positive number of output axes; got 0\. Use 1"):
        pccore.WeightSpec(0, -1, 0)
    with pytest.raises(ValueError, match="unsupported weight layout"):
        matricise(jnp.asarray(w), -1, 3)  # no input axis left
