"""A decoder-only transformer written natively in Equinox and in Flax NNX, the sequence task
it learns, and the baselines it is judged against (used by examples/transformer.py and
tests/test_transformer.py).

Both frameworks build the same architecture from one set of NumPy weights (`init_weights`):

    tokens (S,) -> embed:  token embedding + learned positional embedding   -> (S, D)
                -> blocks: N pre-LayerNorm causal self-attention + MLP
                           blocks, h + attn(ln1(h)), then h + mlp(ln2(h))   -> (S, D) each
                -> head:   final LayerNorm + unembedding                    -> (S, V) logits

Each of the N + 2 parts is one predictive-coding layer, so the latents are per-token
(S, D) activities. Equinox uses `eqx.nn.Embedding`, `eqx.nn.MultiheadAttention`,
`eqx.nn.LayerNorm` and `eqx.nn.MLP` on one sequence; NNX uses `nnx.Embed`, `nnx.LayerNorm`
and `nnx.Linear` on a batch, with the attention written out (see `NnxAttention` for why not
`nnx.MultiHeadAttention`). The weights are moved between the two with `to_equinox`,
`to_nnx` and `weights_of`, in one layout: kernels `(in, out)`.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# -- the task: a second-order Markov chain ----------------------------------------------------


def markov_table(vocab: int, seed: int = 0) -> np.ndarray:
    """A fixed random successor for every pair of previous tokens: `table[a, b]`."""
    return np.random.default_rng(seed).integers(0, vocab, size=(vocab, vocab))


def sample(table: np.ndarray, n: int, seq_len: int, noise: float, seed: int) -> np.ndarray:
    """`n` sequences of `seq_len + 1` tokens: the first two uniform, then each token is
    `table[previous two]` with probability 1 - `noise`, else uniform. Predicting it needs the
    token two back as well as the last one: the attention has to look back."""
    vocab = table.shape[0]
    rng = np.random.default_rng(seed)
    t = np.empty((n, seq_len + 1), np.int32)
    t[:, :2] = rng.integers(0, vocab, size=(n, 2))
    for i in range(2, seq_len + 1):
        rand = rng.integers(0, vocab, size=n)
        keep = rng.random(n) >= noise
        t[:, i] = np.where(keep, table[t[:, i - 2], t[:, i - 1]], rand)
    return t


def split_xy(seqs: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs `seqs[:, :-1]` (int32) and one-hot next-token targets `seqs[:, 1:]` (float32)."""
    return seqs[:, :-1].astype(np.int32), np.eye(vocab, dtype=np.float32)[seqs[:, 1:]]


def unigram_baseline(train_targets: np.ndarray, test_targets: np.ndarray, vocab: int):
    """The best context-free predictor: the training split's token frequencies at every
    position. Returns its next-token accuracy on the test split (it always predicts the most
    frequent training token) and its cross-entropy there (nats per token, the frequencies
    smoothed by one count per token)."""
    counts = np.bincount(train_targets.ravel(), minlength=vocab) + 1.0
    p = counts / counts.sum()
    acc = float(np.mean(test_targets == np.argmax(p)))
    ce = float(-np.mean(np.log(p[test_targets])))
    return acc, ce


def bigram_baseline(train_x: np.ndarray, train_t: np.ndarray, test_x: np.ndarray,
                    test_t: np.ndarray, vocab: int):
    """The best predictor from the current token alone (what a model without attention can
    do): add-one-smoothed successor frequencies. Returns (test accuracy, test CE)."""
    counts = np.ones((vocab, vocab))
    np.add.at(counts, (train_x.ravel(), train_t.ravel()), 1.0)
    p = counts / counts.sum(1, keepdims=True)
    acc = float(np.mean(np.argmax(p[test_x], -1) == test_t))
    ce = float(-np.mean(np.log(p[test_x, test_t])))
    return acc, ce


# -- one set of weights -----------------------------------------------------------------------


