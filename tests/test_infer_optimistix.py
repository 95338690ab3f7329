"""The optimistix family: direct minimisation of the energy over the activities."""

from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from tests import cases

optx = pytest.importorskip("optimistix")


def _linear(key, sizes=(5, 6, 6, 6, 6, 3), dtype=jnp.float64):
    w = cases.canonical_mlp(sizes, key, dtype, bias=False)
    return cases.build_mlp("equinox", w, activation=lambda a: a)


def _data(key, model, B=8):
    kx, ky = jax.random.split(key)
    n_in, n_out = model.in_shape.shape[0], model.out_shapes[-1].shape[0]
    return (jax.random.normal(kx, (B, n_in), jnp.float64),
            jax.random.normal(ky, (B, n_out), jnp.float64))


@pytest.mark.slow
def test_reaches_closed_form_in_far_fewer_gradients(x64, getkey):
    model = _linear(getkey())
    x, y = _data(getkey(), model)
    F_star = pccore.theory.linear_equilibrium_energy(model, x, y)
    ss = pccore.SteadyState(rtol=0.0, atol=1e-7)
    counts = {}
    for name, solver in [
        ("bfgs", optx.BFGS(rtol=1e-12, atol=1e-12)),
        ("ncg", optx.NonlinearCG(rtol=1e-12, atol=1e-12)),
    ]:
        sol = pccore.infer(model, x=x, y=y, solver=solver, steady_state=ss, max_steps=2000)
        assert sol.result == pccore.RESULTS.converged
        assert abs(sol.energy - F_star) <= 1e-8 * F_star, name
        counts[name] = int(sol.num_grad_evals)
    # 0.3 is near Euler's stability limit 2 / λ_max(H) ≈ 0.44 here (0.5 diverges)
    euler = pccore.infer(model, x=x, y=y, t1=1e4, dt0=0.3, max_steps=50_000, steady_state=ss)
    assert euler.result == pccore.RESULTS.converged
    assert abs(euler.energy - F_star) <= 1e-8 * F_star
    counts["euler"] = int(euler.num_grad_evals)
    # Recorded on this problem: BFGS ~35, Euler at its largest stable step ~550.
    assert counts["euler"] >= 5 * counts["bfgs"], counts
    # NonlinearCG reaches F* too, but its line search needs about as many gradients as
    # Euler on this small, mildly conditioned problem: no ratio is claimed for it.


def test_param_grads_same_whichever_family(x64, getkey):
    sizes = (4, 6, 6, 3)
    model = cases.build_mlp("equinox", cases.canonical_mlp(sizes, getkey(), jnp.float64))
    x, y = _data(getkey(), model)
    # An energy-based line search cannot resolve |∇F| much below sqrt(eps) ≈ 1e-8.
    ss = pccore.SteadyState(rtol=0.0, atol=1e-7)
    runs = [
        dict(solver=optx.BFGS(rtol=1e-12, atol=1e-12)),
        dict(solver=diffrax.Euler(), t1=2e3, dt0=0.2, max_steps=20_000),
        dict(solver=optax.sgd(0.1, momentum=0.5), max_steps=20_000),
    ]
    grads = []
    for kw in runs:
        sol = pccore.infer(model, x=x, y=y, steady_state=ss, **kw)
        assert sol.result == pccore.RESULTS.converged
        grads.append(pccore.param_grads(model, sol.activities, x=x, y=y))
    flat = [jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(g)]) for g in grads]
    for f in flat[1:]:
        np.testing.assert_allclose(f, flat[0], atol=1e-6)


class _ArmijoDescent(optx.AbstractGradientDescent):
    """Steepest descent with a backtracking Armijo line search."""

    rtol: float
    atol: float
    norm: Callable = optx.max_norm
    descent: optx.SteepestDescent = optx.SteepestDescent()
    search: optx.BacktrackingArmijo = optx.BacktrackingArmijo()


