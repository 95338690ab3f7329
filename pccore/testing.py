"""Conformance checks for adapters, and a checklist for energy variants: the checks pccore's
own adapters and variants pass, for yours ([`pccore.testing.check_energy`][] for a variant).

An adapter conforms when a model built natively in its framework from the same
framework-neutral weights as pccore's Equinox reference behaves the same under predictive
coding: energies, activity gradients, equilibrated activities, parameter gradients, one
optax update and ten training steps agree with the reference, and `unwrap()` gives a
native object whose own forward pass equals pccore's prediction.

```python
import pccore.testing as pt

def build(kind, weights, activation):         # your framework's model, wrapped
    native = my_framework_mlp(weights, activation)
    return pt.Built(pccore.wrap(native), lambda unwrapped, x: unwrapped(x))

jax.config.update("jax_enable_x64", True)
pt.check_conformance(build, "mlp")            # raises AssertionError naming what differs
```

pccore's own test suite runs these checks on the Equinox, Haiku, Flax Linen and Flax NNX
adapters (`tests/test_conformance.py`) and on a toy third-party adapter.

**Architectures** (`kind`), all from [`pccore.testing.canonical_mlp`][] or
[`pccore.testing.canonical_cnn`][] weights:

- `"mlp"`: Linear layers `5 -> 9 -> 4 -> 3` with `activation` between them; a weight `W` is
    `(in, out)` and `y = x @ W + b`.
- `"cnn"`: a 3x3 VALID convolution (kernel `K` in HWIO), relu, 2x2 average pooling, a flatten
    in HWC order and a dense layer, on 8x8 one-channel digits (NHWC, or NCHW with
    `channels_first=True`).
- `"mid"`: the MLP with a parameter-free LayerNorm (epsilon [`pccore.testing.EPS`][], no scale,
    no offset) after the first activation, which must fold into the first layer.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._energy._abstract import AbstractEnergy

from ._energy._api import energy, init_activities

from ._energy._base import PC
from ._energy._api import energy as _total_energy  # `energy` is the variant in check_energy
from ._energy._init import AbstractInit
from ._inference._infer import infer
from ._train._learn import param_grads
from ._model import PCModel
from ._train._train_step import train_step
from ._transfer import transfer_weights
from ._wrap import wrap

Weights = list[tuple[jax.Array, jax.Array | None]]
"""Per layer: `W` (in, out) or a kernel `K` (h, w, in, out), and a bias or None."""

EPS = 1e-5
"""The LayerNorm epsilon of the `"mid"` architecture."""

KINDS = ("mlp", "cnn", "mid")
STEPS = 10
MLP_SIZES = (5, 9, 4, 3)


class Built(NamedTuple):
    """A model built natively and wrapped: the [`pccore.PCModel`][] and the native forward
    `forward(unwrapped, x) -> y` of what `model.unwrap()` returns."""

    model: PCModel
    forward: Callable[[Any, jax.Array], jax.Array]


Activation = Callable[[jax.Array], jax.Array]
"""An elementwise activation function."""

Builder = Callable[[str, Weights, Activation], Built]
"""`build(kind, weights, activation) -> Built`: your framework's model of that architecture."""


def canonical_mlp(sizes: Sequence[int], key: jax.Array, dtype: Any = jnp.float32,
                  bias: bool = True) -> Weights:
    """Framework-neutral weights of an MLP `sizes[0] -> ... -> sizes[-1]`, `W` as (in, out)."""
    out: Weights = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        kw, kb = jax.random.split(k)
        W = jax.random.normal(kw, (n_in, n_out), dtype) / jnp.sqrt(n_in)
        b = 0.1 * jax.random.normal(kb, (n_out,), dtype) if bias else None
        out.append((W, b))
    return out


