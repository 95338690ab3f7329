"""Initialisers that read the model at call time: `pccore.Amortised()` never goes stale.

Oracle: `pccore.amortise` of the amortiser the step was given (the current weights), and the
energy there from `pccore.energy`; the stale snapshot's energy is computed too, to show the
check can fail (the amortiser did change). All in float64.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from tests import cases

SIZES = [3, 6, 5, 4]  # x -> ... -> y
B = 4


def _data(key):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (B, SIZES[0]), jnp.float64)
    y = jax.random.normal(ky, (B, SIZES[-1]), jnp.float64)
    return x, y


def _net(sizes, key):
    return cases.build_mlp("equinox", cases.canonical_mlp(sizes, key, jnp.float64))


def _bidirectional(key):
    kf, kb = jax.random.split(key)
    return pccore.Bidirectional(_net(SIZES, kf), _net(SIZES[::-1], kb))


def _assert_tuples_equal(a, b, rtol=1e-12):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=1e-14)


@pytest.mark.slow
def test_amortised_reads_the_current_backward_network(x64, getkey):
    """`TrainStep(energy=BPC(), init=Amortised())`, built once before the loop: every step
    starts at the sweep of the backward network it is given, as the backward network trains."""
    model = _bidirectional(getkey())
    x, y = _data(getkey())
    energy = pccore.BPC()
    init = pccore.Amortised()
    step = pccore.TrainStep(optax.sgd(0.2), energy=energy, init=init, solver=diffrax.Euler(),
                            t1=0.5, dt0=0.1)
    opt_state = step.init(model)
    first = model
    for k in range(3):
        want = pccore.amortise(model.backward, y)[1:]  # z_1 .. z_(L-1); x clamped
        got = pccore.init_activities(model, x, y=y, energy=energy, init=init)
        _assert_tuples_equal(got, want)
        current = float(pccore.energy(model, want, x=x, y=y, energy=energy))
        model, opt_state, stats = step(model, opt_state, x=x, y=y)
        assert bool(stats.updated)
        # TrainStats.loss is the batch-mean energy where inference started
        np.testing.assert_allclose(float(stats.loss) * B, current, rtol=1e-12)
        if k > 0:  # a snapshot of the first backward network would start elsewhere
            stale = float(pccore.energy(model, pccore.amortise(first.backward, y)[1:], x=x, y=y,
                                        energy=energy))
            assert abs(stale - current) > 1e-6 * abs(current)
    # the snapshot form keeps the weights it was built with (documented, and still accepted)
    snapshot = pccore.Amortised(first.backward)
    _assert_tuples_equal(pccore.init_activities(model, x, y=y, energy=energy, init=snapshot),
                         pccore.amortise(first.backward, y)[1:])


def test_amortised_reads_the_parameterised_backward_network(x64, getkey):
    """Under a parameterisation the guesses are those of the backward predictions g_l of the
    energy (the scaled network), as every other term of F."""
    model = _bidirectional(getkey())
    x, y = _data(getkey())
    energy = pccore.BPC(parameterisation=pccore.NTP())
    got = pccore.init_activities(model, x, y=y, energy=energy, init=pccore.Amortised())
    scaled = pccore.NTP().apply(model.backward)
    _assert_tuples_equal(got, pccore.amortise(scaled, y)[1:])
    # free bottom: z_0 is a variable, guessed too
    got = pccore.init_activities(model, None, y=y, energy=energy, init=pccore.Amortised())
    _assert_tuples_equal(got, pccore.amortise(scaled, y))


@pytest.mark.slow
def test_hybrid_steps_use_the_amortiser_they_are_given(x64, getkey):
    """The documented hybrid loop: every hybrid_train_step starts the generator's inference at
    the guesses of the amortiser passed to it (the one the previous step returned)."""
    kg, ka = jax.random.split(getkey())
    gen, amort = _net(SIZES, kg), _net(SIZES[::-1], ka)
    x, y = _data(getkey())
    opt, a_opt = optax.sgd(0.1), optax.sgd(0.5)
    g_state, a_state = opt.init(gen.params), a_opt.init(amort.params)
    first = amort
    opts = dict(solver=diffrax.Euler(), t1=0.5, dt0=0.1)
    for k in range(3):
        current = float(pccore.energy(gen, pccore.amortise(amort, y)[1:], x=x, y=y))
        stale = float(pccore.energy(gen, pccore.amortise(first, y)[1:], x=x, y=y))
        gen, g_state, amort, a_state, stats = pccore.hybrid_train_step(
            gen, amort, opt, g_state, a_opt, a_state, x=x, y=y, **opts)
        assert bool(stats.generator.updated)
        np.testing.assert_allclose(float(stats.generator.loss) * B, current, rtol=1e-12)
        if k > 0:
            assert abs(stale - current) > 1e-6 * abs(current)


NO_AMORTISER = (r"`init=pccore.Amortised\(\)` \(no `amortiser` argument\).*got a PCModel "
                r"without an `amortiser`.*Expected a model that carries one.*"
                r"pccore.Bidirectional.*`init=pccore.Amortised\(amortiser\)` built at that call")


def test_amortised_without_an_amortiser_is_refused(getkey):
    gen = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey()))
    x, y = jnp.zeros((2, SIZES[0])), jnp.zeros((2, SIZES[-1]))
    with pytest.raises(ValueError, match=NO_AMORTISER):
        pccore.init_activities(gen, x, y=y, init=pccore.Amortised())


@pytest.mark.slow
def test_amortised_without_an_amortiser_is_refused_by_infer(getkey):
    gen = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey()))
    x, y = jnp.zeros((2, SIZES[0])), jnp.zeros((2, SIZES[-1]))
    with pytest.raises(ValueError, match=NO_AMORTISER):
        pccore.infer(gen, x=x, y=y, init=pccore.Amortised(), t1=0.2, dt0=0.1)


def test_amortised_bad_amortisers_are_refused(getkey):
    with pytest.raises(TypeError, match=r"`amortiser` must be a pccore.PCModel .*or None.*got "
                                        r"str"):
        pccore.Amortised("my amortiser")  # type: ignore[arg-type]
    gen = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey()))
    short = cases.build_mlp("equinox", cases.canonical_mlp([SIZES[-1], SIZES[-2]], getkey()))
    x, y = jnp.zeros((2, SIZES[0])), jnp.zeros((2, SIZES[-1]))
    with pytest.raises(ValueError, match=r"`Amortised`: the amortiser has 1 layers.*the energy "
                                         r"has 2 inference variables"):
        pccore.init_activities(gen, x, y=y, init=pccore.Amortised(short))
