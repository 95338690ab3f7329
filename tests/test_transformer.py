"""The decoder-only transformer of examples/transformer.py, native in Equinox
(`eqx.nn.MultiheadAttention`, `eqx.nn.LayerNorm`, `eqx.nn.MLP`) and in Flax NNX (`nnx.Linear`,
`nnx.LayerNorm`, `nnx.Embed`), built from one set of NumPy weights.

Oracles: a feed-forward pass and a PC energy (SP and μPC) written out by hand in pure JAX
from those weights; and the two frameworks' training runs against each other and against
the unigram baseline.
"""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore

pytest.importorskip("flax.nnx")
_PATH = pathlib.Path(__file__).resolve().parent.parent / "examples" / "_transformer_models.py"
_spec = importlib.util.spec_from_file_location("_transformer_models", _PATH)
tm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tm)

V, S, D, DEPTH, H, F = 5, 6, 8, 2, 2, 16  # vocabulary, sequence, width, blocks, heads, MLP width
CE = pccore.PC(loss=pccore.CrossEntropy())
MUPC = pccore.PC(loss=pccore.CrossEntropy(), parameterisation=pccore.MuPC(gamma=1.0))


def _weights(dtype=np.float32, unit=False, depth=DEPTH):
    w = tm.init_weights(V, S, D, depth, F, seed=0, unit=unit)
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), w)


def _wrap(w, framework):
    if framework == "equinox":
        return pccore.wrap(tm.to_equinox(w, H), boundaries=tm.eqx_boundaries(len(w["blocks"])),
                           input_shape=(S,), dtype=jnp.int32)
    return pccore.wrap(tm.to_nnx(w, H), boundaries=tm.nnx_boundaries(len(w["blocks"])),
                       input_shape=(S,), dtype=jnp.int32)


FRAMEWORKS = ("equinox", "flax.nnx")


def _data(n, seed):
    return tm.split_xy(tm.sample(tm.markov_table(V, seed=0), n, S, 0.1, seed=seed), V)


# -- the model written by hand, batched, from the weights dict ----------------------------------


def _ln(p, h):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _lin(p, h):
    return h @ p["kernel"] + p.get("bias", 0.0)


def _gelu(a):  # the tanh approximation (jax.nn.gelu's default, used by both frameworks)
    return 0.5 * a * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))


def _block(b, h):
    B = h.shape[0]
    heads = lambda a: a.reshape(B, S, H, D // H)
    a = _ln(b["ln1"], h)
    q, k, v = heads(_lin(b["q"], a)), heads(_lin(b["k"], a)), heads(_lin(b["v"], a))
    logits = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(D // H)
    logits = jnp.where(jnp.tril(jnp.ones((S, S), bool)), logits, -jnp.inf)
    att = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, -1), v).reshape(B, S, D)
    h = h + _lin(b["o"], att)
    return h + _lin(b["down"], _gelu(_lin(b["up"], _ln(b["ln2"], h))))


def _layers(w):
    """f_1 ... f_L: embedding, the blocks, the head."""
    return [lambda t: jnp.asarray(w["tok"])[t] + w["pos"],
            *[lambda h, b=b: _block(b, h) for b in w["blocks"]],
            lambda h: _lin(w["head"], _ln(w["ln_f"], h))]


def _mupc_scaled(w):
    """μPC's effective weights: a hidden kernel times 1/sqrt(fan_in), the head's 1/(fan_in
    gamma); embeddings, LayerNorms and biases as they are."""
    scale = lambda p: {**p, "kernel": p["kernel"] / math.sqrt(p["kernel"].shape[0])}
    blocks = [{n: scale(p) if "kernel" in p else p for n, p in b.items()} for b in w["blocks"]]
    head = {**w["head"], "kernel": w["head"]["kernel"] / w["head"]["kernel"].shape[0]}
    return {**w, "blocks": blocks, "head": head}


def _forward_by_hand(w, tokens):
    h = tokens
    for f in _layers(w):
        h = f(h)
    return h


@jax.jit
def _energy_by_hand(w, zs, tokens, y):
    r"""$\sum_{l<L} \frac12 \lVert z_l - f_l(z_{l-1}) \rVert^2 + CE(f_L(z_{L-1}), y)$, summed
    over the batch and the positions, z_0 = the tokens."""
    layers = _layers(w)
    chain = (tokens, *zs)
    total = sum(0.5 * jnp.sum((chain[l] - layers[l - 1](chain[l - 1])) ** 2)
                for l in range(1, len(layers)))
    return total - jnp.sum(y * jax.nn.log_softmax(layers[-1](chain[-1]), -1))


# -- tests ----------------------------------------------------------------------------------------


def test_both_frameworks_give_the_hand_written_logits_and_the_same_layers():
    w = _weights()
    models = {name: _wrap(w, name) for name in FRAMEWORKS}
    x, _ = _data(4, seed=3)
    want = jax.jit(_forward_by_hand)(w, x)
    for name, model in models.items():
        assert model.num_layers == DEPTH + 2, name
        assert [s.shape for s in model.out_shapes] == [(S, D)] * (DEPTH + 1) + [(S, V)], name
        assert not any(model.reads_input), name  # a causal mask only: no tokens read
        assert model.fan_ins(0) == () and model.fan_ins(DEPTH + 1) == (D,), name
        assert sorted(model.fan_ins(1)) == [D, D, D, D, D, F], name  # q k v o up down
        # float32: different contraction orders (vmapped matmuls, einsum), a few ulp of O(1)
        np.testing.assert_allclose(model(x), want, rtol=2e-5, atol=2e-5, err_msg=name)
    # the unwrapped natives hold the weights they were given
    assert tm.max_abs_diff(tm.eqx_weights(models["equinox"].unwrap()), w) == 0.0
    assert tm.max_abs_diff(tm.nnx_weights(models["flax.nnx"].unwrap()), w) == 0.0