def canonical_cnn(key: jax.Array, dtype: Any = jnp.float32, channels: int = 3,
                  classes: int = 10) -> Weights:
    """Weights of the CNN: a conv kernel (3, 3, 1, channels) in HWIO, a dense W (9 channels,
    classes)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    K = jax.random.normal(k1, (3, 3, 1, channels), dtype) / 3.0
    W = jax.random.normal(k3, (9 * channels, classes), dtype) / jnp.sqrt(9 * channels)
    return [(K, 0.1 * jax.random.normal(k2, (channels,), dtype)),
            (W, 0.1 * jax.random.normal(k4, (classes,), dtype))]


def equinox_reference(kind: str, weights: Weights,
                      activation: Callable[[jax.Array], jax.Array] = jnp.tanh) -> Built:
    """The reference: the architecture built in Equinox (channels first) and wrapped."""
    import equinox as eqx

    def linear(W, b):
        lin = eqx.nn.Linear(W.shape[0], W.shape[1], use_bias=b is not None, key=jax.random.key(0),
                            dtype=W.dtype)
        lin = eqx.tree_at(lambda m: m.weight, lin, W.T)
        return lin if b is None else eqx.tree_at(lambda m: m.bias, lin, b)

    if kind == "cnn":
        (K, bk), (W, b) = weights
        conv = eqx.nn.Conv2d(1, K.shape[-1], 3, key=jax.random.key(0), dtype=K.dtype)
        conv = eqx.tree_at(lambda m: (m.weight, m.bias), conv,
                           (jnp.transpose(K, (3, 2, 0, 1)), bk.reshape(-1, 1, 1)))
        layers = [conv, eqx.nn.Lambda(jax.nn.relu), eqx.nn.AvgPool2d(2, 2),
                  eqx.nn.Lambda(lambda x: jnp.transpose(x, (1, 2, 0)).reshape(-1)), linear(W, b)]
        options: dict[str, Any] = {"input_shape": (1, 8, 8)}
    else:
        layers = []
        for i, (W, b) in enumerate(weights):
            layers.append(linear(W, b))
            if i < len(weights) - 1:
                layers.append(eqx.nn.Lambda(activation))
            if kind == "mid" and i == 0:
                layers.append(eqx.nn.LayerNorm(W.shape[1], eps=EPS, use_weight=False,
                                               use_bias=False, dtype=W.dtype))
        options = {}
    model = wrap(eqx.nn.Sequential(layers), **options)
    return Built(model, lambda m, x: jax.vmap(m)(x))


def conformance_data(kind: str, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The batch the checks run on: 16 digits (NHWC) and their labels for `"cnn"`, else 6
    Gaussian samples of width 5 and targets of width 3."""
    if kind == "cnn":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = jnp.asarray(d.images[:16, :, :, None] / 16.0, dtype)
        return x, jax.nn.one_hot(d.target[:16], 10, dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (6, MLP_SIZES[0]), dtype)
    return x, jax.random.normal(jax.random.key(2), (6, MLP_SIZES[-1]), dtype)


def conformance_weights(kind: str, dtype: Any) -> Weights:
    """The weights the checks build every model from."""
    if kind == "cnn":
        return canonical_cnn(jax.random.key(0), dtype)
    return canonical_mlp(MLP_SIZES, jax.random.key(0), dtype)


def _activation(kind: str) -> Callable[[jax.Array], jax.Array]:
    return jax.nn.relu if kind == "cnn" else jnp.tanh


Quantities = dict[str, list[Any]]
"""What the checks compare: per quantity, a list of arrays."""


