"""`pccore.transfer_weights`: layouts across frameworks, and errors when architectures differ."""

import jax
import numpy as np
import pytest

import pccore
from tests import cases


@pytest.mark.parametrize("framework", [f for f in cases.FRAMEWORKS if f != "equinox"])
def test_transfer_equals_building_with_the_same_weights(framework):
    """Copying Equinox's (out, in)/OIHW weights into another framework's (in, out)/HWIO model
    gives exactly the model built natively from the same canonical weights, and back."""
    for build, w in [
        (cases.build_mlp, cases.canonical_mlp([5, 7, 3], jax.random.key(0))),
        (cases.build_cnn, cases.canonical_cnn(jax.random.key(0))),
    ]:
        w_other = [(2.0 * a, None if b is None else b - 1.0) for a, b in w]  # a different init
        src = build("equinox", w)
        dst = pccore.transfer_weights(src, build(framework, w_other))
        ref = build(framework, w)
        for a, b in zip(jax.tree_util.tree_leaves(dst.params), jax.tree_util.tree_leaves(ref.params)):
            np.testing.assert_array_equal(a, b)
        back = pccore.transfer_weights(dst, build("equinox", w_other))
        for a, b in zip(jax.tree_util.tree_leaves(back.params), jax.tree_util.tree_leaves(src.params)):
            np.testing.assert_array_equal(a, b)


def test_mismatched_architectures_name_the_first_differing_layer():
    src = cases.build_mlp("equinox", cases.canonical_mlp([5, 7, 3], jax.random.key(0)))
    wider = cases.build_mlp("equinox", cases.canonical_mlp([5, 8, 3], jax.random.key(0)))
    deeper = cases.build_mlp("equinox", cases.canonical_mlp([5, 7, 7, 3], jax.random.key(0)))
    nobias = cases.build_mlp("equinox", cases.canonical_mlp([5, 7, 3], jax.random.key(0), bias=False))
    with pytest.raises(ValueError, match=r"layer 0 .*weight 0 has shape \(7, 5\) in `src` and \(8, 5\)"):
        pccore.transfer_weights(src, wider)
    with pytest.raises(ValueError, match="`dst` has 3 layers .* but `src` has 2"):
        pccore.transfer_weights(src, deeper)
    with pytest.raises(ValueError, match=r"layer 0 .*1 other parameters \(biases, ...\) but `dst` has 0"):
        pccore.transfer_weights(src, nobias)


def _layernorm_mlp(framework, key, scale=True, shift=True):
    """Linear 4->8, LayerNorm (eps 1e-5), tanh, Linear 8->3, built natively and wrapped."""
    if framework == "equinox":
        import equinox as eqx

        k0, k1 = jax.random.split(key)
        ln = eqx.nn.LayerNorm(8, eps=1e-5, use_weight=scale, use_bias=shift)
        return pccore.wrap(eqx.nn.Sequential([eqx.nn.Linear(4, 8, key=k0), ln,
                                              eqx.nn.Lambda(jax.numpy.tanh),
                                              eqx.nn.Linear(8, 3, key=k1)]))
    if framework == "haiku":
        import haiku as hk

        def f(x):
            x = hk.LayerNorm(-1, scale, shift, eps=1e-5)(hk.Linear(8)(x))
            return hk.Linear(3)(jax.numpy.tanh(x))

        f = hk.without_apply_rng(hk.transform(f))
        return pccore.wrap(f, f.init(key, jax.numpy.zeros((1, 4))))
    if framework == "flax.linen":
        import flax.linen as nn

        m = nn.Sequential([nn.Dense(8), nn.LayerNorm(1e-5, use_scale=scale, use_bias=shift),
                           jax.numpy.tanh, nn.Dense(3)])
        return pccore.wrap(m, m.init(key, jax.numpy.zeros((1, 4))))
    from flax import nnx

    rngs = nnx.Rngs(int(jax.random.randint(key, (), 0, 1000)))
    return pccore.wrap(nnx.Sequential(nnx.Linear(4, 8, rngs=rngs),
                                      nnx.LayerNorm(8, epsilon=1e-5, use_scale=scale,
                                                    use_bias=shift, rngs=rngs),
                                      jax.numpy.tanh, nnx.Linear(8, 3, rngs=rngs)))


@pytest.mark.parametrize("framework", [f for f in cases.FRAMEWORKS if f != "equinox"])
def test_norm_scale_and_shift_go_to_their_namesakes(framework):
    """A norm's scale and shift have the same shape and each framework orders them
    differently (Equinox weight, bias; Haiku offset, scale; Flax bias, scale): the transfer
    pairs them by name, so the copy computes what the source computes, and back."""
    pytest.importorskip(framework)
    src = _layernorm_mlp("equinox", jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten(src.params[1])  # the norm: weight, bias
    assert [a.shape for a in leaves] == [(8,), (8,)]
    norm = jax.tree_util.tree_unflatten(
        treedef, [jax.numpy.linspace(0.5, 2.0, 8), jax.numpy.linspace(-1.0, 1.0, 8)])
    src = src.with_params((src.params[0], norm, src.params[2]))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    dst = pccore.transfer_weights(src, _layernorm_mlp(framework, jax.random.key(2)))
    np.testing.assert_allclose(dst(x), src(x), atol=1e-6)
    back = pccore.transfer_weights(dst, _layernorm_mlp("equinox", jax.random.key(3)))
    for a, b in zip(jax.tree_util.tree_leaves(back.params), jax.tree_util.tree_leaves(src.params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"layer 1 .*other parameters are \['scale'\] and `dst`'s "
                                         r"are \['shift'\]"):
        pccore.transfer_weights(_layernorm_mlp("equinox", jax.random.key(0), shift=False),
                                _layernorm_mlp(framework, jax.random.key(2), scale=False))
