"""Inference methods: the step contract, the one driver, and one module per family.

- `_base.py`: [`pccore.AbstractInference`][], [`pccore.AbstractJointInference`][],
  [`pccore.Fields`][];
- `_driver.py`: the loop that runs any method's steps;
- `_common.py`: the leaf helpers every route shares (energy gradients, the steady-state test);
- `_gradient_flow.py`: [`pccore.GradientFlow`][], diffrax solvers;
- `_optax.py`: [`pccore.OptaxInference`][], optax optimisers on the activities;
- `_optimistix.py`: [`pccore.OptimistixInference`][], optimistix minimisers;
- `_langevin.py`: [`pccore.Langevin`][], Monte Carlo PC's sampler;
- `_incremental.py`: [`pccore.IncrementalPC`][], activities and parameters stepped together.

A new family is one new module here (or in your own package) with no edit to the driver.
"""

from ._base import AbstractInference as AbstractInference
from ._base import AbstractJointInference as AbstractJointInference
from ._base import Fields as Fields
from ._base import descends as descends
from ._base import split_key as split_key
from ._driver import drive as drive
from ._gradient_flow import GradientFlow as GradientFlow
from ._incremental import IncrementalPC as IncrementalPC
from ._langevin import Langevin as Langevin
from ._langevin import MonteCarloPC as MonteCarloPC
from ._optax import OptaxInference as OptaxInference
from ._optimistix import OptimistixInference as OptimistixInference

__all__ = ["AbstractInference", "AbstractJointInference", "Fields", "GradientFlow",
           "IncrementalPC", "Langevin", "MonteCarloPC", "OptaxInference", "OptimistixInference", "descends", "drive", "split_key"]
