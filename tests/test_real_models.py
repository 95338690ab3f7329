"""Real models wrapped as their users build them: `hk.nets.ResNet` itself, a Flax Linen and a
Flax NNX ResNet with BatchNorm in eval mode, a JPC-style Equinox residual CNN with
parameter-free latents, and Haiku RNNs run by `hk.dynamic_unroll`.

Oracles: the native forward pass (`f.apply`, `module.apply`, the module's own `__call__`) and
the PC energy written out by hand from the native submodules, in float64 to 1e-10.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore

TOL = dict(rtol=1e-10, atol=1e-10)


def _f64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
        else a, tree)


def _digits(n=None):
    data = pccore.datasets.load_digits()
    img = lambda a: jnp.asarray(a).reshape(-1, 8, 8, 1)  # NHWC
    return (img(data.x_train)[:n], jnp.asarray(data.y_train)[:n], img(data.x_test),
            jnp.asarray(data.y_test))


def _random_latents(model, n, key):
    """Random hidden latents z_1..z_{L-1} of the model's shapes (the energy's argument)."""
    shapes = model.out_shapes[:-1]
    keys = jax.random.split(key, len(shapes))
    return tuple(jax.random.normal(k, (n, *s.shape), s.dtype) for k, s in zip(keys, shapes))


def _energy_by_hand(layers, x, zs, y):
    r"""$\sum_l \frac12 \lVert z_l - f_l(z_{l-1}) \rVert^2$ over layers and samples, with
    $z_0 = x$ and $z_L = y$ (the default `pccore.PC()`: squared error at the output)."""
    chain = (x, *zs, y)
    return sum(0.5 * jnp.sum((chain[l + 1] - f(chain[l])) ** 2) for l, f in enumerate(layers))


def _train(model, x, y, steps=3, **kw):
    opt = optax.sgd(0.05)
    state = opt.init(model.params)
    for _ in range(steps):
        model, state, stats = pccore.train_step(model, opt, state, x=x, y=y, **kw)
        assert bool(stats.updated)
    return model


def _changed(a, b):
    return any(not np.array_equal(u, v) for u, v in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _accuracy(model, x, y):
    return float(jnp.mean(jnp.argmax(model(x), -1) == jnp.argmax(y, -1)))


# -- Haiku: hk.nets.ResNet ------------------------------------------------------------------

hk = pytest.importorskip("haiku")

HK_BOUNDARIES = ["res_net/~/initial_conv", *(f"res_net/~/block_group_{i}" for i in range(4)),
                 "res_net/~/logits"]


def _hk_resnet():
    """The smallest hk.nets.ResNet: one basic (non-bottleneck) block of 4 channels per group,
    a 3x3 stride-1 stem for 8x8 inputs, non-zero logits weights (the default is zeros)."""
    return hk.nets.ResNet(
        blocks_per_group=(1, 1, 1, 1), num_classes=10, bottleneck=False,
        channels_per_group=(4, 4, 4, 4), strides=(1, 2, 1, 1),
        initial_conv_config=dict(output_channels=4, kernel_shape=3, stride=1),
        logits_config=dict(w_init=hk.initializers.VarianceScaling(1.0)))


def _hk_setup(dtype=jnp.float32):
    """`f`, params and the BatchNorm state of a native training-mode `init` on digits (its
    running averages are those of the batch)."""
    f = hk.transform_with_state(lambda x, is_training: _hk_resnet()(x, is_training))
    params, state = f.init(jax.random.key(1), _digits(128)[0], True)
    return (f, *_f64((params, state))) if dtype == jnp.float64 else (f, params, state)


def _hk_native_layers(params, state):
    """The layer functions from hk.nets.ResNet's own submodules, in eval mode."""
    def layer(body):
        g = hk.transform_with_state(lambda h: body(_hk_resnet(), h))
        return lambda h: g.apply(params, state, None, h)[0]

    def stem(net, x):
        h = jax.nn.relu(net.initial_batchnorm(net.initial_conv(x), False))
        return hk.max_pool(h, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")

    def group(i):
        def body(net, h):
            out = net.block_groups[i](h, False, False)
            return out.mean((1, 2)) if i == 3 else out
        return body

    return [layer(stem), *(layer(group(i)) for i in range(4)),
            layer(lambda net, h: net.logits(h))]


@pytest.mark.slow
def test_hk_resnet_equals_native_forward_and_hand_written_energy(x64):
    f, params, state = _hk_setup(jnp.float64)
    model = pccore.wrap(f, params, state=state, args=(False,), input_shape=(8, 8, 1),
                        boundaries=HK_BOUNDARIES)
    assert model.num_layers == 6
    assert model.names[0] == "res_net/~/initial_conv+res_net/~/initial_batchnorm"
    assert model.names[-1] == "res_net/~/logits"
    assert [s.shape for s in model.out_shapes] == [(4, 4, 4), (4, 4, 4), (2, 2, 4), (2, 2, 4),
                                                   (4,), (10,)]
    x = _digits(6)[0].astype(jnp.float64)
    np.testing.assert_allclose(model(x), f.apply(params, state, None, x, False)[0], **TOL)
    zs = _random_latents(model, len(x), jax.random.key(2))
    y = jax.random.normal(jax.random.key(3), (len(x), 10), jnp.float64)
    want = _energy_by_hand(_hk_native_layers(params, state), x, zs, y)
    np.testing.assert_allclose(pccore.energy(model, zs, x=x, y=y), want, **TOL)


@pytest.mark.slow
def test_hk_resnet_unwraps_to_params_the_native_forward_reads(x64):
    f, params, state = _hk_setup(jnp.float64)
    model = pccore.wrap(f, params, state=state, args=(False,), input_shape=(8, 8, 1),
                        boundaries=HK_BOUNDARIES)
    x, y = _digits(16)[:2]
    x, y = x.astype(jnp.float64), y.astype(jnp.float64)
    trained = _train(model, x, y, t1=0.5, dt0=0.05)
    back = trained.unwrap()
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    assert _changed(back, params)
    np.testing.assert_allclose(trained(x), f.apply(back, state, None, x, False)[0], **TOL)


@pytest.mark.slow
def test_hk_resnet_skip_around_a_boundary_is_refused():
    f, params, state = _hk_setup()
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"layer 3 \('res_net/~/block_group_0/~/block_0/~/shortcut_batchnorm'\) "
                             r"reads the output of layer 0 \('res_net/~/initial_conv'\)"):
        pccore.wrap(f, params, state=state, args=(False,), input_shape=(8, 8, 1))