def init_weights(vocab: int, seq_len: int, dim: int, depth: int, hidden: int, seed: int,
                 unit: bool = False) -> dict:
    """NumPy weights for the whole model, kernels `(in, out)`. Linear kernels are
    N(0, 1/fan_in) (standard parameterisation), or N(0, 1) with `unit=True` (what μPC expects:
    its parameterisation does the 1/sqrt(fan_in) scaling); embeddings N(0, 1); LayerNorm
    scales 1 and biases 0."""
    rng = np.random.default_rng(seed)

    def kernel(n_in, n_out):
        w = rng.normal(size=(n_in, n_out))
        return (w if unit else w / math.sqrt(n_in)).astype(np.float32)

    def bias(n):
        return (0.02 * rng.normal(size=n)).astype(np.float32)

    def ln():
        return {"scale": np.ones(dim, np.float32), "bias": np.zeros(dim, np.float32)}

    def linear(n_in, n_out):
        return {"kernel": kernel(n_in, n_out), "bias": bias(n_out)}

    # no key bias: softmax ignores a shift shared by all keys, so its gradient is exactly zero
    # and Adam would turn the rounding noise in it into full-size steps
    blocks = [{"ln1": ln(), "q": linear(dim, dim), "k": {"kernel": kernel(dim, dim)},
               "v": linear(dim, dim),
               "o": linear(dim, dim), "ln2": ln(), "up": linear(dim, hidden),
               "down": linear(hidden, dim)} for _ in range(depth)]
    return {"tok": rng.normal(size=(vocab, dim)).astype(np.float32),
            "pos": rng.normal(size=(seq_len, dim)).astype(np.float32),
            "blocks": blocks, "ln_f": ln(), "head": linear(dim, vocab)}


def causal_mask(seq_len: int) -> jax.Array:
    """(S, S): query t sees keys 0..t."""
    return jnp.tril(jnp.ones((seq_len, seq_len), bool))


# -- Equinox: per-sequence modules --------------------------------------------------------------


class EqxEmbed(eqx.Module):
    tok: eqx.nn.Embedding
    pos: jax.Array

    def __call__(self, tokens):  # (S,) int -> (S, D)
        return jax.vmap(self.tok)(tokens) + self.pos


