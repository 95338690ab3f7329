"""The inference engine against closed forms, across solver families, and its failure modes."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from tests import cases

_linear = cases.linear_network


def _tanh_mlp(key, sizes=(6, 8, 8, 3)):
    return pccore.wrap(eqx.nn.MLP(sizes[0], sizes[-1], sizes[1], len(sizes) - 2,
                                  activation=jnp.tanh, key=key))


# Euler at a stable constant step with the steady-state stop: the cheapest solve to compile.
CONVERGE = dict(solver=diffrax.Euler(), dt0=0.2, t1=2000.0, max_steps=10000)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [2, 3, 4, 5, 6])
def test_linear_network_reaches_closed_form_equilibrium(x64, depth):
    key = jax.random.key(depth)
    widths = [int(w) for w in jax.random.randint(key, (depth + 1,), 2, 9)]
    model = _linear(jax.random.fold_in(key, 1), widths)
    x = jax.random.normal(jax.random.fold_in(key, 2), (5, widths[0]))
    y = jax.random.normal(jax.random.fold_in(key, 3), (5, widths[-1]))
    sol = pccore.infer(model, x=x, y=y, steady_state=pccore.SteadyState(1e-10, 1e-10), **CONVERGE)
    assert sol.result == pccore.RESULTS.converged
    want = pccore.theory.linear_equilibrium_energy(model, x, y)
    np.testing.assert_allclose(sol.energy, want, rtol=1e-6)
    for got, exp in zip(sol.activities, pccore.theory.linear_equilibrium_activities(model, x, y)):
        np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-8)


def test_closed_form_energy_matches_issue_formula(x64, getkey):
    # F* = 1/2 sum_i r_i^T S^-1 r_i, r = y - W_L..W_1 x, S = I + sum_k (W_L..W_k)(W_L..W_k)^T.
    model = _linear(getkey(), [3, 5, 4, 2])
    Ws = [model.weight_matrices(l)[0] for l in range(3)]
    x = jax.random.normal(getkey(), (7, 3))
    y = jax.random.normal(getkey(), (7, 2))
    r = y - x @ (Ws[2] @ Ws[1] @ Ws[0]).T
    S = jnp.eye(2) + Ws[2] @ Ws[2].T + (Ws[2] @ Ws[1]) @ (Ws[2] @ Ws[1]).T
    want = 0.5 * jnp.sum(r * jnp.linalg.solve(S, r.T).T)
    np.testing.assert_allclose(pccore.theory.linear_equilibrium_energy(model, x, y), want, rtol=1e-12)


def test_optax_sgd_equals_euler(x64, getkey):
    model = _tanh_mlp(getkey())
    x = jax.random.normal(getkey(), (4, 6))
    y = jax.random.normal(getkey(), (4, 3))
    eta, T = 0.15, 17
    by_sgd = pccore.infer(model, x=x, y=y, solver=optax.sgd(eta), max_steps=T)
    by_euler = pccore.infer(model, x=x, y=y, solver=diffrax.Euler(), dt0=eta, t1=eta * T)
    assert int(by_sgd.num_steps) == int(by_euler.num_steps) == T
    for a, b in zip(by_sgd.activities, by_euler.activities):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_steady_state_stops_early_and_reports_limits(x64, getkey):
    model = _linear(getkey(), [4, 6, 6, 3])
    x = jax.random.normal(getkey(), (8, 4))
    y = jax.random.normal(getkey(), (8, 3))
    # Explicit adaptive solvers settle with a residual oscillation of about the controller's
    # tolerance, so the steady-state tolerance sits 10x above it.
    steady = pccore.SteadyState(rtol=1e-4, atol=1e-4)
    adaptive = dict(solver=diffrax.Heun(), stepsize_controller=diffrax.PIDController(1e-5, 1e-5))
    sol = pccore.infer(model, x=x, y=y, t1=1e4, dt0=0.1, steady_state=steady, **adaptive)
    assert sol.result == pccore.RESULTS.converged
    # Integrating to t1 = 1e4 would take thousands of steps (explicit stability limit).
    assert float(sol.t) < 100 and int(sol.num_steps) < 1000
    g = jax.grad(lambda z: pccore.energy(model, z, x=x, y=y))(sol.activities)
    for gl, zl in zip(g, sol.activities):
        bound = 1e-4 + 1e-4 * jnp.max(jnp.abs(zl), axis=1)
        assert jnp.all(jnp.max(jnp.abs(gl), axis=1) <= bound)
    np.testing.assert_allclose(sol.energy, pccore.theory.linear_equilibrium_energy(model, x, y),
                               rtol=1e-6)
    steady = pccore.SteadyState(rtol=1e-6, atol=1e-6)
    # Same with constant Euler steps: it stops before t1 and counts its steps.
    fixed = pccore.infer(model, x=x, y=y, dt0=0.2, t1=1e3, max_steps=5000, steady_state=steady)
    assert fixed.result == pccore.RESULTS.converged and int(fixed.num_steps) < 5000
    # Cannot converge in time: t1 first, or the step budget first.
    short = pccore.infer(model, x=x, y=y, dt0=0.1, t1=0.5, steady_state=steady)
    assert short.result == pccore.RESULTS.not_converged and int(short.num_steps) == 5
    sgd = pccore.infer(model, x=x, y=y, solver=optax.sgd(0.1), max_steps=5, steady_state=steady,
                       throw=False)
    assert sgd.result == pccore.RESULTS.max_steps_reached and int(sgd.num_steps) == 5
    with pytest.raises(Exception, match="used all `max_steps`"):
        pccore.infer(model, x=x, y=y, solver=optax.sgd(0.1), max_steps=5, steady_state=steady)
    budget = pccore.infer(model, x=x, y=y, t1=1e4, dt0=0.1, max_steps=3, steady_state=steady,
                          throw=False, **adaptive)
    assert budget.result == pccore.RESULTS.max_steps_reached


def test_zero_state_with_nonzero_field_is_not_steady(x64, getkey):
    # Linear, no biases, x = 0: the feed-forward state is exactly 0 but y != 0 pulls on it.
    model = _linear(getkey(), [3, 5, 5, 2])
    x = jnp.zeros((4, 3))
    y = 3.0 * jnp.ones((4, 2))
    sol = pccore.infer(model, x=x, y=y, dt0=0.1, t1=0.1, steady_state=pccore.SteadyState(0.5, 1e-3))
    assert int(sol.num_steps) == 1
    assert sol.result == pccore.RESULTS.not_converged


def test_large_output_error_at_feedforward_start_is_not_steady(getkey):
    # Only the last hidden layer feels the output error at the feed-forward start; a norm over
    # all activities (or a 1/B energy) would dilute it. Ours must not stop at t = 0.
    model = pccore.wrap(eqx.nn.MLP(64, 10, 128, 3, activation=jnp.tanh, key=getkey()))
    x = jax.random.normal(getkey(), (256, 64))
    y = jax.nn.one_hot(jnp.arange(256) % 10, 10)
    sol = pccore.infer(model, x=x, y=y, dt0=0.1, t1=0.3, steady_state=pccore.SteadyState(1e-3, 1e-3))
    assert int(sol.num_steps) == 3


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["euler", "heun_fixed", "adam"])
def test_batch_invariance_fixed_steps(x64, getkey, solver):
    # float64: Adam normalises gradients, so float32 rounding noise on an exactly-zero
    # gradient (hidden errors vanish at the feed-forward start) would become a full step.
    model = _tanh_mlp(getkey())
    x = jax.random.normal(getkey(), (64, 6))
    y = jax.random.normal(getkey(), (64, 3))
    opts = {
        "euler": dict(solver=diffrax.Euler(), dt0=0.1, t1=2.0),
        "heun_fixed": dict(solver=diffrax.Heun(), dt0=0.2, t1=2.0),
        "adam": dict(solver=optax.adam(0.05), max_steps=15),
    }[solver]
    batched = pccore.infer(model, x=x, y=y, **opts).activities
    for i in (0, 17, 63):
        alone = pccore.infer(model, x=x[i:i + 1], y=y[i:i + 1], **opts).activities
        for a, b in zip(batched, alone):
            np.testing.assert_allclose(a[i:i + 1], b, rtol=1e-10, atol=1e-12)


def test_batch_invariance_adaptive_equilibrium(x64, getkey):
    model = _linear(getkey(), [6, 8, 8, 3])
    x = jax.random.normal(getkey(), (64, 6))
    y = jax.random.normal(getkey(), (64, 3))
    opts = dict(solver=diffrax.Tsit5(), stepsize_controller=diffrax.PIDController(1e-8, 1e-8),
                dt0=0.1, t1=1e4, steady_state=pccore.SteadyState(1e-7, 1e-7))
    batched = pccore.infer(model, x=x, y=y, **opts)
    assert batched.result == pccore.RESULTS.converged
    for i in (0, 41):
        alone = pccore.infer(model, x=x[i:i + 1], y=y[i:i + 1], **opts).activities
        for a, b in zip(batched.activities, alone):
            np.testing.assert_allclose(a[i:i + 1], b, atol=1e-5)


@pytest.mark.slow
def test_saved_trajectory_and_energies(getkey):
    model = _tanh_mlp(getkey())
    x = jax.random.normal(getkey(), (4, 6))
    y = jax.random.normal(getkey(), (4, 3))
    ts = jnp.array([0.5, 1.0, 2.0])
    sol = pccore.infer(model, x=x, y=y, saveat=diffrax.SaveAt(ts=ts), dt0=0.1, t1=2.0)
    assert sol.trajectory[0].shape == (3, 4, 8)
    for j, T in enumerate([5, 10, 20]):
        ref = pccore.infer(model, x=x, y=y, dt0=0.1, t1=0.1 * T)
        for a, b in zip(sol.trajectory, ref.activities):
            np.testing.assert_allclose(a[j], b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sol.energies[j], ref.energy, rtol=1e-5)
    assert bool(jnp.all(jnp.diff(sol.energies) <= 0))
    opt = pccore.infer(model, x=x, y=y, solver=optax.sgd(0.1), max_steps=20,
                       saveat=diffrax.SaveAt(ts=jnp.array([0, 10, 20])))
    np.testing.assert_allclose(opt.energies[0], pccore.energy(model, pccore.init_activities(model, x),
                                                              x=x, y=y), rtol=1e-6)
    np.testing.assert_allclose(opt.energies[2], opt.energy, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["euler", "tsit5-pid", "sgd"])
def test_saved_trajectory_with_a_steady_state_stop(x64, getkey, route):
    """Saving does not change the solve: with a steady-state stop the final state, time,
    steps and result are those of the same solve without `saveat`. A save time before the
    stop holds the state there; one after it holds inf, and so does its energy."""
    # float64: the two solves are different programs, and the step at which each one's
    # field drops below 0.05 must be the same; their states differ by rounding, in float32
    # ~1e-7 relative (measured at 0.1 of the 1e-6 tolerances below), in float64 ~1e-15, so
    # only float64 keeps "same step count" and these tolerances CPU-independent.
    model = _tanh_mlp(getkey())
    assert jax.tree.leaves(model.params)[0].dtype == jnp.float64
    x = jax.random.normal(getkey(), (4, 6))
    y = jax.random.normal(getkey(), (4, 3))
    steady = pccore.SteadyState(0.0, 0.05)
    if route == "sgd":
        kw, ts, early = dict(solver=optax.sgd(0.2), max_steps=1000), [5, 990], dict(max_steps=5)
    else:
        kw = dict(dt0=0.2, t1=200.0, max_steps=2000)
        if route == "tsit5-pid":
            kw.update(solver=diffrax.Tsit5(), stepsize_controller=diffrax.PIDController(1e-4, 1e-4))
        ts, early = [1.0, 190.0], dict(t1=1.0)
    plain = pccore.infer(model, x=x, y=y, steady_state=steady, **kw)
    saved = pccore.infer(model, x=x, y=y, steady_state=steady,
                         saveat=diffrax.SaveAt(ts=jnp.array(ts)), **kw)
    assert plain.result == saved.result == pccore.RESULTS.converged
    assert int(saved.num_steps) == int(plain.num_steps) < 900
    np.testing.assert_allclose(saved.t, plain.t, rtol=1e-6)
    np.testing.assert_allclose(saved.energy, plain.energy, rtol=1e-6)
    for a, b in zip(saved.activities, plain.activities):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the state at the first save time (adaptive: diffrax interpolates it, within tolerance)
    ref = pccore.infer(model, x=x, y=y, **{**kw, **early})
    tol = 1e-3 if route == "tsit5-pid" else 1e-6
    for a, b in zip(saved.trajectory, ref.activities):
        np.testing.assert_allclose(a[0], b, rtol=10 * tol, atol=tol)
        assert bool(jnp.all(a[1] == jnp.inf))
    np.testing.assert_allclose(saved.energies[0], ref.energy, rtol=10 * tol)
    assert float(saved.energies[1]) == np.inf
    assert float(saved.ts[1]) == (990.0 if route == "sgd" else np.inf)


@pytest.mark.slow
def test_saveat_t0_t1_and_steps(getkey):
    """`SaveAt(t0=True)`, `t1=True` and `steps=True` are honoured, against the start, the
    result, and shorter solves."""
    model = _tanh_mlp(getkey())
    x = jax.random.normal(getkey(), (4, 6))
    y = jax.random.normal(getkey(), (4, 3))
    kw = dict(x=x, y=y, dt0=0.3, t1=1.2)
    sol = pccore.infer(model, **kw)
    z0 = pccore.init_activities(model, x)
    for save, times, states in [
        (diffrax.SaveAt(t0=True), [0.0], [z0]),
        (diffrax.SaveAt(t1=True), [1.2], [sol.activities]),
        (diffrax.SaveAt(steps=True), [0.3, 0.6, 0.9, 1.2],
         [pccore.infer(model, x=x, y=y, dt0=0.3, t1=0.3 * k).activities for k in (1, 2, 3, 4)]),
    ]:
        got = pccore.infer(model, **kw, saveat=save)
        np.testing.assert_allclose(got.ts, times, rtol=1e-6)
        for j, state in enumerate(states):
            for a, b in zip(got.trajectory, state):
                np.testing.assert_allclose(a[j], b, rtol=1e-5, atol=1e-6)
        for a, b in zip(got.activities, sol.activities):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # t1 not a whole number of steps: saving keeps the steps min(k dt0, t1)
    kw["t1"] = 1.0
    got = pccore.infer(model, **kw, saveat=diffrax.SaveAt(steps=True))
    np.testing.assert_allclose(got.ts, [0.3, 0.6, 0.9, 1.0], rtol=1e-6)
    for a, b in zip(got.activities, pccore.infer(model, **kw).activities):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_saveat_errors(getkey):
    model = _tanh_mlp(getkey())
    x, y = jnp.ones((2, 6)), jnp.ones((2, 3))
    opt = dict(x=x, y=y, solver=optax.sgd(0.1), max_steps=10)
    with pytest.raises(ValueError, match=r"save times are update counts 0\.\.max_steps = 0\.\.10; "
                                         r"got ts=\[0\.0, 2\.5\]"):
        pccore.infer(model, **opt, saveat=diffrax.SaveAt(ts=jnp.array([0.0, 2.5])))
    with pytest.raises(ValueError, match=r"got ts=\[0, 30\]"):
        pccore.infer(model, **opt, saveat=diffrax.SaveAt(ts=jnp.array([0, 30])))
    with pytest.raises(ValueError, match=r"t0=, t1= and steps= have no meaning here"):
        pccore.infer(model, **opt, saveat=diffrax.SaveAt(t0=True, ts=jnp.array([5])))
    sub = diffrax.SubSaveAt(ts=jnp.array([1.0]))
    with pytest.raises(ValueError, match=r"several `subs` and a custom `fn` are not supported"):
        pccore.infer(model, x=x, y=y, saveat=diffrax.SaveAt(subs=[sub, sub]))
    with pytest.raises(ValueError, match=r"several `subs` and a custom `fn` are not supported"):
        pccore.infer(model, x=x, y=y, saveat=diffrax.SaveAt(ts=jnp.array([1.0]),
                                                            fn=lambda t, z, args: z[0]))
    with pytest.raises(ValueError, match=r"dense=True is not supported"):
        pccore.infer(model, x=x, y=y, saveat=diffrax.SaveAt(dense=True, t1=True))
    with pytest.raises(TypeError, match=r"`saveat` must be a diffrax\.SaveAt or None; got list"):
        pccore.infer(model, x=x, y=y, saveat=[1.0])
    # a NumPy integer is a valid step budget
    a = pccore.infer(model, **{**opt, "max_steps": np.int64(10)})
    np.testing.assert_array_equal(a.energy, pccore.infer(model, **opt).energy)


def test_divergence_is_reported(getkey):
    model = _tanh_mlp(getkey())
    x = jax.random.normal(getkey(), (4, 6))
    y = 1e3 * jax.random.normal(getkey(), (4, 3))
    sol = pccore.infer(model, x=x, y=y, dt0=50.0, t1=5000.0, throw=False)
    assert sol.result == pccore.RESULTS.diverged
    with pytest.raises(Exception, match="Inference diverged"):
        pccore.infer(model, x=x, y=y, dt0=50.0, t1=5000.0)
    # under jax.jit, reading any one field of the solution raises, not only the activities
    for field in ("energy", "num_steps", "activities"):
        fn = eqx.filter_jit(lambda m, x, y, f=field: getattr(
            pccore.infer(m, x=x, y=y, dt0=50.0, t1=5000.0), f))
        with pytest.raises(Exception, match="Inference diverged"):
            jax.block_until_ready(fn(model, x, y))


def test_result_codes_print_their_meaning(getkey):
    model = _tanh_mlp(getkey())
    x, y = jnp.ones((2, 6)), jnp.ones((2, 3))
    assert "whole budget" in str(pccore.infer(model, x=x, y=y).result)
    steady = pccore.infer(model, x=x, y=y, t1=200.0, dt0=0.5,
                          steady_state=pccore.SteadyState(1e-3, 1e-3))
    assert steady.result == pccore.RESULTS.converged and "steady state" in str(steady.result)


def test_solver_errors(getkey):
    model = _tanh_mlp(getkey())
    x, y = jnp.ones((2, 6)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"`solver=Euler\(\)` gives no error estimate"):
        pccore.infer(model, x=x, y=y, stepsize_controller=diffrax.PIDController(1e-3, 1e-3))
    families = r"`solver` must be one of three families: a diffrax ODE solver .* an optax .* an optimistix"
    with pytest.raises(TypeError, match=families):
        pccore.infer(model, x=x, y=y, solver="euler")
    with pytest.raises(ValueError, match=r"`dt0` must be a finite positive number"):
        pccore.infer(model, x=x, y=y, dt0=-0.1)
    with pytest.raises(ValueError, match=r"needs 100 steps, more than max_steps=10"):
        pccore.infer(model, x=x, y=y, dt0=0.1, t1=10.0, max_steps=10)
    with pytest.raises(ValueError, match=r"`SteadyState`: got rtol=0, atol=0"):
        pccore.SteadyState(rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"`model`: no predictive-coding adapter for .*builtins.dict"):
        pccore.wrap({"not": "a model"})


@pytest.mark.slow
@pytest.mark.parametrize("solver", [diffrax.Heun(), diffrax.Tsit5(), diffrax.Bosh3(),
                                    pccore.AdaptiveEuler(), diffrax.ImplicitEuler()],
                         ids=["heun", "tsit5", "bosh3", "adaptive-euler", "implicit-euler"])
@pytest.mark.parametrize("stop", [False, True], ids=["to-t1", "steady-state"])
def test_adaptive_loop_equals_diffeqsolve(x64, getkey, solver, stop):
    """The adaptive route (diffrax's step and controller in pccore's own loop) takes the
    same steps as `diffrax.diffeqsolve` with an equivalent event, to rounding."""
    model = _tanh_mlp(getkey())
    x = jax.random.normal(getkey(), (5, 6))
    y = jax.random.normal(getkey(), (5, 3))
    pid = diffrax.PIDController(rtol=1e-5, atol=1e-5, pcoeff=0.3, icoeff=0.3)
    steady = pccore.SteadyState(1e-3, 1e-3) if stop else None
    t1 = 200.0 if stop else 3.0
    sol = pccore.infer(model, x=x, y=y, solver=solver, stepsize_controller=pid, t1=t1,
                       dt0=0.05, max_steps=4000, steady_state=steady)
    # The same flow written directly against diffrax.
    energy = pccore.PC()
    z0 = pccore.init_activities(model, x, y=y)
    grad = jax.grad(lambda z: pccore.energy(model, z, x=x, y=y, energy=energy))
    vf = lambda t, z, args: jax.tree_util.tree_map(jnp.negative, grad(z))

    def steady_fn(t, z, args, **kwargs):
        g = grad(z)
        ok = jnp.array(True)
        for gl, zl in zip(g, z):
            ok = ok & jnp.all(jnp.max(jnp.abs(gl), axis=1) <= 1e-3 + 1e-3 * jnp.max(jnp.abs(zl), axis=1))
        return ok

    ref = diffrax.diffeqsolve(diffrax.ODETerm(vf), solver, 0.0, t1, 0.05, tuple(z0),
                              stepsize_controller=pid, max_steps=4000,
                              event=diffrax.Event(steady_fn) if stop else None)
    assert int(sol.num_steps) == int(ref.stats["num_steps"]) > 5
    np.testing.assert_allclose(float(sol.t), float(ref.ts[-1]), rtol=1e-10)
    for a, b in zip(sol.activities, ref.ys):
        np.testing.assert_allclose(a, b[-1], rtol=1e-8, atol=1e-10)
    expected = pccore.RESULTS.converged if stop else pccore.RESULTS.completed
    assert sol.result == expected
    if stop:  # and it is really a steady state
        assert bool(steady_fn(None, sol.activities, None))


def test_unstable_step_is_reported_as_energy_increased(x64, getkey):
    """Euler on a deep linear network is stable iff dt0 < 2 / lambda_max(H) (H the constant
    activity Hessian, from pccore.theory): below it the energy never rises; above it the
    top eigen-direction grows and the solve must say so, naming the remedies."""
    model = cases.linear_network(getkey(), [4, 6, 6, 3])
    x = jax.random.normal(getkey(), (5, 4), jnp.float64)
    y = jax.random.normal(getkey(), (5, 3), jnp.float64)
    lam_max = float(jnp.linalg.eigvalsh(pccore.theory.linear_activity_hessian(model))[-1])
    start = float(pccore.energy(model, pccore.init_activities(model, x), x=x, y=y))
    stable = 1.8 / lam_max
    sol = pccore.infer(model, x=x, y=y, t1=60 * stable, dt0=stable)
    assert sol.result == pccore.RESULTS.completed and float(sol.energy) < start
    unstable = 2.2 / lam_max
    sol = pccore.infer(model, x=x, y=y, t1=60 * unstable, dt0=unstable, throw=False)
    assert sol.result == pccore.RESULTS.energy_increased
    assert float(pccore.energy(model, sol.activities, x=x, y=y)) > start  # independently
    with pytest.raises(Exception, match=r"Inference raised the energy above its starting value"
                                        r".*smaller `dt0`.*AdaptiveEuler.*MuPC"):
        jax.block_until_ready(pccore.infer(model, x=x, y=y, t1=60 * unstable,
                                           dt0=unstable).activities)
    optim = optax.sgd(1e-3)
    _, _, stats = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                    t1=60 * unstable, dt0=unstable)
    assert stats.result == pccore.RESULTS.energy_increased
    assert bool(stats.updated)  # finite: the update is applied, the result says what happened
    _, _, stats = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                    t1=60 * stable, dt0=stable)
    assert stats.result == pccore.RESULTS.completed


class _TTY(__import__("io").StringIO):
    def isatty(self):
        return True


def test_progress_bar_for_a_long_solve(monkeypatch):
    """`progress=True` draws diffrax's tqdm meter on a terminal, silent elsewhere; the solve
    is the same (the same steps on diffrax's own loop)."""
    import sys

    model = _mlp_progress()
    x, y = jnp.ones((2, 4)), jnp.ones((2, 2))
    plain = pccore.infer(model, x=x, y=y, t1=1.0, dt0=0.1)
    quiet = pccore.infer(model, x=x, y=y, t1=1.0, dt0=0.1, progress=True)  # not a terminal
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    drawn = pccore.infer(model, x=x, y=y, t1=1.0, dt0=0.1, progress=True)
    jax.block_until_ready(drawn.activities)
    for a, b, c in zip(plain.activities, quiet.activities, drawn.activities):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
    assert "100.00%" in tty.getvalue(), tty.getvalue()
    with pytest.raises(ValueError, match=r"`progress=True`: the solver is a "
                                         r"GradientTransformationExtraArgs, but only gradient flow"):
        pccore.infer(model, x=x, y=y, solver=optax.sgd(0.1), progress=True)


def _mlp_progress():
    return cases.build_mlp("equinox", cases.canonical_mlp([4, 5, 2], jax.random.key(0)))
