"""Equinox modules of the user's own class, cut at named boundaries: a CNN, a GRU over
`lax.scan` and a small ViT, each against its native forward and a hand-written PC energy."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore


class CNN(eqx.Module):
    """Per-sample forward (C, H, W) -> logits, as Equinox users write it."""

    conv1: eqx.nn.Conv2d
    pool: eqx.nn.AvgPool2d
    head: eqx.nn.Linear

    def __init__(self, key, channels=4):
        k1, k2 = jax.random.split(key)
        self.conv1 = eqx.nn.Conv2d(1, channels, 3, key=k1)
        self.pool = eqx.nn.AvgPool2d(2, 2)
        self.head = eqx.nn.Linear(channels * 3 * 3, 10, key=k2)

    def __call__(self, x):
        h = self.pool(jax.nn.relu(self.conv1(x)))
        return self.head(h.reshape(-1))


class GRU(eqx.Module):
    """A GRU cell run over a sequence with `lax.scan`; returns the last hidden state."""

    cell: eqx.nn.GRUCell

    def __call__(self, xs):
        def step(h, x):
            h = self.cell(x, h)
            return h, None

        h, _ = jax.lax.scan(step, jnp.zeros(self.cell.hidden_size, xs.dtype), xs)
        return h


class SeqClassifier(eqx.Module):
    rnn: GRU
    head: eqx.nn.Linear

    def __init__(self, key, n_in=3, hidden=5, n_out=2):
        k1, k2 = jax.random.split(key)
        self.rnn = GRU(eqx.nn.GRUCell(n_in, hidden, key=k1))
        self.head = eqx.nn.Linear(hidden, n_out, key=k2)

    def __call__(self, xs):
        return self.head(jnp.tanh(self.rnn(xs)))


class Block(eqx.Module):
    """Pre-norm transformer block (attention + MLP, both residual inside the block)."""

    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, dim, key):
        k1, k2 = jax.random.split(key)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(dim), eqx.nn.LayerNorm(dim)
        self.attn = eqx.nn.MultiheadAttention(2, dim, key=k1)
        self.mlp = eqx.nn.MLP(dim, dim, 2 * dim, 1, activation=jax.nn.gelu, key=k2)

    def __call__(self, x):
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h)
        return x + jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))


class ViT(eqx.Module):
    patch: eqx.nn.Linear
    pos: jax.Array
    blocks: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    size: int = eqx.field(static=True)

    def __init__(self, key, size=4, dim=8, depth=2, classes=3):
        ks = jax.random.split(key, depth + 3)
        self.size = size
        self.patch = eqx.nn.Linear(size * size, dim, key=ks[0])
        self.pos = 0.1 * jax.random.normal(ks[1], (4, dim))
        self.blocks = [Block(dim, k) for k in ks[2:-1]]
        self.norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, classes, key=ks[-1])

    def __call__(self, img):  # (1, 8, 8) -> 4 patches of 4x4
        s = self.size
        p = img.reshape(2, s, 2, s).transpose(0, 2, 1, 3).reshape(4, s * s)
        x = jax.vmap(self.patch)(p) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x.mean(0)))


def _energy(zs, mus):
    """Hand-written PC energy: 0.5 |z_l - mu_l|^2 summed over layers and samples."""
    return sum(0.5 * jnp.sum((z - m) ** 2) for z, m in zip(zs, mus))


def _check_energy(model, x, y, native_layers, tol):
    """pccore's energy at perturbed activities against the one written from native layers."""
    z = pccore.init_activities(model, x, y=y)  # the hidden latents
    assert len(z) == model.num_layers - 1
    z = [zi + 0.1 * jax.random.normal(jax.random.key(7 + i), zi.shape, zi.dtype)
         for i, zi in enumerate(z)]
    zs = [*z, y]
    ins = [x, *z]
    mus = [jax.vmap(f)(h) for f, h in zip(native_layers, ins)]
    want = _energy(zs, mus)
    got = pccore.energy(model, tuple(z), x=x, y=y)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.slow
