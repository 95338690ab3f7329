r"""Closed forms for deep linear networks, used as oracles for the engine.

For $f_l(z) = W_l z$ (no biases, no activations), MSE output and a clamped input, write
$A_1 = a_1 W_1$, $A_l = a_l W_l$ (or $I + a_l W_l$ with a skip) for $1 < l < L$ and
$A_L = a_L W_L$, with the parameterisation's scalings $a_l$ and output precision $\lambda$.
The energy is then the negative log-joint of $z_l = A_l z_{l-1} + \epsilon_l$,
$\epsilon_l \sim \mathcal N(0, I)$,
$y = A_L z_{L-1} + \epsilon_L$, $\epsilon_L \sim \mathcal N(0, I/\lambda)$.

- equilibrium energy: $F^* = \tfrac12 \sum_i r_i^\top S^{-1} r_i$ with $r_i = y_i - A_L \cdots A_1 x_i$
  (no activity decay; with one, $F^* = c - \tfrac12 b^\top z^*$, see below);
- rescaling matrix: $S = I/\lambda + \sum_{l=1}^{L-1} M_l M_l^\top$, $M_l = A_L \cdots A_{l+1}$;
- activity Hessian (per sample, block-tridiagonal): $H_{l,l} = (1+\alpha) I + c_l A_{l+1}^\top A_{l+1}$
  ($c_{L-1} = \lambda$, else 1; $\alpha$ the activity decay), $H_{l+1,l} = -A_{l+1}$;
- equilibrium activities: $z^* = H^{-1} b$, $b_1 = A_1 x$, $b_{L-1} \mathrel{+}= \lambda A_L^\top y$.

Energies are batch **sums**, as [`pccore.energy`][] and [`pccore.InferenceSolution`][]`.energy`
return; divide by the batch size for the batch means of [`pccore.TrainStats`][] (see the
Units section of the concepts page). Gradients are of the batch mean, as
[`pccore.param_grads`][] returns.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float

from ._energy._base import PC
from ._energy._loss import MSE
from ._model import PCModel


def _check(model: PCModel, energy: PC) -> None:
    if not isinstance(energy, PC) or not isinstance(energy.loss, MSE):
        raise ValueError(
            "`energy`: the linear theory covers PC(loss=MSE()) only; got "
            f"{energy!r}."
        )
    for l in range(model.num_layers):
        if model.reads_input and model.reads_input[l]:
            raise ValueError(
                f"`model`: layer {l} ({model.names[l]!r}) reads the clamped model input besides "
                "its own input; the linear theory needs f_l(z) = W_l z, a function of the "
                "layer's input alone."
            )
        n_leaves = len(jtu.tree_leaves(model.params[l]))
        if len(model.weights[l]) != 1 or n_leaves != 1:
            raise ValueError(
                f"`model`: layer {l} ({model.names[l]!r}) has {n_leaves} parameter arrays and "
                f"{len(model.weights[l])} weight matrices; the linear theory needs exactly one "
                "weight and no bias per layer (build the layers with use_bias=False / "
                "with_bias=False)."
            )


def linear_maps(model: PCModel, energy: PC = PC()) -> list[Float[Array, "out in"]]:
    """The effective maps $A_1, \\dots, A_L$ (scalings and skips included).

    Raises if a layer is not linear without bias (checked on a random probe, also under jit).
    """
    _check(model, energy)
    return _linear_maps(model, energy)


def _linear_maps(model: PCModel, energy: PC) -> list[Array]:
    prepared = energy.prepare(model)
    maps = []
    for l in range(model.num_layers):
        (W,) = prepared.weight_matrices(l)
        if prepared.skips[l]:
            W = W + jnp.eye(W.shape[0], dtype=W.dtype)
        shape = prepared.in_shape.shape if l == 0 else prepared.out_shapes[l - 1].shape
        probe = jax.random.normal(jax.random.key(l), (2, int(np.prod(shape))), W.dtype)
        got = prepared.predict_layer(l, probe.reshape(2, *shape)).reshape(2, -1)
        ok = jnp.allclose(got, probe @ W.T, rtol=1e-4, atol=1e-5)
        msg = (
            f"`model`: layer {l} ({model.names[l]!r}) is not the linear map of its weight "
            "(it has an activation or another nonlinearity); the linear theory needs "
            "f_l(z) = W_l z."
        )
        if isinstance(ok, jax.core.Tracer):  # under jax.grad/jit: checked at run time
            W = eqx.error_if(W, ~ok, msg)
        elif not ok:
            raise ValueError(msg)
        maps.append(W)
    return maps


def _chain(maps):
    out = maps[0]
    for A in maps[1:]:
        out = A @ out
    return out


@eqx.filter_jit
def linear_rescaling(model: PCModel, energy: PC = PC()) -> Float[Array, "out out"]:
    """The rescaling matrix $S = I/\\lambda + \\sum_{l=1}^{L-1} M_l M_l^\\top$."""
    maps = linear_maps(model, energy)
    lam = energy.parameterisation.output_precision
    d = maps[-1].shape[0]
    S = jnp.eye(d, dtype=maps[-1].dtype) / lam
    for l in range(1, len(maps)):
        M = _chain(maps[l:])
        S = S + M @ M.T
    return S


@eqx.filter_jit
def linear_equilibrium_energy(
    model: PCModel, x: Float[Array, "batch ..."], y: Float[Array, "batch ..."], *,
    energy: PC = PC(),
) -> Float[Array, ""]:
    """The energy at equilibrium, a batch **sum** $\\sum_i F_i^*$ (as [`pccore.energy`][]).

    Without activity decay, $F^* = \\tfrac12 \\sum_i r_i^\\top S^{-1} r_i$. With an activity
    decay $\\alpha$ (a number or an array, also traced), $F$ is the quadratic
    $\\tfrac12 z^\\top H z - b^\\top z + c$ with $c = \\tfrac12 \\lVert A_1 x \\rVert^2 +
    \\tfrac\\lambda2 \\lVert y \\rVert^2$, so $F^* = c - \\tfrac12 b^\\top z^*$.

    Differentiable in `model.params`: its gradient equals the PC parameter gradient at the
    equilibrium (envelope theorem), times the batch size.
    """
    maps = linear_maps(model, energy)
    B = x.shape[0]
    decay = energy.activity_decay
    if len(maps) == 1 or (isinstance(decay, int | float) and decay == 0):
        r = y.reshape(B, -1) - x.reshape(B, -1) @ _chain(maps).T
        S = linear_rescaling(model, energy)
        return 0.5 * jnp.sum(r * jnp.linalg.solve(S, r.T).T)
    lam = energy.parameterisation.output_precision
    z = linear_equilibrium_activities(model, x, y, energy=energy)
    first = x.reshape(B, -1) @ maps[0].T
    c = 0.5 * jnp.sum(first**2) + 0.5 * lam * jnp.sum(y**2)
    b_dot_z = jnp.sum(first * z[0].reshape(B, -1)) + lam * jnp.sum(
        (y.reshape(B, -1) @ maps[-1]) * z[-1].reshape(B, -1))
    return c - 0.5 * b_dot_z


@eqx.filter_jit
def linear_equilibrium_energy_grad(
    model: PCModel, x: Float[Array, "batch ..."], y: Float[Array, "batch ..."], *,
    energy: PC = PC(),
) -> tuple:
    r"""$\nabla_\theta \frac1B F^*(\theta)$: the gradient of the batch-mean closed-form energy.

    By the envelope theorem this equals [`pccore.param_grads`][] at the equilibrium
    activities (the PC parameter gradient), so it is an oracle for the update path. Regularisers
    are not included. **Returns:** a tree with the structure of `model.params`.
    """
    B = x.shape[0]
    return jax.grad(
        lambda p: linear_equilibrium_energy(model.with_params(p), x, y, energy=energy) / B
    )(model.params)


@eqx.filter_jit
def linear_activity_hessian(model: PCModel, energy: PC = PC()) -> Float[Array, "n n"]:
    """The per-sample Hessian of $F$ in the hidden activities $z_1..z_{L-1}$ (dense)."""
    maps = linear_maps(model, energy)
    lam = energy.parameterisation.output_precision
    L = len(maps)
    dims = [A.shape[0] for A in maps[:-1]]
    offs = np.concatenate([[0], np.cumsum(dims)])
    H = jnp.zeros((offs[-1], offs[-1]), maps[0].dtype)
    for l in range(L - 1):
        A = maps[l + 1]
        c = lam if l == L - 2 else 1.0
        blk = (1.0 + energy.activity_decay) * jnp.eye(dims[l], dtype=A.dtype) + c * A.T @ A
        H = H.at[offs[l]:offs[l + 1], offs[l]:offs[l + 1]].set(blk)
        if l < L - 2:
            H = H.at[offs[l + 1]:offs[l + 2], offs[l]:offs[l + 1]].set(-A)
            H = H.at[offs[l]:offs[l + 1], offs[l + 1]:offs[l + 2]].set(-A.T)
    return H


@eqx.filter_jit
def linear_equilibrium_activities(
    model: PCModel, x: Float[Array, "batch ..."], y: Float[Array, "batch ..."], *,
    energy: PC = PC(),
) -> tuple[Array, ...]:
    """The equilibrium hidden activities $z^* = H^{-1} b$, per sample, shaped as the latents."""
    maps = linear_maps(model, energy)
    lam = energy.parameterisation.output_precision
    B = x.shape[0]
    dims = [A.shape[0] for A in maps[:-1]]
    b = [jnp.zeros((B, d), maps[0].dtype) for d in dims]
    b[0] = b[0] + x.reshape(B, -1) @ maps[0].T
    b[-1] = b[-1] + lam * y.reshape(B, -1) @ maps[-1]
    H = linear_activity_hessian(model, energy)
    z = jnp.linalg.solve(H, jnp.concatenate(b, axis=1).T).T
    splits = np.cumsum(dims)[:-1]
    return tuple(
        zl.reshape(B, *model.out_shapes[l].shape)
        for l, zl in enumerate(jnp.split(z, splits, axis=1))
    )


__all__ = [
    "linear_activity_hessian",
    "linear_equilibrium_activities",
    "linear_equilibrium_energy",
    "linear_equilibrium_energy_grad",
    "linear_maps",
    "linear_rescaling",
]
