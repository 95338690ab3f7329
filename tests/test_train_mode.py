"""Train-mode BatchNorm and Dropout in the four adapters.

One network, `x -> tanh(BN(x W0 + b0)) -> tanh(BN(. W1 + b1)) -> . W2 + b2`, written natively
in Equinox, Haiku, Flax Linen and Flax NNX from the same float64 weights. Oracles: the four
frameworks agree with each other; the energy equals one written by hand with batch
statistics; the running averages after one step equal each framework's own update rule,
computed by hand at the equilibrium; dropout masks equal the native training forward's for the
same key (Equinox, Linen, Haiku) and are fixed within a step.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore

hk = pytest.importorskip("haiku")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

EPS = 1e-5  # every framework's BatchNorm default
MOMENTUM = 0.9
SIZES = [(4, 6), (6, 5), (5, 3)]
B = 8


def _weights():
    k = jax.random.split(jax.random.key(0), 6)
    W = [jax.random.normal(k[i], s, jnp.float64) / np.sqrt(s[0]) for i, s in enumerate(SIZES)]
    b = [0.1 * jax.random.normal(k[3 + i], (s[1],), jnp.float64) for i, s in enumerate(SIZES)]
    return W, b


def _data():
    x = 1.0 + jax.random.normal(jax.random.key(1), (B, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (B, 3), jnp.float64)
    return x, y


def _f64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


# --- the same network in each framework --------------------------------------------------


def _equinox(dropout=0.0):
    W, b = _weights()
    k = jax.random.split(jax.random.key(3), 3)
    lins = []
    for i, (w, bi) in enumerate(zip(W, b)):
        lin = eqx.nn.Linear(*w.shape, key=k[i], dtype=jnp.float64)
        lins.append(eqx.tree_at(lambda m: (m.weight, m.bias), lin, (w.T, bi)))
    bn = lambda n: eqx.nn.BatchNorm(n, "batch", momentum=MOMENTUM, mode="batch", dtype=jnp.float64)
    items = [lins[0], bn(6), eqx.nn.Lambda(jnp.tanh), lins[1], bn(5), eqx.nn.Lambda(jnp.tanh)]
    if dropout:
        items.append(eqx.nn.Dropout(dropout))
    items.append(lins[2])
    seq, state = eqx.nn.make_with_state(eqx.nn.Sequential)(items)
    return seq, state, pccore.wrap(seq, state, boundaries=[0, 3, len(items) - 1])


def _haiku_fn(dropout=0.0):
    def fwd(x, is_training):
        x = jnp.tanh(hk.BatchNorm(True, True, MOMENTUM, name="bn0")(hk.Linear(6, name="d0")(x),
                                                                   is_training))
        x = jnp.tanh(hk.BatchNorm(True, True, MOMENTUM, name="bn1")(hk.Linear(5, name="d1")(x),
                                                                   is_training))
        if dropout and is_training:
            x = hk.dropout(hk.next_rng_key(), dropout, x)
        return hk.Linear(3, name="d2")(x)

    return hk.transform_with_state(fwd)


def _haiku(dropout=0.0):
    W, b = _weights()
    f = _haiku_fn(dropout)
    x, _ = _data()
    params, state = f.init(jax.random.key(0), x, True)
    params = _f64({**params, **{f"d{i}": {"w": W[i], "b": b[i]} for i in range(3)}})
    state = _f64(state)
    model = pccore.wrap(f, params, state=state, args=(False,), train_args=(True,),
                        boundaries=["d0", "d1", "d2"])
    return f, (params, state), model


class _Linen(nn.Module):
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM,
                                       epsilon=EPS, name=name, param_dtype=jnp.float64)
        x = jnp.tanh(bn("bn0")(nn.Dense(6, name="d0")(x)))
        x = jnp.tanh(bn("bn1")(nn.Dense(5, name="d1")(x)))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(3, name="d2")(x)


def _linen(dropout=0.0):
    W, b = _weights()
    module = _Linen(dropout)
    x, _ = _data()
    v = module.init(jax.random.key(0), x, False)
    v = _f64({"params": {**v["params"], **{f"d{i}": {"kernel": W[i], "bias": b[i]}
                                           for i in range(3)}},
              "batch_stats": v["batch_stats"]})
    model = pccore.wrap(module, v, kwargs={"train": False}, train_kwargs={"train": True},
                        boundaries=["d0", "d1", "d2"])
    return module, v, model


class _NNX(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
        f = dict(param_dtype=jnp.float64, dtype=jnp.float64)
        self.d0 = nnx.Linear(4, 6, rngs=rngs, **f)
        self.bn0 = nnx.BatchNorm(6, momentum=MOMENTUM, epsilon=EPS, rngs=rngs, **f)
        self.d1 = nnx.Linear(6, 5, rngs=rngs, **f)
        self.bn1 = nnx.BatchNorm(5, momentum=MOMENTUM, epsilon=EPS, rngs=rngs, **f)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.d2 = nnx.Linear(5, 3, rngs=rngs, **f)

    def __call__(self, x):
        x = jnp.tanh(self.bn0(self.d0(x)))
        x = jnp.tanh(self.bn1(self.d1(x)))
        return self.d2(self.drop(x))


def _nnx(dropout=0.0):
    W, b = _weights()
    m = _NNX(nnx.Rngs(0), dropout)
    for i in range(3):
        d = getattr(m, f"d{i}")
        d.kernel.set_value(W[i])
        d.bias.set_value(b[i])
    for bn in (m.bn0, m.bn1):  # statistics in float64 too
        bn.mean.set_value(bn.mean.get_value().astype(jnp.float64))
        bn.var.set_value(bn.var.get_value().astype(jnp.float64))
    m.train()
    return m, None, pccore.wrap(m, boundaries=["d0", "d1", "d2"])


BUILD = {"equinox": lambda: _equinox()[2], "haiku": lambda: _haiku()[2],
         "flax.linen": lambda: _linen()[2], "flax.nnx": lambda: _nnx()[2]}


# --- the hand-written energy ---------------------------------------------------------------


def _bn(h):
    mean, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
    return (h - mean) / jnp.sqrt(var + EPS)


def _hand_energy(z, x, y):
    W, b = _weights()
    z1, z2 = z
    e = 0.5 * jnp.sum((z1 - jnp.tanh(_bn(x @ W[0] + b[0]))) ** 2)
    e += 0.5 * jnp.sum((z2 - jnp.tanh(_bn(z1 @ W[1] + b[1]))) ** 2)
    return e + 0.5 * jnp.sum((y - (z2 @ W[2] + b[2])) ** 2)


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("framework", list(BUILD))
def test_energy_uses_batch_statistics_of_the_activities(x64, framework):
    model = BUILD[framework]()
    assert model.training and model.stateful and not model.stochastic
    x, y = _data()
    z = tuple(jax.random.normal(jax.random.key(5 + i), (B, n), jnp.float64)
              for i, n in enumerate((6, 5)))
    np.testing.assert_allclose(pccore.energy(model, z, x=x, y=y), _hand_energy(z, x, y),
                               rtol=1e-10)
    grads = jax.grad(lambda z: pccore.energy(model, z, x=x, y=y))(z)
    want = jax.grad(lambda z: _hand_energy(z, x, y))(z)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)
    # batch statistics couple the samples: moving one sample's activity moves another's energy
    moved = (z[0].at[0].add(1.0), z[1])
    per = lambda z: jnp.sum((z[1] - jnp.tanh(_bn(z[0] @ _weights()[0][1] + _weights()[1][1]))) ** 2,
                            axis=1)
    assert float(jnp.abs(per(moved)[1:] - per(z)[1:]).max()) > 1e-3


@pytest.mark.slow
def test_the_four_frameworks_agree_in_training_mode(x64):
    x, y = _data()
    optim = optax.adam(1e-2)
    runs = {}
    for name, build in BUILD.items():
        model = build()
        opt_state = optim.init(model.params)
        energies = []
        for _ in range(3):
            model, opt_state, stats = pccore.train_step(model, optim, opt_state, x=x, y=y)
            assert bool(stats.updated)
            energies.append(float(stats.energy))
        runs[name] = (np.array(energies), model(x), model.eval()(x))
    ref = runs["equinox"]
    for name, (energies, train_out, _) in runs.items():
        np.testing.assert_allclose(energies, ref[0], rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(train_out, ref[1], rtol=1e-10, atol=1e-12, err_msg=name)


def _equilibrium(model, x, y):
    """The activities train_step's inference reaches (its defaults, on the same model)."""
    return pccore.infer(model, x=x, y=y).activities


