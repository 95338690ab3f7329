"""The same model built natively in Equinox, Haiku, Flax Linen and Flax NNX, from one set of
weights: an MLP, a small CNN or a small (dense) ResNet.

Used by `pccore compare`: every framework starts from identical weights, written into the
framework's own model object in its own layout, and is then wrapped with [`pccore.wrap`][].
Frameworks are imported only when their builder runs (each through
`pccore.adapters.require`, which names the pip extra when one is missing).
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._model import PCModel
from ._wrap import wrap

Weights = list[tuple[np.ndarray, ...]]
"""Per layer its weights, then its biases: `(W, b)` with `W` in `(in, out)` layout
(Haiku/Flax's) for a dense layer, `(K, b)` with `K` in HWIO for a convolution, `(W1, W2, b1,
b2)` for a residual block; float32."""

ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "sigmoid": jax.nn.sigmoid,
}

FRAMEWORK_EXTRAS = {"equinox": None, "haiku": "haiku", "linen": "flax", "nnx": "flax"}
"""The CLI's framework names and the pip extra each needs (`None`: always installed)."""


def canonical_mlp(sizes: Sequence[int], seed: int) -> Weights:
    r"""Framework-neutral starting weights: $W, b \sim U(\pm 1/\sqrt{\text{fan-in}})$.

    This is Equinox's default initialisation for `eqx.nn.Linear`, drawn with NumPy so that it
    does not depend on any framework's initialiser.
    """
    rng = np.random.default_rng(seed)
    out = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / np.sqrt(n_in)
        W = rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32)
        b = rng.uniform(-bound, bound, (n_out,)).astype(np.float32)
        out.append((W, b))
    return out


def _equinox(weights: Weights, activation: Callable):
    import equinox as eqx

    layers = []
    for i, (W, b) in enumerate(weights):
        lin = eqx.nn.Linear(W.shape[0], W.shape[1], key=jax.random.key(0))
        lin = eqx.tree_at(lambda m: (m.weight, m.bias), lin, (jnp.asarray(W.T), jnp.asarray(b)))
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(eqx.nn.Lambda(activation))
    return eqx.nn.Sequential(layers), None


def _haiku(weights: Weights, activation: Callable):
    from pccore.adapters import require

    hk = require("haiku")
    widths = [W.shape[1] for W, _ in weights]
    transformed = hk.transform(lambda x: hk.nets.MLP(widths, activation=activation)(x))
    params = {
        f"mlp/~/linear_{i}": {"w": jnp.asarray(W), "b": jnp.asarray(b)}
        for i, (W, b) in enumerate(weights)
    }
    return transformed, params


def _linen(weights: Weights, activation: Callable):
    from pccore.adapters import require

    nn = require("flax.linen")
    layers, params = [], {}
    for i, (W, b) in enumerate(weights):
        params[f"layers_{len(layers)}"] = {"kernel": jnp.asarray(W), "bias": jnp.asarray(b)}
        layers.append(nn.Dense(W.shape[1]))
        if i < len(weights) - 1:
            layers.append(activation)
    return nn.Sequential(layers), {"params": params}


def _nnx(weights: Weights, activation: Callable):
    from pccore.adapters import require

    nnx = require("flax.nnx")
    rngs = nnx.Rngs(0)
    layers = []
    for i, (W, b) in enumerate(weights):
        lin = nnx.Linear(W.shape[0], W.shape[1], rngs=rngs)
        lin.kernel[...] = jnp.asarray(W)
        lin.bias[...] = jnp.asarray(b)
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(activation)
    return nnx.Sequential(*layers), None


NATIVE_BUILDERS: dict[str, Callable] = {
    "equinox": _equinox,
    "haiku": _haiku,
    "linen": _linen,
    "nnx": _nnx,
}
"""`builder(weights, activation) -> (native model, variables or None)` per framework."""


def native_mlp(framework: str, weights: Weights, activation: Callable):
    """The MLP as the framework's own object: `(model, variables)` (`variables` may be None)."""
    if framework not in NATIVE_BUILDERS:
        raise ValueError(
            f"`framework`: unknown framework {framework!r}; expected one of "
            f"{sorted(NATIVE_BUILDERS)}."
        )
    return NATIVE_BUILDERS[framework](weights, activation)


def build_mlp(framework: str, weights: Weights, activation: Callable) -> PCModel:
    """The MLP built natively in `framework` with these weights, wrapped by [`pccore.wrap`][]."""
    model, variables = native_mlp(framework, weights, activation)
    n_in = int(weights[0][0].shape[0])
    if framework == "equinox":
        return wrap(model)
    return wrap(model, variables, input_shape=(n_in,))


def canonical_weights(model: PCModel) -> Weights:
    """Read the weights back from a wrapped model of any framework, per layer in the
    framework-neutral layout of `canonical_mlp`/`canonical_cnn`/`canonical_resnet`: the
    layer's weights in the order of its leaves (a matrix as `(in, out)`, a kernel as HWIO),
    then its other leaves (biases), flattened.

    Which leaves are weights, and their output axis, comes from the adapter's
    [`pccore.WeightSpec`][]s, so each framework's layout is handled by its adapter.
    """
    out = []
    for l, p in enumerate(model.params):
        leaves = [np.asarray(a) for a in jtu.tree_leaves(p)]
        specs = {s.index: s.out_axis for s in model.weights[l]}
        weights = []
        for i in sorted(specs):
            w = leaves[i]
            if specs[i] % w.ndim == 0:  # Equinox's (out, in, kh, kw): to (kh, kw, in, out)
                w = np.transpose(w, (*range(2, w.ndim), 1, 0))
            weights.append(w)
        others = [a.reshape(-1) for i, a in enumerate(leaves) if i not in specs]
        out.append((*weights, *others))
    return out


def same_layout(a: Weights, b: Weights) -> bool:
    """Whether two weight sets have the same layers and array shapes (comparable)."""
    return len(a) == len(b) and all(
        len(la) == len(lb) and all(np.shape(x) == np.shape(y) for x, y in zip(la, lb))
        for la, lb in zip(a, b))


def max_weight_difference(a: Weights, b: Weights) -> float:
    """The largest absolute difference between two weight sets (weights and biases)."""
    if not same_layout(a, b):
        raise ValueError("the two weight sets have different layers or shapes")
    return max(
        float(np.max(np.abs(x - y))) for la, lb in zip(a, b) for x, y in zip(la, lb)
    )


MODELS = ("mlp", "cnn", "resnet")
"""The architectures `pccore compare --model` builds in every framework."""

DEFAULT_HIDDEN = {"mlp": (64, 64), "cnn": (8,), "resnet": (32, 32)}
"""`--hidden` per model when not given: the MLP's widths, the CNN's channels, the ResNet's
width (one residual block per value)."""

KERNEL = 3
"""The CNN's convolution is KERNEL x KERNEL, VALID, followed by a 2x2 average pool."""


def image_side(num_features: int) -> int:
    """The side of a square one-channel image of `num_features` pixels (ValueError if none)."""
    side = math.isqrt(num_features)
    if side * side != num_features or side < KERNEL + 1:
        raise ValueError(
            f"{num_features} features are not a square one-channel image of side >= "
            f"{KERNEL + 1}; a CNN needs square images (8x8 digits, 28x28 MNIST).")
    return side


def _pooled(side: int) -> int:
    return (side - KERNEL + 1) // 2


def canonical_cnn(sizes: Sequence[int], seed: int) -> Weights:
    r"""Starting weights of the CNN `sizes = (pixels, channels, classes)`: a kernel
    `K (3, 3, 1, channels)` (HWIO) and its bias, then the head `W (pooled^2 * channels,
    classes)` (rows in HWC order) and its bias, all $U(\pm 1/\sqrt{\text{fan-in}})$."""
    n_in, channels, classes = sizes
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(KERNEL * KERNEL)
    K = rng.uniform(-bound, bound, (KERNEL, KERNEL, 1, channels)).astype(np.float32)
    bK = rng.uniform(-bound, bound, (channels,)).astype(np.float32)
    flat = _pooled(image_side(n_in)) ** 2 * channels
    bound = 1.0 / np.sqrt(flat)
    W = rng.uniform(-bound, bound, (flat, classes)).astype(np.float32)
    b = rng.uniform(-bound, bound, (classes,)).astype(np.float32)
    return [(K, bK), (W, b)]


def canonical_resnet(sizes: Sequence[int], seed: int) -> Weights:
    r"""Starting weights of the ResNet `sizes = (features, H, ..., H, classes)`: the stem
    `(W, b)`, one `(W1, W2, b1, b2)` per residual block (`len(sizes) - 2` blocks, each
    `H -> H -> H`), the head `(W, b)`; all $U(\pm 1/\sqrt{\text{fan-in}})$."""
    n_in, *widths, classes = sizes
    width = widths[0]
    if any(w != width for w in widths):
        raise ValueError(f"a residual stream has one width; got {widths}")
    rng = np.random.default_rng(seed)

    def dense(a, b):
        bound = 1.0 / np.sqrt(a)
        return (rng.uniform(-bound, bound, (a, b)).astype(np.float32),
                rng.uniform(-bound, bound, (b,)).astype(np.float32))

    out = [dense(n_in, width)]
    for _ in widths:
        (W1, b1), (W2, b2) = dense(width, width), dense(width, width)
        out.append((W1, W2, b1, b2))
    out.append(dense(width, classes))
    return out


CANONICAL = {"mlp": canonical_mlp, "cnn": canonical_cnn, "resnet": canonical_resnet}
"""`canonical(sizes, seed) -> Weights` per model."""


def describe(kind: str, sizes: Sequence[int]) -> str:
    """A short name of the architecture, e.g. `64-64-64-10`, `cnn 8x8 conv3x3x8-pool-10`."""
    if kind == "cnn":
        side = image_side(sizes[0])
        return f"cnn {side}x{side} conv{KERNEL}x{KERNEL}x{sizes[1]}-avgpool2-{sizes[2]}"
    if kind == "resnet":
        return f"resnet {sizes[0]}-{sizes[1]}-{len(sizes) - 2}x[res {sizes[1]}]-{sizes[-1]}"
    return "-".join(str(n) for n in sizes)


# ------------------------------------------------------------------------------------- CNN
# layer 0: reshape -> conv 3x3 VALID (1 -> C) -> activation -> 2x2 average pool -> flatten
# (HWC order); layer 1: dense to the classes. The input is the flat image; each model
# reshapes it (NCHW in Equinox, NHWC elsewhere). The hidden latent is the flattened pooled
# features in every framework: Haiku/Flax cut at the *input* of the next boundary (boundaries
# "conv", "head"), Equinox at the *output* of a boundary (boundaries "pool", a parameter-free
# module doing activation, pooling and flattening, and "head"; the conv before the first
# boundary joins layer 0).


def _equinox_cnn(weights: Weights, activation: Callable, side: int):
    import equinox as eqx

    (K, bK), (W, b) = weights

    class Pool(eqx.Module):  # (C, H, W) -> activation, 2x2 average pool, flatten in HWC order
        pool: eqx.nn.AvgPool2d
        activation: Callable = eqx.field(static=True)

        def __call__(self, h):
            h = self.pool(self.activation(h))
            return jnp.transpose(h, (1, 2, 0)).reshape(-1)

    class CNN(eqx.Module):
        conv: eqx.nn.Conv2d
        pool: Pool
        head: eqx.nn.Linear
        side: int = eqx.field(static=True)

        def __call__(self, x):  # one flat sample
            return self.head(self.pool(self.conv(x.reshape(1, self.side, self.side))))

    conv = eqx.nn.Conv2d(1, K.shape[-1], KERNEL, key=jax.random.key(0))
    conv = eqx.tree_at(lambda m: (m.weight, m.bias), conv,
                       (jnp.asarray(np.transpose(K, (3, 2, 0, 1))), jnp.asarray(bK).reshape(-1, 1, 1)))
    net = CNN(conv, Pool(eqx.nn.AvgPool2d(2, 2), activation), _eqx_linear(W, b), side)
    return wrap(net, boundaries=["pool", "head"], input_shape=(side * side,))


def _eqx_linear(W, b):
    import equinox as eqx

    lin = eqx.nn.Linear(W.shape[0], W.shape[1], key=jax.random.key(0))
    return eqx.tree_at(lambda m: (m.weight, m.bias), lin, (jnp.asarray(W.T), jnp.asarray(b)))


def _nhwc(x, side):  # flat (..., side * side) -> (..., side, side, 1)
    return x.reshape(*x.shape[:-1], side, side, 1)


def _pool_flatten(h, activation):  # (..., H, W, C) -> activation, 2x2 average pool, flatten HWC
    h = activation(h)
    n, w, c = h.shape[-3] // 2, h.shape[-2] // 2, h.shape[-1]
    h = h[..., : 2 * n, : 2 * w, :].reshape(*h.shape[:-3], n, 2, w, 2, c).mean((-4, -2))
    return h.reshape(*h.shape[:-3], -1)


def _haiku_cnn(weights: Weights, activation: Callable, side: int):
    from pccore.adapters import require

    hk = require("haiku")
    (K, bK), (W, b) = weights

    def fn(x):
        h = hk.Conv2D(K.shape[-1], KERNEL, padding="VALID", name="conv")(_nhwc(x, side))
        return hk.Linear(W.shape[1], name="head")(_pool_flatten(h, activation))

    params = {"conv": {"w": jnp.asarray(K), "b": jnp.asarray(bK)},
              "head": {"w": jnp.asarray(W), "b": jnp.asarray(b)}}
    return wrap(hk.transform(fn), params, input_shape=(side * side,), boundaries=["conv", "head"])


def _linen_cnn(weights: Weights, activation: Callable, side: int):
    from pccore.adapters import require

    nn = require("flax.linen")
    (K, bK), (W, b) = weights

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(K.shape[-1], (KERNEL, KERNEL), padding="VALID", name="conv")(_nhwc(x, side))
            return nn.Dense(W.shape[1], name="head")(_pool_flatten(h, activation))

    variables = {"params": {"conv": {"kernel": jnp.asarray(K), "bias": jnp.asarray(bK)},
                            "head": {"kernel": jnp.asarray(W), "bias": jnp.asarray(b)}}}
    return wrap(CNN(), variables, input_shape=(side * side,), boundaries=["conv", "head"])


def _nnx_cnn(weights: Weights, activation: Callable, side: int):
    from pccore.adapters import require

    nnx = require("flax.nnx")
    (K, bK), (W, b) = weights
    rngs = nnx.Rngs(0)

    class CNN(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(1, K.shape[-1], (KERNEL, KERNEL), padding="VALID", rngs=rngs)
            self.conv.kernel[...] = jnp.asarray(K)
            self.conv.bias[...] = jnp.asarray(bK)
            self.head = _nnx_linear(nnx, W, b, rngs)

        def __call__(self, x):
            return self.head(_pool_flatten(self.conv(_nhwc(x, side)), activation))

    return wrap(CNN(), input_shape=(side * side,), boundaries=["conv", "head"])


def _nnx_linear(nnx, W, b, rngs):
    lin = nnx.Linear(W.shape[0], W.shape[1], rngs=rngs)
    lin.kernel[...] = jnp.asarray(W)
    lin.bias[...] = jnp.asarray(b)
    return lin


# ---------------------------------------------------------------------------------- ResNet
# stem: dense (features -> H) | per block: h + fc2(act(fc1(act(h)))) (pre-activation; the
# whole block is one layer, so its skip stays inside it) | head: dense (H -> classes).
# Boundaries: the stem, each block, the head; nothing runs between two boundaries, so the
# latents (stem and block outputs) are the same in every framework.


def _resnet_names(n_blocks: int, sep: str) -> list[str]:
    return ["stem", *(f"blocks{sep}{i}" for i in range(n_blocks)), "head"]


def _equinox_resnet(weights: Weights, activation: Callable):
    import equinox as eqx

    class Block(eqx.Module):
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear
        activation: Callable = eqx.field(static=True)

        def __call__(self, h):
            return h + self.fc2(self.activation(self.fc1(self.activation(h))))

    class ResNet(eqx.Module):
        stem: eqx.nn.Linear
        blocks: tuple
        head: eqx.nn.Linear

        def __call__(self, x):
            h = self.stem(x)
            for block in self.blocks:
                h = block(h)
            return self.head(h)

    stem, *blocks, head = weights
    net = ResNet(_eqx_linear(*stem),
                 tuple(Block(_eqx_linear(W1, b1), _eqx_linear(W2, b2), activation)
                       for W1, W2, b1, b2 in blocks),
                 _eqx_linear(*head))
    boundaries = ["stem", *(f"blocks[{i}]" for i in range(len(blocks))), "head"]
    return wrap(net, boundaries=boundaries, input_shape=(stem[0].shape[0],))


def _haiku_resnet(weights: Weights, activation: Callable):
    from pccore.adapters import require

    hk = require("haiku")
    stem, *blocks, head = weights
    width = stem[0].shape[1]

    class Block(hk.Module):
        def __call__(self, h):
            u = hk.Linear(width, name="fc1")(activation(h))
            return h + hk.Linear(width, name="fc2")(activation(u))

    def fn(x):
        h = hk.Linear(width, name="stem")(x)
        for i in range(len(blocks)):
            h = Block(name=f"blocks_{i}")(h)
        return hk.Linear(head[0].shape[1], name="head")(h)

    params = {"stem": {"w": jnp.asarray(stem[0]), "b": jnp.asarray(stem[1])},
              "head": {"w": jnp.asarray(head[0]), "b": jnp.asarray(head[1])}}
    for i, (W1, W2, b1, b2) in enumerate(blocks):
        params[f"blocks_{i}/fc1"] = {"w": jnp.asarray(W1), "b": jnp.asarray(b1)}
        params[f"blocks_{i}/fc2"] = {"w": jnp.asarray(W2), "b": jnp.asarray(b2)}
    return wrap(hk.transform(fn), params, input_shape=(stem[0].shape[0],),
                boundaries=_resnet_names(len(blocks), "_"))


def _linen_resnet(weights: Weights, activation: Callable):
    from pccore.adapters import require

    nn = require("flax.linen")
    stem, *blocks, head = weights
    width = stem[0].shape[1]

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h):
            u = nn.Dense(width, name="fc1")(activation(h))
            return h + nn.Dense(width, name="fc2")(activation(u))

    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(width, name="stem")(x)
            for i in range(len(blocks)):
                h = Block(name=f"blocks_{i}")(h)
            return nn.Dense(head[0].shape[1], name="head")(h)

    dense = lambda W, b: {"kernel": jnp.asarray(W), "bias": jnp.asarray(b)}
    params = {"stem": dense(*stem), "head": dense(*head)}
    for i, (W1, W2, b1, b2) in enumerate(blocks):
        params[f"blocks_{i}"] = {"fc1": dense(W1, b1), "fc2": dense(W2, b2)}
    return wrap(ResNet(), {"params": params}, input_shape=(stem[0].shape[0],),
                boundaries=_resnet_names(len(blocks), "_"))


def _nnx_resnet(weights: Weights, activation: Callable):
    from pccore.adapters import require

    nnx = require("flax.nnx")
    stem, *blocks, head = weights
    rngs = nnx.Rngs(0)

    class Block(nnx.Module):
        def __init__(self, W1, W2, b1, b2):
            self.fc1 = _nnx_linear(nnx, W1, b1, rngs)
            self.fc2 = _nnx_linear(nnx, W2, b2, rngs)

        def __call__(self, h):
            return h + self.fc2(activation(self.fc1(activation(h))))

    class ResNet(nnx.Module):
        def __init__(self):
            self.stem = _nnx_linear(nnx, *stem, rngs)
            self.blocks = nnx.List([Block(*w) for w in blocks])
            self.head = _nnx_linear(nnx, *head, rngs)

        def __call__(self, x):
            h = self.stem(x)
            for block in self.blocks:
                h = block(h)
            return self.head(h)

    return wrap(ResNet(), input_shape=(stem[0].shape[0],),
                boundaries=_resnet_names(len(blocks), "/"))


_CNN_BUILDERS = {"equinox": _equinox_cnn, "haiku": _haiku_cnn, "linen": _linen_cnn,
                 "nnx": _nnx_cnn}
_RESNET_BUILDERS = {"equinox": _equinox_resnet, "haiku": _haiku_resnet,
                    "linen": _linen_resnet, "nnx": _nnx_resnet}


def build_model(kind: str, framework: str, weights: Weights, activation: Callable,
                num_features: int) -> PCModel:
    """The `kind` model (`mlp`, `cnn`, `resnet`; see `MODELS`) built natively in `framework`
    from framework-neutral `weights` (from `CANONICAL[kind]`) and wrapped; it takes flat
    inputs of `num_features` (the CNN reshapes them to square one-channel images)."""
    if kind == "mlp":
        return build_mlp(framework, weights, activation)
    if kind not in MODELS:
        raise ValueError(f"`kind`: unknown model {kind!r}; expected one of {list(MODELS)}.")
    if framework not in NATIVE_BUILDERS:
        raise ValueError(
            f"`framework`: unknown framework {framework!r}; expected one of "
            f"{sorted(NATIVE_BUILDERS)}."
        )
    if kind == "cnn":
        side = image_side(num_features)
        return _CNN_BUILDERS[framework](weights, activation, side)
    return _RESNET_BUILDERS[framework](weights, activation)

