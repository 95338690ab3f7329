"""Deep linear networks: the closed forms of `pccore.theory` against the engine (R6a, R12, R14).

Oracles: converged inference (adaptive Tsit5 with a steady-state stop), `jax.hessian` of the
energy, and `pccore.param_grads` at the equilibrium (envelope theorem). All in float64.
"""

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import pccore
from pccore import theory
from tests import cases

D, N, DY, B = 6, 16, 3, 4


def linear_model(L, param, skips, key):
    sizes = [D] + [N] * (L - 1) + [DY]
    weights = cases.canonical_mlp(sizes, key, jnp.float64, bias=False)
    if not isinstance(param, pccore.SP):  # NTP / muPC: W ~ N(0, 1), the scaling is explicit
        weights = [(W * jnp.sqrt(W.shape[0]), b) for W, b in weights]
    model = cases.build_mlp("equinox", weights, lambda z: z)
    return model.with_skips(skips)


def data(key):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (B, D), jnp.float64), jax.random.normal(ky, (B, DY), jnp.float64)


# depth 3-6, every type, with and without skips, gamma and the output precision lambda
CONVERGED = [
    (3, pccore.SP(), False),
    (4, pccore.NTP(), False),
    (5, pccore.MuPC(gamma=0.5, output_precision=2.0), False),
    (6, pccore.SP(output_precision=0.5), True),
    (5, pccore.NTP(output_precision=2.0), True),
    (4, pccore.MuPC(gamma=2.0), True),
]


@eqx.filter_jit
def _oracles(model, x, y, energy):
    return (
        theory.linear_equilibrium_energy(model, x, y, energy=energy),
        theory.linear_equilibrium_activities(model, x, y, energy=energy),
        theory.linear_equilibrium_energy_grad(model, x, y, energy=energy),
    )


def _converge(model, x, y, energy):
    """Gradient descent on the activities (optax route) to a tight steady state."""
    return pccore.infer(model, x=x, y=y, energy=energy, solver=optax.sgd(0.2), max_steps=100_000,
                        steady_state=pccore.SteadyState(rtol=0.0, atol=1e-8))


@pytest.mark.slow
def test_adaptive_solve_stops_at_the_steady_state(x64, getkey):
    """R6 (a): the event on the vector field stops an adaptive solve early, at the closed form."""
    param = pccore.MuPC(gamma=0.5, output_precision=2.0)
    model = linear_model(5, param, True, getkey())
    x, y = data(getkey())
    energy = pccore.PC(parameterisation=param)
    opts = dict(x=x, y=y, energy=energy, solver=diffrax.Tsit5(), t1=1000.0, dt0=0.1,
                stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8), max_steps=20000)
    sol = pccore.infer(model, steady_state=pccore.SteadyState(rtol=0.0, atol=1e-6), **opts)
    assert sol.result == pccore.RESULTS.converged
    assert float(sol.t) < 500.0  # stopped long before t1 = 1000
    assert float(sol.vector_field_norm) <= 1e-6
    F_star, z_star, _ = _oracles(model, x, y, energy)
    np.testing.assert_allclose(sol.energy, F_star, rtol=1e-6)
    for a, b in zip(sol.activities, z_star):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("L,param,skips", CONVERGED, ids=lambda v: repr(v)[:40])
def test_converged_inference_matches_closed_form(x64, getkey, L, param, skips):
    model = linear_model(L, param, skips, getkey())
    x, y = data(getkey())
    _check_converged_against_closed_form(model, x, y, pccore.PC(parameterisation=param))