@pytest.mark.slow
def test_hk_resnet_trains_above_chance_on_digits():
    f, params, state = _hk_setup()
    model = pccore.wrap(f, params, state=state, args=(False,), input_shape=(8, 8, 1),
                        boundaries=HK_BOUNDARIES)
    x, y, xt, yt = _digits()
    energy = pccore.PC(loss=pccore.CrossEntropy())
    opt = optax.adam(3e-3)
    opt_state = opt.init(model.params)
    for _ in range(5):
        for i in range(0, len(x) - 63, 64):
            model, opt_state, _ = pccore.train_step(model, opt, opt_state, x=x[i:i + 64],
                                                    y=y[i:i + 64], energy=energy)
    acc = _accuracy(model, xt, yt)
    assert acc > 0.35, acc  # chance is 0.1
    np.testing.assert_allclose(model(xt), f.apply(model.unwrap(), state, None, xt, False)[0],
                               rtol=1e-5, atol=1e-5)


# -- Haiku: RNNs run by hk.dynamic_unroll ---------------------------------------------------

T, NI, NH = 5, 2, 4  # sequence length, input and hidden widths


class _HkCell(hk.RNNCore):
    """An Elman cell with one hk.Linear, so that the cell's linear is a default boundary."""

    def __call__(self, x, h):
        h = jnp.tanh(hk.Linear(NH, name="lin")(jnp.concatenate([x, h], -1)))
        return h, h

    def initial_state(self, batch_size):
        return jnp.zeros((batch_size, NH))


