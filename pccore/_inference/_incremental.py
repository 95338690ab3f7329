r"""Incremental predictive coding: activities and parameters stepped together.

Every inference step moves the activities by $-h\,\nabla_z \mathcal F$ and then takes one
step of the training optimiser on the parameters at the new activities, so learning does
not wait for an equilibrium (Salvatori et al., *A stable, fast, and fully automatic learning
algorithm for predictive coding networks*, ICLR 2024):

$$z_{t+1} = z_t - h\,\nabla_z \mathcal F(z_t; \theta_t), \qquad
\theta_{t+1} = \theta_t + \mathrm{update}\big(\nabla_\theta \mathcal L(z_{t+1}; \theta_t)\big),$$

with $\mathcal L = \frac1B \sum_i F_i + R(\theta)$ the training objective.
"""

from typing import Any

from jaxtyping import PRNGKeyArray

from .._custom_types import Activities
from ._base import AbstractJointInference, Fields


class IncrementalPC(AbstractJointInference):
    r"""Incremental PC (iPC): one activity step of size $h$, then one update of the training
    optimiser, at every inference step.

    ```python
    step = pccore.TrainStep(optax.sgd(1e-2), method=pccore.IncrementalPC(0.1), max_steps=20)
    model, opt_state, stats = step(model, step.init(model), x=x, y=y)
    ```

    It runs in a training step ([`pccore.TrainStep`][], [`pccore.train_step`][]), which
    hands it the parameters and the optimiser state and takes them back after `max_steps`
    steps (default 20) or a steady state; `stats.energy` is the energy at the end, at the
    final parameters. `pccore.infer` refuses it (it has no parameters to update).

    **Arguments:** `step_size`, $h > 0$, the activities' Euler step.
    """

    step_size: float = 0.1

    def __check_init__(self) -> None:
        if not (isinstance(self.step_size, int | float) and self.step_size > 0):
            raise ValueError(f"`IncrementalPC(step_size={self.step_size!r})`: expected a "
                             "positive number, e.g. 0.1.")

    def init_joint(self, z0: Activities, key: PRNGKeyArray | None, params: Any,
                   opt_state: Any) -> Any:
        return params, opt_state

    def params(self, state: Any) -> tuple[Any, Any]:
        return state

    def step(self, fields: Fields, z: Activities, g: Activities,
             state: Any) -> tuple[Activities, Any]:
        assert fields.param_grad is not None and fields.param_update is not None
        params, opt_state = state
        z = tuple(a - self.step_size * b for a, b in zip(z, g))
        grads = fields.param_grad(z, params)
        return z, fields.param_update(grads, opt_state, params)


__all__ = ["IncrementalPC"]
