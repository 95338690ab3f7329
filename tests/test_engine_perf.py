"""Engine cost: no retracing between training steps, and exact gradient-evaluation counts."""

import diffrax
import jax
import jax.numpy as jnp
import optax
import optimistix as optx
import pytest

import pccore
from tests import cases


class _Counting(pccore.AbstractEnergy):
    """PC, counting Python calls (traces) and runtime calls (host callback) of `per_sample`."""

    inner: pccore.PC = pccore.PC()

    def variable_shapes(self, m, c):
        return self.inner.variable_shapes(m, c)

    def data_shapes(self, m):
        return self.inner.data_shapes(m)

    def layer_energies(self, m, v, x, y):
        return self.inner.layer_energies(m, v, x, y)

    def init(self, m, x, y, i, k):
        return self.inner.init(m, x, y, i, k)

    def predict(self, m, x):
        return self.inner.predict(m, x)

    def output_loss(self, p, y):
        return self.inner.output_loss(p, y)

    callback: bool = True

    def per_sample(self, m, v, x, y):
        COUNT["traced"] += 1
        if self.callback:
            jax.debug.callback(lambda: COUNT.__setitem__("run", COUNT["run"] + 1))
        return self.inner.per_sample(m, v, x, y)


COUNT = {"traced": 0, "run": 0}


def _model(key, dtype=jnp.float32):
    return cases.build_mlp("equinox", cases.canonical_mlp((6, 5, 5, 3), key, dtype))


def test_train_step_does_not_retrace(getkey):
    model = _model(getkey())
    optim = optax.adam(1e-3)
    state = optim.init(model.params)
    energy = _Counting(callback=False)
    x, y = jax.random.normal(getkey(), (4, 6)), jax.random.normal(getkey(), (4, 3))
    model, state, _ = pccore.train_step(model, optim, state, x=x, y=y, energy=energy)
    traced = COUNT["traced"]
    for _ in range(3):
        x, y = jax.random.normal(getkey(), (4, 6)), jax.random.normal(getkey(), (4, 3))
        model, state, _ = pccore.train_step(model, optim, state, x=x, y=y, energy=energy)
    assert COUNT["traced"] == traced
    # Fresh but equal configuration objects every call (as in `energy=PC()` written in the
    # loop) share the compiled step too.
    for _ in range(3):
        model, state, _ = pccore.train_step(model, optim, state, x=x, y=y,
                                            energy=_Counting(callback=False),
                                            solver=diffrax.Euler(), init=pccore.FeedForward())
    assert COUNT["traced"] == traced