class _HkEncoder(hk.Module):
    """The whole RNN, one array out: the module that calls hk.dynamic_unroll."""

    def __init__(self, core, name=None):
        super().__init__(name=name)
        self.core = core

    def __call__(self, xs):
        core = {"gru": hk.GRU, "vanilla": hk.VanillaRNN}[self.core](NH, name=self.core) \
            if self.core != "cell" else _HkCell(name="cell")
        out, _ = hk.dynamic_unroll(core, xs, core.initial_state(xs.shape[0]), time_major=False)
        return out[:, -1]


def _hk_rnn(core, dtype=jnp.float64):
    def fn(xs):  # (batch, T, NI)
        h = jnp.tanh(hk.Linear(NI, name="inp")(xs))
        return hk.Linear(2, name="head")(jnp.tanh(_HkEncoder(core, name="enc")(h)))

    f = hk.without_apply_rng(hk.transform(fn))
    xs = jax.random.normal(jax.random.key(0), (3, T, NI), dtype)
    return f, f.init(jax.random.key(1), xs), xs


@pytest.mark.slow
@pytest.mark.parametrize("core", ["gru", "vanilla", "cell"])
def test_hk_dynamic_unroll_named_as_one_boundary_equals_native(core, x64):
    f, params, xs = _hk_rnn(core)
    model = pccore.wrap(f, params, input_shape=(T, NI), boundaries=["inp", "enc", "head"])
    assert [s.shape for s in model.out_shapes] == [(T, NI), (NH,), (2,)]
    np.testing.assert_allclose(model(xs), f.apply(params, xs), **TOL)
    native = lambda body: (lambda h: hk.without_apply_rng(hk.transform(body)).apply(params, h))
    layers = [native(lambda x: jnp.tanh(hk.Linear(NI, name="inp")(x))),
              native(lambda h: jnp.tanh(_HkEncoder(core, name="enc")(h))),  # up to head's input
              native(lambda h: hk.Linear(2, name="head")(h))]
    zs = _random_latents(model, len(xs), jax.random.key(2))
    y = jax.random.normal(jax.random.key(3), (len(xs), 2), jnp.float64)
    np.testing.assert_allclose(pccore.energy(model, zs, x=xs, y=y),
                               _energy_by_hand(layers, xs, zs, y), **TOL)
    if core == "cell":  # the unroll's parameters train as one layer's
        back = _train(model, xs, y, steps=2).unwrap()
        assert _changed(back["enc/cell/lin"], params["enc/cell/lin"])


@pytest.mark.slow
@pytest.mark.parametrize("core, boundaries, inside", [
    ("cell", None, ["enc/cell/lin"]),  # used to wrap, then die with UnexpectedTracerError
    ("cell", ["inp", "enc/cell/lin", "head"], ["enc/cell/lin"]),
    ("gru", None, ["enc/gru"]),
    ("gru", ["inp", "enc/gru", "head"], ["enc/gru"]),
    ("vanilla", None, ["enc/vanilla/linear", "enc/vanilla/linear_1"]),
])
def test_hk_boundary_inside_dynamic_unroll_is_refused_at_wrap_time(core, boundaries, inside):
    f, params, _ = _hk_rnn(core, jnp.float32)
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"layer boundary Haiku module\(s\) " + re.escape(repr(inside))
                       + r" are called inside a JAX transform \(the lax\.scan that "
                         r"hk\.dynamic_unroll .*put the hk\.dynamic_unroll call in a module of its "
                         r"own that returns one array, and name that module in `boundaries="):
        pccore.wrap(f, params, input_shape=(T, NI), boundaries=boundaries)


# -- Flax Linen: a ResNet with BatchNorm, in eval mode --------------------------------------

nn = pytest.importorskip("flax.linen")

LN_BOUNDARIES = ["stem", "block_0", "block_1", "head"]


