"""Flax NNX adapter: Sequential, custom modules, in-place write-back, refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore

nnx = pytest.importorskip("flax.nnx")


def _x(n=5, d=4):
    return jax.random.normal(jax.random.key(0), (n, d))


class Custom(nnx.Module):
    """Attributes named against call order (iter_modules is sorted by name): z first, a last."""

    def __init__(self, rngs):
        self.z_in = nnx.Linear(4, 7, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(7, 6, rngs=rngs), nnx.Linear(6, 5, rngs=rngs)])
        self.a_out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        x = jnp.tanh(self.z_in(x))
        for b in self.blocks:
            x = jax.nn.relu(b(x))
        return self.a_out(x)


def test_custom_module_call_order_and_round_trip():
    m = Custom(nnx.Rngs(0))
    model = pccore.wrap(m)
    assert model.names == ("z_in", "blocks/0", "blocks/1", "a_out")
    np.testing.assert_allclose(model(_x()), m(_x()), rtol=1e-6)
    new = model.with_params(jax.tree_util.tree_map(lambda a: a * 2.0, model.params))
    fresh = new.unwrap()
    assert type(fresh) is Custom and fresh is not m
    np.testing.assert_allclose(fresh(_x()), new(_x()), rtol=1e-6)
    np.testing.assert_array_equal(m.a_out.kernel[...] * 2.0, fresh.a_out.kernel[...])


def test_in_place_update_after_training():
    m = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), jnp.tanh, nnx.Linear(6, 3, rngs=nnx.Rngs(1)))
    model = pccore.wrap(m, in_place=True)
    optim = optax.sgd(0.1)
    state = optim.init(model.params)
    model, state, _ = pccore.train_step(model, optim, state, x=_x(), y=jnp.ones((5, 3)))
    out = model.unwrap()
    assert out is m  # the user's module, updated in place
    np.testing.assert_allclose(m(_x()), model(_x()), rtol=1e-6)


def test_batchnorm_and_dropout_train_in_training_mode_and_run_frozen_in_eval_mode():
    """Training mode is read from the modules (tested against hand-written energies in
    test_train_mode.py); in eval mode the running averages are frozen."""
    rngs = nnx.Rngs(0)
    m = nnx.Sequential(nnx.Linear(4, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs), jnp.tanh,
                       nnx.Dropout(0.5, rngs=rngs), nnx.Linear(6, 3, rngs=rngs))
    wrapped = pccore.wrap(m)
    assert wrapped.training and wrapped.stochastic
    m.layers[1].eval()
    wrapped = pccore.wrap(m)
    assert wrapped.training and wrapped.stochastic  # the dropout still trains
    m.layers[3].eval()
    assert not pccore.wrap(m).training
    m(3.0 + _x())  # no-op for the statistics in eval mode; set them by hand instead
    m.layers[1].mean[...] = jnp.arange(6.0) / 6
    m.layers[1].var[...] = 1.0 + jnp.arange(6.0)
    m.eval()
    model = pccore.wrap(m)
    np.testing.assert_allclose(model(_x()), m(_x()), rtol=1e-6)
    assert [n.split("+")[0] for n in model.names] == ["layers/0", "layers/1", "layers/4"]


def test_variables_are_refused():
    m = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="holds its own parameters"):
        pccore.wrap(m, {"params": {}})


class _Twice(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(4, 4, rngs=rngs)
        self.b = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.b(jnp.tanh(self.a(x)))))


def test_inferred_input_shape_keeps_the_real_error():
    # the input shape is inferable (a leading nnx.Linear); the model is refused for its own reason
    for options in ({}, {"input_shape": (4,)}):
        with pytest.raises(ValueError, match=r"module\(s\) \{'b': 2\} are called more than once"):
            pccore.wrap(_Twice(nnx.Rngs(0)), **options)
    class Conv(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 2, (3, 3), rngs=rngs)

        def __call__(self, x):
            return self.conv(x)
    with pytest.raises(ValueError, match=r"cannot infer the per-sample input shape .* input_shape="):
        pccore.wrap(Conv(nnx.Rngs(0)))


class _TrainArg(nnx.Module):
    """The usual NNX pattern: the mode is a call argument, which overrides `.eval()`."""

    def __init__(self, rngs, bn):
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs) if bn else None
        self.do = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x, train: bool = True):
        h = self.l1(x)
        if self.bn is not None:
            h = self.bn(h, use_running_average=not train)
        return self.l2(self.do(jnp.tanh(h), deterministic=not train))


@pytest.mark.parametrize("bn", [False, True])
def test_training_mode_chosen_by_a_call_argument_is_refused(bn):
    m = _TrainArg(nnx.Rngs(0), bn)
    m.eval()  # overridden by the call argument's default, train=True
    changed = r"BatchStat 'bn/mean', BatchStat 'bn/var', RngCount" if bn else r"RngCount 'do/rngs/count'"
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=rf"changes {changed}.*although its submodules are in eval mode.*"
                             r"kwargs=\{'train': False\}"):
        pccore.wrap(m)
    if bn:
        m.bn.mean[...] = jnp.arange(8.0) / 8
        m.bn.var[...] = 1.0 + jnp.arange(8.0)
    model = pccore.wrap(m, kwargs={"train": False})
    np.testing.assert_allclose(model(_x()), m(_x(), train=False), rtol=1e-6)
    optim = optax.sgd(0.1)
    trained, _, _ = pccore.train_step(model, optim, optim.init(model.params), x=_x(), y=jnp.ones((5, 3)))
    np.testing.assert_allclose(trained.unwrap()(_x(), train=False), trained(_x()), rtol=1e-6)


def test_nnx_scan_over_stacked_blocks_is_one_layer_of_its_module(getkey):
    """Blocks stacked with nnx.vmap and run by nnx.scan are called on copies the interceptor
    does not see; their parameters belong to the one layer whose output reads them: the
    module that runs the scan, named as a boundary. Forward and energy against the native
    model and a hand-written energy."""

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.lin(x))

    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            return body(x, self.blocks)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.inp, self.stack = nnx.Linear(4, 8, rngs=rngs), Stack(rngs)
            self.out = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(self.stack(jnp.tanh(self.inp(x))))

    native = Model(nnx.Rngs(0))
    model = pccore.wrap(native, boundaries=["inp", "stack", "out"])
    assert model.names == ("inp", "stack+stack/blocks/lin", "out")
    x = jax.random.normal(getkey(), (5, 4))
    np.testing.assert_array_equal(model(x), native(x))
    z = tuple(jax.random.normal(getkey(), (5, 8)) for _ in range(2))
    y = jax.random.normal(getkey(), (5, 3))
    want = (0.5 * jnp.sum((z[0] - jnp.tanh(native.inp(x))) ** 2)
            + 0.5 * jnp.sum((z[1] - native.stack(z[0])) ** 2)
            + 0.5 * jnp.sum((y - native.out(z[1])) ** 2))
    np.testing.assert_allclose(pccore.energy(model, z, x=x, y=y), want, rtol=1e-5)


# -- multi-axis kernels: nnx.MultiHeadAttention's (in, heads, head_dim) projections ---------------

IN, H, HD, OUT, S = 6, 2, 4, 5, 3  # q/k/v kernels (IN, H, HD), out (H, HD, OUT); H*HD != IN


def _init(seed):
    """An initialiser from NumPy (no random-number kernels to compile in float64)."""
    rng = np.random.default_rng(seed)
    return lambda key, shape, dtype: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), dtype)


class _Attention(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs, kernel_init=_init(0), bias_init=_init(1))
        self.inp = nnx.Linear(2, IN, **kw)
        self.attn = nnx.MultiHeadAttention(num_heads=H, in_features=IN, qkv_features=H * HD,
                                           out_features=OUT, decode=False, **kw)
        self.head = nnx.Linear(OUT, 3, **kw)

    def __call__(self, x):
        return self.head(self.attn(jnp.tanh(self.inp(x))))


def _wrap_attention(m):
    return pccore.wrap(m, input_shape=(S, 2), boundaries=["inp", "attn", "head"])


def _weight_names(model, l):
    """The owning module of each of layer `l`'s weights (`query`, ..., `out`)."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(model.params[l])[0]]
    return [str(paths[s.index][-2].key) for s in model.weights[l]]