SS = pccore.SteadyState(0.0, 1e-4)
PID = diffrax.PIDController(rtol=1e-4, atol=1e-4)
PID6 = diffrax.PIDController(rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw, final",
    [
        (dict(solver=diffrax.Euler(), t1=2.0, dt0=0.1), 2),
        (dict(solver=diffrax.Tsit5(), t1=2.0, dt0=0.1), 3),
        (dict(solver=diffrax.Euler(), t1=200.0, dt0=0.1, max_steps=10_000, steady_state=SS), 1),
        (dict(solver=diffrax.Heun(), t1=200.0, dt0=0.1, max_steps=10_000, steady_state=SS), 2),
        (dict(solver=diffrax.Heun(), t1=0.5, dt0=0.1, steady_state=SS), 2),
        (dict(solver=diffrax.Tsit5(), t1=200.0, dt0=0.1, max_steps=10_000, steady_state=SS), 1),
        (dict(solver=diffrax.Tsit5(), stepsize_controller=PID, t1=50.0, dt0=0.1,
              steady_state=SS), 3),
        (dict(solver=diffrax.Heun(), stepsize_controller=PID, t1=50.0, dt0=0.1,
              steady_state=SS), 3),
        (dict(solver=diffrax.Heun(), stepsize_controller=PID, t1=50.0, dt0=0.1, max_steps=4,
              steady_state=SS), 3),
        (dict(solver=pccore.AdaptiveEuler(), stepsize_controller=PID, t1=50.0, dt0=0.1,
              max_steps=10_000, steady_state=SS), 3),
        # First-same-as-last solvers whose first step is rejected (dt0 too large for the
        # tolerance): diffrax re-evaluates the first stage unless handed it.
        (dict(solver=diffrax.Bosh3(), stepsize_controller=PID6, t1=5.0, dt0=0.1), 3),
        (dict(solver=diffrax.Bosh3(), stepsize_controller=PID6, t1=5.0, dt0=0.1,
              saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 5.0, 4)), steady_state=SS), 3 + 4),
        (dict(solver=pccore.AdaptiveEuler(), stepsize_controller=PID6, t1=5.0, dt0=0.1,
              max_steps=10_000, saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 5.0, 4))), 3 + 4),
        (dict(solver=optax.adam(0.05), max_steps=3000, steady_state=SS), 1),
        (dict(solver=optx.BFGS(rtol=1e-8, atol=1e-8), steady_state=SS), 3),
        (dict(solver=optx.OptaxMinimiser(optax.sgd(0.1), rtol=1e-8, atol=1e-8), max_steps=3000,
              steady_state=SS), 3),
    ],
    ids=["euler", "tsit5", "euler-ss", "heun-ss", "heun-ss-not-reached", "tsit5-ss", "tsit5-pid-ss",
         "heun-pid-ss", "heun-pid-ss-not-reached", "adaptive-euler-pid-ss", "bosh3-rejected-first",
         "bosh3-saveat-ss", "adaptive-euler-saveat", "adam-ss", "bfgs-ss", "optaxmin-ss"],
)
def test_num_grad_evals_is_exact(x64, getkey, kw, final):
    # Oracle: a host callback inside the energy counts its evaluations at run time. The
    # solution's own diagnostics add `final` (the final energy; the gradient and the energy at
    # the start, each unless the loop has it (the start's for the energy_increased test); the
    # energy of each point of a saved trajectory, computed as a diffrax solve saves it: one
    # call per save time reached, here 4).
    # float64: the check below recomputes the field outside the solver and compares it with
    # the same 1e-4 threshold. Near an equilibrium g = e_l - J^T e_{l+1} is a difference of
    # O(1) terms, so two programs' roundings of it differ by ~eps |z|: in float32 ~1e-7, 0.1%
    # of the threshold, enough for the two sides to disagree on another CPU when the last
    # step lands that close to it; in float64 ~1e-16.
    f64 = jnp.float64
    model = _model(getkey(), f64)
    x, y = jax.random.normal(getkey(), (4, 6), f64), jax.random.normal(getkey(), (4, 3), f64)
    COUNT["run"] = 0
    sol = pccore.infer(model, x=x, y=y, energy=_Counting(), throw=False, **kw)
    jax.block_until_ready(sol)
    assert int(sol.num_grad_evals) == COUNT["run"] - final
    if "steady_state" in kw:  # and "converged" means the field is below the tolerance
        g = jax.grad(lambda z: pccore.energy(model, z, x=x, y=y))(sol.activities)
        below = all(bool(jnp.all(jnp.max(jnp.abs(a), axis=1) <= 1e-4)) for a in g)
        assert below == (sol.result == pccore.RESULTS.converged), (below, sol.result)


def test_steady_state_euler_costs_one_gradient_per_step(getkey):
    # Compiled cost of one loop iteration: the steady-state test must reuse the step's
    # gradient, so the loop body's flops stay those of one activity gradient (XLA's cost
    # analysis counts a while body once). Both programs hold one gradient outside their
    # loop (the fixed-step loop takes its first step outside, the steady-state loop
    # evaluates z0 for the test): they cost the same, where a test evaluating its own
    # gradient in the loop would add a second one.
    model = _model(getkey())
    x, y = jnp.ones((64, 6)), jnp.ones((64, 3))

    def flops(**kw):
        f = jax.jit(lambda m, x, y: pccore.infer(m, x=x, y=y, throw=False, **kw).activities)
        return f.lower(model, x, y).compile().cost_analysis()["flops"]

    grad_flops = jax.jit(
        lambda z: jax.grad(lambda z: pccore.energy(model, z, x=x, y=y))(z)
    ).lower(pccore.init_activities(model, x)).compile().cost_analysis()["flops"]
    fixed = flops(t1=2.0, dt0=0.1)
    steady = flops(t1=2.0, dt0=0.1, steady_state=SS)
    assert abs(steady - fixed) < 0.5 * grad_flops, (fixed, steady, grad_flops)
    assert fixed > 1.5 * grad_flops  # the measure does see both gradients