class LnBlock(nn.Module):
    """A basic residual block; its skip stays inside the block, so the block is one layer."""

    features: int = 4

    @nn.compact
    def __call__(self, x, train: bool = True):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
        h = nn.relu(bn("bn_0")(nn.Conv(self.features, (3, 3), use_bias=False, name="conv_0")(x)))
        h = bn("bn_1")(nn.Conv(self.features, (3, 3), use_bias=False, name="conv_1")(h))
        return nn.relu(x + h)


class LnResNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3), name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = LnBlock(name="block_0")(x, train)
        x = LnBlock(name="block_1")(x, train)
        return nn.Dense(10, name="head")(x.mean((1, 2)))


def _ln_setup(dtype=jnp.float32):
    """The module and its variables, with batch statistics from native training-mode passes."""
    net = LnResNet()
    x = _digits(256)[0]
    variables = net.init(jax.random.key(0), x[:2])
    for i in range(0, len(x), 128):
        _, upd = net.apply(variables, x[i:i + 128], mutable=["batch_stats"])
        variables = {**variables, **upd}
    return net, (_f64(variables) if dtype == jnp.float64 else variables)


def _ln_native_layers(v):
    """The layer functions from the native submodules, applied to their variable slices."""
    def sub(module, name, *args):
        part = {c: v[c][name] for c in ("params", "batch_stats") if name in v[c]}
        return lambda h: module.apply(part, h, *args)

    conv, bn = sub(nn.Conv(4, (3, 3)), "stem"), sub(nn.BatchNorm(use_running_average=True), "stem_bn")
    stem = lambda x: nn.avg_pool(nn.relu(bn(conv(x))), (2, 2), (2, 2))
    block_0 = sub(LnBlock(), "block_0", False)
    block_1 = sub(LnBlock(), "block_1", False)
    head = sub(nn.Dense(10), "head")
    return [stem, block_0, lambda h: block_1(h).mean((1, 2)), head]


@pytest.mark.slow
def test_linen_resnet_equals_native_forward_and_hand_written_energy(x64):
    net, v = _ln_setup(jnp.float64)
    model = pccore.wrap(net, v, input_shape=(8, 8, 1), kwargs={"train": False},
                        boundaries=LN_BOUNDARIES)
    assert [n.split("+")[0] for n in model.names] == LN_BOUNDARIES
    assert model.names[0] == "stem+stem_bn"  # the BatchNorm after the stem joins its layer
    assert [s.shape for s in model.out_shapes] == [(4, 4, 4), (4, 4, 4), (4,), (10,)]
    x = _digits(6)[0].astype(jnp.float64)
    np.testing.assert_allclose(model(x), net.apply(v, x, train=False), **TOL)
    zs = _random_latents(model, len(x), jax.random.key(2))
    y = jax.random.normal(jax.random.key(3), (len(x), 10), jnp.float64)
    np.testing.assert_allclose(pccore.energy(model, zs, x=x, y=y),
                               _energy_by_hand(_ln_native_layers(v), x, zs, y), **TOL)


@pytest.mark.slow
def test_linen_resnet_unwraps_to_variables_the_native_forward_reads(x64):
    net, v = _ln_setup(jnp.float64)
    model = pccore.wrap(net, v, input_shape=(8, 8, 1), kwargs={"train": False},
                        boundaries=LN_BOUNDARIES)
    x, y = _digits(16)[:2]
    x, y = x.astype(jnp.float64), y.astype(jnp.float64)
    trained = _train(model, x, y, t1=0.5, dt0=0.05)
    back = trained.unwrap()
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(v)
    assert _changed(back["params"], v["params"])
    np.testing.assert_array_equal(back["batch_stats"]["stem_bn"]["var"],
                                  v["batch_stats"]["stem_bn"]["var"])  # frozen
    np.testing.assert_allclose(trained(x), net.apply(back, x, train=False), **TOL)