@pytest.mark.slow
@pytest.mark.parametrize(
    "energy",
    [
        pccore.PC(loss=pccore.CrossEntropy()),
        pccore.PC(parameterisation=pccore.MuPC(), activity_decay=0.1),
    ],
    ids=["cross-entropy", "mupc-decay"],
)
def test_every_minimiser_finds_the_gradient_flow_equilibrium(x64, getkey, energy):
    sizes = (4, 5, 5, 3)
    model = cases.build_mlp("equinox", cases.canonical_mlp(sizes, getkey(), jnp.float64))
    x, y = _data(getkey(), model, B=4)
    y = jax.nn.softmax(y)
    ss = pccore.SteadyState(rtol=0.0, atol=1e-7)
    ref = pccore.infer(model, x=x, y=y, energy=energy, t1=2e3, dt0=0.1, max_steps=20_000,
                       steady_state=ss)
    for solver in [
        optx.BFGS(rtol=1e-10, atol=1e-10),
        optx.NonlinearCG(rtol=1e-10, atol=1e-10),
        optx.LBFGS(rtol=1e-10, atol=1e-10),
        _ArmijoDescent(rtol=1e-10, atol=1e-10),
        optx.OptaxMinimiser(optax.sgd(0.1, momentum=0.5), rtol=1e-10, atol=1e-10),
    ]:
        sol = pccore.infer(model, x=x, y=y, energy=energy, solver=solver, steady_state=ss,
                           max_steps=20_000)
        assert sol.result == pccore.RESULTS.converged, type(solver).__name__
        for a, b in zip(sol.activities, ref.activities):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_own_tolerance_step_budget_and_batch_independence(x64, getkey):
    model = _linear(getkey())
    x, y = _data(getkey(), model)
    sol = pccore.infer(model, x=x, y=y, solver=optx.BFGS(rtol=1e-10, atol=1e-10))
    assert sol.result == pccore.RESULTS.converged
    assert sol.num_grad_evals == sol.num_steps
    # Dense quasi-Newton runs per sample, each to the closed-form equilibrium activities.
    z_star = pccore.theory.linear_equilibrium_activities(model, x, y)
    for a, b in zip(sol.activities, z_star):
        np.testing.assert_allclose(a, b, atol=1e-6)
    short = pccore.infer(model, x=x, y=y, solver=optx.BFGS(rtol=1e-10, atol=1e-10), max_steps=3,
                         throw=False)
    assert short.result == pccore.RESULTS.max_steps_reached and short.num_steps == 3


def test_unknown_family_and_saveat_errors(getkey):
    model = cases.build_mlp("equinox", cases.canonical_mlp((3, 4, 2), getkey()))
    x, y = jnp.ones((2, 3)), jnp.ones((2, 2))
    with pytest.raises(TypeError, match="three families.*diffrax.*optax.*optimistix"):
        pccore.infer(model, x=x, y=y, solver=optx.Newton(rtol=1e-6, atol=1e-6))
    with pytest.raises(ValueError, match="`saveat` is not supported with an optimistix"):
        pccore.infer(model, x=x, y=y, solver=optx.BFGS(rtol=1e-6, atol=1e-6),
                     saveat=diffrax.SaveAt(ts=jnp.array([0.0, 1.0])))


@pytest.mark.slow
def test_digits_training_matches_gradient_flow():
    from sklearn.datasets import load_digits

    X, labels = load_digits(return_X_y=True)
    X = jnp.asarray(X / 16.0, jnp.float32)
    Y = jax.nn.one_hot(labels, 10)
    Xtr, Ytr, Xte, Yte = X[:1400], Y[:1400], X[1400:], Y[1400:]
    w = cases.canonical_mlp((64, 32, 10), jax.random.key(0))

    def train(**kw):
        model = cases.build_mlp("equinox", w)
        optim = optax.adam(1e-2)
        state = optim.init(model.params)
        for _ in range(2):
            for i in range(0, 1400, 100):
                model, state, _ = pccore.train_step(model, optim, state, x=Xtr[i:i + 100],
                                                    y=Ytr[i:i + 100], **kw)
        return float(pccore.evaluate(model, Xte, Yte).accuracy)

    flow = train(t1=10.0, dt0=0.1, steady_state=pccore.SteadyState(1e-3, 1e-3))
    bfgs = train(solver=optx.BFGS(rtol=1e-4, atol=1e-4),
                 steady_state=pccore.SteadyState(1e-3, 1e-3))
    # Both families find the same equilibria, so the updates (and accuracies) agree.
    assert flow > 0.8 and abs(bfgs - flow) <= 0.02, (flow, bfgs)
