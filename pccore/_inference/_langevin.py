r"""Monte Carlo predictive coding's inference: Langevin dynamics on the activities.

Instead of descending to the minimum of $\mathcal F$, the activities sample the posterior
$p(z \mid x, y) \propto \exp(-\mathcal F(z) / T)$ (Oliviers, Tang and Bogacz, *Learning
probability distributions of sensory inputs with Monte Carlo predictive coding*, 2024):

$$z \leftarrow z - h\,\nabla_z \mathcal F(z) + \sqrt{2hT}\,\xi, \qquad \xi \sim \mathcal N(0, I).$$

On a quadratic energy (a deep linear network, Hessian $H$, minimum $z^*$) the chain is
Gaussian with mean $z^*$ and, for this unadjusted discretisation, the stationary covariance
$T\,(H - \tfrac h2 H^2)^{-1}$ exactly, which tends to the posterior's $T H^{-1}$ as
$h \to 0$ (stable for $h\,\lambda_{\max}(H) < 2$).

Training: [`pccore.MonteCarloPC`][] averages the parameter gradient over the chain's samples
after a burn-in, a Monte Carlo estimate of the expected gradient
$\mathbb E_{z \sim p}[\nabla_\theta \mathcal F]$ that MCPC follows. (`Langevin` in a
training step updates once, at the last sample: a one-sample estimate.) A new `key` each
step gives new samples, with no recompilation: the key is an argument of the compiled step.
"""

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PRNGKeyArray

from .._custom_types import Activities
from ._base import AbstractInference, AbstractJointInference, Fields


class Langevin(AbstractInference):
    r"""Langevin dynamics on the activities, Monte Carlo PC's inference (a sampler of
    $\exp(-\mathcal F / T)$):
    $z \leftarrow z - h\,\nabla_z \mathcal F + \sqrt{2hT}\,\xi$.

    ```python
    step = pccore.TrainStep(optax.adam(1e-3), method=pccore.Langevin(0.05), max_steps=100)
    for i, (x, y) in enumerate(batches):
        model, opt_state, stats = step(model, opt_state, x=x, y=y,
                                       key=jax.random.fold_in(key, i))  # a new sample each step
    ```

    It draws its noise from the solve's key (`key=` of [`pccore.infer`][] or the training
    step, required): the same key gives the same sample, a new key a new one, with no
    recompilation. As a sampler it does not descend the energy, so ending above the start
    is not reported; `max_steps` (default 20) sets the chain's length.

    **Arguments:**

    - `step_size`: $h > 0$ (stable for $h\,\lambda_{\max}(H) < 2$ on the energy's Hessian).
    - `temperature`: $T \ge 0$; $T = 0$ is gradient descent with step $h$.
    """

    step_size: float = 0.05
    temperature: float = 1.0
    needs_key = True
    descends = False

    def __check_init__(self) -> None:
        if not (isinstance(self.step_size, int | float) and self.step_size > 0):
            raise ValueError(f"`Langevin(step_size={self.step_size!r})`: expected a positive "
                             "number, e.g. 0.05.")
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ValueError(f"`Langevin(temperature={self.temperature!r})`: expected a number "
                             ">= 0 (1.0 samples the posterior exp(-F)).")

    def init(self, fields: Fields, z0: Activities, key: PRNGKeyArray | None) -> Any:
        assert key is not None  # the driver gives a sampler its key (needs_key)
        return key

    def step(self, fields: Fields, z: Activities, g: Activities,
             state: Any) -> tuple[Activities, Any]:
        key, sub = jax.random.split(state)
        leaves, treedef = jtu.tree_flatten(z)
        keys = jax.random.split(sub, max(len(leaves), 1))
        noise = jtu.tree_unflatten(treedef, [jax.random.normal(k, a.shape, a.dtype)
                                             for k, a in zip(keys, leaves)])
        scale = (2 * self.step_size * self.temperature) ** 0.5
        new = jtu.tree_map(lambda a, b, n: a - self.step_size * b + scale * n, z, g, noise)
        return new, key




class MonteCarloPC(AbstractJointInference):
    r"""Monte Carlo predictive coding's training step: Langevin sampling of the activities
    ([`pccore.Langevin`][]), and one parameter update with the gradient averaged over the
    chain's samples after a burn-in,

    $$\theta \leftarrow \theta + \mathrm{update}\Big(\frac1K \sum_{k=1}^{K}
      \nabla_\theta \mathcal L(z^{(b+k)}; \theta)\Big),$$

    a Monte Carlo estimate of $\mathbb E_{z \sim p(z \mid x, y)}[\nabla_\theta \mathcal L]$
    with $p \propto \exp(-\mathcal F / T)$ (Oliviers, Tang and Bogacz 2024).

    ```python
    step = pccore.TrainStep(optax.adam(1e-3), method=pccore.MonteCarloPC(0.05, burn_in=20,
                                                                         num_samples=10))
    model, opt_state, stats = step(model, opt_state, x=x, y=y, key=jax.random.fold_in(key, i))
    ```

    It runs `burn_in + num_samples` steps (the default `max_steps`; a smaller one is
    refused), in a training step only ([`pccore.TrainStep`][], [`pccore.train_step`][]); each call needs a `key`.
    The parameters stay fixed while the chain runs. For inference alone, sample with
    `pccore.infer(..., method=pccore.Langevin(...))`.

    **Arguments:**

    - `step_size`, `temperature`: as in [`pccore.Langevin`][].
    - `burn_in`: steps before the first sample used, $b \ge 0$.
    - `num_samples`: samples averaged, $K \ge 1$ (one per step).
    """

    step_size: float = 0.05
    temperature: float = 1.0
    burn_in: int = 20
    num_samples: int = 10
    needs_key = True

    def __check_init__(self) -> None:
        Langevin(self.step_size, self.temperature)  # the same checks
        for name in ("burn_in", "num_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (name == "num_samples"):
                raise ValueError(f"`MonteCarloPC({name}={v!r})`: expected a whole number "
                                 f">= {int(name == 'num_samples')}.")

    def init_joint(self, z0: Activities, key: PRNGKeyArray | None, params: Any,
                   opt_state: Any) -> Any:
        assert key is not None
        total = jtu.tree_map(jnp.zeros_like, params)
        return params, opt_state, key, total, jnp.zeros((), jnp.int32)

    def params(self, state: Any) -> tuple[Any, Any]:
        return state[0], state[1]

    def steps_needed(self) -> int | None:
        return self.burn_in + self.num_samples

    def finished(self, state: Any) -> Any:
        return state[4] >= self.burn_in + self.num_samples

    def step(self, fields: Fields, z: Activities, g: Activities,
             state: Any) -> tuple[Activities, Any]:
        assert fields.param_grad is not None and fields.param_update is not None
        params, opt_state, key, total, k = state
        z, key = Langevin(self.step_size, self.temperature).step(fields, z, g, key)
        grads = fields.param_grad(z, params)
        use = k >= self.burn_in
        total = jtu.tree_map(lambda t, u: jnp.where(use, t + u, t), total, grads)
        last = k + 1 == self.burn_in + self.num_samples
        mean = jtu.tree_map(lambda t: t / self.num_samples, total)
        new_params, new_opt = fields.param_update(mean, opt_state, params)
        pick = lambda a, b: jtu.tree_map(lambda u, v: jnp.where(last, u, v), a, b)
        return z, (pick(new_params, params), pick(new_opt, opt_state), key, total, k + 1)


__all__ = ["Langevin", "MonteCarloPC"]
