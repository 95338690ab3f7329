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

    def init(self, fields, z0, key):
        return None

    def step(self, fields, z, g, state):
        return jtu.tree_map(lambda a, b: a - self.lr * b, z, g), state


class LineSearch(pccore.AbstractInference):
    """Gradient descent with the largest step in lr * 2^-j (j < 12) that decreases the energy
    by at least c * step * |g|^2 (Armijo); a monotone descent by construction. It checks the
    gradient at the accepted point once more (an extra evaluation per step, to be counted)."""

    lr: float = 4.0
    c: float = 1e-4

    def init(self, fields, z0, key):
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

    def init(self, fields, z0, key):
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
    """The test file's IPC (the joint-update hook, no edit to pccore) trains on digits."""
    acc = cases.digits_accuracy(IPC(0.1), max_steps=20)
    assert acc > 0.85, acc  # chance is 0.1


# --- the families as objects: gradient flow and optimistix --------------------------------


class ViaDriver(pccore.AbstractInference):
    """Any method's steps, run by the plain driver (pccore runs GradientFlow and
    OptimistixInference on fused routes; this makes it take the driver instead)."""

    method: pccore.AbstractInference

    def init(self, fields, z0, key):
        return self.method.init(fields, z0, key)

    def step(self, fields, z, g, state):
        return self.method.step(fields, z, g, state)

    def finished(self, state):
        return self.method.finished(state)


_FLOWS = {
    "euler": pccore.GradientFlow(diffrax.Euler(), t1=1.0, dt0=0.1),
    "euler, t1 not a whole number of steps": pccore.GradientFlow(diffrax.Euler(), t1=1.05,
                                                                 dt0=0.1),
    "heun": pccore.GradientFlow(diffrax.Heun(), t1=1.0, dt0=0.1),
    "tsit5": pccore.GradientFlow(diffrax.Tsit5(), t1=1.0, dt0=0.25),
    "tsit5 + pid": pccore.GradientFlow(diffrax.Tsit5(),
                                       diffrax.PIDController(rtol=1e-6, atol=1e-6), t1=3.0,
                                       dt0=None),
}


@pytest.mark.parametrize("name", list(_FLOWS))
def test_gradient_flow_through_the_driver_equals_its_fused_route(x64, name):
    """The fused gradient-flow routes take exactly the steps of the step contract: the same
    end state, time reached, and (adaptive) the same number of steps."""
    model, (x, y) = _mlp(), _data()
    flow = _FLOWS[name]
    fused = pccore.infer(model, x=x, y=y, solver=flow)
    driven = pccore.infer(model, x=x, y=y, solver=ViaDriver(flow), max_steps=4096)
    for a, b in zip(fused.activities, driven.activities):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert driven.result == fused.result == pccore.RESULTS.completed
    assert int(driven.num_steps) == int(fused.num_steps)
    # an adaptive solve ends exactly at t1 on both routes
    assert float(fused.t) == flow.t1


def test_gradient_flow_with_a_steady_state_stops_where_its_fused_route_stops(x64):
    model, (x, y) = _mlp(), _data()
    flow = pccore.GradientFlow(diffrax.Euler(), t1=50.0, dt0=0.2)
    steady = pccore.SteadyState(rtol=0.0, atol=1e-5)
    fused = pccore.infer(model, x=x, y=y, solver=flow, steady_state=steady)
    driven = pccore.infer(model, x=x, y=y, solver=ViaDriver(flow), steady_state=steady,
                          max_steps=flow.num_constant_steps)
    assert fused.result == driven.result == pccore.RESULTS.converged
    assert int(fused.num_steps) == int(driven.num_steps)
    assert int(fused.num_grad_evals) == int(driven.num_grad_evals) == int(fused.num_steps) + 1
    for a, b in zip(fused.activities, driven.activities):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # the horizon reached first: not converged on both (a steady state was asked for)
    short = pccore.GradientFlow(diffrax.Euler(), t1=0.4, dt0=0.2)
    a = pccore.infer(model, x=x, y=y, solver=short, steady_state=steady, throw=False)
    b = pccore.infer(model, x=x, y=y, solver=ViaDriver(short), steady_state=steady,
                     max_steps=100, throw=False)
    assert a.result == b.result == pccore.RESULTS.not_converged


