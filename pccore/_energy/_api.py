"""The energy functions of the public API: the batch energy, its per-layer terms, and the
initial activities (validated entry points, compiled)."""

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from .._check import check_activities, check_data
from .._custom_types import Activities, BatchArray, Scalar
from .._model import PCModel
from ._abstract import AbstractEnergy
from ._base import PC
from ._init import AbstractInit, FeedForward


def energy(
    model: PCModel,
    activities: Activities,
    *,
    x: BatchArray | None = None,
    y: BatchArray | None,
    energy: AbstractEnergy = PC(),
) -> Scalar:
    r"""The energy $\mathcal F = \sum_i F_i$ of a batch: the *sum* over samples.

    Its gradient in the activities drives inference. Divide by the batch size for the
    parameter objective (see the batch convention above; [`pccore.param_grads`][] does).

    **Arguments:**

    - `model`: a [`pccore.PCModel`][].
    - `activities`: the inference variables (for [`pccore.PC`][]: $z_1..z_{L-1}$, or
        $z_0..z_{L-1}$ when `x` is None).
    - `x`: the clamped bottom (input or prior), or None for a free bottom.
    - `y`: the clamped top (target or observation), or None for a free top.
    - `energy`: the variant, e.g. `PC(loss=CrossEntropy())`.

    **Returns:** a scalar, $\sum_i F_i$ (activity regularisers included).
    """
    x, y = check_data(model, energy, x, y, scan_device=True)
    activities = check_activities(model, energy, activities, x, y, scan_device=True)
    return _energy(model, activities, x, y, energy)


@eqx.filter_jit
def _energy(model, activities, x, y, energy):
    return energy.per_sample(energy.prepare(model), activities, x, y).sum()


@eqx.filter_jit
def _layer_energies(model, activities, x, y, energy):
    return energy.layer_energies(energy.prepare(model), activities, x, y).sum(axis=0)


def layer_energies(
    model: PCModel,
    activities: Activities,
    *,
    x: BatchArray | None = None,
    y: BatchArray | None,
    energy: AbstractEnergy = PC(),
) -> Float[Array, " terms"]:
    """Per-layer energies $[E_1, \\dots, E_L]$ in layer order, each summed over the batch.

    They add up to [`pccore.energy`][] without activity regularisers.
    """
    x, y = check_data(model, energy, x, y, scan_device=True)
    activities = check_activities(model, energy, activities, x, y, scan_device=True)
    return _layer_energies(model, activities, x, y, energy)


def init_activities(
    model: PCModel,
    x: BatchArray | None = None,
    *,
    y: BatchArray | None = None,
    energy: AbstractEnergy = PC(),
    init: AbstractInit = FeedForward(),
    key: PRNGKeyArray | None = None,
) -> Activities:
    """Initial inference variables: feed-forward from `x` by default.

    **Arguments:**

    - `model`, `x`, `y`, `energy`: as in [`pccore.energy`][].
    - `init`: [`pccore.FeedForward`][] (default) or [`pccore.RandomNormal`][] (free bottoms).
    - `key`: a PRNG key, for random initialisers.

    **Returns:** a tuple of arrays, one per inference variable.
    """
    x, y = check_data(model, energy, x, y, scan_device=True)
    if x is None and y is None:
        raise ValueError("`x` and `y` are both None; pass at least one to fix the batch size.")
    return _init_activities(model, x, y, energy, init, key)


@eqx.filter_jit
def _init_activities(model, x, y, energy, init, key):
    return energy.init(energy.prepare(model), x, y, init, key)