@pytest.mark.slow
def test_linen_resnet_skip_around_a_boundary_is_refused():
    net, v = _ln_setup()
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"not a chain of its layers: layer 2 \('block_0/conv_1'\) reads .*"
                             r"parameters of layer 0 \('stem'\) besides its own input"):
        pccore.wrap(net, v, input_shape=(8, 8, 1), kwargs={"train": False},
                    boundaries=["stem", "block_0/conv_0", "block_0/conv_1", "block_1", "head"])


# -- Equinox: a JPC-style residual CNN with parameter-free latents --------------------------

eqx = pytest.importorskip("equinox")


class EqxResBlock(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d

    def __call__(self, x):
        return jax.nn.relu(x + self.conv2(jax.nn.relu(self.conv1(x))))


class JpcResCNN(eqx.Module):
    """Per-sample (C, H, W) forward, as JPC writes its models: latents after a pooling layer
    and after an `eqx.nn.Identity`, both without parameters."""

    stem: eqx.nn.Conv2d
    block: EqxResBlock
    pool: eqx.nn.AvgPool2d
    conv: eqx.nn.Conv2d
    latent: eqx.nn.Identity
    head: eqx.nn.Linear

    def __init__(self, key, c=3):
        k = jax.random.split(key, 5)
        self.stem = eqx.nn.Conv2d(1, c, 3, padding=1, key=k[0])
        self.block = EqxResBlock(eqx.nn.Conv2d(c, c, 3, padding=1, key=k[1]),
                                 eqx.nn.Conv2d(c, c, 3, padding=1, key=k[2]))
        self.pool = eqx.nn.AvgPool2d(2, 2)
        self.conv = eqx.nn.Conv2d(c, c, 3, padding=1, key=k[3])
        self.latent = eqx.nn.Identity()
        self.head = eqx.nn.Linear(c * 4 * 4, 10, key=k[4])

    def __call__(self, x):
        h = self.block(jax.nn.relu(self.stem(x)))
        h = self.latent(jnp.tanh(self.conv(self.pool(h))))
        return self.head(h.reshape(-1))


EQX_BOUNDARIES = ["stem", "block", "pool", "conv", "latent", "head"]


@pytest.mark.slow
def test_jpc_resnet_has_one_latent_per_named_boundary_and_the_hand_written_energy(x64):
    net = _f64(JpcResCNN(jax.random.key(0)))
    model = pccore.wrap(net, boundaries=EQX_BOUNDARIES, input_shape=(1, 8, 8))
    assert model.names == tuple(EQX_BOUNDARIES)
    assert model.num_layers == len(EQX_BOUNDARIES)  # hidden latents plus the output
    assert [s.shape for s in model.out_shapes] == [(3, 8, 8), (3, 8, 8), (3, 4, 4), (3, 4, 4),
                                                   (3, 4, 4), (10,)]
    assert jax.tree_util.tree_leaves(model.params[2]) == []  # pool and latent: no parameters
    assert jax.tree_util.tree_leaves(model.params[4]) == []
    x = jnp.transpose(_digits(5)[0], (0, 3, 1, 2)).astype(jnp.float64)  # NCHW
    y = jax.random.normal(jax.random.key(3), (5, 10), jnp.float64)
    assert len(pccore.init_activities(model, x, y=y)) == len(EQX_BOUNDARIES) - 1
    np.testing.assert_allclose(model(x), jax.vmap(net)(x), **TOL)
    layers = [net.stem,                                         # z_1 = stem(x)
              lambda h: net.block(jax.nn.relu(h)),              # z_2
              net.pool,                                         # z_3, parameter-free
              net.conv,                                         # z_4
              lambda h: net.latent(jnp.tanh(h)),                # z_5, parameter-free
              lambda h: net.head(h.reshape(-1))]                # the output
    zs = _random_latents(model, len(x), jax.random.key(2))
    want = _energy_by_hand([jax.vmap(f) for f in layers], x, zs, y)
    np.testing.assert_allclose(pccore.energy(model, zs, x=x, y=y), want, **TOL)


@pytest.mark.slow
def test_jpc_resnet_unwraps_to_its_class_after_train_step(x64):
    net = _f64(JpcResCNN(jax.random.key(0)))
    model = pccore.wrap(net, boundaries=EQX_BOUNDARIES, input_shape=(1, 8, 8))
    x = jnp.transpose(_digits(5)[0], (0, 3, 1, 2)).astype(jnp.float64)
    y = jax.random.normal(jax.random.key(3), (5, 10), jnp.float64)
    trained = _train(model, x, y, steps=2)
    back = trained.unwrap()
    assert type(back) is JpcResCNN and _changed(back, net)
    np.testing.assert_allclose(trained(x), jax.vmap(back)(x), **TOL)


@pytest.mark.slow
def test_jpc_resnet_skip_around_a_boundary_is_refused():
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"not a chain of its layers: layer 3 \('head'\) reads the output of "
                             r"layer 0 \('stem'\) besides its own input"):
        pccore.wrap(JpcResCNN(jax.random.key(0)), input_shape=(1, 8, 8),
                    boundaries=["stem", "block.conv1", "block.conv2", "head"])