@pytest.mark.slow
@pytest.mark.parametrize("framework", list(BUILD))
def test_running_averages_after_one_step_follow_the_framework_rule(x64, framework):
    """Updated once, at the equilibrium, with the parameters inference used."""
    model = BUILD[framework]()
    x, y = _data()
    z1, _ = _equilibrium(model, x, y)
    W, b = _weights()
    batch = [x @ W[0] + b[0], z1 @ W[1] + b[1]]  # the BatchNorms' inputs at the equilibrium
    means = [h.mean(0) for h in batch]
    vars_ = [((h - h.mean(0)) ** 2).mean(0) for h in batch]
    optim = optax.sgd(0.1)
    trained, _, stats = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    assert bool(stats.updated)
    before, after = _averages(framework, model), _averages(framework, trained)
    for i in range(2):
        for old, new, batch in zip(before[i], after[i], (means[i], vars_[i])):
            if framework == "haiku":  # zero-debiased EMA: the first average is the batch value
                want = batch
            else:  # Equinox's hidden averages, Linen's and NNX's: m * old + (1 - m) * batch
                want = MOMENTUM * old + (1 - MOMENTUM) * batch
            np.testing.assert_allclose(new, want, rtol=1e-9, atol=1e-12)
    if framework == "haiku":
        assert int(trained.unwrap_state()["bn0/~/mean_ema"]["counter"]) == 1