@pytest.mark.parametrize("variant", ["PC", "muPC"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_energy_equals_hand_written(framework, variant, x64):
    """pccore's energy at random per-token latents, in float64, equals the hand-written one
    (for μPC: with the weights scaled by hand). One block (first, hidden and last layer
    kinds; the two-block chain is checked by the logits test) keeps the compilation short."""
    x, y = _data(3, seed=4)
    unit = variant == "muPC"
    w = _weights(np.float64, unit=unit, depth=1)
    model = _wrap(w, framework)
    keys = jax.random.split(jax.random.key(5), 2)
    zs = tuple(jax.random.normal(k, (3, S, D), jnp.float64) for k in keys)
    got = pccore.energy(model, zs, x=x, y=y.astype(np.float64), energy=MUPC if unit else CE)
    want = _energy_by_hand(_mupc_scaled(w) if unit else w, zs, x, y.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def _train(models, energy, steps, x, y, lr=1e-3, check_at=None):
    """Train each model on the same batches; also returns the weights at step `check_at`."""
    optim = optax.adam(lr)
    states = {n: optim.init(m.params) for n, m in models.items()}
    rng = np.random.default_rng(0)
    early = None
    for step in range(steps):
        idx = rng.integers(0, len(x), 32)
        for n in models:
            models[n], states[n], stats = pccore.train_step(
                models[n], optim, states[n], x=x[idx], y=y[idx], energy=energy, t1=2.0, dt0=0.1)
            assert bool(stats.updated)
        if step + 1 == check_at:
            early = _weights_of(models)
    return models, early


def _weights_of(models):
    return {n: (tm.nnx_weights if n == "flax.nnx" else tm.eqx_weights)(m.unwrap())
            for n, m in models.items()}


def _gap(models):
    w = _weights_of(models)
    return tm.max_abs_diff(w["equinox"], w["flax.nnx"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["PC", "muPC"])
def test_equal_weights_train_equally_in_float64(variant, x64):
    """From the same weights and batches, Equinox and NNX take the same training steps. In
    float32 the two runs drift apart as rounding is amplified (7e-6 after 20 steps, from a
    rounding of 1.2e-7: ~60x; see the next test); float64 rounds at 1.1e-16, so the same
    amplification leaves ~1e-14: measured 1e-14 (PC) and 3e-14 (μPC), while the weights
    moved by 0.02. 1e-11 leaves a margin of 300x and is a million times below float32's
    gap: any difference in what the two models compute would show."""
    x, y = _data(256, seed=1)
    unit = variant == "muPC"
    w = _weights(np.float64, unit=unit)
    models = {name: _wrap(w, name) for name in FRAMEWORKS}
    energy = MUPC if unit else CE
    y = y.astype(np.float64)
    e0 = [float(pccore.energy(m, pccore.init_activities(m, x[:32], energy=energy), x=x[:32],
                              y=y[:32], energy=energy)) for m in models.values()]
    np.testing.assert_allclose(e0[0], e0[1], rtol=1e-13)
    models, _ = _train(models, energy, 20, x, y)
    assert _gap(models) < 1e-11
    assert tm.max_abs_diff(tm.eqx_weights(models["equinox"].unwrap()), w) > 1e-3  # it trained


@pytest.mark.slow
def test_pc_training_agrees_in_float32_and_beats_the_unigram_baseline():
    """In float32, both frameworks' PC runs stay as close as float32 lets two runs be, and
    both beat the unigram baseline on the test split by the same margin.

    float32's own gap: Equinox against itself from weights one ulp apart. A hidden layer
    learns from its prediction error z - f(z_prev), a small difference of O(1) activities,
    so its float32 gradient carries rounding noise of ~1e-3 relative, and Adam turns an
    entry that is mostly noise into a step of about the learning rate either way: after 20
    steps the frameworks differed by 7.1e-6 and the one-ulp runs by 8.2e-6 (1e-5 is ~80
    ulp of the largest weight, 4). The float64 test above is the tight check."""
    x_train, y_train = _data(1024, seed=1)
    x_test, y_test = _data(256, seed=2)
    uni_acc, uni_ce = tm.unigram_baseline(y_train.argmax(-1), y_test.argmax(-1), V)
    w = _weights()
    nudged = jax.tree_util.tree_map(lambda a: np.nextafter(a, np.inf, dtype=a.dtype), w)
    models = {**{name: _wrap(w, name) for name in FRAMEWORKS}, "one ulp": _wrap(nudged, "equinox")}
    models, early = _train(models, CE, 150, x_train, y_train, check_at=20)
    gap = tm.max_abs_diff(early["equinox"], early["flax.nnx"])
    floor = tm.max_abs_diff(early["equinox"], early["one ulp"])
    assert gap <= max(30 * floor, 1e-5), (gap, floor)
    del models["one ulp"]
    evals = [pccore.evaluate(m, x_test, y_test, energy=CE) for m in models.values()]
    for name, ev in zip(models, evals):
        acc, ce = float(ev.accuracy), float(ev.loss) / S
        assert acc > uni_acc + 0.1 and ce < uni_ce - 0.1, (name, acc, ce, uni_acc, uni_ce)
    assert abs(float(evals[0].accuracy) - float(evals[1].accuracy)) <= 0.01
