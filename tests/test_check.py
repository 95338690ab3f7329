"""Input hardening: every bad input gets an error naming the argument, got vs expected, the fix."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from tests import cases


@pytest.fixture(scope="module")
def setup():
    model = cases.build_mlp("equinox", cases.canonical_mlp([3, 5, 2], jax.random.key(0)))
    kx, ky = jax.random.split(jax.random.key(1))
    x = np.asarray(jax.random.normal(kx, (4, 3)))
    y = np.asarray(jax.random.normal(ky, (4, 2)))
    return model, x, y


def _entry_points(model, x, y):
    """Every public function that takes data, as `f(x, y)`."""
    z = pccore.init_activities(model, x)  # clean activities; only the data is corrupted
    opt = optax.sgd(0.1)
    return {
        "infer": lambda x, y: pccore.infer(model, x=x, y=y, t1=0.2),
        "train_step": lambda x, y: pccore.train_step(model, opt, opt.init(model.params), x=x, y=y, t1=0.2),
        "evaluate": lambda x, y: pccore.evaluate(model, x, y),
        "energy": lambda x, y: pccore.energy(model, z, x=x, y=y),
        "layer_energies": lambda x, y: pccore.layer_energies(model, z, x=x, y=y),
        "param_grads": lambda x, y: pccore.param_grads(model, z, x=x, y=y),
        "init_activities": lambda x, y: pccore.init_activities(model, x, y=y),
    }


BAD_DATA = [
    (
        "int x",
        lambda x, y: (x.astype(np.int32), y),
        TypeError,
        r"`x` has dtype int32; expected float32 or float64\. Cast it first, "
        r"e\.g\. `x\.astype\(jnp\.float32\)`",
    ),
    (
        "float16 y",
        lambda x, y: (x, y.astype(np.float16)),
        TypeError,
        r"`y` has dtype float16; expected float32 or float64\. Half precision is not supported",
    ),
    (
        "bfloat16 x",
        lambda x, y: (jnp.asarray(x, jnp.bfloat16), y),
        TypeError,
        r"`x` has dtype bfloat16; expected float32 or float64\. Half precision",
    ),
    (
        "rank",
        lambda x, y: (x[0], y),
        ValueError,
        r"`x` has shape \(3,\); expected \(batch, 3\) \(a batch on axis 0 of per-sample shape \(3,\)",
    ),
    ("features", lambda x, y: (x, y[:, :1]), ValueError, r"`y` has shape \(4, 1\); expected \(4, 2\)"),
    ("batch mismatch", lambda x, y: (x, y[:3]), ValueError, r"`y` has shape \(3, 2\); expected \(4, 2\)"),
    (
        "empty",
        lambda x, y: (x[:0], y[:0]),
        ValueError,
        r"`x` is an empty batch \(shape \(0, 3\)\); expected at least one sample",
    ),
    (
        "nan host",
        lambda x, y: (np.where(np.arange(3) == 1, np.nan, x).astype(np.float32), y),
        ValueError,
        r"`x` contains 4 non-finite value\(s\) \(NaN or inf\) out of 12; expected finite data",
    ),
    (
        "inf host",
        lambda x, y: (x, np.full_like(y, np.inf)),
        ValueError,
        r"`y` contains 8 non-finite value\(s\)",
    ),
    ("list of str", lambda x, y: ([["a"] * 3] * 4, y), TypeError, r"`x` has dtype <U1; expected float32"),
]


@pytest.mark.parametrize("name,corrupt,error,match", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_is_refused_everywhere(setup, name, corrupt, error, match):
    model, x, y = setup
    bx, by = corrupt(x, y)
    for fn_name, fn in _entry_points(model, x, y).items():
        if fn_name == "init_activities" and name.startswith(("features", "batch", "inf host", "float16")):
            continue  # init_activities only validates what it is given (y optional)
        with pytest.raises(error, match=match):
            fn(bx, by)


def test_nonfinite_device_data(setup):
    """Device arrays: the utilities scan them; the hot paths report divergence instead."""
    model, x, y = setup
    xn = jnp.asarray(x).at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"`x` contains 1 non-finite value"):
        pccore.evaluate(model, xn, jnp.asarray(y))
    with pytest.raises(ValueError, match=r"`x` contains 1 non-finite value"):
        pccore.energy(model, pccore.init_activities(model, x), x=xn, y=y)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"Inference diverged"):
        pccore.infer(model, x=xn, y=jnp.asarray(y), t1=0.2)
    opt = optax.sgd(0.1)
    state = opt.init(model.params)
    new, new_state, stats = pccore.train_step(model, opt, state, x=xn, y=jnp.asarray(y), t1=0.2)
    assert not bool(stats.updated) and stats.result == pccore.RESULTS.diverged
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)  # the update was skipped, not applied with NaN


def test_throw_keeps_activities_exact_and_works_under_jit(setup):
    """`throw=True` threads its check through a scalar: activities are bitwise unchanged."""
    model, x, y = setup
    ref = pccore.infer(model, x=x, y=y, t1=0.3, throw=False)
    got = pccore.infer(model, x=x, y=y, t1=0.3)
    jitted = jax.jit(lambda x, y: pccore.infer(model, x=x, y=y, t1=0.3).activities)(x, y)
    for a, b, c in zip(ref.activities, got.activities, jitted):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)


BAD_HYPER = [
    (dict(t1=-1.0), r"`t1` must be a finite positive number; got -1\.0\. E\.g\. t1=2\.0"),
    (dict(t1=float("inf")), r"`t1` must be a finite positive number; got inf"),
    (dict(t1=float("nan")), r"`t1` must be a finite positive number; got nan"),
    (dict(dt0=0.0), r"`dt0` must be a finite positive number; got 0\.0\. E\.g\. dt0=0\.1"),
    (dict(dt0=-0.1), r"`dt0` must be a finite positive number; got -0\.1"),
    (dict(max_steps=0), r"`max_steps` must be a positive int or None; got 0"),
    (dict(max_steps=True), r"`max_steps` must be a positive int or None; got True"),
    (dict(max_steps=2.5), r"`max_steps` must be a positive int or None; got 2\.5"),
    (
        dict(t1=1e4, dt0=1e-3),
        r"`t1 / dt0` = 10000\.0/0\.001 asks for 1e\+07 steps, more than 1000000 without",
    ),
    (
        dict(solver=diffrax.Heun(), stepsize_controller=diffrax.PIDController(rtol=-1e-3, atol=1e-3)),
        r"`PIDController`: got rtol=-0\.001, atol=0\.001; expected both finite and >= 0",
    ),
]


@pytest.mark.parametrize("kwargs,match", BAD_HYPER)
def test_bad_hyper_parameters(setup, kwargs, match):
    model, x, y = setup
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match=match):
        pccore.infer(model, x=x, y=y, **kwargs)
    with pytest.raises(ValueError, match=match):
        pccore.train_step(model, opt, opt.init(model.params), x=x, y=y, **kwargs)


def test_bad_options_and_objects(setup):
    model, x, y = setup
    for make, match in [
        (
            lambda: pccore.SteadyState(rtol=float("nan")),
            r"`SteadyState`: got rtol=nan, atol=0\.001; expected both finite",
        ),
        (
            lambda: pccore.SteadyState(0.0, 0.0),
            r"`SteadyState`: got rtol=0\.0, atol=0\.0; .* at least one > 0",
        ),
        (lambda: pccore.SteadyState(-1.0, 1.0), r"`SteadyState`: got rtol=-1\.0"),
        (
            lambda: pccore.PC(activity_decay=-0.1),
            r"`PC`: `activity_decay` must be finite and >= 0; got -0\.1",
        ),
        (lambda: pccore.MuPC(gamma=0.0), r"`MuPC`: `gamma` must be finite and > 0; got 0\.0"),
        (
            lambda: pccore.NTP(output_precision=float("inf")),
            r"`NTP`: `output_precision` must be finite and >= 0; got inf",
        ),
        (
            lambda: pccore.SP(output_precision=jnp.array(-1.0)),
            r"`SP`: `output_precision` must be finite and >= 0; got -1\.0",
        ),
        (
            lambda: pccore.EPC(activity_decay=float("nan")),
            r"`EPC`: `activity_decay` must be finite and >= 0; got nan",
        ),
        (lambda: pccore.BPC(alpha_f=-1.0), r"`BPC`: `alpha_f` must be finite and >= 0; got -1\.0"),
        (
            lambda: pccore.BPC(activity_decay=-0.5),
            r"`BPC`: `activity_decay` must be finite and >= 0; got -0\.5",
        ),
        (
            lambda: pccore.GraphPC(output_precision=float("inf")),
            r"`GraphPC`: `output_precision` must be finite and >= 0; got inf",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(
        TypeError,
        match=r"`model` must be a pccore\.PCModel \(or another pccore\.AbstractPCModel\); got MLP\. "
        r"Wrap your model first",
    ):
        pccore.infer(eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0)), x=x, y=y)
    with pytest.raises(
        TypeError, match=r"`energy` must be a pccore\.AbstractEnergy such as pccore\.PC\(\); got MSE"
    ):
        pccore.evaluate(model, x, y, energy=pccore.MSE())
    # cast on the host: XLA's CPU float16 conversion needs F16C, which an SSE4.2-only CPU
    # (XLA_FLAGS=--xla_cpu_max_isa=SSE4_2) lacks
    half = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float16))
                        if eqx.is_inexact_array(a) else a, model)
    with pytest.raises(
        TypeError, match=r"`model\.params\[0\]\[0\]\.weight` has dtype float16; expected float32"
    ):
        pccore.evaluate(half, x, y)
    with pytest.raises(
        TypeError, match=r"`x` must be an array of shape \(batch, \.\.\.\); got list that NumPy"
    ):
        pccore.evaluate(model, [[1.0, 2.0, 3.0], [1.0]], y)
    with pytest.raises(TypeError, match=r"`activities\[0\]` has dtype int32; expected float32"):
        pccore.energy(model, (jnp.zeros((4, 5), jnp.int32),), x=x, y=y)
