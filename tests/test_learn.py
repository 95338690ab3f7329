"""The update path: parameter gradients, optimiser-state threading, NaN safety, no recompiles."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore


def _model(key):
    return pccore.wrap(eqx.nn.MLP(5, 3, 7, 2, activation=jnp.tanh, key=key))


@pytest.mark.slow
def test_train_step_equals_manual_infer_grad_update(getkey):
    model = _model(getkey())
    x = jax.random.normal(getkey(), (8, 5))
    y = jax.random.normal(getkey(), (8, 3))
    optim = optax.adam(1e-2)
    state = optim.init(model.params)
    m1, s1, _ = pccore.train_step(model, optim, state, x=x, y=y, dt0=0.1, t1=1.0)
    m2, s2, stats = pccore.train_step(m1, optim, s1, x=x, y=y, dt0=0.1, t1=1.0)
    # By hand: the same engine pieces through the public API, twice.
    p, st = model, state
    for _ in range(2):
        z = pccore.infer(p, x=x, y=y, dt0=0.1, t1=1.0).activities
        g = pccore.param_grads(p, z, x=x, y=y)
        upd, st = optim.update(g, st, p.params)
        p = p.with_params(optax.apply_updates(p.params, upd))
    for a, b in zip(jax.tree_util.tree_leaves(m2.params), jax.tree_util.tree_leaves(p.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(s2[0].count) == 2  # Adam's state advanced twice: it is threaded, not restarted
    assert int(stats.num_steps) == 10 and bool(stats.updated)
    # stats.loss is the feed-forward output loss (batch mean) before the update.
    np.testing.assert_allclose(stats.loss, 0.5 * jnp.mean(jnp.sum((m1(x) - y) ** 2, axis=1)),
                               rtol=1e-5)


def test_unwrap_after_training_matches_feedforward(getkey):
    mlp = eqx.nn.MLP(5, 3, 7, 2, activation=jnp.tanh, key=getkey())
    model = pccore.wrap(mlp)
    x = jax.random.normal(getkey(), (8, 5))
    y = jax.random.normal(getkey(), (8, 3))
    optim = optax.sgd(0.1)
    state = optim.init(model.params)
    for _ in range(3):
        model, state, _ = pccore.train_step(model, optim, state, x=x, y=y)
    native = model.unwrap()
    assert type(native) is eqx.nn.MLP
    np.testing.assert_allclose(jax.vmap(native)(x), model(x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(jax.vmap(native)(x), jax.vmap(mlp)(x))


def test_nan_updates_are_not_applied(getkey):
    model = _model(getkey())
    x = jax.random.normal(getkey(), (4, 5))
    y = jnp.full((4, 3), jnp.nan)
    optim = optax.adam(1e-2)
    state = optim.init(model.params)
    new, new_state, stats = pccore.train_step(model, optim, state, x=x, y=y)
    assert stats.result == pccore.RESULTS.diverged and not bool(stats.updated)
    for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    assert int(new_state[0].count) == 0


def test_train_step_errors(getkey):
    model = _model(getkey())
    x, y = jnp.ones((2, 5)), jnp.ones((2, 3))
    with pytest.raises(TypeError, match=r"`optim` must be an optax GradientTransformation"):
        pccore.train_step(model, "adam", None, x=x, y=y)
    with pytest.raises(ValueError, match=r"`x` has shape \(2, 4\); expected \(batch, 5\)"):
        pccore.train_step(model, optax.sgd(0.1), None, x=jnp.ones((2, 4)), y=y)


def test_evaluate_accuracy_and_loss(getkey):
    model = _model(getkey())
    x = jax.random.normal(getkey(), (16, 5))
    pred = model(x)
    y = jax.nn.one_hot(jnp.argmax(pred, axis=1), 3)
    y = y.at[:4].set(jnp.roll(y[:4], 1, axis=1))  # four wrong labels
    ev = pccore.evaluate(model, x, y)
    np.testing.assert_allclose(ev.accuracy, 12 / 16)
    np.testing.assert_allclose(ev.loss, 0.5 * jnp.mean(jnp.sum((pred - y) ** 2, axis=1)), rtol=1e-6)


def test_cached_step_still_validates_every_call(getkey):
    """After a first (checked) call the step is cached; new shapes, host data with NaN and
    half-precision parameters still get the checked path's errors."""
    model = _model(getkey())
    optim = optax.sgd(0.1)
    state = optim.init(model.params)
    x, y = jax.random.normal(getkey(), (4, 5)), jax.random.normal(getkey(), (4, 3))
    pccore.train_step(model, optim, state, x=x, y=y)
    with pytest.raises(ValueError, match=r"`x` has shape \(4, 6\); expected \(batch, 5\)"):
        pccore.train_step(model, optim, state, x=jnp.ones((4, 6)), y=y)
    bad = np.array(x)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"`x` contains 1 non-finite value"):
        pccore.train_step(model, optim, state, x=bad, y=y)
    with pytest.raises(ValueError, match=r"`t1` must be a finite positive number; got -2\.0"):
        pccore.train_step(model, optim, state, x=x, y=y, t1=jnp.asarray(-2.0))  # unhashable
    # a concrete 0-d array is read as the number it holds: the same step as the float
    as_array = pccore.train_step(model, optim, state, x=x, y=y, t1=jnp.asarray(1.0))
    as_float = pccore.train_step(model, optim, state, x=x, y=y, t1=1.0)
    for a, b in zip(jax.tree.leaves(as_array[0].params), jax.tree.leaves(as_float[0].params)):
        np.testing.assert_array_equal(a, b)
    # same layers; cast on the host (XLA's CPU float16 conversion needs F16C, absent with
    # XLA_FLAGS=--xla_cpu_max_isa=SSE4_2)
    half = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float16)), model)
    with pytest.raises(TypeError, match=r"has dtype float16; expected float32 or float64"):
        pccore.train_step(half, optim, optim.init(half.params), x=x, y=y)


