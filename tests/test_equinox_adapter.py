"""Equinox adapter: decomposition, exact round trips, folding of parameter-free callables."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pccore


def _same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(la, lb):
        if eqx.is_array(u):
            np.testing.assert_array_equal(u, v)


def _forms(key):
    k = jax.random.split(key, 6)
    return {
        "mlp": eqx.nn.MLP(4, 3, 6, 2, activation=jnp.tanh, key=k[0]),
        "mlp_scan": eqx.nn.MLP(4, 3, 6, 3, activation=jnp.tanh, scan=True, key=k[1]),
        "mlp_prelu": eqx.nn.MLP(4, 3, 6, 2, activation=eqx.nn.PReLU(0.1), key=k[2]),
        "mlp_scalar": eqx.nn.MLP(4, "scalar", 6, 2, activation=jnp.tanh, key=k[5]),
        "sequential": eqx.nn.Sequential(
            [eqx.nn.Linear(4, 6, key=k[3]), eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(6, 3, key=k[4])]
        ),
        "list": [eqx.nn.Linear(4, 6, key=k[3]), jax.nn.relu, eqx.nn.Linear(6, 3, key=k[4])],
        "tuple": (eqx.nn.Linear(4, 6, key=k[3]), jnp.sin, jnp.tanh, eqx.nn.Linear(6, 3, key=k[4])),
    }


def _native(model, x):
    if isinstance(model, list | tuple):
        def run(xi):
            for f in model:
                xi = f(xi)
            return xi
        return jax.vmap(run)(x)
    return jax.vmap(model)(x)


@pytest.mark.parametrize("form", ["mlp", "mlp_scan", "mlp_prelu", "mlp_scalar", "sequential",
                                  "list", "tuple"])
def test_round_trip_and_forward(getkey, form):
    native = _forms(getkey())[form]
    model = pccore.wrap(native)
    back = model.unwrap()
    assert type(back) is type(native)
    _same(eqx.filter(back, eqx.is_array), eqx.filter(native, eqx.is_array))
    x = jax.random.normal(getkey(), (5, 4))
    np.testing.assert_allclose(model(x).reshape(5, -1), _native(native, x).reshape(5, -1),
                               rtol=1e-6, atol=1e-6)
    # New parameters flow back into the native object.
    doubled = model.with_params(jax.tree_util.tree_map(lambda p: 2 * p, model.params))
    np.testing.assert_allclose(doubled(x).reshape(5, -1),
                               _native(doubled.unwrap(), x).reshape(5, -1), rtol=1e-5, atol=1e-6)


def test_parameter_free_callables_fold_into_the_layer_before(getkey):
    native = _forms(getkey())["tuple"]
    model = pccore.wrap(native)
    assert model.num_layers == 2
    assert model.names == ("0:Linear+1:PjitFunction+2:PjitFunction", "3:Linear")
    z = jax.random.normal(getkey(), (2, 4))
    np.testing.assert_allclose(model.predict_layer(0, z), jnp.tanh(jnp.sin(jax.vmap(native[0])(z))),
                               rtol=1e-6)


def test_learnable_activation_is_a_parameter(getkey):
    mlp = _forms(getkey())["mlp_prelu"]
    model = pccore.wrap(mlp)
    slopes = [p[1].negative_slope for p in model.params[:-1]]
    assert all(s.shape == (6,) for s in slopes)
    new = model.with_params(
        tuple((p[0], eqx.tree_at(lambda a: a.negative_slope, p[1], p[1].negative_slope + 1))
              if i < 2 else p for i, p in enumerate(model.params))
    )
    np.testing.assert_allclose(new.unwrap().activation.negative_slope,
                               mlp.activation.negative_slope + 1)


def test_weight_specs_locate_weights(getkey):
    model = pccore.wrap(_forms(getkey())["sequential"])
    assert model.fan_ins(0) == (4,) and model.fan_ins(1) == (6,)
    W = model.weight_matrices(1)[0]
    np.testing.assert_array_equal(W, model.params[1][0].weight)


def test_training_mode_dropout_needs_a_step_key(getkey):
    model = pccore.wrap([eqx.nn.Linear(4, 4, key=getkey()), eqx.nn.Dropout(0.5),
                         eqx.nn.Linear(4, 2, key=getkey())])
    assert model.training and model.stochastic
    with pytest.raises(ValueError, match=r"`key`: this model is in training mode"):
        model(jnp.ones((2, 4)))
    np.testing.assert_allclose(model.eval()(jnp.ones((2, 4))),
                               jax.vmap(eqx.nn.inference_mode(eqx.nn.Sequential(
                                   list(model.unwrap()))))(jnp.ones((2, 4))), rtol=1e-6)
    with pytest.raises(ValueError, match=r"`input_shape`: cannot infer"):
        pccore.wrap([eqx.nn.Conv2d(1, 2, 3, key=getkey())])