def run(built: Built, template: PCModel, x: jax.Array, y: jax.Array
        ) -> tuple[Quantities, tuple[jax.Array, jax.Array]]:
    """Every quantity the checks compare, for one built model (parameters in the
    `template`'s layout, through [`pccore.transfer_weights`][]), and `(native forward of the
    unwrapped model, pccore's prediction)` after training."""
    model = built.model
    canonical = lambda m: jax.tree_util.tree_leaves(transfer_weights(m, template).params)
    pc = PC()
    z0 = init_activities(model, x=x, y=y, energy=pc)
    keys = jax.random.split(jax.random.key(3), len(z0))  # off the feed-forward pass
    z0 = tuple(z + 0.3 * jax.random.normal(k, z.shape, z.dtype) for z, k in zip(z0, keys))
    E, gz = jax.jit(jax.value_and_grad(lambda z: energy(model, z, x=x, y=y, energy=pc)))(z0)
    sol = infer(model, x=x, y=y, energy=pc, t1=1.0, dt0=0.1)
    gp = param_grads(model, sol.activities, x=x, y=y, energy=pc)
    optim = optax.sgd(0.05, momentum=0.9)
    state = optim.init(model.params)
    out: Quantities = {
        "energy": [E],
        "activity_grads": list(gz),
        "activities": list(sol.activities),
        "param_grads": canonical(model.with_params(gp)),
    }
    losses = []
    for k in range(STEPS):
        model, state, stats = train_step(model, optim, state, x=x, y=y, energy=pc, t1=1.0,
                                         dt0=0.1)
        losses.append(stats.loss)
        if k == 0:
            out["one_update"] = canonical(model)
    out["ten_steps"] = canonical(model)
    out["losses"] = [jnp.stack(losses)]
    return out, (built.forward(model.unwrap(), x), model(x))


@functools.lru_cache(maxsize=8)
def _reference(kind: str, dtype_name: str) -> tuple[Quantities, PCModel]:
    dtype = jnp.dtype(dtype_name)
    built = equinox_reference(kind, conformance_weights(kind, dtype), _activation(kind))
    x, y = conformance_data(kind, dtype)
    if kind == "cnn":
        x = jnp.transpose(x, (0, 3, 1, 2))
    return run(built, built.model, x, y)[0], built.model