# -- Flax NNX: a ResNet with BatchNorm, in eval mode ----------------------------------------

nnx = pytest.importorskip("flax.nnx")

NNX_BOUNDARIES = ["stem", "blocks/0", "blocks/1", "head"]


class NnxBlock(nnx.Module):
    def __init__(self, c, rngs):
        conv = lambda: nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
        self.conv_0, self.conv_1 = conv(), conv()
        self.bn_0, self.bn_1 = nnx.BatchNorm(c, rngs=rngs), nnx.BatchNorm(c, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn_0(self.conv_0(x)))
        return nnx.relu(x + self.bn_1(self.conv_1(h)))


class NnxResNet(nnx.Module):
    def __init__(self, rngs, c=4):
        self.stem = nnx.Conv(1, c, (3, 3), rngs=rngs)
        self.stem_bn = nnx.BatchNorm(c, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(c, rngs) for _ in range(2)])
        self.head = nnx.Linear(c, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.stem_bn(self.stem(x))), (2, 2), (2, 2))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((1, 2)))


def _nnx_setup(dtype=jnp.float32):
    """A ResNet whose BatchNorm statistics come from native training-mode passes, then eval
    (and then cast, parameters and statistics, to `dtype`)."""
    net = NnxResNet(nnx.Rngs(0))
    x = _digits(256)[0]
    net.train()
    for i in range(0, len(x), 128):
        net(x[i:i + 128])
    net.eval()
    if dtype == jnp.float64:
        graphdef, state = nnx.split(net)
        net = nnx.merge(graphdef, _f64(state))
    return net


@pytest.mark.slow
def test_nnx_resnet_equals_native_forward_and_hand_written_energy(x64):
    net = _nnx_setup(jnp.float64)
    model = pccore.wrap(net, input_shape=(8, 8, 1), boundaries=NNX_BOUNDARIES)
    assert [n.split("+")[0] for n in model.names] == NNX_BOUNDARIES
    assert [s.shape for s in model.out_shapes] == [(4, 4, 4), (4, 4, 4), (4,), (10,)]
    x = _digits(6)[0].astype(jnp.float64)
    np.testing.assert_allclose(model(x), net(x), **TOL)
    layers = [lambda x: nnx.avg_pool(nnx.relu(net.stem_bn(net.stem(x))), (2, 2), (2, 2)),
              net.blocks[0], lambda h: net.blocks[1](h).mean((1, 2)), net.head]
    zs = _random_latents(model, len(x), jax.random.key(2))
    y = jax.random.normal(jax.random.key(3), (len(x), 10), jnp.float64)
    np.testing.assert_allclose(pccore.energy(model, zs, x=x, y=y),
                               _energy_by_hand(layers, x, zs, y), **TOL)
    trained = _train(model, x, y.astype(jnp.float64), t1=0.5, dt0=0.05)
    back = trained.unwrap()
    assert type(back) is NnxResNet
    np.testing.assert_allclose(trained(x), back(x), **TOL)
    assert not np.array_equal(back.head.kernel[...], net.head.kernel[...])


