"""`pccore.AdaptiveEuler` against Euler, Heun and the closed-form equilibrium."""

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


def test_step_is_euler_and_error_is_heun_difference(x64, getkey):
    # dy/dt = A y: one step from y0 with step h.
    A = -jnp.abs(jax.random.normal(getkey(), (5, 5))) - 2 * jnp.eye(5)
    y0 = jax.random.normal(getkey(), (5,))
    term = diffrax.ODETerm(lambda t, y, args: A @ y)
    h = 0.07

    def step(solver):
        state = solver.init(term, 0.0, h, y0, None)
        y1, err, _, _, result = solver.step(term, 0.0, h, y0, None, state, made_jump=False)
        assert result == diffrax.RESULTS.successful
        return y1, err

    y1, err = step(pccore.AdaptiveEuler())
    euler, _ = step(diffrax.Euler())
    heun, _ = step(diffrax.Heun())
    np.testing.assert_allclose(y1, y0 + h * A @ y0, rtol=1e-14)
    np.testing.assert_allclose(y1, euler, rtol=1e-14)
    # The estimate is Euler's solution minus Heun's: h/2 (f(y0) - f(y1)).
    np.testing.assert_allclose(err, euler - heun, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(err, 0.5 * h * (A @ y0 - A @ y1), rtol=1e-12, atol=1e-15)


def test_error_estimate_is_second_order(x64):
    # The local error of Euler on dy/dt = -y is y0 (1 - h - e^-h) ~ h^2/2; the estimate
    # tracks it: their ratio tends to 1 and halving h quarters it.
    term = diffrax.ODETerm(lambda t, y, args: -y)
    solver = pccore.AdaptiveEuler()
    y0 = jnp.array([1.0])
    errs = []
    for h in (0.1, 0.05, 0.025):
        state = solver.init(term, 0.0, h, y0, None)
        y1, err, *_ = solver.step(term, 0.0, h, y0, None, state, made_jump=False)
        true = y1 - y0 * jnp.exp(-h)
        np.testing.assert_allclose(err, true, rtol=0.2)
        errs.append(float(err[0]))
    np.testing.assert_allclose(np.array(errs[:-1]) / np.array(errs[1:]), 4.0, rtol=0.1)
    assert solver.order(term) == 1 and solver.error_order(term) == 2


def test_constant_step_takes_eulers_steps(x64, getkey):
    model = pccore.wrap(eqx.nn.MLP(6, 3, 8, 2, activation=jnp.tanh, key=getkey()))
    x = jax.random.normal(getkey(), (4, 6))
    y = jax.random.normal(getkey(), (4, 3))
    a = pccore.infer(model, x=x, y=y, solver=pccore.AdaptiveEuler(), dt0=0.1, t1=2.0)
    b = pccore.infer(model, x=x, y=y, solver=diffrax.Euler(), dt0=0.1, t1=2.0)
    assert int(a.num_steps) == int(b.num_steps) == 20
    for u, v in zip(a.activities, b.activities):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14)
    # with a steady-state stop too, at one gradient per step as Euler's
    steady = pccore.SteadyState(1e-3, 1e-3)
    a = pccore.infer(model, x=x, y=y, solver=pccore.AdaptiveEuler(), dt0=0.1, t1=100.0,
                     max_steps=1000, steady_state=steady)
    b = pccore.infer(model, x=x, y=y, solver=diffrax.Euler(), dt0=0.1, t1=100.0,
                     max_steps=1000, steady_state=steady)
    assert a.result == b.result == pccore.RESULTS.converged
    assert int(a.num_steps) == int(b.num_steps) and int(a.num_grad_evals) == int(b.num_grad_evals)
    for u, v in zip(a.activities, b.activities):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14)
    # and a training step with it is Euler's training step
    optim = optax.sgd(0.1)
    ma, _, sa = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                  solver=pccore.AdaptiveEuler())
    mb, _, sb = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    np.testing.assert_allclose(sa.energy, sb.energy, rtol=1e-12)
    for u, v in zip(jax.tree.leaves(ma.params), jax.tree.leaves(mb.params)):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14)


def test_adaptive_solve_reaches_closed_form_with_one_gradient_per_step(x64, getkey):
    model = _linear(getkey(), [4, 6, 6, 3])
    x = jax.random.normal(getkey(), (8, 4))
    y = jax.random.normal(getkey(), (8, 3))
    pid = diffrax.PIDController(rtol=1e-8, atol=1e-8)
    steady = pccore.SteadyState(1e-7, 1e-7)
    sol = pccore.infer(model, x=x, y=y, solver=pccore.AdaptiveEuler(), stepsize_controller=pid,
                       t1=1e4, dt0=0.05, max_steps=20_000, steady_state=steady)
    assert sol.result == pccore.RESULTS.converged
    np.testing.assert_allclose(sol.energy, pccore.theory.linear_equilibrium_energy(model, x, y),
                               rtol=1e-9)
    for got, want in zip(sol.activities, pccore.theory.linear_equilibrium_activities(model, x, y)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # One gradient at the start (for the test there, and the first step's first stage), then
    # one per step (the count is checked against a run-time counter in test_engine_perf).
    # Heun costs two per step, and two for the step it attempts from the steady state (where
    # the test reads its first stage).
    assert int(sol.num_grad_evals) == int(sol.num_steps) + 1
    heun = pccore.infer(model, x=x, y=y, solver=diffrax.Heun(), stepsize_controller=pid,
                        t1=1e4, dt0=0.05, max_steps=20_000, steady_state=steady)
    assert int(heun.num_grad_evals) == 2 * int(heun.num_steps) + 2


def test_no_error_estimate_message_names_adaptive_euler(getkey):
    model = _linear(getkey(), [3, 4, 2])
    x, y = jnp.ones((2, 3)), jnp.ones((2, 2))
    with pytest.raises(ValueError, match=r"gives no error estimate.*pccore\.AdaptiveEuler\(\)"):
        pccore.infer(model, x=x, y=y, stepsize_controller=diffrax.PIDController(1e-3, 1e-3))