@pytest.mark.slow
def test_gradient_flow_object_equals_the_keyword_shorthand(x64):
    model, (x, y) = _mlp(), _data()
    pid = diffrax.PIDController(rtol=1e-4, atol=1e-4)
    steady = pccore.SteadyState(1e-3, 1e-3)
    a = pccore.infer(model, x=x, y=y, solver=pccore.GradientFlow(diffrax.Tsit5(), pid, t1=5.0,
                                                                 dt0=None),
                     steady_state=steady)
    b = pccore.infer(model, x=x, y=y, solver=diffrax.Tsit5(), stepsize_controller=pid, t1=5.0,
                     dt0=None, steady_state=steady)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    optim = optax.sgd(0.05)
    flow = pccore.GradientFlow(diffrax.Heun(), t1=0.6, dt0=0.2)
    step = pccore.TrainStep(optim, solver=flow)
    m1, _, s1 = step(model, step.init(model), x=x, y=y)
    m2, _, s2 = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                  solver=diffrax.Heun(), t1=0.6, dt0=0.2)
    for u, v in zip(jax.tree.leaves((m1.params, s1)), jax.tree.leaves((m2.params, s2))):
        np.testing.assert_array_equal(u, v)
    step = pccore.TrainStep(optim, method=flow)
    m3, _, s3 = step(model, step.init(model), x=x, y=y)
    m4, _, s4 = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y, method=flow)
    for u, v, w in zip(jax.tree.leaves((m1.params, s1)), jax.tree.leaves((m3.params, s3)),
                       jax.tree.leaves((m4.params, s4))):
        np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(u, w)


def test_gradient_flow_options_live_on_the_object():
    model, (x, y) = _mlp(jnp.float32), _data(jnp.float32)
    flow = pccore.GradientFlow(diffrax.Euler(), t1=1.0, dt0=0.1)
    with pytest.raises(ValueError, match=r"`t1=3.0` given with `solver=GradientFlow\(\.\.\.\)`"
                                         r".*expected them on the object only"):
        pccore.infer(model, x=x, y=y, solver=flow, t1=3.0)
    with pytest.raises(ValueError, match=r"`stepsize_controller=PIDController\(\.\.\.\), "
                                         r"dt0=0.5` given"):
        pccore.TrainStep(optax.sgd(0.1), solver=flow, dt0=0.5,
                         stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3))
    with pytest.raises(TypeError, match=r"`GradientFlow\(solver\)`: `solver` must be a diffrax "
                                        r"ODE solver.*got GradientTransformationExtraArgs"):
        pccore.infer(model, x=x, y=y, solver=pccore.GradientFlow(optax.sgd(0.1)))
    # `method=` takes the object; the shorthand keywords must not be given with it
    a = pccore.infer(model, x=x, y=y, method=flow)
    b = pccore.infer(model, x=x, y=y, solver=diffrax.Euler(), t1=1.0, dt0=0.1)
    for u, v in zip(a.activities, b.activities):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match=r"`solver=Tsit5\(\.\.\.\), t1=2.0` given with "
                                         r"`method=GradientFlow\(\.\.\.\)`; expected one"):
        pccore.infer(model, x=x, y=y, method=flow, solver=diffrax.Tsit5(), t1=2.0)
    with pytest.raises(TypeError, match=r"`method` must be a pccore.AbstractInference.*got "
                                        r"Tsit5. A bare diffrax solver"):
        pccore.infer(model, x=x, y=y, method=diffrax.Tsit5())
    # the object's own options are checked as the keywords are
    with pytest.raises(ValueError, match=r"`dt0` must be a finite positive number; got -1.0"):
        pccore.infer(model, x=x, y=y, solver=pccore.GradientFlow(diffrax.Euler(), dt0=-1.0))