def test_cnn_wraps_at_named_boundaries_and_unwraps_to_its_class(x64):
    cnn = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
                       CNN(jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (5, 1, 8, 8), jnp.float64)
    model = pccore.wrap(cnn, boundaries=["conv1", "head"], input_shape=(1, 8, 8))
    assert model.names == ("conv1", "head")
    assert [s.shape for s in model.out_shapes] == [(4, 6, 6), (10,)]
    back = model.unwrap()
    assert type(back) is CNN
    np.testing.assert_array_equal(eqx.filter_jit(lambda m, v: m(v))(model, x),
                                  eqx.filter_jit(lambda m, v: jax.vmap(m)(v))(back, x))
    np.testing.assert_allclose(model(x), jax.vmap(cnn)(x), rtol=1e-12)
    y = jax.random.normal(jax.random.key(2), (5, 10), jnp.float64)
    layers = [cnn.conv1, lambda h: cnn.head(cnn.pool(jax.nn.relu(h)).reshape(-1))]
    _check_energy(model, x, y, layers, 1e-10)


def test_boundaries_as_a_predicate_or_as_submodules_give_the_same_cut():
    cnn = CNN(jax.random.key(0))
    for b in (lambda m: isinstance(m, eqx.nn.Conv2d | eqx.nn.Linear), [cnn.head, cnn.conv1]):
        assert pccore.wrap(cnn, boundaries=b, input_shape=(1, 8, 8)).names == ("conv1", "head")


@pytest.mark.slow
def test_parameter_free_boundary_is_a_latent(x64):
    """A latent after the pooling layer: that layer has no parameters, its energy term stays."""
    cnn = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
                       CNN(jax.random.key(0)))
    model = pccore.wrap(cnn, boundaries=["conv1", "pool", "head"], input_shape=(1, 8, 8))
    assert model.names == ("conv1", "pool", "head")
    assert jax.tree.leaves(model.params[1]) == []
    x = jax.random.normal(jax.random.key(1), (3, 1, 8, 8), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (3, 10), jnp.float64)
    layers = [cnn.conv1, lambda v: cnn.pool(jax.nn.relu(v)), lambda h: cnn.head(h.reshape(-1))]
    _check_energy(model, x, y, layers, 1e-10)


@pytest.mark.slow
def test_parameter_free_layer_trains_with_mupc_and_regularisers(x64):
    """The core copes with a layer whose params are empty: fan-ins, muPC scalings,
    regularisers and a training step; that layer's (empty) params stay empty."""
    cnn = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
                       CNN(jax.random.key(0)))
    model = pccore.wrap(cnn, boundaries=["conv1", "pool", "head"], input_shape=(1, 8, 8))
    assert model.fan_ins(1) == () and model.weight_matrices(1) == []
    assert model.fan_ins(0) == (9,) and model.fan_ins(2) == (36,)
    x = jax.random.normal(jax.random.key(1), (3, 1, 8, 8), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (3, 10), jnp.float64)
    optim = optax.sgd(0.01)
    for energy in (pccore.PC(parameterisation=pccore.MuPC()),
                   pccore.PC(regularisers=(pccore.WeightDecay(0.1), pccore.SpectralPenalty(0.1)))):
        trained, _, _ = pccore.train_step(model, optim, optim.init(model.params), x=x, y=y,
                                          energy=energy)
        assert jax.tree.leaves(trained.params[1]) == []
        assert bool(jnp.all(jnp.isfinite(trained(x))))
        back = trained.unwrap()
        assert type(back) is CNN
        np.testing.assert_allclose(trained(x), jax.vmap(back)(x), rtol=1e-12)


