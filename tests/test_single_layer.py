"""One-layer models with every solver family and every variant.

A one-layer chain has no free hidden activity: with `x` and `y` clamped there is no inference
variable at all, and the start is the equilibrium (0 steps, 0 gradient evaluations,
`RESULTS.converged`); with a free bottom (`x=None`) the one variable is $z_0$. Oracles:

- no variable: the energy written by hand, and `train_step`'s SGD update against `jax.grad`
  of that energy (one layer of PC is backprop on that layer);
- one variable (a linear layer, float64): the closed-form minimiser of a strictly convex
  quadratic, to within what the steady-state test guarantees. At a state whose gradient $g$
  passes `SteadyState(atol)`, $\\lVert z - z^*\\rVert_2 \\le \\lVert g\\rVert_2 / \\lambda_{\\min}(H)
  \\le \\sqrt{d}\\,\\mathrm{atol} / \\lambda_{\\min}(H)$ per sample, $H$ the Hessian.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore

optx = pytest.importorskip("optimistix")

IN, OUT, B = 3, 4, 5
DECAY = 0.5  # an activity prior: the one-variable problem is strictly convex (H >= DECAY I)
ATOL = 1e-9
# Minimisers that accept a step by its energy decrease stall where that decrease drops below
# the energy's rounding, eps |F| ~ 1e-15, i.e. at gradients near sqrt(eps |F| lambda) ~ 3e-8:
# their steady-state test asks for what float64 can certify.
ATOL_MINIMISER = 1e-6


def _solvers() -> dict:
    steady = pccore.SteadyState(rtol=0.0, atol=ATOL)
    loose = pccore.SteadyState(rtol=0.0, atol=ATOL_MINIMISER)
    return {
        "euler": dict(solver=diffrax.Euler(), t1=200.0, dt0=0.1, steady_state=steady),
        "heun": dict(solver=diffrax.Heun(), t1=200.0, dt0=0.1, steady_state=steady),
        "tsit5+pid": dict(solver=diffrax.Tsit5(), t1=200.0, dt0=0.1, steady_state=steady,
                          stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-12)),
        "kvaerno5+pid": dict(solver=diffrax.Kvaerno5(), t1=200.0, dt0=0.1, steady_state=steady,
                             stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-12)),
        "euler+saveat": dict(solver=diffrax.Euler(), t1=200.0, dt0=0.1, steady_state=steady,
                             saveat=diffrax.SaveAt(ts=jnp.array([0.0, 1.0]), t1=True)),
        "optax-sgd": dict(solver=optax.sgd(0.1), max_steps=4000, steady_state=steady),
        "optax-sgd+saveat": dict(solver=optax.sgd(0.1), max_steps=4000, steady_state=steady,
                                 saveat=diffrax.SaveAt(ts=jnp.array([0, 3]))),
        "bfgs": dict(solver=optx.BFGS(rtol=1e-12, atol=1e-12), steady_state=loose),
        "nonlinear-cg": dict(solver=optx.NonlinearCG(rtol=1e-12, atol=1e-12),
                             steady_state=loose, max_steps=2000),
    }


SOLVERS = list(_solvers())
VARIANTS = ["pc", "epc", "bpc"]


def _linear(key, n_in, n_out) -> eqx.nn.Linear:
    return eqx.nn.Linear(n_in, n_out, key=key)


def _setup(variant: str, key, decay: float = 0.0):
    kf, kb = jax.random.split(key)
    fwd = _linear(kf, IN, OUT)
    if variant == "bpc":
        model = pccore.Bidirectional(pccore.wrap([fwd]), pccore.wrap([_linear(kb, OUT, IN)]))
        energy = pccore.BPC(alpha_f=1.0, alpha_b=0.7, activity_decay=decay)
    else:
        model = pccore.wrap([fwd])
        energy = (pccore.PC if variant == "pc" else pccore.EPC)(activity_decay=decay)
    return model, energy


def _layers(model, variant):
    """(W, b) of the forward layer, and of the backward one for BPC, from the params."""
    if variant == "bpc":
        f, g = model.params
        return (f[0][0].weight, f[0][0].bias), (g[0][0].weight, g[0][0].bias)
    return (model.params[0][0].weight, model.params[0][0].bias), None


def _energy_by_hand(variant, fwd, bwd, z0, y, decay):
    """Per-sample energies written out for a linear layer (BPC with alpha_f=1, alpha_b=0.7)."""
    W, b = fwd
    e = 0.5 * jnp.sum((y - (z0 @ W.T + b)) ** 2, axis=1)
    if variant == "bpc":
        Wb, bb = bwd
        e = e + 0.7 * 0.5 * jnp.sum((z0 - (y @ Wb.T + bb)) ** 2, axis=1)
    return e + decay * 0.5 * jnp.sum(z0**2, axis=1)


def _data(key, dtype):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (B, IN), dtype), jax.random.normal(ky, (B, OUT), dtype))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_no_inference_variable_is_an_immediate_equilibrium(x64, getkey, variant, solver):
    model, energy = _setup(variant, getkey())
    x, y = _data(getkey(), jnp.float64)
    opts = _solvers()[solver]
    sol = pccore.infer(model, x=x, y=y, energy=energy, **opts)
    assert sol.activities == ()
    assert int(sol.num_steps) == 0 and int(sol.num_grad_evals) == 0
    assert sol.result == pccore.RESULTS.converged
    fwd, bwd = _layers(model, variant)
    want = _energy_by_hand(variant, fwd, bwd, x, y, 0.0).sum()
    np.testing.assert_allclose(sol.energy, want, rtol=1e-12)
    if opts.get("saveat") is not None:
        # the start is the end: later save times are not reached (inf), as after any stop
        reached = np.isfinite(np.asarray(sol.ts))
        assert reached.any() and not reached.all()
        np.testing.assert_allclose(np.asarray(sol.energies)[reached], want, rtol=1e-12)
        assert np.all(np.isinf(np.asarray(sol.energies)[~reached]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("solver", ["euler", "tsit5+pid", "optax-sgd", "bfgs"])
def test_one_layer_train_step_is_sgd_on_the_energy(x64, getkey, variant, solver):
    model, energy = _setup(variant, getkey())
    x, y = _data(getkey(), jnp.float64)
    opts = {k: v for k, v in _solvers()[solver].items() if k != "saveat"}
    lr = 0.05
    optim = optax.sgd(lr)
    new, _, stats = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                      energy=energy, **opts)
    assert bool(stats.updated) and int(stats.num_steps) == 0

    def mean_energy(params):
        fwd, bwd = _layers(model.with_params(params), variant)
        return _energy_by_hand(variant, fwd, bwd, x, y, 0.0).mean()

    grads = jax.grad(mean_energy)(model.params)
    want = jax.tree.map(lambda p, g: p - lr * g, model.params, grads)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_one_free_variable_reaches_the_closed_form(x64, getkey, variant, solver):
    model, energy = _setup(variant, getkey(), decay=DECAY)
    _, y = _data(getkey(), jnp.float64)
    opts = _solvers()[solver]
    sol = pccore.infer(model, x=None, y=y, energy=energy, init=pccore.RandomNormal(),
                       key=getkey(), throw=False, **opts)
    assert sol.result == pccore.RESULTS.converged
    (W, b), bwd = _layers(model, variant)
    # minimise 1/2|y - W z - b|^2 [+ 0.7/2 |z - Wb y - bb|^2] + DECAY/2 |z|^2 in closed form
    H = W.T @ W + DECAY * jnp.eye(IN)
    rhs = (y - b) @ W
    if variant == "bpc":
        Wb, bb = bwd
        H = H + 0.7 * jnp.eye(IN)
        rhs = rhs + 0.7 * (y @ Wb.T + bb)
    z_star = jnp.linalg.solve(H, rhs.T).T
    lam_min = float(jnp.linalg.eigvalsh(H)[0])
    bound = np.sqrt(IN) * opts["steady_state"].atol / lam_min
    (z0,) = energy.activities(model, sol.activities, None)
    assert float(jnp.max(jnp.abs(z0 - z_star))) <= bound
    fwd, _ = _layers(model, variant)
    # F - F* = 1/2 (z - z*)^T H (z - z*) per sample: at most lambda_max/2 |z - z*|^2
    lam_max = float(jnp.linalg.eigvalsh(H)[-1])
    f_star = _energy_by_hand(variant, fwd, bwd, z_star, y, DECAY).sum()
    rounding = 64 * np.finfo(np.float64).eps * float(f_star)  # two sums of B terms each
    gap = float(sol.energy - f_star)
    assert -rounding <= gap <= B * lam_max / 2 * IN * bound**2 + rounding


def test_a_graph_without_latents_is_refused(getkey):
    """GraphPC clamps `x`: a one-layer graph has no node, which wrap_graph refuses."""
    lin = _linear(getkey(), IN, OUT)
    params, static = eqx.partition(lin, eqx.is_inexact_array)
    with pytest.raises(ValueError, match=r"visited no `pccore.node` marker"):
        pccore.wrap_graph(lambda p, x: eqx.combine(p, static)(x), params, jnp.ones((B, IN)),
                          per_sample=True)


def test_one_layer_hybrid_step_updates_both(x64, getkey):
    """Hybrid PC on a one-layer generator (x clamped: no variable): the generator's update is
    SGD on its energy, and the amortiser y -> x learns from the clamped x."""
    gen, _ = _setup("pc", getkey())
    amort = pccore.wrap([_linear(getkey(), OUT, IN)])
    x, y = _data(getkey(), jnp.float64)
    optim = optax.sgd(0.05)
    g2, _, a2, _, stats = pccore.hybrid_train_step(
        gen, amort, optim, optim.init(gen.params), optim, optim.init(amort.params), x=x, y=y)
    assert bool(stats.generator.updated) and int(stats.generator.num_steps) == 0
    W, b = _layers(gen, "pc")[0]
    gW = jax.grad(lambda W: _energy_by_hand("pc", (W, b), None, x, y, 0.0).mean())(W)
    np.testing.assert_allclose(g2.params[0][0].weight, W - 0.05 * gW, rtol=1e-12)
