"""Equinox adapter: BatchNorm (inference mode, frozen eqx.nn.State) and Dropout."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore


def _model():
    k = jax.random.split(jax.random.key(0), 2)
    return eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Linear(4, 6, key=k[0]), eqx.nn.BatchNorm(6, "batch", momentum=0.5, mode="batch"),
        eqx.nn.Lambda(jnp.tanh), eqx.nn.Dropout(0.5), eqx.nn.Linear(6, 3, key=k[1]),
    ])


def _x(n=5):
    return jax.random.normal(jax.random.key(1), (n, 4))


def test_batchnorm_inference_mode_runs_frozen_on_its_state():
    seq, state = _model()
    # non-trivial running statistics from one training-mode pass
    train = jax.vmap(lambda xi, st: seq(xi, st, key=jax.random.key(2)), axis_name="batch",
                     in_axes=(0, None), out_axes=(0, None))
    _, state = train(3.0 + _x(), state)
    inf = eqx.nn.inference_mode(seq)
    model = pccore.wrap(inf, state)
    native = jax.vmap(lambda xi: inf(xi, state)[0])(_x())
    np.testing.assert_allclose(model(_x()), native, rtol=1e-6)
    assert model.names[1] == "1:BatchNorm+2:Lambda+3:Dropout"
    optim = optax.sgd(0.1)
    opt_state = optim.init(model.params)
    trained, _, _ = pccore.train_step(model, optim, opt_state, x=_x(), y=jnp.ones((5, 3)))
    # the state is frozen: the trained model still reads the same running averages
    new = trained.unwrap()
    np.testing.assert_allclose(trained(_x()), jax.vmap(lambda xi: new(xi, state)[0])(_x()), rtol=1e-6)


def _native_train(seq, state, x, key):
    if state is not None:  # a native call retires the State it is given
        state = jax.tree.unflatten(*reversed(jax.tree.flatten(state)))
    keys = jax.random.split(key, x.shape[0])
    out = jax.vmap(lambda xi, ki: seq(xi, state, key=ki) if state is not None else seq(xi, key=ki),
                   axis_name="batch", out_axes=(0, None) if state is not None else 0)(x, keys)
    return out[0] if state is not None else out


def test_training_mode_trains_and_missing_state_is_refused():
    seq, state = _model()
    model = pccore.wrap(seq, state)
    assert model.training and model.stochastic
    key = jax.random.key(3)
    np.testing.assert_allclose(model.with_step_key(key)(_x()), _native_train(seq, state, _x(), key),
                               rtol=1e-6)
    no_dropout = eqx.tree_at(lambda m: m.layers[3], seq, eqx.nn.Dropout(0.5, inference=True))
    with pytest.raises(pccore.UnsupportedLayerError, match=r"model.layers\[1\] is a stateful BatchNorm"):
        pccore.wrap(eqx.nn.inference_mode(no_dropout, True))
    dropout_only = eqx.nn.Sequential([eqx.nn.Linear(4, 3, key=jax.random.key(0)), eqx.nn.Dropout(0.5)])
    model = pccore.wrap(dropout_only)
    assert model.training and model.stochastic and model.unwrap_state() is None
    with pytest.raises(TypeError, match="its eqx.nn.State"):
        pccore.wrap(eqx.nn.inference_mode(seq), {"not": "a state"})


class _Block(eqx.Module):
    """A custom module hiding Dropout one level down (not a layer of the Sequential)."""

    lin: eqx.nn.Linear
    drop: eqx.nn.Dropout

    def __call__(self, x, *, key=None):
        return self.drop(jnp.tanh(self.lin(x)), key=key)


def test_training_mode_layers_nested_in_elements_train_as_natively():
    k = jax.random.split(jax.random.key(0), 3)
    inner = eqx.nn.Sequential([eqx.nn.BatchNorm(6, "batch", mode="batch"), eqx.nn.Lambda(jnp.tanh)])
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx.nn.Linear(4, 6, key=k[0]), inner, eqx.nn.Linear(6, 3, key=k[1])])
    key = jax.random.key(5)
    for model in (pccore.wrap(seq, state), pccore.wrap(list(seq.layers), state)):
        assert model.training and not model.stochastic
        np.testing.assert_allclose(model.with_step_key(key)(_x()),
                                   _native_train(seq, state, _x(), key), rtol=1e-6)
    blocks = eqx.nn.Sequential([_Block(eqx.nn.Linear(4, 6, key=k[0]), eqx.nn.Dropout(0.5)),
                                eqx.nn.Linear(6, 3, key=k[2])])
    model = pccore.wrap(blocks, input_shape=(4,))
    assert model.stochastic
    np.testing.assert_allclose(model.with_step_key(key)(_x()), _native_train(blocks, None, _x(), key),
                               rtol=1e-6)
    # in inference mode the same nested model is accepted and matches the native forward
    inf = eqx.nn.inference_mode(blocks)
    np.testing.assert_allclose(pccore.wrap(inf, input_shape=(4,))(_x()), jax.vmap(inf)(_x()), rtol=1e-6)


def test_leading_parameter_free_elements_join_the_first_layer():
    """[Lambda, Linear, Lambda, Linear] is two layers, as the same model is in the other
    adapters: a layer without parameters would be a latent PC cannot learn anything for."""
    k0, k1 = jax.random.split(jax.random.key(0))
    seq = eqx.nn.Sequential([eqx.nn.Lambda(lambda v: 2.0 * v), eqx.nn.Linear(4, 5, key=k0),
                             eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(5, 3, key=k1)])
    model = pccore.wrap(seq, input_shape=(4,))
    assert model.names == ("0:Lambda+1:Linear+2:Lambda", "3:Linear")
    x = jax.random.normal(jax.random.key(1), (6, 4))
    np.testing.assert_allclose(model(x), jax.vmap(seq)(x), rtol=1e-6, atol=1e-6)
    z = pccore.init_activities(model, x)
    np.testing.assert_allclose(z[0], jax.vmap(lambda v: jnp.tanh(seq.layers[1](2.0 * v)))(x),
                               rtol=1e-6, atol=1e-6)
    back = model.unwrap()
    assert type(back) is eqx.nn.Sequential and len(back.layers) == 4
