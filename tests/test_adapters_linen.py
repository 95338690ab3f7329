"""Flax Linen adapter: Sequential, setup() lists, @nn.compact, frozen collections, refusals."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore

nn = pytest.importorskip("flax.linen")
from flax.core import FrozenDict  # noqa: E402


def _x(n=5, d=4):
    return jax.random.normal(jax.random.key(0), (n, d))


class SetupMLP(nn.Module):
    def setup(self):
        self.layers = [nn.Dense(s) for s in (7, 6, 3)]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.tanh(layer(x))
        return self.layers[-1](x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.tanh(nn.LayerNorm(name="ln")(nn.Dense(8, name="dense")(x)))


class Compact(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Block(name="enc")(x)
        return nn.Dense(3)(x)


@pytest.mark.parametrize(
    "module, names",
    [
        (nn.Sequential([nn.Dense(7), nn.tanh, nn.Dense(3)]), ["layers_0", "layers_2"]),
        (SetupMLP(), ["layers_0", "layers_1", "layers_2"]),
        (Compact(), ["enc/dense", "enc/ln", "Dense_0"]),
    ],
)
def test_chain_equals_native_and_round_trip(module, names):
    variables = module.init(jax.random.key(1), _x())
    model = pccore.wrap(module, variables)
    assert list(model.names) == names
    for n in (1, 6):
        np.testing.assert_allclose(model(_x(n)), module.apply(variables, _x(n)), rtol=1e-6, atol=1e-7)
    new = model.with_params(jax.tree_util.tree_map(lambda a: a * 2.0, model.params)).unwrap()
    assert type(new) is type(variables)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(variables)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, 2.0 * b), new, variables)


def test_boundaries_and_frozendict_mapping_type():
    module = Compact()
    variables = FrozenDict(module.init(jax.random.key(1), _x()))
    model = pccore.wrap(module, variables, boundaries=["enc", "Dense_0"])
    assert model.names == ("enc+enc/dense+enc/ln", "Dense_0")
    np.testing.assert_allclose(model(_x()), module.apply(variables, _x()), rtol=1e-6)
    back = model.unwrap()
    assert isinstance(back, FrozenDict)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.tanh(x))
        return nn.Dense(3)(x)


def test_batchnorm_and_dropout_eval_mode_frozen_training_refused():
    module = BNNet()
    variables = module.init(jax.random.key(1), _x(), train=False)
    _, upd = module.apply(variables, 3.0 + _x(), train=True, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.key(2)})
    variables = {**variables, **upd}  # non-trivial running averages
    model = pccore.wrap(module, variables, kwargs={"train": False})
    np.testing.assert_allclose(model(_x()), module.apply(variables, _x(), train=False), rtol=1e-6)
    with pytest.raises(pccore.UnsupportedLayerError, match="'BatchNorm_0' updates a variable.*train_kwargs="):
        pccore.wrap(module, variables, kwargs={"train": True})


def test_dropout_training_refused():
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.Dropout(0.5, deterministic=False)(nn.tanh(nn.Dense(6)(x))))

    module = Drop()
    variables = module.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, _x())
    with pytest.raises(pccore.UnsupportedLayerError, match="'Dropout_0' needs a random key"):
        pccore.wrap(module, variables)


def test_call_order_cannot_be_determined():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(4)
            return d(nn.tanh(d(x)))

    module = Shared()
    with pytest.raises(ValueError, match=r"cannot determine the layer order.*'Dense_0': 2"):
        pccore.wrap(module, module.init(jax.random.key(0), _x()))


def test_mismatched_variables_are_refused():
    module = nn.Sequential([nn.Dense(7), nn.tanh, nn.Dense(3)])
    other = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(3)])
    variables = other.init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match="`variables` do not match the Linen module"):
        pccore.wrap(module, variables)
    with pytest.raises(ValueError, match="'params' collection"):
        pccore.wrap(module, {"batch_stats": {}})
    extra = {"params": {**variables["params"], "layers_9": {"kernel": jnp.ones((3, 3))}}}
    with pytest.raises(ValueError, match=r"parameters of \['layers_9'\] belong to no layer"):
        pccore.wrap(other, extra)


class Boxed(nn.Module):
    """Params boxed with nn.with_partitioning (nn.Partitioned), one of them on a bias."""

    @nn.compact
    def __call__(self, x):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        x = jnp.tanh(nn.Dense(6, kernel_init=init)(x))
        bias = nn.with_partitioning(nn.initializers.normal(), ("model",))
        return nn.Dense(3, kernel_init=init, bias_init=bias)(x)


def test_boxed_params_train_and_round_trip():
    module = Boxed()
    variables = module.init(jax.random.key(1), _x())
    assert isinstance(variables["params"]["Dense_0"]["kernel"], nn.Partitioned)
    model = pccore.wrap(module, variables)  # input shape inferred through the box
    assert model.names == ("Dense_0", "Dense_1")
    assert model.in_shape.shape == (4,)
    assert [len(w) for w in model.weights] == [1, 1]  # the kernels, seen through their boxes
    np.testing.assert_allclose(model(_x()), module.apply(variables, _x()), rtol=1e-6)
    optim = optax.sgd(0.1)
    state = optim.init(model.params)
    trained, _, _ = pccore.train_step(model, optim, state, x=_x(), y=jnp.ones((5, 3)))
    out = trained.unwrap()
    kernel = out["params"]["Dense_1"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, "model")
    assert not np.allclose(kernel.value, variables["params"]["Dense_1"]["kernel"].value)
    np.testing.assert_allclose(module.apply(out, _x()), trained(_x()), rtol=1e-6)


class EncDec(nn.Module):
    """Named so that sorted keys ('decoder' < 'encoder') are not call order."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="decoder")(jnp.tanh(nn.Dense(6, name="encoder")(x)))