def test_sequential_boundaries_keep_a_latent_after_a_parameter_free_layer(x64):
    k = jax.random.split(jax.random.key(0), 2)
    seq = eqx.nn.Sequential([eqx.nn.Linear(4, 6, key=k[0]), eqx.nn.Lambda(jnp.tanh),
                             eqx.nn.Identity(), eqx.nn.Linear(6, 3, key=k[1])])
    seq = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, seq)
    assert pccore.wrap(seq).num_layers == 2
    model = pccore.wrap(seq, boundaries=[0, 1, 3])
    assert model.names == ("0:Linear", "1:Lambda+2:Identity", "3:Linear")
    by_pred = pccore.wrap(list(seq.layers), boundaries=lambda m: not isinstance(m, eqx.nn.Identity))
    assert by_pred.names == ("0:Linear", "1:Lambda+2:Identity", "3:Linear")
    x = jax.random.normal(jax.random.key(1), (4, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (4, 3), jnp.float64)
    L = seq.layers
    _check_energy(model, x, y, [L[0], jnp.tanh, L[3]], 1e-10)
    with pytest.raises(ValueError, match=r"`boundaries`: expected increasing element indices in 0..3"):
        pccore.wrap(seq, boundaries=[1, 0])
    with pytest.raises(TypeError, match=r"`boundaries`: for model.layers these are the indices"):
        pccore.wrap(seq, boundaries=["0"])


def test_gru_over_lax_scan_is_one_boundary():
    model_eqx = SeqClassifier(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (4, 6, 3))
    model = pccore.wrap(model_eqx, boundaries=["rnn", "head"], input_shape=(6, 3))
    assert model.names == ("rnn", "head")
    back = model.unwrap()
    assert type(back) is SeqClassifier
    np.testing.assert_allclose(model(xs), jax.vmap(model_eqx)(xs), rtol=1e-6, atol=1e-6)
    y = jax.random.normal(jax.random.key(2), (4, 2))
    _check_energy(model, xs, y, [model_eqx.rnn, lambda h: model_eqx.head(jnp.tanh(h))], 1e-5)
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"`boundaries`: 'rnn.cell' is called inside a jax.vmap, lax.scan"):
        pccore.wrap(model_eqx, boundaries=["rnn.cell", "head"], input_shape=(6, 3))


@pytest.mark.slow
def test_vit_with_layernorm_and_attention():
    vit = ViT(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 1, 8, 8))
    model = pccore.wrap(vit, boundaries=["blocks[0]", "blocks[1]", "head"], input_shape=(1, 8, 8))
    assert model.names == ("blocks[0]", "blocks[1]", "head")
    back = model.unwrap()
    assert type(back) is ViT
    np.testing.assert_allclose(model(x), jax.vmap(vit)(x), rtol=1e-5, atol=1e-5)
    # the positional embedding (an array of the top-level module) belongs to layer 0,
    # the final norm to the last
    assert jax.tree.leaves(model.params[0].pos)
    assert jax.tree.leaves(model.params[2].norm)

    def patches(img):
        return img.reshape(2, 4, 2, 4).transpose(0, 2, 1, 3).reshape(4, 16)

    layers = [lambda img: vit.blocks[0](jax.vmap(vit.patch)(patches(img)) + vit.pos),
              vit.blocks[1], lambda h: vit.head(vit.norm(h.mean(0)))]
    y = jax.random.normal(jax.random.key(2), (3, 3))
    _check_energy(model, x, y, layers, 1e-5)
    with pytest.raises(pccore.UnsupportedLayerError, match=r"'patch' is called inside a jax.vmap"):
        pccore.wrap(vit, boundaries=["patch", "head"], input_shape=(1, 8, 8))