def test_cached_step_equals_uncached_step(x64, getkey):
    """The cached step (configuration closed over) and the general step (configuration
    traced: an array option forces it) give the same parameters and statistics."""
    model = _model(getkey())
    x = jax.random.normal(getkey(), (8, 5))
    y = jax.random.normal(getkey(), (8, 3))
    optim = optax.adam(1e-2)
    runs = []
    for decay in (0.05, jnp.asarray(0.05)):
        m, s = model, optim.init(model.params)
        for _ in range(3):
            m, s, stats = pccore.train_step(m, optim, s, x=x, y=y,
                                            energy=pccore.PC(activity_decay=decay))
        runs.append((m, s, stats))
    (m1, s1, st1), (m2, s2, st2) = runs
    for a, b in zip(jax.tree_util.tree_leaves((m1.params, s1, st1)),
                    jax.tree_util.tree_leaves((m2.params, s2, st2))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert float(st1.energy) > 0 and bool(st1.updated)


def _copy(tree):
    """The same values in fresh objects (new arrays, new containers)."""
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def _assert_same(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.slow
def test_passing_back_the_returned_objects_equals_passing_copies(getkey):
    """A loop that passes back what `train_step` returned reuses its leaves; any other
    combination (a fresh optimiser state, another optimiser, new data shapes) must read the
    objects it is given. Oracle: the same call on fresh copies, which nothing remembers."""
    model = _model(getkey())
    x, y = jax.random.normal(getkey(), (8, 5)), jax.random.normal(getkey(), (8, 3))
    optim = optax.adam(1e-2)
    step = pccore.TrainStep(optim)
    m1, s1, _ = step(model, step.init(model), x=x, y=y)
    assert step._last[id(m1)].opt_state is s1
    expected = step(_copy(m1), _copy(s1), x=x, y=y)
    _assert_same(step(m1, s1, x=x, y=y), expected)
    # the same through the convenience function
    m1, s1, _ = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    expected = pccore.train_step(_copy(m1), optim, _copy(s1), x=x, y=y)
    _assert_same(pccore.train_step(m1, optim, s1, x=x, y=y), expected)
    # The returned model with a different optimiser state: that state is used.
    fresh = optim.init(m1.params)
    _assert_same(pccore.train_step(m1, optim, fresh, x=x, y=y),
                 pccore.train_step(_copy(m1), optim, _copy(fresh), x=x, y=y))
    # ... and with another optimiser (its own state).
    sgd = optax.sgd(0.5)
    _assert_same(pccore.train_step(m1, sgd, sgd.init(m1.params), x=x, y=y),
                 pccore.train_step(_copy(m1), sgd, sgd.init(m1.params), x=x, y=y))
    # ... and with other solver options.
    _assert_same(pccore.train_step(m1, optim, s1, x=x, y=y, t1=0.5),
                 pccore.train_step(_copy(m1), optim, _copy(s1), x=x, y=y, t1=0.5))
    # New data shapes are still checked.
    with pytest.raises(ValueError, match=r"`x` has shape \(8, 6\); expected \(batch, 5\)"):
        pccore.train_step(m1, optim, s1, x=jnp.ones((8, 6)), y=y)


@pytest.mark.slow
def test_remembered_state_does_not_outlive_its_model(getkey):
    """What a call remembers (to skip re-reading the pytrees next time) is released with the
    model it returned, and at most a few entries are kept."""
    import gc
    import weakref

    from pccore._train import _train_step

    model = _model(getkey())
    x, y = jax.random.normal(getkey(), (8, 5)), jax.random.normal(getkey(), (8, 3))
    optim = optax.adam(1e-2)
    step = pccore.TrainStep(optim)
    m1, s1, _ = step(model, step.init(model), x=x, y=y)
    leaf = weakref.ref(jax.tree_util.tree_leaves(s1)[-1])  # an Adam moment
    key = id(m1)
    del s1  # the user drops the state, keeps the model: the entry keeps it alive ...
    gc.collect()
    assert leaf() is not None
    del m1  # ... until the model goes
    gc.collect()
    assert leaf() is None and key not in step._last
    kept = [step(model, optim.init(model.params), x=x, y=y)
            for _ in range(3 * _train_step._MAX_LAST)]
    assert len(step._last) <= _train_step._MAX_LAST and len(kept) == 3 * _train_step._MAX_LAST


@pytest.mark.slow
def test_release_callback_survives_interpreter_exit():
    """The callback that releases a remembered entry with its model must not read module
    globals: at interpreter exit they may already be cleared when the model dies (here an
    entry held from `__main__` outlives `pccore._train._train_step`'s globals). Oracle: a clean stderr."""
    import subprocess
    import sys

    script = (
        "import jax, jax.numpy as jnp, optax, equinox as eqx, pccore\n"
        "model = pccore.wrap(eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0)))\n"
        "step = pccore.TrainStep(optax.sgd(0.1))\n"
        "model, state, stats = step(model, step.init(model), x=jnp.ones((3, 4)),\n"
        "                           y=jnp.ones((3, 2)))\n"
        "entry = step._last[id(model)]\n"
        "print(entry.ref() is model)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    assert "Exception ignored" not in out.stderr, out.stderr


def test_optimiser_state_changed_in_place_is_read_again(getkey):
    """optax's `inject_hyperparams` state holds its hyper-parameters in a dict that users
    change in place. A remembered state must not hide that: with the learning rate set to
    0 the next step leaves the parameters exactly as they are (oracle: SGD with rate 0)."""
    model = _model(getkey())
    x, y = jax.random.normal(getkey(), (8, 5)), jax.random.normal(getkey(), (8, 3))
    optim = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    m1, s1, _ = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    s1.hyperparams["learning_rate"] = jnp.asarray(0.0)
    m2, s2, stats = pccore.train_step(m1, optim, s1, x=x, y=y)
    assert bool(stats.updated)
    _assert_same(m2.params, m1.params)
    assert float(s2.hyperparams["learning_rate"]) == 0.0
