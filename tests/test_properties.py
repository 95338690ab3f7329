"""Property-based invariants over random depths, widths, batch sizes and dtypes (hypothesis).

Oracles: an energy written out independently here (and `>= 0` for MSE), central finite
differences of the batch-mean objective in float64, the user's own Equinox model after
unwrap and a checkpoint round trip, and, for arbitrary (valid or invalid) inputs, "a clear
error or a finite or flagged result", never a silent NaN and never a hang.
"""

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pccore
from tests import cases

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def mlps(draw, dtypes=("float32", "float64")):
    """(widths, batch, dtype, seed): an MLP widths[0] -> ... -> widths[-1] of 1-3 layers."""
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 3), min_size=depth + 1, max_size=depth + 1))
    return widths, draw(st.integers(1, 3)), draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**16))


def _setup(widths, batch, dtype, seed):
    """Weights and data from NumPy's generator (no per-shape JAX compilations in the test)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    weights = [
        (normal(n_in, n_out) / math.sqrt(n_in), 0.1 * normal(n_out))
        for n_in, n_out in zip(widths[:-1], widths[1:])
    ]
    model = cases.build_mlp("equinox", weights, jnp.tanh)
    x, y = normal(batch, widths[0]), normal(batch, widths[-1])
    zs = tuple(2 * normal(batch, w) for w in widths[1:-1])
    return weights, model, x, y, zs


def _energy_oracle(weights, x, y, zs):
    """Independently: sum_l 1/2 ||z_l - tanh(z_{l-1} W_l + b_l)||^2 + 1/2 ||y - z_{L-1} W_L - b_L||^2."""
    z = [np.asarray(x, np.float64)] + [np.asarray(a, np.float64) for a in zs]
    total = 0.0
    for l, (W, b) in enumerate(weights):
        pre = z[l] @ np.asarray(W, np.float64) + np.asarray(b, np.float64)
        last = l == len(weights) - 1
        target = np.asarray(y, np.float64) if last else z[l + 1]
        total += 0.5 * np.sum((target - (pre if last else np.tanh(pre))) ** 2)
    return total


@pytest.mark.slow
@given(case=mlps())
@settings(max_examples=6, **SETTINGS)
def test_mse_energy_is_nonnegative_and_matches_oracle(case):
    widths, batch, dtype, seed = case
    with jax.enable_x64(dtype == "float64"):
        weights, model, x, y, zs = _setup(*case)
        e = pccore.energy(model, zs, x=x, y=y)
        terms = pccore.layer_energies(model, zs, x=x, y=y)
        tol = 1e-4 if dtype == "float32" else 1e-10
        assert e.dtype == jnp.dtype(dtype)
        assert float(e) >= 0 and bool(jnp.all(terms >= 0))
        np.testing.assert_allclose(float(e), _energy_oracle(weights, x, y, zs), rtol=tol, atol=tol)
        np.testing.assert_allclose(float(terms.sum()), float(e), rtol=tol, atol=tol)


@pytest.mark.slow
@given(case=mlps(dtypes=("float64",)))
@settings(max_examples=5, **SETTINGS)
def test_param_grads_match_finite_differences(case):
    with jax.enable_x64(True):
        weights, model, x, y, zs = _setup(*case)
        batch = x.shape[0]
        grads = pccore.param_grads(model, zs, x=x, y=y)
        leaves, treedef = jax.tree.flatten(model.params)
        rng = np.random.default_rng(case[3] + 1)
        v = jax.tree.unflatten(treedef, [jnp.asarray(rng.standard_normal(a.shape)) for a in leaves])

        def objective(t):  # the batch mean of F_i, through the public energy only
            p = jax.tree.map(lambda a, d: a + t * d, model.params, v)
            return float(pccore.energy(model.with_params(p), zs, x=x, y=y)) / batch

        eps = 1e-6
        fd = (objective(eps) - objective(-eps)) / (2 * eps)
        analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
        np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
@given(case=mlps())
@settings(max_examples=6, **SETTINGS)
def test_wrap_unwrap_and_checkpoint_round_trip(case, tmp_path):
    widths, batch, dtype, seed = case
    with jax.enable_x64(dtype == "float64"):
        weights, model, x, y, _ = _setup(*case)
        native = model.unwrap()
        assert isinstance(native, eqx.nn.Sequential)
        # The user's own model computes what the wrapped one does (both compiled: the wrapped
        # forward is jitted, and XLA's fusion may round differently from eager execution) ...
        np.testing.assert_array_equal(jax.jit(jax.vmap(native))(x), model(x))
        # ... and wrapping it again gives back the same parameters and the same function.
        again = pccore.wrap(native)
        for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(again(x), model(x))
        # A checkpoint round trip is exact, and returns the user's type.
        moved = model.with_params(jax.tree.map(lambda a: a + 1, model.params))
        opt_state = optax.adam(1e-3).init(moved.params)
        pccore.save_checkpoint(tmp_path / "c", model=moved, opt_state=opt_state, step=1, overwrite=True)
        ck = pccore.restore_checkpoint(tmp_path / "c", model=model, opt_state=opt_state)
        for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(ck.model), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(jax.jit(jax.vmap(ck.model.unwrap()))(x), moved(x))


CORRUPTIONS = {
    "none": lambda a: a,
    "nan": lambda a: np.where(np.arange(a.shape[-1]) == 0, np.nan, a),
    "inf": lambda a: np.full_like(a, -np.inf),
    "int": lambda a: a.astype(np.int64),
    "float16": lambda a: a.astype(np.float16),
    "empty": lambda a: a[:0],
    "huge": lambda a: a * 1e30,
}


@pytest.mark.slow
@given(
    batch=st.integers(1, 3),
    # Valid values drawn more often than invalid ones, so both paths are exercised.
    t1=st.sampled_from([0.3, 0.3, 1.0, 1.0, -1.0, 0.0, math.nan, math.inf]),
    dt0=st.sampled_from([0.1, 0.1, 0.5, 0.5, 4.0, 4.0, 0.0, -0.1, math.nan, None]),
    corrupt_data=st.sampled_from(["none"] * 6 + ["huge"] * 2 + sorted(set(CORRUPTIONS) - {"none", "huge"})),
    optax_solver=st.booleans(),
    steady=st.booleans(),
)
@settings(max_examples=12, **SETTINGS)
def test_public_api_never_returns_nan_silently(batch, t1, dt0, corrupt_data, optax_solver, steady):
    model = _MODEL
    rng = np.random.default_rng(batch)
    corrupt = CORRUPTIONS[corrupt_data]
    x = corrupt(rng.standard_normal((batch, 2)).astype(np.float32))
    y = corrupt(rng.standard_normal((batch, 2)).astype(np.float32))
    opts = dict(
        t1=None if optax_solver else t1,  # an optax solver has no horizon (t1 is refused)
        dt0=dt0,
        steady_state=pccore.SteadyState() if steady else None,
        solver=optax.sgd(0.1 if dt0 is None or not dt0 > 0 else dt0) if optax_solver else diffrax.Euler(),
        max_steps=20 if optax_solver else None,
    )
    optim = optax.sgd(0.1)
    state = optim.init(model.params)
    try:
        new, _, stats = pccore.train_step(model, optim, state, x=x, y=y, **opts)
    except (ValueError, TypeError) as e:
        assert "`" in str(e) and ("expected" in str(e) or "must be" in str(e)), str(e)
        event("refused with a clear error")
        return
    if bool(stats.updated):
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(new.params))
        assert bool(jnp.isfinite(stats.energy))
    else:  # reported, and nothing was changed
        event("train_step skipped a diverged or overflowing update")
        # inference diverged, or it did not and the update itself overflowed
        assert stats.result == pccore.RESULTS.diverged or bool(jnp.isfinite(stats.energy))
        for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(new.params)):
            np.testing.assert_array_equal(a, b)
    try:
        sol = pccore.infer(model, x=x, y=y, **opts)
    except eqx.EquinoxRuntimeError as e:
        kinds = [k for k in ("diverged", "max_steps", "raised the energy") if k in str(e)]
        assert kinds, str(e)  # reported with its reason, never returned silently
        event("infer raised: " + kinds[0])
        return
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in sol.activities) and bool(jnp.isfinite(sol.energy))
    ev = pccore.evaluate(model, x, y)
    assert bool(jnp.isfinite(ev.loss))
    event("ran, finite results")


_MODEL = None


@pytest.fixture(autouse=True, scope="module")
def _small_model():
    global _MODEL
    _MODEL = cases.build_mlp("equinox", cases.canonical_mlp([2, 3, 2], jax.random.key(0)))
    yield
    _MODEL = None