def test_input_shape_is_inferred_from_call_order_not_dict_order():
    module = EncDec()
    variables = jax.tree_util.tree_map(lambda a: a, module.init(jax.random.key(1), _x()))
    assert list(variables["params"]) == ["decoder", "encoder"]  # as after a checkpoint restore
    model = pccore.wrap(module, variables)
    assert model.in_shape.shape == (4,) and model.names == ("encoder", "decoder")
    np.testing.assert_allclose(model(_x()), module.apply(variables, _x()), rtol=1e-6)


class ConvHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(2, (3, 3))(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_input_shape_that_cannot_be_inferred_asks_for_it():
    module = ConvHead()
    variables = module.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"`input_shape`: cannot infer .* \[\(128,\)\], fits a "
                                         r"first-called nn.Dense .*Conv_0.* Pass it"):
        pccore.wrap(module, variables)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    model = pccore.wrap(module, variables, input_shape=(8, 8, 1))
    np.testing.assert_allclose(model(x), module.apply(variables, x), rtol=1e-6)


# -- multi-axis kernels: nn.MultiHeadDotProductAttention's (in, heads, head_dim) projections -----

IN, H, HD, OUT, S = 6, 2, 4, 5, 3  # q/k/v kernels (IN, H, HD), out (H, HD, OUT); H*HD != IN


def _init(seed):
    """An initialiser from NumPy (no random-number kernels to compile in float64)."""
    rng = np.random.default_rng(seed)
    return lambda key, shape, dtype: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), dtype)


class Attention(nn.Module):
    dtype: Any = jnp.float32

    def setup(self):
        kw = dict(param_dtype=self.dtype, dtype=self.dtype, kernel_init=_init(0), bias_init=_init(1))
        self.inp = nn.Dense(IN, **kw)
        self.attn = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * HD,
                                                    out_features=OUT, **kw)
        self.head = nn.Dense(3, **kw)

    def __call__(self, x):
        return self.head(self.attn(nn.tanh(self.inp(x))))


def _wrap_attention(dtype=jnp.float32):
    m = Attention(dtype)
    v = m.init(jax.random.key(0), jnp.zeros((1, S, 2), dtype))
    return m, v, pccore.wrap(m, v, input_shape=(S, 2), boundaries=["inp", "attn", "head"])


def _weight_names(model, l):
    """The owning module of each of layer `l`'s weights (`query`, ..., `out`)."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(model.params[l])[0]]
    return [str(paths[s.index][-2].key) for s in model.weights[l]]


def test_attention_fan_ins_and_weight_matrices_read_the_true_layout():
    """q/k/v kernels (in, heads, head_dim) read as W (heads*head_dim, in): fan-in `in` (not
    in*heads); the output projection (heads, head_dim, out) as W (out, heads*head_dim)."""
    _, v, model = _wrap_attention()
    names = _weight_names(model, 1)
    assert sorted(names) == ["key", "out", "query", "value"]
    assert dict(zip(names, model.fan_ins(1))) == {"query": IN, "key": IN, "value": IN, "out": H * HD}
    assert model.fan_ins(0) == (2,) and model.fan_ins(2) == (OUT,)
    p = v["params"]["attn"]
    want = {n: np.asarray(p[n]["kernel"]).reshape(IN, H * HD).T for n in ("query", "key", "value")}
    want["out"] = np.asarray(p["out"]["kernel"]).reshape(H * HD, OUT).T
    for n, W in zip(names, model.weight_matrices(1)):
        np.testing.assert_array_equal(W, want[n], err_msg=n)


def test_attention_mupc_energy_equals_hand_scaled_kernels(x64):
    """μPC's energy of the wrapped model, in float64, equals the energy written by hand from
    variables whose kernels are scaled by 1/sqrt(true fan-in) (the head's by 1/(fan-in gamma))."""
    gamma = 0.5
    m, v, model = _wrap_attention(jnp.float64)
    energy = pccore.PC(parameterisation=pccore.MuPC(gamma=gamma))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(4, S, 2)), rng.normal(size=(4, S, 3))
    zs = (rng.normal(size=(4, S, IN)), rng.normal(size=(4, S, OUT)))
    scale = {"inp": 1 / np.sqrt(2), "head": 1 / (OUT * gamma),
             "attn": {"query": 1 / np.sqrt(IN), "key": 1 / np.sqrt(IN), "value": 1 / np.sqrt(IN),
                      "out": 1 / np.sqrt(H * HD)}}

    def scaled(p, c):
        if isinstance(c, dict):
            return {n: scaled(p[n], c[n]) for n in p}
        return {**p, "kernel": p["kernel"] * c}

    s = {"params": scaled(v["params"], scale)}

    @jax.jit
    def by_hand(s, x, zs, y):
        f = lambda method, h: m.apply(s, h, method=method)
        return 0.5 * (jnp.sum((zs[0] - jnp.tanh(f(lambda mm, h: mm.inp(h), x))) ** 2)
                      + jnp.sum((zs[1] - f(lambda mm, h: mm.attn(h), zs[0])) ** 2)
                      + jnp.sum((y - f(lambda mm, h: mm.head(h), zs[1])) ** 2))

    got = pccore.energy(model, zs, x=x, y=y, energy=energy)
    np.testing.assert_allclose(got, by_hand(s, x, zs, y), rtol=1e-12)
