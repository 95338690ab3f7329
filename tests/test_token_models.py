"""Token (integer-input) models: transformer LMs in Haiku, Flax Linen and Flax NNX.

Each starts with an embedding (so it takes int32 token ids, inferred or given with `dtype=`),
and its attention blocks build a causal + padding mask from the tokens inside the block, so
those layers read the clamped model input besides their own input (`reads_input`). Oracles:
the native forward pass, and the PC energy written out by hand (float64) from the params.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore

V, S, D, H = 5, 6, 8, 2  # vocabulary (0 is padding), sequence length, model width, heads
PAD = 0
CE = pccore.PC(loss=pccore.CrossEntropy())


def _mask(tokens: jax.Array) -> jax.Array:
    """(batch, 1, S, S) causal mask that also hides padding keys (a query sees itself)."""
    causal = jnp.tril(jnp.ones((S, S), bool))
    keep = (tokens != PAD)[:, None, None, :] | jnp.eye(S, dtype=bool)
    return causal & keep


def _tokens(key, n=4) -> jax.Array:
    """Token batches with padding at the start of some rows."""
    t = jax.random.randint(key, (n, S), 1, V).astype(jnp.int32)
    return t.at[0, :2].set(PAD)


def _next_token_targets(tokens) -> jax.Array:
    return jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), V)


def _tol(dtype) -> dict:
    eps = float(jnp.finfo(dtype).eps)
    return dict(rtol=1e3 * eps, atol=1e3 * eps)


def _to(dtype, tree):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


# -- attention and energy written by hand ---------------------------------------------------


def _attention(q, k, v, mask):
    """Multi-head attention on (batch, S, H*K) projections, the mask given per batch row."""
    B = q.shape[0]
    split = lambda a: a.reshape(B, S, H, -1)
    q, k, v = split(q), split(k), split(v)
    logits = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, -jnp.inf)
    return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, axis=-1), v).reshape(B, S, -1)


def _energy_by_hand(layers, zs, tokens, y):
    r"""$\sum_l \frac12 \lVert z_l - f_l(z_{l-1}, x) \rVert^2 + CE(f_L(z_{L-1}, x), y)$, z_0 = x."""
    chain = (tokens, *zs)
    total = sum(0.5 * jnp.sum((chain[l] - layers[l - 1](chain[l - 1], tokens)) ** 2)
                for l in range(1, len(layers)))
    logits = layers[-1](chain[-1], tokens)
    return total - jnp.sum(y * jax.nn.log_softmax(logits, axis=-1))


def _random_activities(model, tokens, key):
    shapes = [s.shape for s in model.out_shapes[:-1]]
    keys = jax.random.split(key, len(shapes))
    dtype = model.out_shapes[0].dtype
    return tuple(jax.random.normal(k, (tokens.shape[0], *s), dtype) for k, s in zip(keys, shapes))


# -- Haiku ----------------------------------------------------------------------------------

hk = pytest.importorskip("haiku")


class _HkBlock(hk.Module):
    def __call__(self, h, tokens):
        attn = hk.MultiHeadAttention(H, D // H, w_init=hk.initializers.VarianceScaling(1.0))
        h = h + attn(h, h, h, mask=_mask(tokens))
        return h + hk.Linear(D, name="down")(jnp.tanh(hk.Linear(D, name="up")(h)))


def _hk_lm(tokens):
    h = hk.Embed(V, D, name="embed")(tokens)
    for i in range(2):
        h = _HkBlock(name=f"block_{i}")(h, tokens)
    return hk.Linear(V, name="head")(h)


HK_BOUNDARIES = ["embed", "block_0", "block_1", "head"]


def _haiku(dtype=jnp.float32):
    f = hk.without_apply_rng(hk.transform(_hk_lm))
    params = _to(dtype, f.init(jax.random.key(1), _tokens(jax.random.key(0))))
    return f, params


def _hk_layers(p):
    lin = lambda name, a: a @ p[name]["w"] + p[name]["b"]

    def block(i):
        def f(h, tokens):
            pre = f"block_{i}/multi_head_attention/"
            a = _attention(lin(pre + "query", h), lin(pre + "key", h), lin(pre + "value", h),
                           _mask(tokens))
            h = h + lin(pre + "linear", a)
            return h + lin(f"block_{i}/down", jnp.tanh(lin(f"block_{i}/up", h)))
        return f

    return [lambda t, _: p["embed"]["embeddings"][t], block(0), block(1),
            lambda h, _: lin("head", h)]


@pytest.mark.slow
def test_haiku_lm_infers_int_tokens_and_equals_native():
    f, params = _haiku()
    model = pccore.wrap(f, params, input_shape=(S,), boundaries=HK_BOUNDARIES)
    assert model.in_shape == jax.ShapeDtypeStruct((S,), jnp.int32)
    assert model.reads_input == (False, True, True, False)
    assert [s.shape for s in model.out_shapes] == [(S, D), (S, D), (S, D), (S, V)]
    x = _tokens(jax.random.key(1), 3)
    np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(model, x), f.apply(params, x),
                               rtol=1e-6, atol=1e-6)
    new = model.with_params(jax.tree_util.tree_map(lambda a: a + 1.0, model.params)).unwrap()
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b + 1.0), new, params)
    given = pccore.wrap(f, params, input_shape=(S,), boundaries=HK_BOUNDARIES, dtype=jnp.int32)
    assert given.in_shape.dtype == jnp.int32


@pytest.mark.slow
def test_haiku_lm_energy_equals_hand_written(x64):
    f, params = _haiku(jnp.float64)
    model = pccore.wrap(f, params, input_shape=(S,), boundaries=HK_BOUNDARIES)
    x = _tokens(jax.random.key(3))
    y = _next_token_targets(x)
    zs = _random_activities(model, x, jax.random.key(4))
    got = pccore.energy(model, zs, x=x, y=y, energy=CE)
    want = _energy_by_hand(_hk_layers(params), zs, x, y)
    np.testing.assert_allclose(got, want, **_tol(jnp.float64))
    terms = pccore.layer_energies(model, zs, x=x, y=y, energy=CE)
    np.testing.assert_allclose(terms.sum(), want, **_tol(jnp.float64))
    # ePC infers errors, on the same chain: at the errors of these activities, the same energy
    epc = pccore.EPC(loss=pccore.CrossEntropy())
    errors = epc.init(model, x, y, pccore.FeedForward(), None)
    ff = pccore.init_activities(model, x)
    np.testing.assert_allclose(pccore.energy(model, errors, x=x, y=y, energy=epc),
                               pccore.energy(model, ff, x=x, y=y, energy=CE), **_tol(jnp.float64))


@pytest.mark.slow
def test_integer_x_in_every_entry_point():
    f, params = _haiku()
    model = pccore.wrap(f, params, input_shape=(S,), boundaries=HK_BOUNDARIES)
    x = _tokens(jax.random.key(5))
    y = _next_token_targets(x)
    for tokens in (x, np.asarray(x), np.asarray(x, np.int64)):
        e = pccore.evaluate(model, tokens, y, energy=CE)
        np.testing.assert_allclose(
            e.loss, optax.softmax_cross_entropy(f.apply(params, x), y).sum(-1).mean(), rtol=1e-5)
    ff = pccore.init_activities(model, x)
    out = float(pccore.CrossEntropy()(f.apply(params, x), y).sum())
    np.testing.assert_allclose(pccore.energy(model, ff, x=x, y=y, energy=CE), out, rtol=1e-5)
    sol = pccore.infer(model, x=x, y=y, energy=CE, t1=1.0, dt0=0.1)
    assert float(sol.energy) < out  # inference lowers the energy from the feed-forward pass
    opt = optax.sgd(0.05)
    new, _, stats = pccore.train_step(model, opt, opt.init(model.params), x=x, y=y, energy=CE,
                                      t1=1.0, dt0=0.1)
    assert bool(stats.updated)
    assert float(pccore.evaluate(new, x, y, energy=CE).loss) < float(e.loss)


@pytest.mark.slow  # over 3.5 s: the fast set keeps a margin under its 5 minutes
def test_dtype_mismatches_are_refused_by_name():
    f, params = _haiku()
    model = pccore.wrap(f, params, input_shape=(S,), boundaries=HK_BOUNDARIES)
    x = _tokens(jax.random.key(6))
    y = _next_token_targets(x)
    zs = pccore.init_activities(model, x)
    with pytest.raises(TypeError, match=r"`x` has dtype float32; expected int32: this model "
                                        r"takes integer \(token ids\) inputs \(its "
                                        r"`in_shape.dtype` is int32\)\. Pass `x` as int32"):
        pccore.energy(model, zs, x=x.astype(jnp.float32), y=y, energy=CE)
    with pytest.raises(TypeError, match=r"`x` has dtype bool; expected int32"):
        pccore.evaluate(model, x > 2, y, energy=CE)
    with pytest.raises(TypeError, match=r"`y` has dtype int32; expected float32 or float64\. "
                                        r"Cast it first"):
        pccore.energy(model, zs, x=x, y=jnp.roll(x, -1, 1)[..., None].repeat(V, -1), energy=CE)
    with pytest.raises(ValueError, match=r"`x` is None \(a free bottom latent z_0\), but this "
                                         r"model takes int32 inputs.*a token model cannot have a "
                                         r"free input latent"):
        pccore.init_activities(model, y=y, energy=CE, init=pccore.RandomNormal(),
                               key=jax.random.key(0))
    float_model = pccore.wrap(*_haiku_mlp())
    with pytest.raises(TypeError, match=r"`x` has dtype int32; expected float32 or float64\. "
                                        r"Cast it first, e\.g\. `x\.astype\(jnp\.float32\)`: this "
                                        r"model takes float32 inputs .*wrap the model with "
                                        r"`dtype=jnp\.int32`"):
        pccore.evaluate(float_model, jnp.ones((2, 4), jnp.int32), jnp.ones((2, 3)))


def _haiku_mlp(skip_from_input=False, bias=True):
    def fn(x):
        h = hk.Linear(4, with_bias=bias, name="d1")(x)
        h = h if not bias else jnp.tanh(h)
        out = hk.Linear(4 if skip_from_input else 3, with_bias=bias, name="d2")(h)
        return out + x if skip_from_input else out

    f = hk.without_apply_rng(hk.transform(fn))
    return f, f.init(jax.random.key(1), jnp.ones((2, 4)))


def test_layer_reading_the_input_needs_x():
    """A layer that reads the clamped input cannot run with a free bottom; the linear theory,
    which needs f_l(z) = W_l z, refuses it too."""
    f, params = _haiku_mlp(skip_from_input=True)
    model = pccore.wrap(f, params)
    assert model.reads_input == (False, True)
    y = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"`x`: layer 1 \('d2'\) reads the clamped model input "
                                         r"`x`.*but `x` is None \(a free bottom\)\. .*pass `x`"):
        pccore.init_activities(model, y=y, init=pccore.RandomNormal(), key=jax.random.key(0))
    linear = pccore.wrap(*_haiku_mlp(skip_from_input=True, bias=False))
    with pytest.raises(ValueError, match=r"layer 1 \('d2'\) reads the clamped model input "
                                         r"besides its own input; the linear theory"):
        pccore.theory.linear_maps(linear)


def test_skip_from_another_layer_is_still_refused():
    def fn(tokens):  # block_1 also reads the embedding, around the block_0 boundary
        e = hk.Embed(V, D, name="embed")(tokens)
        h = _HkBlock(name="block_0")(e, tokens)
        return hk.Linear(V, name="head")(_HkBlock(name="block_1")(h, tokens) + e)

    f = hk.without_apply_rng(hk.transform(fn))
    params = f.init(jax.random.key(1), _tokens(jax.random.key(0)))
    with pytest.raises(pccore.UnsupportedLayerError,
                       match=r"layer 2 \('block_1'\) reads the model input and parameters of layer 0 "
                             r"\('embed'\) besides its own input"):
        pccore.wrap(f, params, input_shape=(S,), boundaries=HK_BOUNDARIES[:3])


# -- Flax Linen -----------------------------------------------------------------------------

nn = pytest.importorskip("flax.linen")


class _LnBlock(nn.Module):
    @nn.compact
    def __call__(self, h, tokens):
        attn = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D, name="attn")
        h = h + attn(h, h, mask=_mask(tokens))
        return h + nn.Dense(D, name="down")(jnp.tanh(nn.Dense(D, name="up")(h)))


class _LnLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(V, D, name="embed")(tokens)
        for i in range(2):
            h = _LnBlock(name=f"block_{i}")(h, tokens)
        return nn.Dense(V, name="head")(h)


def _linen(dtype=jnp.float32):
    m = _LnLM()
    v = m.init(jax.random.key(1), _tokens(jax.random.key(0)))
    return m, _to(dtype, v)


def _ln_layers(p):
    dense = lambda q, a: a @ q["kernel"].reshape(a.shape[-1], -1) + q["bias"].reshape(-1)

    def block(i):
        def f(h, tokens):
            b = p[f"block_{i}"]
            a = _attention(dense(b["attn"]["query"], h), dense(b["attn"]["key"], h),
                           dense(b["attn"]["value"], h), _mask(tokens))
            out = b["attn"]["out"]
            h = h + a @ out["kernel"].reshape(-1, D) + out["bias"]
            return h + dense(b["down"], jnp.tanh(dense(b["up"], h)))
        return f

    return [lambda t, _: p["embed"]["embedding"][t], block(0), block(1),
            lambda h, _: dense(p["head"], h)]


def test_linen_lm_equals_native_and_round_trips():
    m, v = _linen()
    model = pccore.wrap(m, v, input_shape=(S,), boundaries=["embed", "block_0", "block_1", "head"])
    assert model.in_shape == jax.ShapeDtypeStruct((S,), jnp.int32)
    assert model.reads_input == (False, True, True, False)
    x = _tokens(jax.random.key(7))
    np.testing.assert_allclose(model(x), m.apply(v, x), rtol=1e-6, atol=1e-6)
    new = model.with_params(jax.tree_util.tree_map(lambda a: a * 2.0, model.params)).unwrap()
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(v)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, 2.0 * b), new, v)
    given = pccore.wrap(m, v, input_shape=(S,), dtype=jnp.int32,
                        boundaries=["embed", "block_0", "block_1", "head"])
    np.testing.assert_array_equal(given(x), model(x))


@pytest.mark.slow
def test_linen_lm_energy_equals_hand_written(x64):
    m, v = _linen(jnp.float64)
    model = pccore.wrap(m, v, input_shape=(S,), boundaries=["embed", "block_0", "block_1", "head"])
    x = _tokens(jax.random.key(8))
    y = _next_token_targets(x)
    zs = _random_activities(model, x, jax.random.key(9))
    want = _energy_by_hand(_ln_layers(v["params"]), zs, x, y)
    np.testing.assert_allclose(pccore.energy(model, zs, x=x, y=y, energy=CE), want,
                               **_tol(jnp.float64))


# -- Flax NNX -------------------------------------------------------------------------------

nnx = pytest.importorskip("flax.nnx")


class _NnxAttention(nnx.Module):
    """One-head causal attention whose mask comes from the tokens."""

    def __init__(self, rngs, dtype):
        mk = lambda: nnx.Linear(D, D, rngs=rngs, param_dtype=dtype)
        self.q, self.k, self.v, self.o = mk(), mk(), mk(), mk()

    def __call__(self, h, tokens):
        logits = jnp.einsum("btd,bsd->bts", self.q(h), self.k(h)) / math.sqrt(D)
        logits = jnp.where(_mask(tokens)[:, 0], logits, -jnp.inf)
        return h + self.o(jax.nn.softmax(logits, axis=-1) @ self.v(h))


class _NnxLM(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.embed = nnx.Embed(V, D, rngs=rngs, param_dtype=dtype)
        self.block = _NnxAttention(rngs, dtype)
        self.head = nnx.Linear(D, V, rngs=rngs, param_dtype=dtype)

    def __call__(self, tokens):
        return self.head(self.block(self.embed(tokens), tokens))


NNX_BOUNDARIES = ["embed", "block", "head"]


def _nnx_layers(m):
    b = m.block
    lin = lambda l, a: a @ l.kernel[...] + l.bias[...]

    def block(h, tokens):
        logits = jnp.einsum("btd,bsd->bts", lin(b.q, h), lin(b.k, h)) / math.sqrt(D)
        w = jax.nn.softmax(jnp.where(_mask(tokens)[:, 0], logits, -jnp.inf), axis=-1)
        return h + lin(b.o, w @ lin(b.v, h))

    return [lambda t, _: m.embed.embedding[...][t], block, lambda h, _: lin(m.head, h)]


def test_nnx_lm_equals_native_and_round_trips():
    m = _NnxLM(nnx.Rngs(0))
    model = pccore.wrap(m, input_shape=(S,), boundaries=NNX_BOUNDARIES)
    assert model.names[0] == "embed" and model.names[2] == "head"
    assert model.in_shape == jax.ShapeDtypeStruct((S,), jnp.int32)
    assert model.reads_input == (False, True, False)
    x = _tokens(jax.random.key(10))
    np.testing.assert_allclose(model(x), m(x), rtol=1e-6, atol=1e-6)
    back = model.unwrap()
    assert type(back) is _NnxLM
    np.testing.assert_array_equal(back(x), m(x))


@pytest.mark.slow
def test_nnx_lm_energy_equals_hand_written(x64):
    m = _NnxLM(nnx.Rngs(0), jnp.float64)
    model = pccore.wrap(m, input_shape=(S,), dtype=jnp.int32, boundaries=NNX_BOUNDARIES)
    x = _tokens(jax.random.key(11))
    y = _next_token_targets(x)
    zs = _random_activities(model, x, jax.random.key(12))
    np.testing.assert_allclose(pccore.energy(model, zs, x=x, y=y, energy=CE),
                               _energy_by_hand(_nnx_layers(m), zs, x, y), **_tol(jnp.float64))


# -- Equinox (the core side: an int32 input shape from `dtype=`) -----------------------------


class _VEmbed(eqx.Module):
    emb: eqx.nn.Embedding

    def __call__(self, t, *, key=None):
        return jax.vmap(self.emb)(t)


class _VLinear(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, h, *, key=None):
        return jax.vmap(self.lin)(h)


def test_equinox_embedding_model_takes_integer_x():
    k = jax.random.split(jax.random.key(0), 3)
    native = eqx.nn.Sequential([
        _VEmbed(eqx.nn.Embedding(V, D, key=k[0])), _VLinear(eqx.nn.Linear(D, D, key=k[1])),
        eqx.nn.Lambda(jnp.tanh), _VLinear(eqx.nn.Linear(D, V, key=k[2])),
    ])
    model = pccore.wrap(native, dtype=jnp.int32, input_shape=(S,))
    assert model.in_shape == jax.ShapeDtypeStruct((S,), jnp.int32)
    x = _tokens(jax.random.key(13))
    y = _next_token_targets(x)
    np.testing.assert_allclose(model(x), jax.vmap(native)(x), rtol=1e-6, atol=1e-6)
    opt = optax.sgd(0.05)
    _, _, stats = pccore.train_step(model, opt, opt.init(model.params), x=x, y=y, energy=CE,
                                    t1=0.5, dt0=0.1)
    assert bool(stats.updated)
    with pytest.raises(TypeError, match=r"`x` has dtype float32; expected int32"):
        pccore.evaluate(model, x.astype(jnp.float32), y, energy=CE)


# -- training -------------------------------------------------------------------------------


def _pattern_batch(key, n):
    """Windows of the cycle 1, 2, 3, 4 at random offsets: the next token is determined."""
    starts = jax.random.randint(key, (n, 1), 0, V - 1)
    tokens = (starts + jnp.arange(S + 1)) % (V - 1) + 1
    return tokens[:, :-1].astype(jnp.int32), jax.nn.one_hot(tokens[:, 1:], V)


@pytest.mark.slow
def test_haiku_lm_learns_a_repeating_pattern_with_train_step():
    f, params = _haiku()
    model = pccore.wrap(f, params, input_shape=(S,), boundaries=HK_BOUNDARIES)
    opt = optax.adam(3e-3)
    state = opt.init(model.params)
    x_test, y_test = _pattern_batch(jax.random.key(99), 64)
    before = float(pccore.evaluate(model, x_test, y_test, energy=CE).accuracy)
    for step in range(150):
        x, y = _pattern_batch(jax.random.key(step), 32)
        model, state, stats = pccore.train_step(model, opt, state, x=x, y=y, energy=CE,
                                                t1=1.0, dt0=0.2)
    acc = float(pccore.evaluate(model, x_test, y_test, energy=CE).accuracy)
    assert acc > max(0.9, before + 0.3), (before, acc)  # chance is 1/4 over the 4 live tokens


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["flax.linen", "flax.nnx"])
def test_linen_and_nnx_lms_learn_the_repeating_pattern(framework):
    """The next token is determined by the current one: above the unigram baseline (1/4
    over the four live tokens), and the unwrapped model predicts as pccore does."""
    if framework == "flax.linen":
        m, v = _linen()
        model = pccore.wrap(m, v, input_shape=(S,), boundaries=["embed", "block_0", "block_1", "head"])
        native = lambda back, x: m.apply(back, x)
    else:
        model = pccore.wrap(_NnxLM(nnx.Rngs(0)), input_shape=(S,), boundaries=NNX_BOUNDARIES)
        native = lambda back, x: back(x)
    opt = optax.adam(3e-3)
    state = opt.init(model.params)
    x_test, y_test = _pattern_batch(jax.random.key(99), 64)
    for step in range(150):
        x, y = _pattern_batch(jax.random.key(step), 32)
        model, state, stats = pccore.train_step(model, opt, state, x=x, y=y, energy=CE,
                                                t1=1.0, dt0=0.2)
    acc = float(pccore.evaluate(model, x_test, y_test, energy=CE).accuracy)
    assert acc > 0.9, acc
    np.testing.assert_allclose(native(model.unwrap(), x_test), model(x_test), rtol=1e-5, atol=1e-5)
