"""One unit per quantity (docs/concepts.md, Units): inference energies are batch sums,
training statistics batch means.

Oracles: `pccore.energy` (the batch sum, by definition) at the same activities, and the closed
form of `pccore.theory` at the equilibrium of a deep linear network. All in float64.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from pccore import theory
from tests import cases

B = 5


def _data(key, d_in, d_out):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (B, d_in), jnp.float64),
            jax.random.normal(ky, (B, d_out), jnp.float64))


@pytest.mark.slow
def test_train_stats_are_batch_means_of_the_inference_energy(x64, getkey):
    sizes = [4, 7, 6, 3]
    model = cases.build_mlp("equinox", cases.canonical_mlp(sizes, getkey(), jnp.float64))
    x, y = _data(getkey(), sizes[0], sizes[-1])
    # an activity prior is part of every energy; the parameter penalty R is in none of them
    energy = pccore.PC(activity_decay=0.1, regularisers=(pccore.WeightDecay(0.3),))
    opts = dict(energy=energy, solver=diffrax.Euler(), t1=1.0, dt0=0.1)
    z0 = pccore.init_activities(model, x, y=y, energy=energy)
    sol = pccore.infer(model, x=x, y=y, **opts)
    opt = optax.sgd(0.1)
    _, _, stats = pccore.train_step(model, opt, opt.init(model.params), x=x, y=y, **opts)
    start = float(pccore.energy(model, z0, x=x, y=y, energy=energy))
    end = float(pccore.energy(model, sol.activities, x=x, y=y, energy=energy))
    assert end < 0.9 * start  # inference moved: the two checks below are distinct
    np.testing.assert_allclose(float(stats.loss) * B, start, rtol=1e-12)
    np.testing.assert_allclose(float(stats.energy) * B, end, rtol=1e-12)
    np.testing.assert_allclose(float(sol.energy), end, rtol=1e-12)
    assert sol.batch_size == B
    np.testing.assert_allclose(float(sol.mean_energy), float(stats.energy), rtol=1e-12)
    # the saved energies are batch sums too
    ts = jnp.array([0.0, 1.0])
    saved = pccore.infer(model, x=x, y=y, saveat=diffrax.SaveAt(ts=ts), **opts)
    np.testing.assert_allclose(np.asarray(saved.energies), [start, end], rtol=1e-12)


@pytest.mark.slow
def test_theory_energy_is_the_batch_sum_at_the_equilibrium(x64, getkey):
    sizes = [6, 9, 8, 3]
    weights = cases.canonical_mlp(sizes, getkey(), jnp.float64, bias=False)
    model = cases.build_mlp("equinox", weights, lambda z: z)
    x, y = _data(getkey(), sizes[0], sizes[-1])
    energy = pccore.PC(parameterisation=pccore.SP(output_precision=2.0))
    z_star = theory.linear_equilibrium_activities(model, x, y, energy=energy)
    closed = float(theory.linear_equilibrium_energy(model, x, y, energy=energy))
    np.testing.assert_allclose(float(pccore.energy(model, z_star, x=x, y=y, energy=energy)),
                               closed, rtol=1e-10)
    # and per sample: the batch sum of the one-sample closed forms
    per_sample = sum(float(theory.linear_equilibrium_energy(model, x[i:i + 1], y[i:i + 1],
                                                            energy=energy)) for i in range(B))
    np.testing.assert_allclose(per_sample, closed, rtol=1e-10)


@pytest.mark.slow
def test_converged_train_stats_are_the_closed_form_batch_mean(x64, getkey):
    sizes = [6, 9, 8, 3]
    weights = cases.canonical_mlp(sizes, getkey(), jnp.float64, bias=False)
    model = cases.build_mlp("equinox", weights, lambda z: z)
    x, y = _data(getkey(), sizes[0], sizes[-1])
    energy = pccore.PC()
    opts = dict(energy=energy, solver=optax.sgd(0.2), max_steps=100_000,
                steady_state=pccore.SteadyState(rtol=0.0, atol=1e-9))
    closed = float(theory.linear_equilibrium_energy(model, x, y, energy=energy))
    sol = pccore.infer(model, x=x, y=y, **opts)
    opt = optax.sgd(0.1)
    _, _, stats = pccore.train_step(model, opt, opt.init(model.params), x=x, y=y, **opts)
    np.testing.assert_allclose(float(sol.energy), closed, rtol=1e-8)
    np.testing.assert_allclose(float(sol.mean_energy), closed / B, rtol=1e-8)
    np.testing.assert_allclose(float(stats.energy) * B, closed, rtol=1e-8)


def test_a_solution_without_variables_does_not_guess_its_batch():
    """A one-layer model with both ends clamped has no inference variable (as `pccore.infer`
    returns for it, tests/test_single_layer.py): the solution refuses to guess B."""
    zero = jnp.zeros((), jnp.int32)
    sol = pccore.InferenceSolution(activities=(), num_steps=zero, energy=jnp.array(3.0),
                                   result=pccore.RESULTS.completed, t=jnp.array(0.0),
                                   vector_field_norm=jnp.array(0.0), num_grad_evals=zero)
    with pytest.raises(ValueError, match=r"`InferenceSolution.batch_size`: this solution has no "
                                         r"inference variables.*divide `energy` by the batch "
                                         r"size of your data"):
        sol.mean_energy
    with_one = eqx.tree_at(lambda s: s.activities, sol, (jnp.ones((B, 2)),))
    assert with_one.batch_size == B
    np.testing.assert_allclose(float(with_one.mean_energy), 3.0 / B, rtol=1e-7)
