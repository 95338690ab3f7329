"""Inference methods as objects: families written outside pccore run through the one driver.

Two families are written here, on the public step contract only (`pccore.AbstractInference`):
plain gradient descent, and gradient descent with a backtracking (Armijo) line search. They
run through `pccore.infer`, `pccore.train_step` and `pccore.TrainStep` with no edit to pccore.
Oracles: optax SGD (the same descent), the closed-form equilibrium of a deep linear network,
and the counted gradient evaluations.
"""

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


class GradientDescent(pccore.AbstractInference):
    """z <- z - lr * g."""

    lr: float = 0.1

    def init(self, z0, key):
        return None

    def step(self, fields, z, g, state):
        return jtu.tree_map(lambda a, b: a - self.lr * b, z, g), state


class LineSearch(pccore.AbstractInference):
    """Gradient descent with the largest step in lr * 2^-j (j < 12) that decreases the energy
    by at least c * step * |g|^2 (Armijo); a monotone descent by construction. It checks the
    gradient at the accepted point once more (an extra evaluation per step, to be counted)."""

    lr: float = 4.0
    c: float = 1e-4

    def init(self, z0, key):
        return None

    def step(self, fields, z, g, state):
        e = fields.energy(z)
        g2 = sum(jnp.sum(b * b) for b in jtu.tree_leaves(g))
        steps = self.lr * 0.5 ** jnp.arange(12.0)
        trial = lambda h: jtu.tree_map(lambda a, b: a - h * b, z, g)
        energies = jax.vmap(lambda h: fields.energy(trial(h)))(steps)
        ok = energies <= e - self.c * steps * g2
        h = jnp.where(jnp.any(ok), steps[jnp.argmax(ok)], 0.0)
        new = trial(h)
        fields.grad(new)  # an extra evaluation (unused): num_grad_evals must count it
        return new, state


def _mlp(dtype=jnp.float64):
    return cases.build_mlp("equinox", cases.canonical_mlp([5, 8, 6, 3], jax.random.key(0), dtype))


def _data(dtype=jnp.float64):
    return (jax.random.normal(jax.random.key(1), (6, 5), dtype),
            jax.random.normal(jax.random.key(2), (6, 3), dtype))


def test_a_family_of_your_own_equals_the_same_descent_by_optax(x64):
    model, (x, y) = _mlp(), _data()
    ours = pccore.infer(model, x=x, y=y, solver=GradientDescent(0.1), max_steps=15)
    sgd = pccore.infer(model, x=x, y=y, solver=optax.sgd(0.1), max_steps=15)
    for a, b in zip(ours.activities, sgd.activities):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    assert int(ours.num_steps) == 15 and int(ours.num_grad_evals) == 15
    # the object form of the optax shorthand is the same too
    wrapped = pccore.infer(model, x=x, y=y, solver=pccore.OptaxInference(optax.sgd(0.1)),
                           max_steps=15)
    for a, b in zip(wrapped.activities, sgd.activities):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_the_driver_stops_at_a_steady_state_and_counts_every_evaluation(x64):
    """A line search on a deep linear network reaches the closed-form equilibrium; the energy
    never rises; the extra gradient a step evaluates is counted."""
    model = cases.linear_network(jax.random.key(3), [4, 6, 5, 3])
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model)
    x = jax.random.normal(jax.random.key(4), (5, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(5), (5, 3), jnp.float64)
    atol = 1e-6  # (an energy-based line search stalls near 1e-9: decreases below rounding)
    steady = pccore.SteadyState(rtol=0.0, atol=atol)
    sol = pccore.infer(model, x=x, y=y, solver=LineSearch(), max_steps=2000, steady_state=steady,
                       saveat=diffrax.SaveAt(ts=jnp.arange(0, 40)))
    assert sol.result == pccore.RESULTS.converged
    k = int(sol.num_steps)
    assert int(sol.num_grad_evals) == 1 + 2 * k  # the start, and two per step
    want = pccore.theory.linear_equilibrium_activities(model, x, y)
    # |z - z*|_inf <= sqrt(d) atol / lambda_min(H) per sample, d latent units per sample
    lam_min = float(jnp.linalg.eigvalsh(pccore.theory.linear_activity_hessian(model)).min())
    bound = np.sqrt(6 + 5) * atol / lam_min
    for a, b in zip(sol.activities, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=bound)
    reached = np.asarray(sol.energies)[np.isfinite(np.asarray(sol.energies))]
    assert len(reached) > 2 and np.all(np.diff(reached) <= 1e-12 * abs(reached[0]))


def test_a_family_of_your_own_trains_through_train_step_and_TrainStep(x64):
    model, (x, y) = _mlp(), _data()
    optim = optax.sgd(0.05)
    ours = pccore.TrainStep(optim, solver=GradientDescent(0.1), max_steps=10)
    a = ours(model, ours.init(model), x=x, y=y)
    b = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                          solver=optax.sgd(0.1), max_steps=10)
    for u, v in zip(jax.tree.leaves((a[0].params, a[2].energy)), jax.tree.leaves((b[0].params, b[2].energy))):
        np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-15)
    assert int(a[2].num_grad_evals) == 10


@pytest.mark.slow
def test_an_inference_method_takes_no_time_horizon():
    model = _mlp(jnp.float32)
    x, y = _data(jnp.float32)
    with pytest.raises(ValueError, match=r"`t1=1.0`: `solver` is an inference method "
                                         r"\(GradientDescent\), which has no time horizon"):
        pccore.infer(model, x=x, y=y, solver=GradientDescent(), t1=1.0)


