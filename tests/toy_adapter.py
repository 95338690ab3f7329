"""A toy third-party adapter: a model given as a list of `(function, params)` pairs.

Each function is `f(params, x) -> y`, batched; weight matrices are leaves named `"W"` in
(in, out) layout. Used by tests/test_adapters_registry.py through the public registry.
"""

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from pccore.adapters import AbstractAdapter

import pccore


class Pairs(list):
    """The toy framework's model type: a list of (function, params) pairs."""


class PairsAdapter(AbstractAdapter):
    name = "toy.pairs"
    framework_module = "tests.toy_adapter"
    priority = 5

    def matches(self, model: Any) -> bool:
        return isinstance(model, Pairs)

    def wrap(self, model: Any, variables: Any = None, *, input_shape=None, **options) -> pccore.PCModel:
        fns = tuple(f for f, _ in model)
        params = tuple(p for _, p in model)
        if input_shape is None:
            input_shape = (params[0]["W"].shape[0],)
        in_shape = jax.ShapeDtypeStruct(tuple(input_shape), params[0]["W"].dtype)
        out_shapes, x = [], jax.ShapeDtypeStruct((1, *in_shape.shape), in_shape.dtype)
        for f, p in zip(fns, params):
            x = jax.eval_shape(f, p, x)
            out_shapes.append(jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
        weights = []
        for p in params:
            paths = [jtu.keystr(k) for k, _ in jtu.tree_flatten_with_path(p)[0]]
            weights.append(tuple(pccore.WeightSpec(i, -1) for i, k in enumerate(paths) if k == "['W']"))
        return pccore.PCModel(
            layers=fns, params=params, in_shape=in_shape, out_shapes=tuple(out_shapes),
            names=tuple(f"pair_{i}" for i in range(len(fns))), weights=tuple(weights),
            skips=(False,) * len(fns), framework=self.name,
            rebuild=lambda ps: Pairs(zip(fns, ps)),
        )


def dense_tanh(p, x):
    return jnp.tanh(x @ p["W"] + p["b"])


def dense(p, x):
    return x @ p["W"] + p["b"]