def check_conformance(build: Builder, kind: str = "mlp", *, dtype: Any = jnp.float64,
                      rtol: float | None = None, channels_first: bool = False) -> Quantities:
    """Build `kind` with `build` and check it against the Equinox reference.

    **Arguments:**

    - `build`: `build(kind, weights, activation) -> Built` (see [`pccore.testing.Built`][]).
    - `kind`: `"mlp"`, `"cnn"` or `"mid"` (see the module docs).
    - `dtype`: float64 (tolerance 1e-10 relative to each quantity's largest entry; needs
        `jax.config.update("jax_enable_x64", True)`) or float32 (1e-5).
    - `rtol`: another tolerance.
    - `channels_first`: the CNN takes NCHW inputs (as Equinox's does), not NHWC.

    **Returns:** the reference's quantities (e.g. `"losses"`, the training losses).

    **Raises:** `AssertionError` naming the first quantity that differs, and by how much.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}; got {kind!r}.")
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "`dtype`: float64 checks need 64-bit JAX; call "
            '`jax.config.update("jax_enable_x64", True)` first, or pass `dtype=jnp.float32`.'
        )
    rtol = rtol if rtol is not None else (1e-10 if dtype == jnp.float64 else 1e-5)
    ref, template = _reference(kind, dtype.name)
    built = build(kind, conformance_weights(kind, dtype), _activation(kind))
    x, y = conformance_data(kind, dtype)
    if kind == "cnn" and channels_first:
        x = jnp.transpose(x, (0, 3, 1, 2))
    out, (native_y, pc_y) = run(built, template, x, y)
    for key, vals in ref.items():
        assert len(out[key]) == len(vals), f"{kind}: {key} has {len(out[key])} entries, the reference {len(vals)}"
        scale = max(float(jnp.max(jnp.abs(b))) for b in vals)
        for a, b in zip(out[key], vals):
            err = float(jnp.max(jnp.abs(jnp.asarray(a) - b))) / scale
            assert err <= rtol, f"{kind}: {key} differs from the Equinox reference by {err:.2e} (rel)"
    np.testing.assert_allclose(native_y, pc_y, rtol=rtol, atol=rtol * float(jnp.abs(pc_y).max()),
                               err_msg=f"{kind}: the unwrapped model's own forward pass")
    return ref


# --- the energy-variant checklist -----------------------------------------------------------


def _fd(f: Callable[[Any], jax.Array], at: Any, direction: Any, h: float) -> float:
    """Central finite difference of the scalar `f` at `at` along `direction`."""
    up = jax.tree.map(lambda a, d: a + h * d, at, direction)
    down = jax.tree.map(lambda a, d: a - h * d, at, direction)
    return float((f(up) - f(down)) / (2 * h))


def _dot(a: Any, b: Any) -> float:
    return float(sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _random_like(tree: Any, key: jax.Array) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, a.shape, a.dtype)
                                        for k, a in zip(keys, leaves)])


def _agree(what: str, got: float, want: float, rtol: float) -> None:
    if not abs(got - want) <= rtol * max(abs(want), 1.0):
        raise AssertionError(f"{what}: got {got!r}, expected {want!r} (rtol {rtol:g}).")


def check_energy(energy: AbstractEnergy, model: PCModel, x: jax.Array | None,
                 y: jax.Array | None, *, key: jax.Array | None = None,
                 init: AbstractInit | None = None) -> None:
    r"""The checklist for an energy variant: the properties pccore's engine relies on, each
    checked against an independent oracle. Run it in float64
    (`jax.config.update("jax_enable_x64", True)`, with a model and data in float64); it
    raises an `AssertionError` naming the first property that fails.

    1. **Variables.** `init` gives one array per entry of `variable_shapes`, with that
       per-sample shape and dtype, and the batch of the data.
    2. **Total energy.** [`pccore.energy`][] equals the sum of `per_sample`, and `per_sample`
       is finite. This and the checks below run at the initial variables moved by a random
       perturbation (a feed-forward start zeroes every hidden error, and with them the terms
       a wrong gradient could lose).
    3. **Samples are independent.** `per_sample` of the batch equals `per_sample` of each
       sample alone (a variant must not couple the samples of a batch; batch-statistics
       layers in training mode are the documented exception and are not checked here).
    4. **Activity gradient.** `jax.grad` of the energy in the variables equals a central
       finite difference along a random direction (the gradient inference follows).
    5. **Inference descends it.** A short Euler gradient flow ([`pccore.infer`][]) ends below
       its start and with a smaller vector field.
    6. **Parameter gradient.** [`pccore.param_grads`][] equals a finite difference of the
       batch-mean objective $\frac1B\sum_i F_i + R(\theta)$ along a random direction in the
       parameters, at fixed variables (the one update path); and, where the variant has
       parameters of its own (`init_params`), the same in those.
    7. **Activities.** `activities` gives arrays of the shapes [`pccore.PC`][] infers for
       this model (the free activities the variables stand for).
    8. **Compiled.** The energy under `jax.jit` equals the eager one.

    **Arguments:**

    - `energy`: the variant, an [`pccore.AbstractEnergy`][].
    - `model`: a [`pccore.PCModel`][] it applies to (float64), e.g. a small wrapped MLP.
    - `x`, `y`: a small batch of clamped data (one of them may be None, as the variant
        allows).
    - `key`: for the random directions and a random initialiser (default `key(0)`).
    - `init`: the initialiser (default feed-forward from `x`, or random normal when `x` is
        None).
    """
    from ._energy._init import FeedForward, RandomNormal
    from ._train._learn import objective

    if not jax.config.jax_enable_x64:
        raise ValueError(
            "`check_energy` compares gradients with finite differences, which need float64: "
            'call jax.config.update("jax_enable_x64", True) and pass a float64 model and data.'
        )
    key = jax.random.key(0) if key is None else key
    k_init, k_z, k_p = jax.random.split(key, 3)
    if energy.init_params(model) is not None and model.energy_params is None:
        model = model.with_energy_params(energy.init_params(model))
    init = (FeedForward() if x is not None else RandomNormal(std=0.5)) if init is None else init
    z = tuple(init_activities(model, x=x, y=y, energy=energy, init=init, key=k_init))
    prepared = energy.prepare(model)
    batch = (x if x is not None else y)
    assert batch is not None
    B = batch.shape[0]

    # 1. variables
    shapes = energy.variable_shapes(prepared, x is not None)
    if len(z) != len(shapes):
        raise AssertionError(f"1. variables: `init` gave {len(z)} arrays; `variable_shapes` "
                             f"declares {len(shapes)}.")
    for i, (a, s) in enumerate(zip(z, shapes)):
        if a.shape != (B, *s.shape) or a.dtype != s.dtype:
            raise AssertionError(
                f"1. variables: variable {i} from `init` has shape {a.shape} and dtype "
                f"{a.dtype}; `variable_shapes` declares {(B, *s.shape)} and {s.dtype}.")

    # The other checks run away from the initialisation (feed-forward activities zero every
    # hidden error, and with them the terms a broken gradient could lose).
    k_init, k_move = jax.random.split(k_init)
    z = tuple(jax.tree.map(lambda a, n: a + 0.3 * n, z, _random_like(z, k_move)))

    # 2. total energy
    per = energy.per_sample(prepared, z, x, y)
    if per.shape != (B,):
        raise AssertionError(f"2. total energy: `per_sample` has shape {per.shape}; expected "
                             f"({B},), one energy per sample.")
    if not bool(jnp.all(jnp.isfinite(per))):
        raise AssertionError("2. total energy: `per_sample` is not finite at the initial "
                             "variables (perturbed).")
    total = float(_total_energy(model, z, x=x, y=y, energy=energy))
    _agree("2. total energy: pccore.energy against the sum of per_sample", total,
           float(per.sum()), 1e-12)

    # 3. samples are independent
    def one(i: int) -> float:
        pick = lambda a: None if a is None else a[i:i + 1]
        return float(energy.per_sample(prepared, tuple(pick(a) for a in z), pick(x),
                                       pick(y))[0])
    for i in range(B):
        _agree(f"3. samples are independent: sample {i}'s energy alone against in the batch",
               one(i), float(per[i]), 1e-10)

    # 4. activity gradient
    f = lambda zz: _total_energy(model, zz, x=x, y=y, energy=energy)
    d = _random_like(z, k_z)
    _agree("4. activity gradient: jax.grad against a finite difference",
           _dot(jax.grad(f)(z), d), _fd(f, z, d, 1e-5), 1e-5)

    # 5. inference descends it
    sol = infer(model, z, x=x, y=y, energy=energy, dt0=0.01, t1=0.2, throw=False)
    g0 = jax.grad(f)(z)
    n0 = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g0)) if z else 0.0
    if z and not (float(sol.energy) < total and float(sol.vector_field_norm) < n0):
        raise AssertionError(
            f"5. inference descends it: 20 Euler steps of 0.01 went from energy {total!r} to "
            f"{float(sol.energy)!r} and vector field {n0!r} to "
            f"{float(sol.vector_field_norm)!r}; both must decrease.")

    # 6. parameter gradient (the network's, and the variant's own where it has some)
    grads = param_grads(model, z, x=x, y=y, energy=energy)
    loss = lambda t: objective(t, model, energy, z, x, y)[0]
    dp = _random_like(model.trainable, k_p)
    _agree("6. parameter gradient: pccore.param_grads against a finite difference",
           _dot(grads, dp), _fd(loss, model.trainable, dp, 1e-5), 1e-5)

    # 7. activities
    acts = energy.activities(model, z, x)
    want = PC().variable_shapes(prepared, x is not None)
    got = tuple(a.shape[1:] for a in acts)
    if got != tuple(s.shape for s in want):
        raise AssertionError(
            f"7. activities: `activities` gave per-sample shapes {got}; pccore.PC infers "
            f"{tuple(s.shape for s in want)} for this model.")

    # 8. compiled
    jitted = float(jax.jit(lambda zz: energy.per_sample(energy.prepare(model), zz, x, y)
                           .sum())(z))
    _agree("8. compiled: the energy under jax.jit against eager", jitted, float(per.sum()),
           1e-12)