class EqxBlock(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __call__(self, h):  # (S, D) -> (S, D)
        a = jax.vmap(self.ln1)(h)
        h = h + self.attn(a, a, a, mask=causal_mask(h.shape[0]))
        return h + jax.vmap(self.mlp)(jax.vmap(self.ln2)(h))


class EqxHead(eqx.Module):
    ln_f: eqx.nn.LayerNorm
    out: eqx.nn.Linear

    def __call__(self, h):  # (S, D) -> (S, V)
        return jax.vmap(lambda t: self.out(self.ln_f(t)))(h)


class EqxLM(eqx.Module):
    """The decoder-only transformer on one sequence of token ids (vmap it for a batch)."""

    embed: EqxEmbed
    blocks: list
    head: EqxHead

    def __call__(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def eqx_boundaries(depth: int) -> list[str]:
    return ["embed", *[f"blocks[{i}]" for i in range(depth)], "head"]


def _shell(cls, *args, **kwargs):
    """An Equinox module of `cls` with shapes but no arrays (no random initialisation runs:
    every array is set from the weights dict afterwards)."""
    return eqx.filter_eval_shape(cls, *args, **kwargs)


def _eqx_linear(p):
    w = jnp.asarray(p["kernel"].T)
    lin = _shell(eqx.nn.Linear, w.shape[1], w.shape[0], use_bias="bias" in p,
                 key=jax.random.key(0))
    if "bias" not in p:
        return eqx.tree_at(lambda m: m.weight, lin, w)
    return eqx.tree_at(lambda m: (m.weight, m.bias), lin, (w, jnp.asarray(p["bias"])))


def _eqx_ln(p):
    ln = _shell(eqx.nn.LayerNorm, p["scale"].shape[0], eps=1e-5)
    return eqx.tree_at(lambda m: (m.weight, m.bias), ln,
                       (jnp.asarray(p["scale"]), jnp.asarray(p["bias"])))


def to_equinox(w: dict, heads: int) -> EqxLM:
    """The Equinox model holding the weights `w` (see `init_weights`)."""
    vocab, dim = w["tok"].shape
    key = jax.random.key(0)
    tok = eqx.tree_at(lambda e: e.weight, _shell(eqx.nn.Embedding, vocab, dim, key=key),
                      jnp.asarray(w["tok"]))
    blocks = []
    for b in w["blocks"]:
        hidden = b["up"]["kernel"].shape[1]
        attn = _shell(eqx.nn.MultiheadAttention, heads, dim, use_query_bias=True,
                      use_key_bias=False, use_value_bias=True, use_output_bias=True, key=key)
        attn = eqx.tree_at(lambda a: (a.query_proj, a.key_proj, a.value_proj, a.output_proj),
                           attn, tuple(_eqx_linear(b[n]) for n in "qkvo"))
        mlp = _shell(eqx.nn.MLP, dim, dim, hidden, 1, activation=jax.nn.gelu, key=key)
        mlp = eqx.tree_at(lambda m: m.layers, mlp, (_eqx_linear(b["up"]), _eqx_linear(b["down"])))
        blocks.append(EqxBlock(_eqx_ln(b["ln1"]), attn, _eqx_ln(b["ln2"]), mlp))
    head = EqxHead(_eqx_ln(w["ln_f"]), _eqx_linear(w["head"]))
    return EqxLM(EqxEmbed(tok, jnp.asarray(w["pos"])), blocks, head)


def _np_linear(lin):
    if lin.bias is None:
        return {"kernel": np.asarray(lin.weight).T}
    return {"kernel": np.asarray(lin.weight).T, "bias": np.asarray(lin.bias)}


def _np_ln(ln):
    return {"scale": np.asarray(ln.weight), "bias": np.asarray(ln.bias)}


def eqx_weights(m: EqxLM) -> dict:
    """The weights of an Equinox model, in `init_weights`' layout."""
    blocks = [{"ln1": _np_ln(b.ln1), "ln2": _np_ln(b.ln2),
               **{n: _np_linear(getattr(b.attn, f"{p}_proj"))
                  for n, p in zip("qkvo", ("query", "key", "value", "output"))},
               "up": _np_linear(b.mlp.layers[0]), "down": _np_linear(b.mlp.layers[1])}
              for b in m.blocks]
    return {"tok": np.asarray(m.embed.tok.weight), "pos": np.asarray(m.embed.pos),
            "blocks": blocks, "ln_f": _np_ln(m.head.ln_f), "head": _np_linear(m.head.out)}


# -- Flax NNX: batched modules --------------------------------------------------------------------


def _nnx_ln(dim, rngs, dtype):
    # Equinox's LayerNorm: eps 1e-5 and the two-pass variance (NNX defaults: 1e-6, E[x^2] - E[x]^2)
    return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, param_dtype=dtype, rngs=rngs)


class NnxEmbed(nnx.Module):
    def __init__(self, vocab, seq_len, dim, rngs, dtype):
        self.tok = nnx.Embed(vocab, dim, param_dtype=dtype, rngs=rngs)
        self.pos = nnx.Param(jnp.zeros((seq_len, dim), dtype))

    def __call__(self, tokens):  # (B, S) int -> (B, S, D)
        return self.tok(tokens) + self.pos[...]


class NnxAttention(nnx.Module):
    """Multi-head causal self-attention from four `nnx.Linear`s (not `nnx.MultiHeadAttention`:
    its query/key/value kernels are `(in, heads, head_dim)`, which pccore reads as a weight
    with fan-in `in * heads`, so μPC would scale them unlike Equinox's `(heads * head_dim, in)`
    projections)."""

    def __init__(self, dim, heads, rngs, dtype):
        self.heads = heads
        lin = lambda bias: nnx.Linear(dim, dim, use_bias=bias, param_dtype=dtype, rngs=rngs)
        self.q, self.k, self.v, self.o = lin(True), lin(False), lin(True), lin(True)

    def __call__(self, h):  # (B, S, D) -> (B, S, D)
        B, S, D = h.shape
        split = lambda a: a.reshape(B, S, self.heads, D // self.heads)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        logits = jnp.einsum("bthk,bshk->bhts", q / math.sqrt(D // self.heads), k)
        logits = jnp.where(causal_mask(S), logits, jnp.finfo(logits.dtype).min)
        a = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, axis=-1), v)
        return self.o(a.reshape(B, S, D))


