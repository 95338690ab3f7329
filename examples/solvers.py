"""Choosing an inference solver: diffrax ODE solvers and optax optimisers on the activities.

Inference integrates the gradient flow dz/dt = -dF/dz. Any diffrax solver works with constant
steps; Heun, Tsit5 and pccore.AdaptiveEuler (Euler's step, one gradient per step, with
Heun's as the error estimate) carry an error estimate, so they also run with an adaptive PID
controller; and any optax optimiser steps the activities directly (`optax.sgd(h)` is Euler
with `dt0 = h`). A `pccore.SteadyState` stops a solve once the vector field is small.

    python examples/solvers.py [--quick]
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _common import QUICK, digits

import pccore

x_train, y_train, _, _ = digits(limit=64)
mlp = eqx.nn.MLP(64, 10, width_size=64, depth=3 if QUICK else 5, activation=jnp.tanh,
                 key=jax.random.key(0))
model = pccore.wrap(mlp)
energy = pccore.PC(loss=pccore.CrossEntropy())
x, y = x_train[:32], y_train[:32]
t1 = 5.0 if QUICK else 20.0

solves = {
    "Euler, dt0=0.1": dict(solver=diffrax.Euler(), t1=t1, dt0=0.1),
    "Heun, dt0=0.1": dict(solver=diffrax.Heun(), t1=t1, dt0=0.1),
    "Tsit5 + PID(1e-4)": dict(solver=diffrax.Tsit5(), t1=t1, dt0=0.1,
                              stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-4)),
    "optax.sgd(0.1)": dict(solver=optax.sgd(0.1), max_steps=round(t1 / 0.1)),
    "optax.adam(0.05)": dict(solver=optax.adam(0.05), max_steps=round(t1 / 0.1)),
    "Heun + PID, steady state": dict(
        solver=diffrax.Heun(), t1=1000.0, dt0=0.1,
        stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3),
        steady_state=pccore.SteadyState(rtol=1e-2, atol=1e-2)),
    "AdaptiveEuler + PID, stop": dict(
        solver=pccore.AdaptiveEuler(), t1=1000.0, dt0=0.1,
        stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3),
        steady_state=pccore.SteadyState(rtol=1e-2, atol=1e-2)),
}
if QUICK:  # fewer compilations on the tiny budget
    for name in ("Heun, dt0=0.1", "optax.adam(0.05)"):
        del solves[name]
def outcome(result) -> str:
    names = ("completed", "converged", "not_converged", "max_steps_reached", "diverged")
    return next(n for n in names if bool(result == getattr(pccore.RESULTS, n)))


results = {}
for name, options in solves.items():
    sol = pccore.infer(model, x=x, y=y, energy=energy, **options)
    results[name] = sol
    print(f"{name:<26} steps {int(sol.num_steps):>5}  energy {float(sol.energy) / 32:.5f}  "
          f"{outcome(sol.result):<10} |grad| {float(sol.vector_field_norm):.1e}")

# optax.sgd(h) on the activities is Euler with dt0 = h (same trajectory, to rounding)
e, s = results["Euler, dt0=0.1"].energy, results["optax.sgd(0.1)"].energy
assert jnp.allclose(e, s, rtol=1e-5), (e, s)
# a higher-order adaptive solve reaches the same point as fixed steps, with fewer steps
assert jnp.allclose(results["Tsit5 + PID(1e-4)"].energy, e, rtol=1e-3)
# the steady-state test stops as soon as the vector field meets the tolerance, long before t1
steady = results["Heun + PID, steady state"]
assert steady.result == pccore.RESULTS.converged and float(steady.t) < 1000.0
# AdaptiveEuler gets to a steady state too, with one gradient per step where Heun takes two
cheap = results["AdaptiveEuler + PID, stop"]
assert cheap.result == pccore.RESULTS.converged
assert int(cheap.num_grad_evals) == int(cheap.num_steps) + 1
print(f"gradients to the steady state: Heun {int(steady.num_grad_evals)}, "
      f"AdaptiveEuler {int(cheap.num_grad_evals)}")

# the same options train: e.g. adaptive Heun in a training step
optim = optax.adam(1e-3)
state = optim.init(model.params)
model, state, stats = pccore.train_step(
    model, optim, state, x=x, y=y, energy=energy, solver=diffrax.Heun(), t1=t1, dt0=0.1,
    stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3))
print(f"training step with adaptive Heun: {int(stats.num_steps)} steps, energy "
      f"{float(stats.energy):.4f}")
eqx.tree_check(model)
