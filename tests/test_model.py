"""`pccore.PCModel`: the compiled feed-forward pass and initial activities."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

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
