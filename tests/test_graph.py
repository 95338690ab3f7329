"""Node markers and graph models: one residual model in Equinox, Haiku, Linen and NNX."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import pccore
from tests import cases

SIZES = [4, 6, 6, 3]
B = 5


def _weights(key):
    return cases.canonical_mlp(SIZES, key)


def _equinox(w):
    class Res(eqx.Module):
        l1: eqx.nn.Linear
        l2: eqx.nn.Linear
        l3: eqx.nn.Linear

        def __call__(self, x):
            h1 = pccore.node("h1", jnp.tanh(self.l1(x)))
            h2 = pccore.node("h2", jnp.tanh(self.l2(h1)) + h1)  # residual skip
            return self.l3(h2)

    def lin(W, b):
        lin = eqx.nn.Linear(W.shape[0], W.shape[1], key=jax.random.key(0))
        return eqx.tree_at(lambda m: (m.weight, m.bias), lin, (W.T, b))

    model = Res(*(lin(W, b) for W, b in w))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return model, (lambda p, x: eqx.combine(p, static)(x)), params, True


def _haiku(w):
    hk = pytest.importorskip("haiku")

    def f(x):
        h1 = pccore.node("h1", jnp.tanh(hk.Linear(6, name="l1")(x)))
        h2 = pccore.node("h2", jnp.tanh(hk.Linear(6, name="l2")(h1)) + h1)
        return hk.Linear(3, name="l3")(h2)

    t = hk.without_apply_rng(hk.transform(f))
    params = {f"l{i + 1}": {"w": W, "b": b} for i, (W, b) in enumerate(w)}
    return (lambda x: t.apply(params, x)), t.apply, params, False


def _linen(w):
    nn = pytest.importorskip("flax.linen")

    class Res(nn.Module):
        @nn.compact
        def __call__(self, x):
            h1 = pccore.node("h1", jnp.tanh(nn.Dense(6, name="l1")(x)))
            h2 = pccore.node("h2", jnp.tanh(nn.Dense(6, name="l2")(h1)) + h1)
            return nn.Dense(3, name="l3")(h2)

    m = Res()
    params = {f"l{i + 1}": {"kernel": W, "bias": b} for i, (W, b) in enumerate(w)}
    apply = lambda p, x: m.apply({"params": p}, x)
    return (lambda x: apply(params, x)), apply, params, False


def _nnx(w):
    nnx = pytest.importorskip("flax.nnx")

    class Res(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 6, rngs=rngs)
            self.l2 = nnx.Linear(6, 6, rngs=rngs)
            self.l3 = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            h1 = pccore.node("h1", jnp.tanh(self.l1(x)))
            h2 = pccore.node("h2", jnp.tanh(self.l2(h1)) + h1)
            return self.l3(h2)

    m = Res(nnx.Rngs(0))
    for lin, (W, b) in zip((m.l1, m.l2, m.l3), w):
        lin.kernel[...] = W
        lin.bias[...] = b
    gdef, params, rest = nnx.split(m, nnx.Param, ...)
    return m, (lambda p, x: nnx.merge(gdef, p, rest)(x)), params, False


BUILD = {"equinox": _equinox, "haiku": _haiku, "flax.linen": _linen, "flax.nnx": _nnx}


def _hand(w, x, z, y):
    (W1, b1), (W2, b2), (W3, b3) = w
    h1, h2 = z
    u1 = jnp.tanh(x @ W1 + b1)
    u2 = jnp.tanh(h1 @ W2 + b2) + h1
    out = h2 @ W3 + b3
    sq = lambda a: 0.5 * jnp.sum(a**2)
    return sq(h1 - u1) + sq(h2 - u2) + sq(y - out), out


def _problem(key):
    k = jax.random.split(key, 4)
    x = jax.random.normal(k[0], (B, 4))
    y = jax.random.normal(k[1], (B, 3))
    z = (jax.random.normal(k[2], (B, 6)), jax.random.normal(k[3], (B, 6)))
    return x, y, z


@pytest.mark.parametrize("framework", list(BUILD))
def test_four_frameworks_give_the_same_energy(framework):
    w = _weights(jax.random.key(0))
    x, y, z = _problem(jax.random.key(1))
    native, apply, params, per_sample = BUILD[framework](w)
    model = pccore.wrap_graph(apply, params, x, per_sample=per_sample)
    assert model.names == ("h1", "h2")
    expected, _ = _hand(w, x, z, y)
    # outside a PC context the node marker is the identity: the model runs natively
    run = jax.vmap(native) if per_sample else native
    np.testing.assert_allclose(run(x), model(x), rtol=1e-6)
    _, ff_out = _hand(w, x, pccore.init_activities(model, x, energy=pccore.GraphPC()), y)
    np.testing.assert_allclose(model(x), ff_out, rtol=1e-5, atol=1e-6)
    E = pccore.energy(model, z, x=x, y=y, energy=pccore.GraphPC())
    np.testing.assert_allclose(E, expected, rtol=1e-6)
    le = pccore.layer_energies(model, z, x=x, y=y, energy=pccore.GraphPC())
    np.testing.assert_allclose(le.sum(), expected, rtol=1e-6)
    # activity gradient equals the hand-written energy's
    g = jax.grad(lambda z: pccore.energy(model, z, x=x, y=y, energy=pccore.GraphPC()))(z)
    g_hand = jax.grad(lambda z: _hand(w, x, z, y)[0])(z)
    for a, b in zip(g, g_hand):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_graph_equals_chain_with_skips():
    """The residual graph is the chain model with an identity skip on the hidden layer."""
    w = _weights(jax.random.key(0))
    x, y, z = _problem(jax.random.key(1))
    _, apply, params, per_sample = _equinox(w)
    graph = pccore.wrap_graph(apply, params, x, per_sample=per_sample)
    chain = cases.build_mlp("equinox", w).with_skips(True)
    np.testing.assert_allclose(pccore.energy(graph, z, x=x, y=y, energy=pccore.GraphPC()),
                               pccore.energy(chain, z, x=x, y=y), rtol=1e-6)
    opts = dict(solver=diffrax.Euler(), t1=1.0, dt0=0.1)
    s_graph = pccore.infer(graph, x=x, y=y, energy=pccore.GraphPC(), **opts)
    s_chain = pccore.infer(chain, x=x, y=y, **opts)
    np.testing.assert_allclose(s_graph.energy, s_chain.energy, rtol=1e-5)
    opt = optax.sgd(0.1)
    g2, _, _ = pccore.train_step(graph, opt, opt.init(graph.params), x=x, y=y,
                                 energy=pccore.GraphPC(), **opts)
    c2, _, _ = pccore.train_step(chain, opt, opt.init(chain.params), x=x, y=y, **opts)
    new = g2.unwrap()
    for lin, layer in zip((new.l1, new.l2, new.l3), c2.params):
        np.testing.assert_allclose(lin.weight, layer[0].weight, rtol=1e-5, atol=1e-6)


def test_node_errors():
    x = jnp.ones((2, 3))

    def twice(p, x):
        return pccore.node("h", pccore.node("h", x * p))

    with pytest.raises(ValueError, match="visited twice"):
        pccore.wrap_graph(twice, jnp.ones(()), x)
    with pytest.raises(ValueError, match="visited no `pccore.node`"):
        pccore.wrap_graph(lambda p, x: x * p, jnp.ones(()), x)
    model = pccore.wrap_graph(lambda p, x: pccore.node("h", x * p).sum(-1, keepdims=True),
                              jnp.ones(()), x)
    with pytest.raises(TypeError, match="needs a pccore.GraphModel"):
        pccore.energy(cases.build_mlp("equinox", _weights(jax.random.key(0))), (),
                      x=jnp.ones((2, 4)), y=jnp.ones((2, 3)), energy=pccore.GraphPC())
    with pytest.raises(ValueError, match="needs a clamped input"):
        pccore.energy(model, (x,), x=None, y=jnp.ones((2, 1)), energy=pccore.GraphPC())
    assert jtu.tree_leaves(model.params)
