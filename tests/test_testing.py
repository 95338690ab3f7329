"""`pccore.testing.check_energy`, the energy-variant checklist: pccore's own variants pass it,
the variant of the "Writing a variant" page passes it, and a broken variant fails it with the
property named."""

import jax
import jax.numpy as jnp
import pytest

import pccore
import pccore.testing as pt
from tests import cases
from tests.test_energy_params import LearnedPrecisionPC


def _mlp():
    return cases.build_mlp("equinox", cases.canonical_mlp([5, 8, 6, 3], jax.random.key(0),
                                                          jnp.float64))


def _data():
    x = jax.random.normal(jax.random.key(1), (4, 5), jnp.float64)
    y = jax.nn.one_hot(jnp.array([0, 2, 1, 2]), 3, dtype=jnp.float64)
    return x, y


@pytest.mark.slow
@pytest.mark.parametrize("energy", [
    pccore.PC(),
    pccore.PC(loss=pccore.CrossEntropy(), parameterisation=pccore.MuPC(), activity_decay=0.1,
              regularisers=(pccore.WeightDecay(1e-2),)),
    pccore.EPC(),
    LearnedPrecisionPC(),
], ids=["pc", "pc-mupc-decay", "epc", "learnable-precisions"])
def test_variants_pass_the_checklist(x64, energy):
    x, y = _data()
    pt.check_energy(energy, _mlp(), x, y)


@pytest.mark.slow
def test_a_free_bottom_passes_the_checklist(x64):
    _, y = _data()
    pt.check_energy(pccore.PC(), _mlp(), None, y, key=jax.random.key(3))


class Coupled(pccore.PC):
    """Broken on purpose: the output error is taken against the batch mean of the targets,
    so one sample's energy depends on the others."""

    def layer_energies(self, model, variables, x, y):
        return super().layer_energies(model, variables, x, y - y.mean(0))


class StopsGradient(pccore.PC):
    """Broken on purpose: the hidden errors' gradient is cut, so inference follows a field
    that is not the energy's gradient."""

    def per_sample(self, model, variables, x, y):
        return super().per_sample(model, tuple(jax.lax.stop_gradient(v) for v in variables[:1])
                                  + tuple(variables[1:]), x, y)


@pytest.mark.slow
def test_a_broken_variant_fails_with_the_property_named(x64):
    x, y = _data()
    with pytest.raises(AssertionError, match=r"3. samples are independent: sample 0"):
        pt.check_energy(Coupled(), _mlp(), x, y)
    with pytest.raises(AssertionError, match=r"4. activity gradient: jax.grad against a finite "
                                             r"difference: got"):
        pt.check_energy(StopsGradient(), _mlp(), x, y)


def test_the_checklist_needs_float64():
    model = cases.build_mlp("equinox", cases.canonical_mlp([5, 8, 6, 3], jax.random.key(0)))
    x, y = jnp.ones((2, 5)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"`check_energy` compares gradients with finite "
                                         r"differences, which need float64"):
        pt.check_energy(pccore.PC(), model, x, y)
