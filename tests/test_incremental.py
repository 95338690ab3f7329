"""Incremental PC, `pccore.IncrementalPC`: one activity step and one parameter update per
inference step, against the same joint steps written by hand; it trains on digits."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from tests import cases


@pytest.mark.slow
def test_incremental_pc_equals_hand_written_joint_steps(x64):
    """Oracle: T joint steps with jax.grad of pccore.energy and SGD, written out."""
    model = cases.build_mlp("equinox", cases.canonical_mlp([5, 8, 6, 3], jax.random.key(0),
                                                           jnp.float64))
    x = jax.random.normal(jax.random.key(1), (6, 5), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (6, 3), jnp.float64)
    T, h, eta = 5, 0.1, 0.05
    step = pccore.TrainStep(optax.sgd(eta), method=pccore.IncrementalPC(h), max_steps=T)
    new, _, stats = step(model, step.init(model), x=x, y=y)
    assert bool(stats.updated) and int(stats.num_steps) == T
    z, params = pccore.init_activities(model, x, y=y), model.params
    for _ in range(T):
        m = model.with_params(params)
        g = jax.grad(lambda z: pccore.energy(m, z, x=x, y=y))(z)
        z = tuple(a - h * b for a, b in zip(z, g))
        gp = jax.grad(lambda p: pccore.energy(model.with_params(p), z, x=x, y=y)
                      / x.shape[0])(params)
        params = jax.tree.map(lambda p, q: p - eta * q, params, gp)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match=r"`solver=IncrementalPC\(...\)` steps the parameters"):
        pccore.infer(model, x=x, y=y, method=pccore.IncrementalPC())
    with pytest.raises(ValueError, match=r"`IncrementalPC\(step_size=-1\)`: expected a positive"):
        pccore.IncrementalPC(-1)


@pytest.mark.slow
def test_incremental_pc_trains_on_digits():
    acc = cases.digits_accuracy(pccore.IncrementalPC(0.1), max_steps=20)
    assert acc > 0.85, acc  # chance is 0.1