@pytest.mark.slow
def test_optimistix_minimiser_as_an_object_and_through_the_driver(x64):
    """`OptimistixInference(m)` equals the shorthand `solver=m`; its steps through the driver
    reach the closed-form equilibrium of a deep linear network within the steady-state
    tolerance's bound."""
    optx = pytest.importorskip("optimistix")
    model = cases.linear_network(jax.random.key(3), [4, 6, 5, 3])
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model)
    x = jax.random.normal(jax.random.key(4), (5, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(5), (5, 3), jnp.float64)
    atol = 1e-8
    steady = pccore.SteadyState(rtol=0.0, atol=atol)
    cg = optx.NonlinearCG(rtol=1e-10, atol=1e-10)
    a = pccore.infer(model, x=x, y=y, solver=pccore.OptimistixInference(cg), steady_state=steady)
    b = pccore.infer(model, x=x, y=y, solver=cg, steady_state=steady)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    driven = pccore.infer(model, x=x, y=y, solver=ViaDriver(pccore.OptimistixInference(cg)),
                          steady_state=steady, max_steps=500)
    assert driven.result == pccore.RESULTS.converged
    want = pccore.theory.linear_equilibrium_activities(model, x, y)
    lam_min = float(jnp.linalg.eigvalsh(pccore.theory.linear_activity_hessian(model)).min())
    bound = np.sqrt(6 + 5) * atol / lam_min
    for got in (a, driven):
        for u, v in zip(got.activities, want):
            np.testing.assert_allclose(u, v, rtol=0, atol=bound)
    with pytest.raises(TypeError, match=r"`minimiser` must be an optimistix minimiser"):
        pccore.OptimistixInference(optax.sgd(0.1))


def _flops(f, *args):
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def test_a_saved_trajectory_costs_what_it_saves_not_max_steps():
    """`SaveAt(steps=True)` keeps a buffer of `max_steps` slots; the energies of the saved
    points are computed as they are saved, so the compiled work does not grow with the
    buffer (the energy of every slot used to be computed after the solve: ~16x the work at
    4096 slots against 256)."""
    model, (x, y) = _mlp(jnp.float32), _data(jnp.float32)
    pid = diffrax.PIDController(rtol=1e-3, atol=1e-3)

    def solve(n):
        return lambda x, y: pccore.infer(model, x=x, y=y, solver=diffrax.Tsit5(),
                                         stepsize_controller=pid, t1=3.0, dt0=None,
                                         max_steps=n, saveat=diffrax.SaveAt(steps=True),
                                         throw=False).energies
    small, large = _flops(solve(256), x, y), _flops(solve(4096), x, y)
    assert large < 1.5 * small, (small, large)


def test_a_trajectory_saved_at_steps_is_indexed_by_accepted_steps(x64):
    model, (x, y) = _mlp(), _data()
    sol = pccore.infer(model, x=x, y=y, solver=diffrax.Tsit5(),
                       stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
                       t1=3.0, dt0=1.0, max_steps=256, saveat=diffrax.SaveAt(steps=True))
    acc, k = int(sol.num_accepted_steps), int(sol.num_steps)
    assert 0 < acc < k  # dt0=1.0 is far too large at these tolerances: steps were rejected
    assert np.all(np.isfinite(np.asarray(sol.energies[:acc])))
    assert np.all(np.isinf(np.asarray(sol.energies[acc:])))
    for traj, z in zip(sol.trajectory, sol.activities):
        np.testing.assert_array_equal(traj[acc - 1], z)
    # each saved energy is the energy of the saved activities
    want = jax.vmap(lambda *zs: pccore.energy(model, zs, x=x, y=y))(
        *(t[:acc] for t in sol.trajectory))
    np.testing.assert_allclose(sol.energies[:acc], want, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(sol.ts[acc - 1]), np.asarray(sol.t))