class NnxBlock(nnx.Module):
    def __init__(self, dim, heads, hidden, rngs, dtype):
        self.ln1, self.ln2 = _nnx_ln(dim, rngs, dtype), _nnx_ln(dim, rngs, dtype)
        self.attn = NnxAttention(dim, heads, rngs, dtype)
        self.up = nnx.Linear(dim, hidden, param_dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, param_dtype=dtype, rngs=rngs)

    def __call__(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.down(nnx.gelu(self.up(self.ln2(h))))


class NnxHead(nnx.Module):
    def __init__(self, dim, vocab, rngs, dtype):
        self.ln_f = _nnx_ln(dim, rngs, dtype)
        self.out = nnx.Linear(dim, vocab, param_dtype=dtype, rngs=rngs)

    def __call__(self, h):
        return self.out(self.ln_f(h))


class NnxLM(nnx.Module):
    """The decoder-only transformer on a batch of token ids (B, S)."""

    def __init__(self, vocab, seq_len, dim, depth, heads, hidden, rngs, dtype=jnp.float32):
        self.embed = NnxEmbed(vocab, seq_len, dim, rngs, dtype)
        self.blocks = nnx.List([NnxBlock(dim, heads, hidden, rngs, dtype) for _ in range(depth)])
        self.head = NnxHead(dim, vocab, rngs, dtype)

    def __call__(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def nnx_boundaries(depth: int) -> list[str]:
    return ["embed", *[f"blocks/{i}" for i in range(depth)], "head"]


def _set_linear(lin, p):
    lin.kernel.set_value(jnp.asarray(p["kernel"]))
    if "bias" in p:
        lin.bias.set_value(jnp.asarray(p["bias"]))


def _set_ln(ln, p):
    ln.scale.set_value(jnp.asarray(p["scale"]))
    ln.bias.set_value(jnp.asarray(p["bias"]))


def to_nnx(w: dict, heads: int) -> NnxLM:
    """The NNX model holding the weights `w` (see `init_weights`). It is built abstractly
    (`nnx.eval_shape`: no random initialisation runs) and every parameter then set."""
    vocab, dim = w["tok"].shape
    seq_len = w["pos"].shape[0]
    hidden = w["blocks"][0]["up"]["kernel"].shape[1]
    m = nnx.eval_shape(lambda: NnxLM(vocab, seq_len, dim, len(w["blocks"]), heads, hidden,
                                     nnx.Rngs(0), w["tok"].dtype))
    m.embed.tok.embedding.set_value(jnp.asarray(w["tok"]))
    m.embed.pos.set_value(jnp.asarray(w["pos"]))
    for blk, b in zip(m.blocks, w["blocks"]):
        _set_ln(blk.ln1, b["ln1"])
        _set_ln(blk.ln2, b["ln2"])
        for n in "qkvo":
            _set_linear(getattr(blk.attn, n), b[n])
        _set_linear(blk.up, b["up"])
        _set_linear(blk.down, b["down"])
    _set_ln(m.head.ln_f, w["ln_f"])
    _set_linear(m.head.out, w["head"])
    leaves = jax.tree_util.tree_leaves(nnx.state(m))
    assert all(isinstance(a, jax.Array) for a in leaves), "a parameter was left unset"
    return m


def nnx_weights(m: NnxLM) -> dict:
    """The weights of an NNX model, in `init_weights`' layout."""
    lin = lambda l: ({"kernel": np.asarray(l.kernel[...])} if l.bias is None else
                     {"kernel": np.asarray(l.kernel[...]), "bias": np.asarray(l.bias[...])})
    ln = lambda l: {"scale": np.asarray(l.scale[...]), "bias": np.asarray(l.bias[...])}
    blocks = [{"ln1": ln(b.ln1), "ln2": ln(b.ln2),
               **{n: lin(getattr(b.attn, n)) for n in "qkvo"},
               "up": lin(b.up), "down": lin(b.down)} for b in m.blocks]
    return {"tok": np.asarray(m.embed.tok.embedding[...]), "pos": np.asarray(m.embed.pos[...]),
            "blocks": blocks, "ln_f": ln(m.head.ln_f), "head": lin(m.head.out)}


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two weight sets of the same layout."""
    return max(float(np.max(np.abs(u - v))) for u, v in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
