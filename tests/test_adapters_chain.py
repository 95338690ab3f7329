"""The chain cut shared by the Haiku, Linen and NNX adapters (`adapters/_chain.py`): what it
refuses (skips around a boundary, weights shared across layers, boundaries that do not return
one array) and what it accepts, against each framework's own forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pccore
from pccore import UnsupportedLayerError

X = jax.random.normal(jax.random.key(0), (5, 4))


def _residual(framework, skip_from_input=False):
    """y = d2(h) + h with h = tanh(d1(x)) (or + x), natively; returns (wrap args, native fn)."""
    if framework == "haiku":
        hk = pytest.importorskip("haiku")

        def fn(x):
            h = jnp.tanh(hk.Linear(4, name="d1")(x))
            return hk.Linear(4, name="d2")(h) + (x if skip_from_input else h)

        f = hk.without_apply_rng(hk.transform(fn))
        p = f.init(jax.random.key(1), X)
        return (f, p), lambda x: f.apply(p, x)
    if framework == "flax.linen":
        nn = pytest.importorskip("flax.linen")

        class Res(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = jnp.tanh(nn.Dense(4)(x))
                return nn.Dense(4)(h) + (x if skip_from_input else h)

        m = Res()
        v = m.init(jax.random.key(1), X)
        return (m, v), lambda x: m.apply(v, x)
    nnx = pytest.importorskip("flax.nnx")

    class Res(nnx.Module):
        def __init__(self, rngs):
            self.d1, self.d2 = nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            h = jnp.tanh(self.d1(x))
            return self.d2(h) + (x if skip_from_input else h)

    m = Res(nnx.Rngs(1))
    return (m,), m


FRAMEWORKS = ["haiku", "flax.linen", "flax.nnx"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_skip_around_a_boundary_is_refused(framework):
    """A layer fed only its predecessor's output would read zeros where the skip was: the
    wrapped model would silently compute another function. The cut refuses it instead."""
    args, _ = _residual(framework)
    with pytest.raises(UnsupportedLayerError, match=r"is not a chain of its layers: layer 1 "
                                                    r"\('\w+'\) reads the model input and "
                                                    r"parameters of layer 0 \('\w+'\) besides its "
                                                    "own input"):
        pccore.wrap(*args)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_skip_from_the_clamped_input_is_a_chain(framework):
    """A layer that reads the model input skips no latent (the input is clamped): it is kept,
    flagged in `reads_input`, and its function takes `x`; the chain equals native."""
    args, native = _residual(framework, skip_from_input=True)
    model = pccore.wrap(*args)
    assert model.reads_input == (False, True)
    np.testing.assert_allclose(model(X), native(X), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"`x`: layer 1 \('\w+'\) reads the clamped model "
                                         r"input `x`.*but `x` is None \(a free bottom\)"):
        model.predict_layer(1, X)


def test_residual_block_as_one_boundary_equals_native():
    """The fix the message suggests: the residual block as one layer."""
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(4)(jnp.tanh(nn.Dense(4)(x)))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(jnp.tanh(Block()(jnp.tanh(nn.Dense(4)(x)))))

    m = Net()
    v = m.init(jax.random.key(1), X)
    with pytest.raises(UnsupportedLayerError, match="is not a chain"):
        pccore.wrap(m, v)
    # (compact modules are named as constructed: the outer Dense(3) first)
    model = pccore.wrap(m, v, boundaries=["Dense_1", "Block_0", "Dense_0"])
    assert model.num_layers == 3
    np.testing.assert_allclose(model(X), m.apply(v, X), rtol=1e-6, atol=1e-6)


def test_weights_shared_across_layers_are_refused():
    """A parameter read by a later layer would be a zero placeholder there."""
    nn = pytest.importorskip("flax.linen")
    nnx = pytest.importorskip("flax.nnx")

    class LAE(nn.Module):  # the decoder also reads the encoder's kernel
        def setup(self):
            self.enc, self.dec = nn.Dense(3, use_bias=False), nn.Dense(4)

        def __call__(self, x):
            h = jnp.tanh(self.enc(x))
            return self.dec(h) + h @ self.enc.variables["params"]["kernel"].T

    lae = LAE()
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \('dec'\) reads the model input "
                                                    r"and parameters of layer 0 \('enc'\)"):
        pccore.wrap(lae, lae.init(jax.random.key(1), X))

    class Dec(nnx.Module):  # holds the encoder's Param itself
        def __init__(self, w):
            self.w = w

        def __call__(self, h):
            return h @ self.w[...].T

    class AE(nnx.Module):
        def __init__(self, rngs):
            self.a_enc = nnx.Linear(4, 3, use_bias=False, rngs=rngs)
            self.b_mid = nnx.Linear(3, 3, rngs=rngs)
            self.dec = Dec(self.a_enc.kernel)

        def __call__(self, x):
            return self.dec(jnp.tanh(self.b_mid(jnp.tanh(self.a_enc(x)))))

    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \('b_mid'\) reads parameters of "
                                                    r"layer 0 \('a_enc'\)"):
        pccore.wrap(AE(nnx.Rngs(0)), input_shape=(4,))


@pytest.mark.parametrize("framework", ["haiku", "flax.linen"])
def test_boundary_called_with_its_input_by_keyword(framework):
    """`Dense(3)(inputs=h)`: the cut finds the input among the keyword arguments."""
    if framework == "haiku":
        hk = pytest.importorskip("haiku")

        def fn(x):
            return hk.Linear(3)(inputs=jnp.tanh(hk.Linear(4)(inputs=x)))

        f = hk.without_apply_rng(hk.transform(fn))
        p = f.init(jax.random.key(1), X)
        model, native = pccore.wrap(f, p), f.apply(p, X)
    else:
        nn = pytest.importorskip("flax.linen")

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(3)(inputs=jnp.tanh(nn.Dense(4)(inputs=x)))

        m = Net()
        v = m.init(jax.random.key(1), X)
        model, native = pccore.wrap(m, v), m.apply(v, X)
    assert model.num_layers == 2
    np.testing.assert_allclose(model(X), native, rtol=1e-6, atol=1e-6)
    z = pccore.init_activities(model, X)  # the first layer's output, fed to the second
    np.testing.assert_allclose(model.predict_layer(1, z[0]), native, rtol=1e-6, atol=1e-6)


def test_boundary_returning_a_tuple_is_refused():
    nn = pytest.importorskip("flax.linen")

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4)(x)
            return h, jnp.tanh(h)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(Two()(x)[1])

    m = Net()
    with pytest.raises(UnsupportedLayerError, match=r"layer boundary 'Two_0' returns a tuple, "
                                                    "not one array"):
        pccore.wrap(m, m.init(jax.random.key(1), X), boundaries=["Two_0", "Dense_0"])
