"""Copy the weights of one wrapped model into another of the same architecture."""

import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._model import PCModel


def _to_canonical(w, out_axis: int):
    """`(out, in, *kernel)` from a weight whose output axis is `out_axis` (0 or -1)."""
    n = w.ndim
    if out_axis % n == 0:
        return w
    if out_axis % n == n - 1:  # (*kernel, in, out)
        return jnp.transpose(w, (n - 1, n - 2, *range(n - 2)))
    raise ValueError(f"unsupported weight layout: out_axis={out_axis} for a {n}-d weight")


def _from_canonical(w, out_axis: int):
    n = w.ndim
    if out_axis % n == 0:
        return w
    return jnp.transpose(w, (*range(2, n), 1, 0))  # (out, in, *kernel) -> (*kernel, in, out)


# What a parameter that is not a weight matrix or kernel is for, read from its name in each
# framework: Equinox's norms `weight`/`bias`, Haiku's `scale`/`offset` (and `b` of a
# Linear or Conv), Flax's `scale`/`bias`. Norm scales and shifts have the same shape, and
# each framework orders them differently, so their order cannot pair them.
_ROLES = {"scale": "scale", "gamma": "scale", "weight": "scale",
          "bias": "shift", "b": "shift", "offset": "shift", "beta": "shift"}


def _role(path) -> str | None:
    """The role of a leaf from its last name (None if the name is not a known one)."""
    for k in reversed(path):
        name = getattr(k, "name", getattr(k, "key", None))
        if isinstance(name, str) and name not in ("value", "raw_value"):
            return _ROLES.get(name)
    return None


def _pair_rest(where: str, s_rest: list, d_rest: list) -> list:
    """Pair the other parameters of a layer, `[(src position, dst position)]`, each given as
    `(position, path)`: by role when every name on both sides is a known one, else in order."""
    s_roles = [_role(p) for _, p in s_rest]
    d_roles = [_role(p) for _, p in d_rest]
    if None in s_roles or None in d_roles:
        return [(a, b) for (a, _), (b, _) in zip(s_rest, d_rest)]
    if sorted(s_roles) != sorted(d_roles):
        raise ValueError(
            f"{where}: `src`'s other parameters are {s_roles} and `dst`'s are {d_roles} (read "
            "from their names); the architectures differ."
        )
    return [
        (a, b)
        for role in dict.fromkeys(s_roles)
        for (a, _), (b, _) in zip(
            [x for x, r in zip(s_rest, s_roles) if r == role],
            [x for x, r in zip(d_rest, d_roles) if r == role],
        )
    ]


def transfer_weights(src: PCModel, dst: PCModel) -> PCModel:
    """Copy `src`'s weights and biases into `dst`, layer by layer, across frameworks.

    Weight matrices and convolution kernels are located with each model's
    [`pccore.WeightSpec`][]s and converted between layouts: Equinox's `(out, in)` and
    `(out, in, *kernel)` (OIHW) against Haiku's and Flax's `(in, out)` and
    `(*kernel, in, out)` (HWIO). The other parameters of a layer (biases, norm scales and
    shifts) are matched by role, read from their names (Equinox's `weight`/`bias` of a norm,
    Haiku's `scale`/`offset` and `b`, Flax's `scale`/`bias`), in order among those of one
    role, or in order alone when a name is not one of these. They are reshaped when only
    singleton axes differ (Equinox's conv bias is `(out, 1, 1)`, Haiku's and Flax's `(out,)`).

    **Arguments:**

    - `src`: the model to copy from.
    - `dst`: a model of the same architecture, in any framework.

    **Returns:** `dst` with `src`'s parameters (in `dst`'s layouts and dtypes).

    **Raises:** `ValueError` naming the first layer whose number or shapes of parameters
    differ.
    """
    for name, m in (("src", src), ("dst", dst)):
        if not isinstance(m, PCModel):
            raise TypeError(
                f"`{name}` must be a pccore.PCModel; got {type(m).__name__}. Wrap the model "
                f"first: `transfer_weights(pccore.wrap(a), pccore.wrap(b))`, then `unwrap()` "
                "the result."
            )
    if src.num_layers != dst.num_layers:
        raise ValueError(
            f"`dst` has {dst.num_layers} layers ({list(dst.names)}) but `src` has "
            f"{src.num_layers} ({list(src.names)}); transfer_weights needs models of the same "
            "architecture."
        )
    new = []
    for l in range(src.num_layers):
        where = f"layer {l} (src {src.names[l]!r}, dst {dst.names[l]!r})"
        s_paths, _ = jtu.tree_flatten_with_path(src.params[l])
        d_paths, treedef = jtu.tree_flatten_with_path(dst.params[l])
        s_leaves, d_leaves = [x for _, x in s_paths], [x for _, x in d_paths]
        s_w, d_w = src.weights[l], dst.weights[l]
        if len(s_w) != len(d_w):
            raise ValueError(
                f"{where}: `src` has {len(s_w)} weight matrices/kernels but `dst` has {len(d_w)}; "
                "the architectures differ."
            )
        out = list(d_leaves)
        for k, (a, b) in enumerate(zip(s_w, d_w)):
            ws, wd = s_leaves[a.index], d_leaves[b.index]
            cs = _to_canonical(jnp.asarray(ws), a.out_axis)
            cd_shape = _to_canonical(jnp.zeros(np.shape(wd)), b.out_axis).shape
            if cs.shape != cd_shape:
                raise ValueError(
                    f"{where}: weight {k} has shape {tuple(np.shape(ws))} in `src` and "
                    f"{tuple(np.shape(wd))} in `dst`, i.e. (out, in, *kernel) = {cs.shape} vs "
                    f"{cd_shape}; the architectures differ."
                )
            out[b.index] = _from_canonical(cs, b.out_axis).astype(wd.dtype)
        s_rest = [(i, p) for i, (p, _) in enumerate(s_paths) if i not in {w.index for w in s_w}]
        d_rest = [(i, p) for i, (p, _) in enumerate(d_paths) if i not in {w.index for w in d_w}]
        if len(s_rest) != len(d_rest):
            raise ValueError(
                f"{where}: `src` has {len(s_rest)} other parameters (biases, ...) but `dst` has "
                f"{len(d_rest)}; the architectures differ (e.g. a layer with and one without bias)."
            )
        for j, i in _pair_rest(where, s_rest, d_rest):
            x = s_leaves[j]
            if np.size(x) != np.size(d_leaves[i]):
                raise ValueError(
                    f"{where}: parameter of shape {tuple(np.shape(x))} in `src` against "
                    f"{tuple(np.shape(d_leaves[i]))} in `dst`; the architectures differ."
                )
            out[i] = jnp.reshape(jnp.asarray(x), np.shape(d_leaves[i])).astype(d_leaves[i].dtype)
        new.append(jtu.tree_unflatten(treedef, out))
    return dst.with_params(tuple(new))
