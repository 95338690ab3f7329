"""Error-reparameterised PC (R11): every error penalised, same equilibrium as PC."""

import diffrax
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import pccore
from tests import cases

SIZES = [4, 8, 8, 3]
B = 3


def _data(key, dtype=jnp.float32):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (B, SIZES[0]), dtype),
            jax.random.normal(ky, (B, SIZES[-1]), dtype))


@pytest.mark.slow
def test_hessian_in_errors_is_identity_plus_output_term(x64, getkey):
    """(a) Linear MSE network: Hessian of F_ePC in epsilon = I + J^T lambda J >= I."""
    lam = 2.0
    model = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey(), jnp.float64, bias=False),
                            lambda z: z)
    x, y = _data(getkey(), jnp.float64)
    x, y = x[:1], y[:1]
    energy = pccore.EPC(parameterisation=pccore.SP(output_precision=lam))
    eps = pccore.init_activities(model, x, energy=energy)
    for e in eps:
        np.testing.assert_array_equal(e, 0.0)  # feed-forward init is epsilon = 0
    flat, unravel = jax.flatten_util.ravel_pytree(eps)
    H = jax.hessian(lambda v: pccore.energy(model, unravel(v), x=x, y=y, energy=energy))(flat)

    def y_hat(v):  # independent: rebuild the output from the errors by hand
        (W1,), (W2,), (W3,) = (model.weight_matrices(l) for l in range(3))
        e1, e2 = unravel(v)
        z1 = x @ W1.T + e1
        z2 = z1 @ W2.T + e2
        return (z2 @ W3.T).ravel()

    J = jax.jacobian(y_hat)(flat)
    np.testing.assert_allclose(H, np.eye(flat.size) + lam * J.T @ J, atol=1e-12)
    assert np.linalg.eigvalsh(H).min() >= 1 - 1e-10


@pytest.mark.parametrize("free_bottom", [False, True])
def test_energy_is_pc_energy_of_rebuilt_activities(getkey, free_bottom):
    """F_ePC(eps) = F_PC(z(eps)) with the same prior on a free z_0 (d) and any loss/scaling."""
    model = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey()))
    x, y = _data(getkey())
    y = jax.nn.softmax(y)
    opts = dict(loss=pccore.CrossEntropy(), parameterisation=pccore.NTP(output_precision=1.5),
                activity_decay=0.2)
    epc, pc = pccore.EPC(**opts), pccore.PC(**opts)
    xc = None if free_bottom else x
    eps = pccore.init_activities(model, xc, y=y, energy=epc, init=pccore.RandomNormal(0.5),
                                 key=getkey())
    z = epc.activities(model, eps, xc)
    # hand-written rebuild on the prepared model
    prepared = opts["parameterisation"].apply(model)
    chain = [eps[0] if free_bottom else x]
    for l, e in enumerate(eps[1:] if free_bottom else eps):
        chain.append(prepared.predict_layer(l, chain[-1]) + e)
    for a, b in zip(z, chain if free_bottom else chain[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(pccore.energy(model, eps, x=xc, y=y, energy=epc),
                               pccore.energy(model, z, x=xc, y=y, energy=pc), rtol=1e-5)
    le = pccore.layer_energies(model, eps, x=xc, y=y, energy=epc)
    errs = eps[1:] if free_bottom else eps
    for l, e in enumerate(errs):
        np.testing.assert_allclose(le[l], 0.5 * jnp.sum(e**2), rtol=1e-6)


def _converge(model, x, y, energy):
    return pccore.infer(
        model, x=x, y=y, energy=energy, solver=diffrax.Tsit5(),
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10), t1=2000.0, dt0=0.1,
        max_steps=20000, steady_state=pccore.SteadyState(rtol=0.0, atol=1e-9),
    )


@pytest.mark.slow
def test_converged_epc_equals_converged_pc(x64, getkey):
    """(b) same equilibrium energy, activities and parameter gradients; (c) non-zero learning signal."""
    model = cases.build_mlp("equinox", cases.canonical_mlp(SIZES, getkey(), jnp.float64))
    x, y = _data(getkey(), jnp.float64)
    pc, epc = pccore.PC(), pccore.EPC()
    s_pc, s_epc = _converge(model, x, y, pc), _converge(model, x, y, epc)
    assert s_pc.result == s_epc.result == pccore.RESULTS.converged
    np.testing.assert_allclose(s_epc.energy, s_pc.energy, rtol=1e-8)
    for a, b in zip(epc.activities(model, s_epc.activities, x), s_pc.activities):
        np.testing.assert_allclose(a, b, atol=1e-7)
    g_pc = pccore.param_grads(model, s_pc.activities, x=x, y=y, energy=pc)
    g_epc = pccore.param_grads(model, s_epc.activities, x=x, y=y, energy=epc)
    for a, b in zip(jtu.tree_leaves(g_epc), jtu.tree_leaves(g_pc)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    # (c) the prediction misses the target, so the weights still learn
    assert float(pccore.evaluate(model, x, y).loss) > 0.1
    assert float(s_epc.energy) > 0.1
    for l in range(model.num_layers):
        assert float(jnp.linalg.norm(g_epc[l][0].weight)) > 1e-2