def _check_converged_against_closed_form(model, x, y, energy):
    """A converged solve against F*, z* and (envelope theorem) grad F*/B; returns F*."""
    sol = _converge(model, x, y, energy)
    assert sol.result == pccore.RESULTS.converged
    F_star, z_star, g_theory = _oracles(model, x, y, energy)
    np.testing.assert_allclose(sol.energy, F_star, rtol=1e-6)
    for a, b in zip(sol.activities, z_star):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    g_pc = pccore.param_grads(model, sol.activities, x=x, y=y, energy=energy)
    for a, b in zip(jtu.tree_leaves(g_theory), jtu.tree_leaves(g_pc)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    return F_star


@pytest.mark.slow
@pytest.mark.parametrize("decay", [0.3, "array"])
def test_closed_form_with_activity_decay(x64, getkey, decay):
    """With an activity decay F* is c - b.z*/2: it matches a converged solve and its envelope
    gradient, as a Python number or an array (also under vmap); at zero decay it equals the
    S^-1 form."""
    param = pccore.NTP(output_precision=2.0)
    model = linear_model(4, param, True, getkey())
    x, y = data(getkey())
    alpha = 0.3 if decay == 0.3 else jnp.asarray(0.3)
    energy = pccore.PC(parameterisation=param, activity_decay=alpha)
    F_star = _check_converged_against_closed_form(model, x, y, energy)
    F = lambda a: theory.linear_equilibrium_energy(
        model, x, y, energy=pccore.PC(parameterisation=param, activity_decay=a))
    np.testing.assert_allclose(jax.vmap(F)(jnp.array([0.0, 0.3])), [F(0.0), F_star], rtol=1e-10)


HESSIAN = [
    (L, param, skips)
    for param in (pccore.SP(), pccore.NTP(), pccore.MuPC(gamma=0.5, output_precision=2.0),
                  pccore.NTP(output_precision=3.0))
    for skips, L in ((False, 3), (True, 6))
]


@pytest.mark.slow
@pytest.mark.parametrize("L,param,skips", HESSIAN, ids=lambda v: repr(v)[:40])
def test_activity_hessian_matches_autodiff(x64, getkey, L, param, skips):
    model = linear_model(L, param, skips, getkey())
    x, y = data(getkey())
    energy = pccore.PC(parameterisation=param, activity_decay=0.3 if skips else 0.0)
    x1, y1 = x[:1], y[:1]
    z = pccore.init_activities(model, x1, energy=energy)
    flat, unravel = jax.flatten_util.ravel_pytree(z)
    H_auto = jax.jit(jax.hessian(
        lambda v: pccore.energy(model, unravel(v), x=x1, y=y1, energy=energy)))(flat)
    H = eqx.filter_jit(theory.linear_activity_hessian)(model, energy)
    np.testing.assert_allclose(H, H_auto, atol=1e-10, rtol=0)


@pytest.mark.slow
def test_scalings_reach_the_maps(x64, getkey):
    """a_l from fan-ins, gamma divides a_L, lambda in S; NTP+skips uses 1/sqrt(N) at the output."""
    L = 4
    model = linear_model(L, pccore.NTP(), True, getkey())
    maps = theory.linear_maps(model, pccore.PC(parameterisation=pccore.NTP()))
    Ws = [model.weight_matrices(l)[0] for l in range(L)]
    np.testing.assert_allclose(maps[0], Ws[0] / np.sqrt(D))
    np.testing.assert_allclose(maps[1], np.eye(N) + Ws[1] / np.sqrt(N * L))
    np.testing.assert_allclose(maps[-1], Ws[-1] / np.sqrt(N))
    mu = pccore.PC(parameterisation=pccore.MuPC(gamma=0.25, output_precision=4.0))
    maps = theory.linear_maps(model, mu)
    np.testing.assert_allclose(maps[-1], Ws[-1] / (N * 0.25))
    S = theory.linear_rescaling(model, mu)
    expected = np.eye(DY) / 4.0
    for l in range(1, L):  # M_l = A_L ... A_{l+1}
        P = np.eye(N)
        for A in maps[l:]:
            P = A @ P
        expected = expected + P @ P.T
    np.testing.assert_allclose(S, expected, rtol=1e-12)


@pytest.mark.parametrize("framework", cases.FRAMEWORKS)
def test_scalings_identical_across_frameworks(framework, getkey):
    weights = cases.canonical_mlp([D, N, N, DY], getkey())
    ref = cases.build_mlp("equinox", weights)
    model = cases.build_mlp(framework, weights)
    for param in (pccore.NTP(), pccore.MuPC(gamma=0.5)):
        assert param.scalings(model) == param.scalings(ref)
        assert param.scalings(model.with_skips()) == param.scalings(ref.with_skips())


def test_theory_rejects_biases_and_nonlinearities(getkey):
    weights = cases.canonical_mlp([D, N, DY], getkey())
    with pytest.raises(ValueError, match="exactly one weight and no bias"):
        theory.linear_maps(cases.build_mlp("equinox", weights, lambda z: z))
    weights = cases.canonical_mlp([D, N, DY], getkey(), bias=False)
    with pytest.raises(ValueError, match="not the linear map of its weight"):
        theory.linear_maps(cases.build_mlp("equinox", weights, jnp.tanh))
    with pytest.raises(ValueError, match="PC\\(loss=MSE\\(\\)\\) only"):
        theory.linear_maps(cases.build_mlp("equinox", weights, lambda z: z),
                           pccore.PC(loss=pccore.CrossEntropy()))