@pytest.mark.slow
def test_nnx_resnet_skip_around_a_boundary_is_refused():
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"not a chain of its layers: layer 2 \('blocks/0/conv_1'\) reads .*"
                             r"parameters of layer 0 \('stem'\) besides its own input"):
        pccore.wrap(_nnx_setup(), input_shape=(8, 8, 1),
                    boundaries=["stem", "blocks/0/conv_0", "blocks/0/conv_1", "head"])


# -- the same ResNets in training mode (train-mode BatchNorm) --------------------------------
#
# Oracle: with `y` the network's own training-mode output, the feed-forward activities are the
# equilibrium (every error is zero), so one training step must leave the parameters as they
# are and update every running average exactly as one native training-mode forward does.


def _at_the_feed_forward_equilibrium(model, x):
    y = model(x)  # training mode: batch statistics
    optim = optax.sgd(0.1)
    trained, _, stats = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y)
    assert bool(stats.updated) and float(stats.energy) < 1e-20
    for a, b in zip(jax.tree_util.tree_leaves(trained.params), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)  # gradients of rounding errors
    return y, trained


@pytest.mark.slow
def test_hk_resnet_in_training_mode_updates_state_as_the_native_training_forward(x64):
    f, params, state = _hk_setup(jnp.float64)
    model = pccore.wrap(f, params, state=state, args=(False,), train_args=(True,),
                        input_shape=(8, 8, 1), boundaries=HK_BOUNDARIES)
    assert model.training and not model.stochastic
    x = _digits(16)[0].astype(jnp.float64)
    native_y, native_state = f.apply(params, state, None, x, True)
    y, trained = _at_the_feed_forward_equilibrium(model, x)
    np.testing.assert_allclose(y, native_y, **TOL)
    got = trained.unwrap_state()
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree_util.tree_leaves(native_state)):
        np.testing.assert_allclose(a, b, **TOL, err_msg=jax.tree_util.keystr(path))
    assert _changed(got, state)
    np.testing.assert_allclose(trained.eval()(x), f.apply(params, got, None, x, False)[0], **TOL)


@pytest.mark.slow
def test_linen_resnet_in_training_mode_updates_batch_stats_as_the_native_training_forward(x64):
    net, v = _ln_setup(jnp.float64)
    model = pccore.wrap(net, v, kwargs={"train": False}, train_kwargs={"train": True},
                        input_shape=(8, 8, 1), boundaries=LN_BOUNDARIES)
    x = _digits(16)[0].astype(jnp.float64)
    native_y, upd = net.apply(v, x, True, mutable=["batch_stats"])
    y, trained = _at_the_feed_forward_equilibrium(model, x)
    np.testing.assert_allclose(y, native_y, **TOL)
    back = trained.unwrap()
    for a, b in zip(jax.tree_util.tree_leaves(back["batch_stats"]),
                    jax.tree_util.tree_leaves(upd["batch_stats"])):
        np.testing.assert_allclose(a, b, **TOL)
    np.testing.assert_allclose(trained.eval()(x), net.apply(back, x, False), **TOL)


@pytest.mark.slow
def test_nnx_resnet_in_training_mode_updates_batch_stats_as_the_native_training_forward(x64):
    net = _nnx_setup(jnp.float64)
    net.train()
    model = pccore.wrap(net, input_shape=(8, 8, 1), boundaries=NNX_BOUNDARIES)
    x = _digits(16)[0].astype(jnp.float64)
    y, trained = _at_the_feed_forward_equilibrium(model, x)
    native = nnx.clone(net)
    np.testing.assert_allclose(y, native(x), **TOL)  # updates `native`'s statistics once
    back = trained.unwrap()
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(back, nnx.BatchStat)),
                    jax.tree_util.tree_leaves(nnx.state(native, nnx.BatchStat))):
        np.testing.assert_allclose(a, b, **TOL)
    back.eval()
    np.testing.assert_allclose(trained.eval()(x), back(x), **TOL)