class Langevin(pccore.AbstractInference):
    """Unadjusted Langevin dynamics, z <- z - lr g + sqrt(2 lr T) xi: a sampler of
    exp(-F / T) (Monte Carlo PC's inference). Its noise comes from the solve's key."""

    lr: float = 0.05
    temperature: float = 1.0
    needs_key = True
    descends = False  # a sampler: its energy fluctuates above the minimum

    def init(self, z0, key):
        traces.append(1)  # counts compilations (a Python side effect at trace time)
        return key

    def step(self, fields, z, g, key):
        key, sub = jax.random.split(key)
        keys = jax.random.split(sub, len(z))
        scale = jnp.sqrt(2 * self.lr * self.temperature)
        return tuple(a - self.lr * b + scale * jax.random.normal(k, a.shape, a.dtype)
                     for a, b, k in zip(z, g, keys)), key


traces: list = []


@pytest.mark.slow
def test_a_stochastic_method_gets_a_new_key_every_solve_without_recompiling(x64):
    """Same key, same sample; a new key, a new sample; one compilation for all of them. Over
    many chains on a deep linear network the samples' mean is the equilibrium (within
    sampling error)."""
    model = cases.linear_network(jax.random.key(3), [4, 6, 5, 3])
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model)
    x = jnp.tile(jax.random.normal(jax.random.key(4), (1, 4), jnp.float64), (400, 1))
    y = jnp.tile(jax.random.normal(jax.random.key(5), (1, 3), jnp.float64), (400, 1))
    run = lambda k: pccore.infer(model, x=x, y=y, solver=Langevin(), max_steps=300, key=k)
    traces.clear()
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    assert len(traces) == 1  # one trace: the key is an argument, not a constant
    for u, v in zip(a.activities, b.activities):
        np.testing.assert_array_equal(u, v)
    assert float(jnp.abs(a.activities[0] - c.activities[0]).max()) > 1e-2
    # 400 chains (one per sample, all with the same data): the mean is z*, within 5 standard
    # errors (the stationary covariance is T H^-1, so the standard error is ~ 1/sqrt(400))
    want = pccore.theory.linear_equilibrium_activities(model, x[:1], y[:1])
    for z, w in zip(a.activities, want):
        se = z.std(axis=0) / np.sqrt(z.shape[0])
        assert np.all(np.abs(z.mean(axis=0) - w[0]) < 5 * se + 1e-3), (z.mean(0), w[0])
    with pytest.raises(ValueError, match=r"`key`: the inference method Langevin draws random numbers"):
        pccore.infer(model, x=x, y=y, solver=Langevin())


class IPC(pccore.AbstractJointInference):
    """Incremental PC: every step moves the activities by -lr dF/dz, then takes one step of
    the training optimiser on the parameters at the new activities."""

    lr: float = 0.1

    def init_joint(self, z0, key, params, opt_state):
        return params, opt_state

    def params(self, state):
        return state

    def step(self, fields, z, g, state):
        params, opt_state = state
        z = tuple(a - self.lr * b for a, b in zip(z, g))
        grads = fields.param_grad(z, params)
        return z, fields.param_update(grads, opt_state, params)


def test_incremental_pc_equals_a_hand_written_joint_step(x64):
    """Oracle: T joint steps written by hand with jax.grad of pccore.energy and the same SGD."""
    model, (x, y) = _mlp(), _data()
    optim, T, lr, eta = optax.sgd(0.05), 5, 0.1, 0.05
    step = pccore.TrainStep(optim, solver=IPC(lr), max_steps=T)
    new, _, stats = step(model, step.init(model), x=x, y=y)
    assert bool(stats.updated) and int(stats.num_grad_evals) == T
    z = pccore.init_activities(model, x, y=y)
    params = model.params
    for _ in range(T):
        m = model.with_params(params)
        g = jax.grad(lambda z: pccore.energy(m, z, x=x, y=y))(z)
        z = tuple(a - lr * b for a, b in zip(z, g))
        gp = jax.grad(lambda p: pccore.energy(model.with_params(p), z, x=x, y=y) / x.shape[0])(params)
        params = jax.tree.map(lambda p, q: p - eta * q, params, gp)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.energy, pccore.energy(model.with_params(params), z, x=x, y=y)
                               / x.shape[0], rtol=1e-12)
    with pytest.raises(TypeError, match=r"`solver=IPC\(...\)` steps the parameters too"):
        pccore.infer(model, x=x, y=y, solver=IPC())


@pytest.mark.slow
def test_incremental_pc_trains_on_digits():
    data = pccore.datasets.load_digits()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    mlp = eqx.nn.MLP(64, 10, 64, 2, activation=jnp.tanh, key=jax.random.key(0))
    model = pccore.wrap(mlp)
    energy = pccore.PC(loss=pccore.CrossEntropy())
    step = pccore.TrainStep(optax.adam(1e-3), energy=energy, solver=IPC(0.1), max_steps=20)
    opt_state = step.init(model)
    for epoch in range(3):
        for i in range(0, len(x) - 31, 32):
            model, opt_state, stats = step(model, opt_state, x=x[i:i + 32], y=y[i:i + 32])
    acc = float(pccore.evaluate(model, jnp.asarray(data.x_test), jnp.asarray(data.y_test),
                                energy=energy).accuracy)
    assert acc > 0.85, acc  # chance is 0.1
