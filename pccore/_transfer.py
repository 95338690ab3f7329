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


def transfer_weights(src: PCModel, dst: PCModel) -> PCModel:
    """Copy `src`'s weights and biases into `dst`, layer by layer, across frameworks.

    Weight matrices and convolution kernels are located with each model's
    [`pccore.WeightSpec`][]s and converted between layouts: Equinox's `(out, in)` and
    `(out, in, *kernel)` (OIHW) against Haiku's and Flax's `(in, out)` and
    `(*kernel, in, out)` (HWIO). The other parameters of a layer (biases, norm scales) are
    matched in order and reshaped when only singleton axes differ (Equinox's conv bias is
    `(out, 1, 1)`, Haiku's and Flax's `(out,)`).

    **Arguments:**

    - `src`: the model to copy from.
    - `dst`: a model of the same architecture, in any framework.

    **Returns:** `dst` with `src`'s parameters (in `dst`'s layouts and dtypes).

    **Raises:** `ValueError` naming the first layer whose number or shapes of parameters
    differ.
    """
    if src.num_layers != dst.num_layers:
        raise ValueError(
            f"`dst` has {dst.num_layers} layers ({list(dst.names)}) but `src` has "
            f"{src.num_layers} ({list(src.names)}); transfer_weights needs models of the same "
            "architecture."
        )
    new = []
    for l in range(src.num_layers):
        where = f"layer {l} (src {src.names[l]!r}, dst {dst.names[l]!r})"
        s_leaves = jtu.tree_leaves(src.params[l])
        d_leaves, treedef = jtu.tree_flatten(dst.params[l])
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
        s_rest = [x for i, x in enumerate(s_leaves) if i not in {w.index for w in s_w}]
        d_rest = [i for i in range(len(d_leaves)) if i not in {w.index for w in d_w}]
        if len(s_rest) != len(d_rest):
            raise ValueError(
                f"{where}: `src` has {len(s_rest)} other parameters (biases, ...) but `dst` has "
                f"{len(d_rest)}; the architectures differ (e.g. a layer with and one without bias)."
            )
        for x, i in zip(s_rest, d_rest):
            if np.size(x) != np.size(d_leaves[i]):
                raise ValueError(
                    f"{where}: parameter of shape {tuple(np.shape(x))} in `src` against "
                    f"{tuple(np.shape(d_leaves[i]))} in `dst`; the architectures differ."
                )
            out[i] = jnp.reshape(jnp.asarray(x), np.shape(d_leaves[i])).astype(d_leaves[i].dtype)
        new.append(jtu.tree_unflatten(treedef, out))
    return dst.with_params(tuple(new))
