"""`pccore.TrainStep`: configured once, compiled once per structure, equal to its parts."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore


def _counting_model(dtype=jnp.float32):
    """A small MLP whose activation records each trace (a Python side effect)."""
    traces = []

    def act(h):
        traces.append(1)
        return jnp.tanh(h)

    k1, k2 = jax.random.split(jax.random.key(0))
    seq = eqx.nn.Sequential([eqx.nn.Linear(4, 6, key=k1, dtype=dtype), eqx.nn.Lambda(act),
                             eqx.nn.Linear(6, 3, key=k2, dtype=dtype)])
    model = pccore.wrap(seq)
    traces.clear()
    return model, traces


def _batch(i, dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(10 + i), (8, 4), dtype)
    return x, jax.random.normal(jax.random.key(20 + i), (8, 3), dtype)


def test_a_step_equals_inference_then_param_grads_then_the_optimiser(x64):
    """Oracle: the step's parts called one by one (infer, param_grads, optax)."""
    model, _ = _counting_model(jnp.float64)
    optim = optax.adam(1e-2)
    step = pccore.TrainStep(optim, t1=1.0, dt0=0.1)
    opt_state = step.init(model)
    x, y = _batch(0, jnp.float64)
    new, new_state, stats = step(model, opt_state, x=x, y=y)
    z = pccore.infer(model, x=x, y=y, t1=1.0, dt0=0.1).activities
    grads = pccore.param_grads(model, z, x=x, y=y)
    updates, want_state = optim.update(grads, opt_state, model.params)
    want = optax.apply_updates(model.params, updates)
    for a, b in zip(jax.tree.leaves((new.params, new_state)), jax.tree.leaves((want, want_state))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.energy, pccore.energy(model, z, x=x, y=y) / 8, rtol=1e-12)
    # the convenience function is the same step
    fn = pccore.train_step(model, optim, opt_state, x=x, y=y, t1=1.0, dt0=0.1)
    for a, b in zip(jax.tree.leaves((fn[0].params, fn[1])), jax.tree.leaves((new.params, new_state))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_it_compiles_once_per_structure_until_cleared():
    model, traces = _counting_model()
    step = pccore.TrainStep(optax.sgd(0.1))
    opt_state = step.init(model)
    model, opt_state, _ = step(model, opt_state, x=_batch(0)[0], y=_batch(0)[1])
    once = len(traces)
    assert once > 0
    for i in range(1, 5):  # new data, same shapes; the loop passes back what it got
        model, opt_state, _ = step(model, opt_state, x=_batch(i)[0], y=_batch(i)[1])
    fresh = eqx.tree_at(lambda m: m.params, model, jax.tree.map(jnp.copy, model.params))
    step(fresh, step.init(fresh), x=_batch(0)[0], y=_batch(0)[1])  # other objects, same structure
    assert len(traces) == once
    step.clear()
    step(model, opt_state, x=_batch(0)[0], y=_batch(0)[1])
    assert len(traces) == 2 * once


@pytest.mark.slow
def test_clear_caches_drops_what_train_step_keeps():
    model, traces = _counting_model()
    optim = optax.sgd(0.1)
    x, y = _batch(0)
    pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    once = len(traces)
    pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    assert len(traces) == once
    pccore.clear_caches()
    pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    assert len(traces) == 2 * once


@pytest.mark.slow
def test_an_optimiser_built_inside_the_loop_is_named_once():
    """Each new optax object compiles a new step (counted by traces); the warning says which
    argument to build outside the loop."""
    pccore.clear_caches()
    model, traces = _counting_model()
    x, y = _batch(0)
    opt_state = optax.sgd(0.1).init(model.params)
    model, opt_state, _ = pccore.train_step(model, optax.sgd(0.1), opt_state, x=x, y=y)
    once = len(traces)
    with pytest.warns(UserWarning, match=r"`optim` is a new object equal to the last call's, so "
                                         r"this step compiles again .* Build `optim` once, outside"):
        model, opt_state, _ = pccore.train_step(model, optax.sgd(0.1), opt_state, x=x, y=y)
    assert len(traces) == 2 * once  # it did compile again
    model, opt_state, _ = pccore.train_step(model, optax.sgd(0.1), opt_state, x=x, y=y)  # once
    optim = optax.sgd(0.1)  # built once: no warning, no compilation
    for _ in range(3):
        model, opt_state, _ = pccore.train_step(model, optim, opt_state, x=x, y=y)


def test_the_configuration_is_checked_when_the_step_is_built():
    with pytest.raises(TypeError, match=r"`optim` must be an optax GradientTransformation"):
        pccore.TrainStep("adam")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`energy` must be a pccore.AbstractEnergy"):
        pccore.TrainStep(optax.sgd(0.1), energy="pc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`t1` must be"):
        pccore.TrainStep(optax.sgd(0.1), t1=-1.0)
    with pytest.raises(ValueError, match=r"`solver=Euler\(\)` gives no error estimate"):
        pccore.TrainStep(optax.sgd(0.1), stepsize_controller=diffrax.PIDController(1e-3, 1e-3))
