"""`pccore.wrap`: any supported model to a [`pccore.PCModel`][]."""

from typing import Any

from ._custom_types import Model
from ._model import PCModel


def wrap(model: Model, variables: Any = None, *, skips: bool = False, **options: Any) -> PCModel:
    """Decompose a model into the layer chain predictive coding runs on.

    **Arguments:**

    - `model`: an Equinox model (`eqx.nn.MLP`, `eqx.nn.Sequential`, a list/tuple of layers
        and callables), a Haiku `hk.Transformed`, a Flax Linen module or a Flax NNX module, or
        any object a registered adapter handles (see [`pccore.adapters.register`][]).
    - `variables`: the parameters where the framework keeps them apart (Haiku params, Linen
        variables; Equinox `eqx.nn.State` of frozen BatchNorm layers).
    - `skips`: add identity residual skips on hidden-to-hidden layers
        (see [`pccore.PCModel.with_skips`][]).
    - `**options`: adapter options, e.g. `input_shape=(1, 8, 8)`.

    Parameter-free work between parameterised layers (activations, reshapes, pooling) folds
    into the layer before it, so the latents are post-activation.

    **Returns:** a [`pccore.PCModel`][]; `unwrap()` gives back the native object.
    """
    if isinstance(model, PCModel):
        if variables is not None or options:
            raise ValueError("`model` is already a PCModel; `variables` and options do not apply.")
        return model.with_skips(skips) if skips else model
    from pccore.adapters import get_adapter

    out = get_adapter(model).wrap(model, variables, **options)
    return out.with_skips(skips) if skips else out