class ListMLP(eqx.Module):
    layers: list

    def __init__(self, key):
        k = jax.random.split(key, 2)
        self.layers = [eqx.nn.Linear(4, 6, key=k[0]), eqx.nn.Lambda(jnp.tanh),
                       eqx.nn.Identity(), eqx.nn.Linear(6, 3, key=k[1])]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_layers_held_in_a_list_and_an_inferred_input_shape():
    mlp = ListMLP(jax.random.key(0))
    with pytest.raises(ValueError, match=r"in call order: \['layers\[0\]', 'layers\[3\]'\]\. "
                                         r"Name the boundaries, e\.g\. `pccore\.wrap\(model, "
                                         r"boundaries=\['layers\[0\]', 'layers\[3\]'\]\)`"):
        pccore.wrap(mlp)
    model = pccore.wrap(mlp, boundaries=["layers[0]", "layers[2]", "layers[3]"])
    assert model.in_shape.shape == (4,)
    assert model.names == ("layers[0]", "layers[2]", "layers[3]")
    x = jax.random.normal(jax.random.key(1), (2, 4))
    np.testing.assert_allclose(model(x), jax.vmap(mlp)(x), rtol=1e-6)
    assert type(model.unwrap()) is ListMLP


def test_a_single_equinox_layer_is_a_one_layer_model():
    lin = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    model = pccore.wrap(lin)
    assert model.names == ("Linear",)
    x = jax.random.normal(jax.random.key(1), (2, 4))
    np.testing.assert_allclose(model(x), jax.vmap(lin)(x), rtol=1e-6)
    assert type(model.unwrap()) is eqx.nn.Linear


def test_missing_boundaries_list_the_candidates():
    cnn = CNN(jax.random.key(0))
    with pytest.raises(ValueError, match=r"(?s)`boundaries`: CNN is an Equinox module of your own "
                       r"class.*in call order: \['conv1', 'head'\].*"
                       r"boundaries=\['conv1', 'head'\], input_shape=\(1, 8, 8\)\)"):
        pccore.wrap(cnn, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"in attribute order: \['conv1', 'head'\].*input_shape=\(\.\.\.\)"):
        pccore.wrap(cnn)


def test_bad_boundaries_are_refused():
    cnn = CNN(jax.random.key(0))
    with pytest.raises(ValueError, match=r"`boundaries`: CNN has no submodule 'conv2'; its "
                                         r"submodules: \['conv1', 'pool', 'head'\]"):
        pccore.wrap(cnn, boundaries=["conv2"], input_shape=(1, 8, 8))
    with pytest.raises(TypeError, match=r"`boundaries`: expected a list"):
        pccore.wrap(cnn, boundaries="conv1", input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"the predicate matches no submodule of CNN"):
        pccore.wrap(cnn, boundaries=lambda m: False, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"is not a submodule of CNN"):
        pccore.wrap(cnn, boundaries=[CNN(jax.random.key(0)).conv1], input_shape=(1, 8, 8))
    with pytest.raises(TypeError, match=r"entries are submodule paths \(str\) or submodules; got int"):
        pccore.wrap(cnn, boundaries=[0], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"`boundaries`: empty"):
        pccore.wrap(cnn, boundaries=[], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"`input_shape`: cannot infer the per-sample input shape of CNN"):
        pccore.wrap(cnn, boundaries=["conv1", "head"])
    with pytest.raises(ValueError, match=r"`variables`: a module of your own class \(CNN\)"):
        pccore.wrap(cnn, {"a": 1}, boundaries=["conv1", "head"], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"`args`/`kwargs`: an MLP takes only the sample"):
        pccore.wrap(eqx.nn.MLP(2, 2, 2, 1, key=jax.random.key(0)), kwargs={"a": 1})
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"`model`: model.blocks\[0\].drop is eqx.nn.Dropout in training mode"):
        pccore.wrap(WithDropout([Dropping(eqx.nn.Linear(2, 2, key=jax.random.key(0)),
                                          eqx.nn.Dropout(0.5))]), boundaries=["blocks[0]"])
    with pytest.raises(ValueError, match=r"`boundaries`: an eqx.nn.MLP is one layer per Linear"):
        pccore.wrap(eqx.nn.MLP(2, 2, 2, 1, key=jax.random.key(0)), boundaries=[0])


class Dropping(eqx.Module):
    lin: eqx.nn.Linear
    drop: eqx.nn.Dropout

    def __call__(self, x):
        return self.drop(self.lin(x))