def test_attention_fan_ins_and_weight_matrices_read_the_true_layout():
    """q/k/v kernels (in, heads, head_dim) read as W (heads*head_dim, in): fan-in `in` (not
    in*heads); the output projection (heads, head_dim, out) as W (out, heads*head_dim)."""
    m = _Attention(nnx.Rngs(0))
    model = _wrap_attention(m)
    names = _weight_names(model, 1)
    assert sorted(names) == ["key", "out", "query", "value"]
    assert dict(zip(names, model.fan_ins(1))) == {"query": IN, "key": IN, "value": IN, "out": H * HD}
    assert model.fan_ins(0) == (2,) and model.fan_ins(2) == (OUT,)
    want = {n: np.asarray(getattr(m.attn, n).kernel[...]).reshape(IN, H * HD).T
            for n in ("query", "key", "value")}
    want["out"] = np.asarray(m.attn.out.kernel[...]).reshape(H * HD, OUT).T
    for n, W in zip(names, model.weight_matrices(1)):
        np.testing.assert_array_equal(W, want[n], err_msg=n)


def test_attention_mupc_energy_equals_hand_scaled_kernels(x64):
    """μPC's energy of the wrapped model, in float64, equals the energy written by hand from a
    copy whose kernels are scaled by 1/sqrt(true fan-in) (the head's by 1/(fan-in gamma))."""
    gamma = 0.5
    m = _Attention(nnx.Rngs(1), jnp.float64)
    model = _wrap_attention(m)
    energy = pccore.PC(parameterisation=pccore.MuPC(gamma=gamma))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(4, S, 2)), rng.normal(size=(4, S, 3))
    zs = (rng.normal(size=(4, S, IN)), rng.normal(size=(4, S, OUT)))
    s = nnx.clone(m)
    for lin, c in [(s.inp, 1 / np.sqrt(2)), (s.attn.query, 1 / np.sqrt(IN)),
                   (s.attn.key, 1 / np.sqrt(IN)), (s.attn.value, 1 / np.sqrt(IN)),
                   (s.attn.out, 1 / np.sqrt(H * HD)), (s.head, 1 / (OUT * gamma))]:
        lin.kernel[...] = lin.kernel[...] * c

    @nnx.jit
    def by_hand(s, x, zs, y):
        return 0.5 * (jnp.sum((zs[0] - jnp.tanh(s.inp(x))) ** 2)
                      + jnp.sum((zs[1] - s.attn(zs[0])) ** 2) + jnp.sum((y - s.head(zs[1])) ** 2))

    want = by_hand(s, x, zs, y)
    got = pccore.energy(model, zs, x=x, y=y, energy=energy)
    np.testing.assert_allclose(got, want, rtol=1e-12)
