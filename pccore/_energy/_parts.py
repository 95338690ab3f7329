"""The check that a variant's loss, parameterisation and regularisers are pccore objects."""

import dataclasses
from typing import Any

from .._check import check_part
from ._loss import AbstractLoss
from ._parameterisation import AbstractParameterisation
from ._regularise import AbstractRegulariser


def check_energy_parts(owner: str, energy: Any) -> None:
    """The `loss`, `parameterisation` and `regularisers` a variant holds are pccore objects."""

    fields = {f.name for f in dataclasses.fields(energy)}
    if "loss" in fields:
        check_part(owner, "loss", energy.loss, AbstractLoss,
                   "pccore.MSE(), pccore.CrossEntropy()")
    if "parameterisation" in fields:
        check_part(owner, "parameterisation", energy.parameterisation, AbstractParameterisation,
                   "pccore.SP(), pccore.NTP(), pccore.MuPC()")
    if "regularisers" in fields:
        regs = energy.regularisers
        if not isinstance(regs, tuple):
            raise TypeError(
                f"`{owner}`: `regularisers` must be a tuple of pccore regularisers; got "
                f"{type(regs).__name__}. E.g. `regularisers=(pccore.WeightDecay(1e-4),)`."
            )
        for i, r in enumerate(regs):
            check_part(owner, f"regularisers[{i}]", r, AbstractRegulariser,
                       "pccore.WeightDecay(1e-4), pccore.SpectralPenalty(1e-3)")