class NnxCNN(nnx.Module):
    """The NNX MNIST tutorial's shape: conv, BatchNorm, pool; conv, BatchNorm, pool; Dropout,
    dense, dense."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.linear1 = nnx.Linear(2 * 2 * 8, 32, rngs=rngs)
        self.linear2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        pool = lambda h: nnx.avg_pool(h, (2, 2), (2, 2))
        x = pool(nnx.relu(self.bn1(self.conv1(x))))
        x = pool(nnx.relu(self.bn2(self.conv2(x))))
        x = self.dropout(x.reshape(x.shape[0], -1))
        return self.linear2(nnx.relu(self.linear1(x)))


@pytest.mark.slow
def test_nnx_cnn_with_batchnorm_and_dropout_trains_on_digits():
    net = NnxCNN(nnx.Rngs(0))
    net.train()
    model = pccore.wrap(net, input_shape=(8, 8, 1),
                        boundaries=["conv1", "conv2", "linear1", "linear2"])
    assert model.training and model.stochastic
    x, y, xt, yt = _digits()
    energy = pccore.PC(loss=pccore.CrossEntropy())
    opt = optax.adam(3e-3)
    opt_state = opt.init(model.params)
    key = jax.random.key(0)
    for epoch in range(4):
        for i in range(0, len(x) - 63, 64):
            key, sub = jax.random.split(key)
            model, opt_state, stats = pccore.train_step(
                model, opt, opt_state, x=x[i:i + 64], y=y[i:i + 64], energy=energy, key=sub)
            assert bool(stats.updated)
    acc = float(pccore.evaluate(model, xt, yt, energy=energy).accuracy)
    assert acc > 0.6, acc  # chance is 0.1
    back = trained_module = model.unwrap()
    assert type(back) is NnxCNN and not trained_module.bn1.use_running_average
    back.eval()
    np.testing.assert_allclose(model.eval()(xt), back(xt), rtol=1e-5, atol=1e-5)


def _train_on_digits(model, epochs=4):
    x, y, xt, yt = _digits()
    energy = pccore.PC(loss=pccore.CrossEntropy())
    step = pccore.TrainStep(optax.adam(1e-2), energy=energy, dt0=0.05)  # BatchNorm: stiff
    opt_state = step.init(model)
    for _ in range(epochs):
        for i in range(0, len(x) - 63, 64):
            model, opt_state, stats = step(model, opt_state, x=x[i:i + 64], y=y[i:i + 64])
            assert bool(stats.updated)
    # accuracy of the training-mode forward (batch statistics of the test set): what the
    # weights learnt, apart from how far the running averages have come in a short run
    acc = float(jnp.mean(jnp.argmax(model(xt), -1) == jnp.argmax(yt, -1)))
    return model, acc, xt


@pytest.mark.slow
def test_hk_resnet_trains_on_digits_in_training_mode():
    f, params, state = _hk_setup()
    model = pccore.wrap(f, params, state=state, args=(False,), train_args=(True,),
                        input_shape=(8, 8, 1), boundaries=HK_BOUNDARIES)
    model, acc, xt = _train_on_digits(model)
    assert acc > 0.5, acc  # chance is 0.1
    native = f.apply(model.unwrap(), model.unwrap_state(), None, xt, False)[0]
    np.testing.assert_allclose(model.eval()(xt), native, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_linen_resnet_trains_on_digits_in_training_mode():
    net, v = _ln_setup()
    model = pccore.wrap(net, v, kwargs={"train": False}, train_kwargs={"train": True},
                        input_shape=(8, 8, 1), boundaries=LN_BOUNDARIES)
    model, acc, xt = _train_on_digits(model)
    assert acc > 0.5, acc
    np.testing.assert_allclose(model.eval()(xt), net.apply(model.unwrap(), xt, False),
                               rtol=1e-5, atol=1e-5)