def _averages(framework, model):
    """Per BatchNorm, its (mean, variance) running statistics in the framework's own state."""
    state = model.unwrap_state()
    if framework == "equinox":
        seq = _equinox()[0]
        return [state.get(seq.layers[1 + 3 * i].batch_state_index) for i in range(2)]
    if framework == "haiku":
        return [(state[f"bn{i}/~/mean_ema"]["average"][0], state[f"bn{i}/~/var_ema"]["average"][0])
                for i in range(2)]
    if framework == "flax.linen":
        return [(state["batch_stats"][f"bn{i}"]["mean"], state["batch_stats"][f"bn{i}"]["var"])
                for i in range(2)]
    return [(state[f"bn{i}"]["mean"].get_value(), state[f"bn{i}"]["var"].get_value())
            for i in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("framework", list(BUILD))
def test_unwrap_gives_the_trained_state_in_the_framework_form(x64, framework):
    x, y = _data()
    optim = optax.sgd(0.1)
    model = BUILD[framework]()
    trained, _, _ = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    want = trained.eval()(x)
    if framework == "equinox":
        seq, state = trained.unwrap(), trained.unwrap_state()
        assert isinstance(state, eqx.nn.State)
        native = jax.vmap(eqx.nn.inference_mode(seq), in_axes=(0, None), out_axes=(0, None),
                          axis_name="batch")(x, state)[0]
    elif framework == "haiku":
        native = _haiku_fn().apply(trained.unwrap(), trained.unwrap_state(), None, x, False)[0]
    elif framework == "flax.linen":
        native = _Linen().apply(trained.unwrap(), x, False)
    else:
        module = trained.unwrap()
        assert isinstance(module, _NNX) and not module.bn0.use_running_average  # still training
        module.eval()
        native = module(x)
    np.testing.assert_allclose(native, want, rtol=1e-12)
    # the eval forward uses the running averages: it differs from the batch-statistics one
    assert float(jnp.abs(want - trained(x)).max()) > 1e-3
    ev = pccore.evaluate(trained, x, y)
    np.testing.assert_allclose(ev.loss, pccore.MSE()(want, y).mean(), rtol=1e-12)


@pytest.mark.slow
def test_a_skipped_update_keeps_the_running_averages(x64):
    model = BUILD["flax.linen"]()
    x, y = _data()
    optim = optax.sgd(float("inf"))  # non-finite parameters: the update is skipped
    trained, _, stats = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    assert not bool(stats.updated)
    for a, b in zip(jax.tree.leaves(trained.unwrap_state()), jax.tree.leaves(model.unwrap_state())):
        np.testing.assert_array_equal(a, b)


# --- Dropout -------------------------------------------------------------------------------


def _native_equinox_train(seq, state, x, key):
    keys = jax.random.split(key, x.shape[0])
    return jax.vmap(lambda xi, ki: seq(xi, state, key=ki), axis_name="batch",
                    out_axes=(0, None))(x, keys)[0]


@pytest.mark.slow
def test_dropout_masks_equal_the_native_training_forward(x64):
    """Equinox (a per-sample key, split over the Sequential's elements), Linen (rngs by module
    path) and Haiku (the transform's key sequence): the same key, the same masks."""
    x, _ = _data()
    key = jax.random.key(11)
    seq, state, m = _equinox(0.5)
    assert m.stochastic
    np.testing.assert_allclose(m.with_step_key(key)(x), _native_equinox_train(seq, state, x, key),
                               rtol=1e-12)
    module, v, m = _linen(0.5)
    native = module.apply(v, x, True, rngs={"dropout": key}, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(m.with_step_key(key)(x), native, rtol=1e-12)
    f, (params, state), m = _haiku(0.5)
    native = f.apply(params, state, key, x, True)[0]
    np.testing.assert_allclose(m.with_step_key(key)(x), native, rtol=1e-12)


def _hand_dropout_energy(seq, z, x, y, key):
    """The Equinox network's energy with the masks of `key`, written from its elements."""
    keys = jax.vmap(lambda k: jax.random.split(k, len(seq.layers)))(jax.random.split(key, B))
    L = seq.layers
    W, b = _weights()
    z1, z2 = z
    e = 0.5 * jnp.sum((z1 - jnp.tanh(_bn(x @ W[0] + b[0]))) ** 2)
    drop = jax.vmap(lambda h, k: L[6](h, key=k))(jnp.tanh(_bn(z1 @ W[1] + b[1])), keys[:, 6])
    e += 0.5 * jnp.sum((z2 - drop) ** 2)
    return e + 0.5 * jnp.sum((y - (z2 @ W[2] + b[2])) ** 2)


@pytest.mark.slow
def test_dropout_mask_is_fixed_through_a_step_and_new_in_the_next(x64):
    seq, _, model = _equinox(0.5)
    model = pccore.wrap(seq, _equinox(0.5)[1], boundaries=[0, 3, 7])  # dropout ends layer 1
    x, y = _data()
    key = jax.random.key(7)
    step_key = jax.random.split(key)[0]  # train_step's masks (documented)
    keyed = model.with_step_key(step_key)
    z = _equilibrium(keyed, x, y)
    e = lambda m, z: pccore.energy(m, z, x=x, y=y)
    np.testing.assert_allclose(e(keyed, z), _hand_dropout_energy(seq, z, x, y, step_key),
                               rtol=1e-12)
    assert e(keyed, z) == e(keyed, z)  # one fixed energy for the whole step
    other = model.with_step_key(jax.random.split(jax.random.key(8))[0])
    assert abs(float(e(other, z) - e(keyed, z))) > 1e-3  # a new mask with a new key
    # the update is the gradient of that same energy at the equilibrium
    optim = optax.sgd(0.1)
    trained, _, stats = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                          key=key)
    np.testing.assert_allclose(stats.energy, e(keyed, z) / B, rtol=1e-10)
    grads = jax.grad(lambda p: pccore.energy(keyed.with_params(p), z, x=x, y=y) / B)(model.params)
    for new, old, g in zip(jax.tree.leaves(trained.params), jax.tree.leaves(model.params),
                           jax.tree.leaves(grads)):
        np.testing.assert_allclose(new, old - 0.1 * g, rtol=1e-10, atol=1e-13)


@pytest.mark.slow
def test_nnx_dropout_masks_are_fixed_per_key_and_scale_the_kept_units(x64):
    m, _, model = _nnx(0.5)
    assert model.stochastic
    x, _ = _data()
    z = jax.random.normal(jax.random.key(3), (4 * B, 6), jnp.float64)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    # layer 1 is d1, bn1, tanh and the dropout before d2 (called in that layer's segment)
    drop = lambda k: model.with_step_key(k).predict_layer(1, z)
    np.testing.assert_array_equal(drop(k1), drop(k1))
    assert float(jnp.abs(drop(k1) - drop(k2)).max()) > 1e-3
    W, b = _weights()
    kept = drop(k1) * (1 - 0.5) / jnp.tanh(_bn(z @ W[1] + b[1]))  # mask * h / (1 - p), over h
    np.testing.assert_allclose(kept * (1 - kept), 0.0, atol=1e-9)  # zeros and ones only
    assert 0.3 < float(kept.mean()) < 0.7


def test_training_mode_errors_are_clear(x64):
    x, y = _data()
    _, _, model = _equinox(0.5)
    optim = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"`key`: this model is in training mode and draws"):
        pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    with pytest.raises(ValueError, match=r"`key`: .*model.with_step_key\(key\)"):
        pccore.energy(model, pccore.init_activities(model.eval(), x), x=x, y=y)

    class Outside(pccore.AbstractEnergy):  # a variant outside the chain family
        inner: pccore.PC = pccore.PC()

        def variable_shapes(self, model, x_clamped):
            return self.inner.variable_shapes(model, x_clamped)

        def data_shapes(self, model):
            return self.inner.data_shapes(model)

        def layer_energies(self, model, variables, x, y):
            return self.inner.layer_energies(model, variables, x, y)

        def init(self, model, x, y, initialiser, key):
            return self.inner.init(model, x, y, initialiser, key)

        def predict(self, model, x):
            return model(x)

        def output_loss(self, prediction, y):
            return self.inner.output_loss(prediction, y)

    with pytest.raises(TypeError, match=r"`energy`: a model in training mode .* trains with a "
                                        r"chain energy such as pccore.PC .* got Outside"):
        pccore.train_step(model, optim, optim.init(model.params), x=x, y=y, energy=Outside(),
                          key=jax.random.key(0))

    class Custom(eqx.Module):
        lin: eqx.nn.Linear
        bn: eqx.nn.BatchNorm

        def __call__(self, x, state):
            return self.bn(self.lin(x), state)[0]

    custom, state = eqx.nn.make_with_state(Custom)(eqx.nn.Linear(4, 3, key=jax.random.key(0)),
                                                   eqx.nn.BatchNorm(3, "batch", mode="batch"))
    with pytest.raises(pccore.UnsupportedLayerError, match=r"inside a module of your own class"):
        pccore.wrap(custom, boundaries=["lin"])

    class NoKey(eqx.Module):
        def __call__(self, x):
            return jnp.tanh(x)

    seq = eqx.nn.Sequential([eqx.nn.Linear(4, 3, key=jax.random.key(0)), NoKey(),
                             eqx.nn.Dropout(0.5)])
    with pytest.raises(ValueError, match=r"training forward of layer 0 .* `key` keyword"):
        pccore.wrap(seq)

    def fwd(x, is_training):
        return hk.Linear(3)(hk.dropout(hk.next_rng_key(), 0.5, x) if is_training else x)

    f = hk.without_apply_rng(hk.transform(fwd))
    params = f.init(jax.random.key(0), x, False)
    with pytest.raises(pccore.UnsupportedLayerError, match=r"takes no `rng` \(hk.without_apply_rng\)"):
        pccore.wrap(f, params, args=(False,), train_args=(True,))
    with pytest.raises(pccore.UnsupportedLayerError, match=r"needs a random key .* `train_args=\(True,\)`"):
        pccore.wrap(hk.transform(fwd), params, args=(True,))


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["equinox", "flax.nnx"])
def test_checkpoints_keep_the_running_averages(x64, tmp_path, framework):
    """The state lives in the model's layers, so a checkpoint holds it: a restored model
    resumes bitwise (its state arrays, then one more step)."""
    x, y = _data()
    optim = optax.adam(1e-2)
    model = BUILD[framework]()
    opt_state = optim.init(model.params)
    model, opt_state, _ = pccore.train_step(model, optim, opt_state, x=x, y=y)
    pccore.save_checkpoint(tmp_path / "c", model=model, opt_state=opt_state, step=1)
    fresh = BUILD[framework]()
    ckpt = pccore.restore_checkpoint(tmp_path / "c", model=fresh,
                                     opt_state=optim.init(fresh.params))
    data = lambda t: [jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
                      for a in jax.tree.leaves(t)]
    for a, b in zip(data(ckpt.model.unwrap_state()), data(model.unwrap_state())):
        np.testing.assert_array_equal(a, b)
    once, _, _ = pccore.train_step(model, optim, opt_state, x=x, y=y)
    again, _, _ = pccore.train_step(ckpt.model, optim, ckpt.opt_state, x=x, y=y)
    for a, b in zip(data((once.params, once.layers)), data((again.params, again.layers))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_epc_updates_the_running_averages_from_the_activities_its_errors_stand_for(x64):
    """At the feed-forward equilibrium (y = the network's own output) PC's activities and
    ePC's zero errors stand for the same layer inputs: the same running averages."""
    x, _ = _data()
    optim = optax.sgd(0.1)
    got = []
    for energy in (pccore.PC(), pccore.EPC()):
        model = BUILD["flax.linen"]()
        y = model(x)
        trained, _, stats = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                              energy=energy)
        assert bool(stats.updated)
        got.append(jax.tree.leaves(trained.unwrap_state()))
    for a, b in zip(*got):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not np.allclose(got[0][0], jax.tree.leaves(BUILD["flax.linen"]().unwrap_state())[0])