class WithDropout(eqx.Module):
    blocks: list

    def __call__(self, x):
        return self.blocks[0](x)


class Residual(eqx.Module):
    a: eqx.nn.Linear
    b: eqx.nn.Linear
    c: eqx.nn.Linear

    def __call__(self, x):
        h = self.a(x)
        return self.c(jnp.tanh(self.b(jnp.tanh(h)))) + h  # a skip around boundary b


class Unused(eqx.Module):
    a: eqx.nn.Linear
    extra: jax.Array

    def __call__(self, x):
        return self.a(x)


def test_non_chains_and_unused_parameters_are_refused():
    k = jax.random.split(jax.random.key(0), 3)
    res = Residual(*(eqx.nn.Linear(3, 3, key=ki) for ki in k))
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"is not a chain of its layers: layer 2 \('c'\) reads the output of layer 0"):
        pccore.wrap(res, boundaries=["a", "b", "c"])
    unused = Unused(eqx.nn.Linear(3, 3, key=k[0]), jnp.ones(2))
    with pytest.raises(ValueError, match=r"parameter 'extra' of the Equinox module Unused is not used"):
        pccore.wrap(unused, boundaries=["a"])


class TokenModel(eqx.Module):
    embed: eqx.nn.Embedding
    head: eqx.nn.Linear

    def __call__(self, tokens):
        return self.head(jnp.tanh(jax.vmap(self.embed)(tokens)).mean(0))


def test_token_models_take_int32_inputs():
    k = jax.random.split(jax.random.key(0), 2)
    seq = eqx.nn.Sequential([eqx.nn.Embedding(10, 4, key=k[0]), eqx.nn.Lambda(jnp.tanh),
                             eqx.nn.Linear(4, 3, key=k[1])])
    model = pccore.wrap(seq)
    assert model.in_shape == jax.ShapeDtypeStruct((), jnp.int32)
    tokens = jnp.array([1, 4, 9])
    np.testing.assert_allclose(model(tokens), jax.vmap(seq)(tokens), rtol=1e-6)
    y = jax.random.normal(jax.random.key(2), (3, 3))
    z = pccore.init_activities(model, tokens, y=y)
    z = (z[0] + 0.1,)
    mus = [jax.vmap(lambda t: jnp.tanh(seq.layers[0](t)))(tokens), jax.vmap(seq.layers[2])(z[0])]
    np.testing.assert_allclose(pccore.energy(model, z, x=tokens, y=y), _energy([*z, y], mus),
                               rtol=1e-5)
    custom = TokenModel(eqx.nn.Embedding(10, 4, key=k[0]), eqx.nn.Linear(4, 3, key=k[1]))
    with pytest.raises(ValueError, match=r"a token sequence, e.g. `input_shape=\(seq_len,\)`"):
        pccore.wrap(custom, boundaries=["embed", "head"])
    with pytest.raises(pccore.UnsupportedLayerError, match=r"'embed' is called inside a jax.vmap"):
        pccore.wrap(custom, boundaries=["embed", "head"], input_shape=(5,))
    m = pccore.wrap(custom, boundaries=["head"], input_shape=(5,))
    assert m.in_shape.dtype == jnp.int32
    toks = jax.random.randint(jax.random.key(3), (2, 5), 0, 10)
    np.testing.assert_allclose(m(toks), jax.vmap(custom)(toks), rtol=1e-6)


class Embed(eqx.Module):
    """An embedding applied per token: the module containing the vmap is the boundary."""

    table: eqx.nn.Embedding

    def __call__(self, tokens):
        return jax.vmap(self.table)(tokens)


class Mix(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, h):
        return jnp.tanh(jax.vmap(self.lin)(h))


