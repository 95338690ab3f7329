"""Haiku adapter: decomposition of any hk.Transformed, options, and every refusal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pccore

hk = pytest.importorskip("haiku")


def _x(n=5, d=4):
    return jax.random.normal(jax.random.key(0), (n, d))


def _t(fn, state=False):
    return hk.without_apply_rng(hk.transform_with_state(fn) if state else hk.transform(fn))


@pytest.mark.parametrize(
    "fn, names",
    [
        (lambda x: hk.nets.MLP([7, 6, 3])(x), ["mlp/~/linear_0", "mlp/~/linear_1", "mlp/~/linear_2"]),
        (lambda x: hk.Sequential([hk.Linear(7), jnp.tanh, hk.Linear(3)])(x), ["linear", "linear_1"]),
    ],
)
def test_chain_equals_native_and_round_trip(fn, names):
    f = _t(fn)
    params = f.init(jax.random.key(1), _x())
    model = pccore.wrap(f, params)
    assert list(model.names) == names
    for n in (1, 5, 9):  # any batch size, eagerly and jitted
        x = _x(n)
        np.testing.assert_array_equal(model(x), f.apply(params, x))
        np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(model, x), f.apply(params, x), rtol=1e-6)
    new = model.with_params(jax.tree_util.tree_map(lambda a: a + 1.0, model.params)).unwrap()
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
    assert list(new) == list(params)  # same names, same order
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b + 1.0), new, params)


def _enc_head(x):
    x = hk.Linear(8, name="enc")(x)
    x = jnp.tanh(hk.LayerNorm(-1, True, True, name="enc_ln")(x))
    return hk.nets.MLP([6, 3], name="head")(x)


def test_boundaries_group_parent_modules():
    f = _t(_enc_head)
    params = f.init(jax.random.key(1), _x())
    auto = pccore.wrap(f, params)
    assert list(auto.names) == ["enc", "enc_ln", "head/~/linear_0", "head/~/linear_1"]
    model = pccore.wrap(f, params, boundaries=["enc", "head"])
    assert [sorted(p) for p in model.params] == [["enc", "enc_ln"], ["head/~/linear_0", "head/~/linear_1"]]
    assert model.names[0] == "enc+enc_ln"
    np.testing.assert_allclose(model(_x()), f.apply(params, _x()), rtol=1e-6)
    # layer 1 alone: hidden latent -> head, checked against the head applied natively
    h = jax.random.normal(jax.random.key(2), (5, 8))
    head = _t(lambda h: hk.nets.MLP([6, 3], name="head")(h))
    np.testing.assert_allclose(model.predict_layer(1, h), head.apply(params, h), rtol=1e-6)
    assert model.unwrap() == params or jax.tree_util.tree_all(
        jax.tree_util.tree_map(np.array_equal, model.unwrap(), params))
    with pytest.raises(ValueError, match=r"`boundaries`: \['nope'\] are never called"):
        pccore.wrap(f, params, boundaries=["enc", "nope"])
    with pytest.raises(ValueError, match="list them in call order"):
        pccore.wrap(f, params, boundaries=["head", "enc"])


def test_batchnorm_inference_runs_frozen_and_training_is_refused():
    def fn(x, is_training):
        x = hk.Linear(6)(x)
        x = hk.BatchNorm(True, True, 0.9)(x, is_training)
        return hk.Linear(3)(jnp.tanh(x))

    f = _t(fn, state=True)
    params, state = f.init(jax.random.key(1), _x(), True)
    _, state = f.apply(params, state, 3.0 + _x(), True)  # non-trivial running averages
    model = pccore.wrap(f, params, state=state, args=(False,))
    np.testing.assert_allclose(model(_x()), f.apply(params, state, _x(), False)[0], rtol=1e-6)
    with pytest.raises(pccore.UnsupportedLayerError, match=r"\['batch_norm'\].*is_training"):
        pccore.wrap(f, params, state=state, args=(True,))
    with pytest.raises(ValueError, match="needs its state"):
        pccore.wrap(f, params, args=(False,))


def test_dropout_deterministic_runs_and_stochastic_is_refused():
    def fn(x, is_training):
        x = jnp.tanh(hk.Linear(6)(x))
        if is_training:
            x = hk.dropout(hk.next_rng_key(), 0.5, x)
        return hk.Linear(3)(x)

    f = hk.transform(fn)  # apply takes an rng
    params = f.init(jax.random.key(1), _x(), False)
    model = pccore.wrap(f, params, args=(False,))
    np.testing.assert_array_equal(model(_x()), f.apply(params, None, _x(), False))
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"`model`: the transformed function itself \(outside any hk.Module\) "
                             "needs a random key"):
        pccore.wrap(f, params, args=(True,))


class _DropBlock(hk.Module):
    def __call__(self, x):
        return hk.dropout(hk.next_rng_key(), 0.5, jnp.tanh(hk.Linear(6)(x)))


def test_dropout_inside_a_module_is_named():
    f = hk.transform(lambda x: hk.Linear(3)(_DropBlock(name="block")(x)))
    params = f.init(jax.random.key(1), _x())
    with pytest.raises(pccore.UnsupportedLayerError,
                       match="`model`: Haiku module 'block' needs a random key"):
        pccore.wrap(f, params)


def test_function_without_parameters_is_refused():
    f = _t(lambda x: jnp.tanh(x))
    with pytest.raises(ValueError, match="has no parameters"):
        pccore.wrap(f, f.init(jax.random.key(0), _x()))


def test_mismatched_params_are_refused():
    f = _t(lambda x: hk.nets.MLP([7, 3])(x))
    g = _t(lambda x: hk.nets.MLP([5, 3])(x))
    params = f.init(jax.random.key(1), _x())
    with pytest.raises(ValueError, match="params do not match"):
        pccore.wrap(g, params, input_shape=(4,))
    extra = {**params, "stray": {"w": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"parameters of \['stray'\] belong to no layer"):
        pccore.wrap(f, extra, input_shape=(4,))
    with pytest.raises(ValueError, match="needs its params"):
        pccore.wrap(f)


def test_shared_module_is_refused():
    def fn(x):
        lin = hk.Linear(4)
        return lin(jnp.tanh(lin(x)))

    f = _t(fn)
    with pytest.raises(ValueError, match="called more than once"):
        pccore.wrap(f, f.init(jax.random.key(0), _x()))


def test_input_shape_is_required_for_a_conv_first_model():
    f = _t(lambda x: hk.Linear(3)(hk.Flatten()(hk.Conv2D(2, 3)(x))))
    params = f.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"`input_shape`: cannot infer .* \[\(128,\)\], fits a "
                                         r"first-called hk.Linear .*ConvND.* Pass it"):
        pccore.wrap(f, params)


def _enc_dec(x):
    """Named so that sorted keys ('decoder' < 'encoder') are not call order."""
    return hk.Linear(3, name="decoder")(jnp.tanh(hk.Linear(6, name="encoder")(x)))


def test_input_shape_is_inferred_from_call_order_not_dict_order():
    f = _t(_enc_dec)
    params = jax.tree_util.tree_map(lambda a: a, f.init(jax.random.key(1), _x()))
    assert list(params) == ["decoder", "encoder"]  # as after a checkpoint restore
    model = pccore.wrap(f, params)
    assert model.in_shape.shape == (4,) and model.names == ("encoder", "decoder")
    np.testing.assert_allclose(model(_x()), f.apply(params, _x()), rtol=1e-6)
    # params of another model are still reported as such, not as a shape to pass
    g = _t(lambda x: hk.Linear(3, name="decoder")(jnp.tanh(hk.Linear(5, name="encoder")(x))))
    with pytest.raises(ValueError, match=r"params do not match the Haiku model \(in Haiku module "
                                         r"'encoder'\)"):
        pccore.wrap(g, params)


def test_weight_specs_read_kernels_in_each_layout():
    """hk.Linear/Conv2D weights are (..., in, out); hk.Conv2DTranspose's are (..., out, in).
    Oracle: fan-in = in_channels * kernel size, from the module definitions."""

    def fn(x):
        x = jax.nn.relu(hk.Conv2D(4, 3, name="conv")(x))
        x = jax.nn.relu(hk.Conv2DTranspose(2, 3, name="deconv")(x))
        return hk.Linear(3, name="head")(hk.Flatten()(x))

    f = _t(fn)
    params = f.init(jax.random.key(0), jnp.ones((1, 6, 6, 5)))
    model = pccore.wrap(f, params, input_shape=(6, 6, 5))
    assert model.fan_ins(0) == (3 * 3 * 5,)
    assert model.fan_ins(1) == (3 * 3 * 4,)
    assert model.fan_ins(2) == (6 * 6 * 2,)
    W = model.weight_matrices(1)[0]  # (out, in) = (2, 36)
    assert W.shape == (2, 36)
