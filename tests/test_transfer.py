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