class TokenClassifier(eqx.Module):
    """Pads (token 0) are masked out after the mixing layer: a later layer reads the tokens."""

    embed: Embed
    mix: Mix
    head: eqx.nn.Linear

    def __init__(self, key, vocab=7, dim=4, classes=3):
        k = jax.random.split(key, 3)
        self.embed = Embed(eqx.nn.Embedding(vocab, dim, key=k[0]))
        self.mix = Mix(eqx.nn.Linear(dim, dim, key=k[1]))
        self.head = eqx.nn.Linear(dim, classes, key=k[2])

    def __call__(self, tokens):
        h = self.mix(self.embed(tokens)) * (tokens != 0)[:, None]
        return self.head(h.mean(0))


@pytest.mark.slow  # over 3.5 s: the fast set keeps a margin under its 5 minutes
def test_token_model_reading_its_tokens_in_a_later_layer(x64):
    net = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
                       TokenClassifier(jax.random.key(0)))
    model = pccore.wrap(net, boundaries=["embed", "mix", "head"], input_shape=(5,))
    assert model.in_shape == jax.ShapeDtypeStruct((5,), jnp.int32)
    assert model.reads_input == (False, False, True)
    toks = jnp.array([[1, 2, 3, 0, 0], [4, 5, 6, 1, 0], [2, 2, 0, 0, 0]], jnp.int32)
    np.testing.assert_allclose(model(toks), jax.vmap(net)(toks), rtol=1e-12)
    y = jax.random.normal(jax.random.key(2), (3, 3), jnp.float64)
    z = [zi + 0.1 * jax.random.normal(jax.random.key(7 + i), zi.shape, zi.dtype)
         for i, zi in enumerate(pccore.init_activities(model, toks, y=y))]
    mus = [jax.vmap(net.embed)(toks), jax.vmap(net.mix)(z[0]),
           jax.vmap(lambda h, t: net.head((h * (t != 0)[:, None]).mean(0)))(z[1], toks)]
    want = _energy([*z, y], mus)
    np.testing.assert_allclose(pccore.energy(model, tuple(z), x=toks, y=y), want, rtol=1e-10)
    optim = optax.sgd(0.1)
    trained, _, _ = pccore.train_step(model, optim, optim.init(model.params), x=toks, y=y)
    assert type(trained.unwrap()) is TokenClassifier


@pytest.mark.slow
def test_cnn_trains_on_digits():
    data = pccore.datasets.load_digits()
    x, y = jnp.asarray(data.x_train).reshape(-1, 1, 8, 8), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test).reshape(-1, 1, 8, 8), jnp.asarray(data.y_test)
    model = pccore.wrap(CNN(jax.random.key(0), channels=8), boundaries=["conv1", "head"],
                        input_shape=(1, 8, 8))
    optim = optax.adam(1e-2)
    state = optim.init(model.params)
    for epoch in range(3):
        for i in range(0, len(x), 64):
            model, state, _ = pccore.train_step(model, optim, state, x=x[i:i + 64], y=y[i:i + 64])
    acc = jnp.mean(jnp.argmax(model(xt), -1) == jnp.argmax(yt, -1))
    assert acc > 0.5, acc
    assert type(model.unwrap()) is CNN


class ResBlock(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d

    def __call__(self, x):
        return jax.nn.relu(x + self.conv2(jax.nn.relu(self.conv1(x))))


class ResNet(eqx.Module):
    stem: eqx.nn.Conv2d
    blocks: list
    head: eqx.nn.Linear

    def __init__(self, key, c=3):
        ks = jax.random.split(key, 6)
        self.stem = eqx.nn.Conv2d(1, c, 3, padding=1, key=ks[0])
        self.blocks = [ResBlock(eqx.nn.Conv2d(c, c, 3, padding=1, key=ks[1 + 2 * i]),
                                eqx.nn.Conv2d(c, c, 3, padding=1, key=ks[2 + 2 * i]))
                       for i in range(2)]
        self.head = eqx.nn.Linear(c, 4, key=ks[5])

    def __call__(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((1, 2)))


@pytest.mark.slow
def test_resnet_blocks_are_boundaries_and_their_insides_are_not(x64):
    net = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
                       ResNet(jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (2, 1, 6, 6), jnp.float64)
    model = pccore.wrap(net, boundaries=["stem", "blocks[0]", "blocks[1]", "head"],
                        input_shape=(1, 6, 6))
    np.testing.assert_allclose(model(x), jax.vmap(net)(x), rtol=1e-12)
    y = jax.random.normal(jax.random.key(2), (2, 4), jnp.float64)
    _check_energy(model, x, y, [net.stem, net.blocks[0], net.blocks[1],
                                lambda h: net.head(h.mean((1, 2)))], 1e-10)
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"layer 3 \('head'\) reads the output of layer 0 \('stem'\)"):
        pccore.wrap(net, boundaries=["stem", "blocks[0].conv1", "blocks[0].conv2", "head"],
                    input_shape=(1, 6, 6))


