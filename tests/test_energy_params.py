"""An energy's own trainable parameters (`PCModel.energy_params`): learnable precisions.

Oracles: gradients and updates written by hand from the Equinox layers, in float64; the
plain path (no energy parameters) unchanged; a trained variant on digits; refusals.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from jaxtyping import ArrayLike

import pccore


class LearnedPrecisionPC(pccore.AbstractChainEnergy):
    r"""The variant of docs/writing-a-variant.md: one learnable precision per hidden layer,
    $\pi_l = e^{s_l}$, with $F = \sum_l \tfrac{\pi_l}{2}\lVert e_l\rVert^2
    - \tfrac{n_l}{2} \log \pi_l + \lambda E_{\mathrm{out}}$."""

    loss: pccore.AbstractLoss = pccore.MSE()
    parameterisation: pccore.AbstractParameterisation = pccore.SP()
    activity_decay: float | ArrayLike = 0.0
    regularisers: tuple[pccore.AbstractRegulariser, ...] = ()

    def init_params(self, model):
        return jnp.zeros(model.num_layers - 1, model.out_shapes[0].dtype)  # s_l = log pi_l

    def layer_energies(self, model, variables, x, y):
        s = model.energy_params
        z = (x, *variables)
        terms = []
        for l in range(model.num_layers - 1):
            e = z[l + 1] - model.predict_layer(l, z[l], x=x)
            n = e[0].size  # units of the layer
            terms.append(jnp.exp(s[l]) * pccore.sq_norm(e) - 0.5 * n * s[l])
        terms.append(self.output(model, z[-1], x, y))
        return jnp.stack(terms, axis=1)

    def init(self, model, x, y, initialiser, key):
        return initialiser(model, self.variable_shapes(model, True), x, y, key)

    def layer_inputs(self, model, variables, x):
        return (x, *variables)


class FixedPrecisionPC(LearnedPrecisionPC):
    """The same energy with the precisions held as options: no trainable parameters."""

    log_precisions: tuple[float, ...] = ()

    def init_params(self, model):
        return None

    def layer_energies(self, model, variables, x, y):
        return super().layer_energies(
            model.with_energy_params(jnp.asarray(self.log_precisions)), variables, x, y)


T1, DT0 = 1.0, 0.1


def _setup(dtype=jnp.float64, batch=16):
    mlp = eqx.nn.MLP(64, 10, 32, 2, activation=jnp.tanh, key=jax.random.key(0), dtype=dtype)
    data = pccore.datasets.load_digits()
    x = jnp.asarray(data.x_train[:batch], dtype)
    y = jnp.asarray(data.y_train[:batch], dtype)
    return mlp, x, y


def _hand_objective(mlp, s, z, x, y):
    """The batch-mean energy written from the Equinox layers: hidden errors weighted by
    exp(s_l), minus (n_l/2) s_l, plus the cross-entropy of the output."""
    L = mlp.layers
    f = lambda l, v: jnp.tanh(jax.vmap(L[l])(v))
    e1 = z[0] - f(0, x)
    e2 = z[1] - f(1, z[0])
    logits = jax.vmap(L[2])(z[1])
    per = (jnp.exp(s[0]) * 0.5 * jnp.sum(e1 ** 2, axis=1) - 0.5 * 32 * s[0]
           + jnp.exp(s[1]) * 0.5 * jnp.sum(e2 ** 2, axis=1) - 0.5 * 32 * s[1]
           - jnp.sum(y * jax.nn.log_softmax(logits), axis=1))
    return per.mean()


@pytest.mark.slow
def test_energy_params_gradient_equals_the_hand_written_one(x64):
    """The gradient the training step takes in the log-precisions (read off one SGD step of
    rate 1) and `pccore.param_grads`'s, against `jax.grad` of the energy written by hand, at
    the activities inference reaches; inference itself sees the precisions as constants."""
    mlp, x, y = _setup()
    energy = LearnedPrecisionPC(loss=pccore.CrossEntropy())
    model = pccore.wrap(mlp)
    model = model.with_energy_params(energy.init_params(model))
    np.testing.assert_array_equal(model.energy_params, np.zeros(2))
    s = jnp.asarray([0.3, -0.2])
    model = model.with_energy_params(s)
    assert model.trainable[1] is s and model.trainable[0] is model.params

    sol = pccore.infer(model, x=x, y=y, energy=energy, t1=T1, dt0=DT0)
    fixed = FixedPrecisionPC(loss=pccore.CrossEntropy(), log_precisions=(0.3, -0.2))
    sol_fixed = pccore.infer(model.with_energy_params(None), x=x, y=y, energy=fixed, t1=T1,
                             dt0=DT0)
    for a, b in zip(sol.activities, sol_fixed.activities):  # -(n/2) s_l moves no activity
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)
    z = sol.activities
    want = jax.grad(_hand_objective, argnums=1)(mlp, s, z, x, y)

    grads = pccore.param_grads(model, z, x=x, y=y, energy=energy)
    assert len(grads) == 2 and jtu.tree_structure(grads[0]) == jtu.tree_structure(model.params)
    err_param_grads = float(jnp.max(jnp.abs(grads[1] - want)))

    step = pccore.TrainStep(optax.sgd(1.0), energy=energy, t1=T1, dt0=DT0)
    new, _, stats = step(model, step.init(model), x=x, y=y)
    assert bool(stats.updated)
    used = s - new.energy_params  # SGD, rate 1: the gradient itself
    err_step = float(jnp.max(jnp.abs(used - want)))
    print(f"log-precision gradient: |param_grads - hand| = {err_param_grads:.2e}, "
          f"|TrainStep - hand| = {err_step:.2e}, hand = {np.asarray(want)}")
    assert err_param_grads < 1e-12 and err_step < 1e-10, (err_param_grads, err_step)
    assert float(jnp.max(jnp.abs(want))) > 1e-2  # a gradient that can tell a wrong one


@pytest.mark.slow
def test_one_sgd_step_updates_params_and_energy_params_by_hand(x64):
    """One SGD step of the compiled training step on both trees equals
    `theta - lr * grad` with the gradient of the hand-written energy."""
    mlp, x, y = _setup()
    energy = LearnedPrecisionPC(loss=pccore.CrossEntropy())
    s = jnp.asarray([0.1, 0.25])
    model = pccore.wrap(mlp).with_energy_params(s)
    z = pccore.infer(model, x=x, y=y, energy=energy, t1=T1, dt0=DT0).activities
    g_mlp = eqx.filter_grad(lambda m: _hand_objective(m, s, z, x, y))(mlp)
    g_s = jax.grad(_hand_objective, argnums=1)(mlp, s, z, x, y)
    lr = 0.05
    want_mlp = jtu.tree_map(lambda p, g: p - lr * g, eqx.filter(mlp, eqx.is_array),
                            eqx.filter(g_mlp, eqx.is_array))
    optim = optax.sgd(lr)
    # the compiled fast path, train_step over it, and the generic path (a configuration
    # holding an array is traced rather than compiled in)
    for run in (pccore.TrainStep(optim, energy=energy, t1=T1, dt0=DT0),
                lambda m, o, **kw: pccore.train_step(m, optim, o, energy=energy, t1=T1, dt0=DT0,
                                                     **kw),
                pccore.TrainStep(optax.sgd(jnp.asarray(lr)), energy=energy, t1=T1, dt0=DT0)):
        new, _, stats = run(model, optim.init(model.trainable), x=x, y=y)
        assert bool(stats.updated)
        got = eqx.filter(new.unwrap(), eqx.is_array)
        err = max(float(jnp.max(jnp.abs(a - b)))
                  for a, b in zip(jtu.tree_leaves(got), jtu.tree_leaves(want_mlp)))
        err_s = float(jnp.max(jnp.abs(new.energy_params - (s - lr * g_s))))
        print(f"one SGD step: params err {err:.2e}, energy_params err {err_s:.2e}")
        assert err < 1e-10 and err_s < 1e-10, (err, err_s)
        assert float(jnp.max(jnp.abs(new.energy_params - s))) > 1e-4  # it did move


def _assert_trees_identical(a, b):
    assert jtu.tree_structure(a) == jtu.tree_structure(b)
    for u, v in zip(jtu.tree_leaves(a), jtu.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.slow
def test_without_energy_params_the_step_is_unchanged(x64):
    """`energy_params=None`: `trainable` is `params` itself, the optimiser state of
    `step.init` is `optim.init(model.params)`, the step is bitwise the same whichever way the
    state was made, and equals a hand-computed SGD step of the hand-written PC energy."""
    mlp, x, y = _setup()
    model = pccore.wrap(mlp)
    assert model.energy_params is None and model.trainable is model.params
    assert model.with_trainable(model.params).params == model.params
    energy = pccore.PC(loss=pccore.CrossEntropy())
    optim = optax.adam(1e-2)
    step = pccore.TrainStep(optim, energy=energy, t1=T1, dt0=DT0)
    _assert_trees_identical(step.init(model), optim.init(model.params))
    a_model, a_state, _ = step(model, step.init(model), x=x, y=y)
    b_model, b_state, _ = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                            energy=energy, t1=T1, dt0=DT0)
    assert a_model.energy_params is None and b_model.energy_params is None
    _assert_trees_identical(a_model.params, b_model.params)
    _assert_trees_identical(a_state, b_state)

    # SGD against the hand-written PC energy (log-precisions zero, whose log term is constant)
    lr = 0.05
    z = pccore.infer(model, x=x, y=y, energy=energy, t1=T1, dt0=DT0).activities
    g = eqx.filter_grad(lambda m: _hand_objective(m, jnp.zeros(2), z, x, y))(mlp)
    sgd = pccore.TrainStep(optax.sgd(lr), energy=energy, t1=T1, dt0=DT0)
    new, _, _ = sgd(model, optax.sgd(lr).init(model.params), x=x, y=y)
    want = jtu.tree_map(lambda p, q: p - lr * q, eqx.filter(mlp, eqx.is_array),
                        eqx.filter(g, eqx.is_array))
    for u, v in zip(jtu.tree_leaves(eqx.filter(new.unwrap(), eqx.is_array)),
                    jtu.tree_leaves(want)):
        np.testing.assert_allclose(u, v, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_learned_precisions_train_on_digits():
    """The learnable-precision variant trains on digits through `pccore.TrainStep`; the
    precisions move from their start and stay finite."""
    t0 = time.perf_counter()
    data = pccore.datasets.load_digits()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    mlp = eqx.nn.MLP(64, 10, 64, 2, activation=jnp.tanh, key=jax.random.key(0))
    energy = LearnedPrecisionPC(loss=pccore.CrossEntropy())
    model = pccore.wrap(mlp)
    model = model.with_energy_params(energy.init_params(model))
    step = pccore.TrainStep(optax.adam(3e-3), energy=energy, t1=2.0, dt0=0.1)
    opt_state = step.init(model)
    for epoch in range(5):
        for i in range(0, len(x) - 31, 32):
            model, opt_state, stats = step(model, opt_state, x=x[i:i + 32], y=y[i:i + 32])
            assert bool(stats.updated)
    acc = float(pccore.evaluate(model, jnp.asarray(data.x_test), jnp.asarray(data.y_test),
                                energy=energy).accuracy)
    s = np.asarray(model.energy_params)
    print(f"digits: accuracy {acc:.4f}, learned precisions {np.exp(s)}, "
          f"{time.perf_counter() - t0:.1f} s")
    assert acc > 0.85, acc
    assert np.all(np.isfinite(s)) and np.min(np.abs(s)) > 0.05, s


def test_bad_energy_params_and_optimiser_state_are_refused():
    mlp, x, y = _setup(jnp.float32)
    model = pccore.wrap(mlp)
    with pytest.raises(ValueError, match=r"`energy_params` holds no arrays .*"
                                         r"with_energy_params\(energy.init_params\(model\)\)"):
        model.with_energy_params(())
    with pytest.raises(TypeError, match=r"`energy_params` is a float, not an array"):
        model.with_energy_params(1.0)
    with pytest.raises(TypeError, match=r"`energy_params\['s'\]` has dtype int32; expected "
                                        r"float32 or float64"):
        model.with_energy_params({"s": jnp.zeros(2, jnp.int32)})

    energy = LearnedPrecisionPC(loss=pccore.CrossEntropy())
    model = model.with_energy_params(energy.init_params(model))
    optim = optax.adam(1e-3)
    step = pccore.TrainStep(optim, energy=energy, t1=0.3, dt0=0.1)
    fix = r"`opt_state = step.init\(model\)`.*`opt_state = optim.init\(model.trainable\)`"
    with pytest.raises(ValueError, match=r"`opt_state` does not match this model: it was made "
                                         r"for `model.params` alone.*" + fix):
        step(model, optim.init(model.params), x=x, y=y)
    with pytest.raises(ValueError, match=r"`opt_state` does not match this model: it does not "
                                         r"fit `optim.init\(model.trainable\)`.*" + fix):
        step(model, optax.adam(1e-3).init(model.params[:2]), x=x, y=y)
    with pytest.raises(ValueError, match=r"`opt_state` does not match this model.*" + fix):
        pccore.train_step(model, optim, optim.init(model.params), x=x, y=y, energy=energy,
                          t1=0.3, dt0=0.1)
    with pytest.raises(TypeError, match=r"`opt_state` is None.*" + fix):
        step(model, None, x=x, y=y)
    # a state made right trains
    _, opt_state, stats = step(model, step.init(model), x=x, y=y)
    assert bool(stats.updated)


@pytest.mark.slow
def test_energy_params_survive_round_trips(tmp_path):
    """Copies, mode switches, a parameterisation, a checkpoint and replication keep them; a
    checkpoint template without them is refused with the fix."""
    mlp, x, y = _setup(jnp.float32)
    energy = LearnedPrecisionPC(loss=pccore.CrossEntropy(), parameterisation=pccore.MuPC())
    model = pccore.wrap(mlp)
    s = jnp.asarray([0.5, -0.5], jnp.float32)
    model = model.with_energy_params(s)
    for m in (model.train().eval(), model.with_step_key(jax.random.key(1)),
              model.with_params(model.params), energy.prepare(model),
              model.with_trainable(model.trainable)):
        assert m.energy_params is s
    step = pccore.TrainStep(optax.adam(1e-2), energy=energy, t1=0.3, dt0=0.1)
    trained, opt_state, _ = step(model, step.init(model), x=x, y=y)
    trained, opt_state, _ = step(trained, opt_state, x=x, y=y)  # the remembered fast path
    assert not np.array_equal(trained.energy_params, s)

    pccore.save_checkpoint(tmp_path / "ck", model=trained, opt_state=opt_state, step=2)
    back = pccore.restore_checkpoint(tmp_path / "ck", model=model, opt_state=step.init(model))
    _assert_trees_identical(back.model.trainable, trained.trainable)
    _assert_trees_identical(back.opt_state, opt_state)
    plain = model.with_energy_params(None)
    with pytest.raises(pccore.CheckpointError, match=r"energy parameters.*with_energy_params"):
        pccore.restore_checkpoint(tmp_path / "ck", model=plain,
                                  opt_state=optax.adam(1e-2).init(plain.params))

    _, rep_model, rep_state = pccore.data_parallel(trained, opt_state)
    _assert_trees_identical(rep_model.energy_params, trained.energy_params)
    new, _, stats = step(rep_model, rep_state, x=x, y=y)
    assert bool(stats.updated) and new.energy_params.shape == (2,)