class Twice(eqx.Module):
    a: eqx.nn.Linear
    b: eqx.nn.Linear

    def __call__(self, x):
        return self.b(self.a(self.a(x)))


def test_boundaries_called_twice_out_of_order_or_never_are_refused():
    k = jax.random.split(jax.random.key(0), 2)
    m = Twice(eqx.nn.Linear(3, 3, key=k[0]), eqx.nn.Linear(3, 2, key=k[1]))
    with pytest.raises(ValueError, match=r"`boundaries`: \['a'\] are called more than once per "
                                         r"forward pass of Twice"):
        pccore.wrap(m, boundaries=["a", "b"])
    with pytest.raises(ValueError, match=r"given as \['head', 'conv1'\] but called in the order \['conv1', 'head'\]"):
        pccore.wrap(CNN(jax.random.key(0)), boundaries=["head", "conv1"], input_shape=(1, 8, 8))
    seq = SeqClassifier(jax.random.key(0))
    never = eqx.tree_at(lambda s: s.rnn, seq, GRUNoCall(seq.rnn.cell))
    with pytest.raises(ValueError, match=r"`boundaries`: \['rnn.cell'\] are never called"):
        pccore.wrap(never, boundaries=["rnn.cell", "head"], input_shape=(6, 3))


class GRUNoCall(eqx.Module):
    """Holds a cell it never calls (a bug the boundary check names)."""

    cell: eqx.nn.GRUCell

    def __call__(self, xs):
        return jnp.zeros(self.cell.hidden_size) + xs.sum()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gru", "vit"])
def test_gru_and_vit_train_on_digits(kind):
    """The GRU reads an image's 8 rows as a sequence; the ViT its four 4x4 patches. Both
    train above chance (0.1), and `unwrap()` gives the class whose forward equals pccore's."""
    data = pccore.datasets.load_digits()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    if kind == "gru":
        net = SeqClassifier(jax.random.key(0), n_in=8, hidden=32, n_out=10)
        model = pccore.wrap(net, boundaries=["rnn", "head"], input_shape=(8, 8))
        shape = (-1, 8, 8)
    else:
        net = ViT(jax.random.key(0), classes=10)
        model = pccore.wrap(net, boundaries=["blocks[0]", "blocks[1]", "head"],
                            input_shape=(1, 8, 8))
        shape = (-1, 1, 8, 8)
    x, xt = x.reshape(shape), xt.reshape(shape)
    energy = pccore.PC(loss=pccore.CrossEntropy())
    opt = optax.adam(3e-3)
    opt_state = opt.init(model.params)
    for epoch in range(8):
        for i in range(0, len(x) - 63, 64):
            model, opt_state, stats = pccore.train_step(
                model, opt, opt_state, x=x[i:i + 64], y=y[i:i + 64], energy=energy, dt0=0.05)
    acc = float(pccore.evaluate(model, xt, yt, energy=energy).accuracy)
    assert acc > 0.5, acc  # chance is 0.1
    back = model.unwrap()
    assert type(back) is type(net)
    np.testing.assert_allclose(jax.vmap(back)(xt), model(xt), rtol=1e-5, atol=1e-5)
