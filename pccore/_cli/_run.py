"""Training runs for the command-line tool: predictive coding through any adapter, and backprop."""

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from .._builders import Weights, canonical_weights
from .._checkpoint._manager import CheckpointManager
from ._options import AbstractVariant, SolverConfig
from .._train._evaluate import evaluate
from .._inference._infer import infer
from .._model import PCModel
from .._results import RESULTS
from .._train._sharding import data_parallel as _data_parallel
from .._train._sharding import shard_batch as _shard_batch
from ..datasets import Dataset


@dataclasses.dataclass
class RunResult:
    """One training run: per-epoch curves and the figures of the comparison table.

    `final_energy` is the batch-mean energy at the inferred activities, averaged over the last
    epoch's training steps (for backprop: the training loss). `energy_trace` is the batch-mean
    energy along one inference solve on the first test batch with the final weights, at
    `trace_times`. `updates_skipped` of the `training_steps` run here left the weights
    unchanged because inference diverged (`TrainStats.updated` False). `first_step_energy`
    is the batch-mean energy at the inferred activities of this run's first training step
    (NaN for backprop), the same in every framework from the same weights. `variant` names
    the PC variant (None for backprop) and `label` the row (`pccore compare --variants`
    labels rows by variant); `name` is the label, else the framework.
    """

    framework: str
    test_accuracy: list[float]
    train_loss: list[float]
    final_energy: float
    step_ms: float
    inference_steps: float
    updates_skipped: int
    seconds: float
    trace_times: list[float]
    energy_trace: list[float]
    weights: Weights = dataclasses.field(repr=False)
    weight_difference: float | None = None
    training_steps: int = 0
    first_step_energy: float = float("nan")
    variant: str | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.framework

    @property
    def never_updated(self) -> bool:
        """Every training step of this run was skipped (inference diverged on each)."""
        return self.training_steps > 0 and self.updates_skipped == self.training_steps

    @property
    def final_accuracy(self) -> float:
        return self.test_accuracy[-1]

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        del out["weights"]
        out["final_accuracy"] = self.final_accuracy
        return out


def batches(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """A shuffled `(num_batches, batch_size)` index array; the last partial batch is dropped,
    so every training step has the same shapes (one compilation)."""
    if batch_size > n:
        raise ValueError(
            f"`--batch-size` {batch_size} is larger than the training set ({n} samples); lower it."
        )
    perm = rng.permutation(n)
    k = n // batch_size
    return perm[: k * batch_size].reshape(k, batch_size)


def _timed(fn: Callable, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, 1000 * (time.perf_counter() - start)


def progress_bar(total: int, desc: str, enabled: bool, file: TextIO | None = None) -> Any:
    """A tqdm bar on stderr (or `file`): nothing is drawn when `enabled` is False or the
    stream is not a terminal (tqdm's `disable=None`), so logs and pipes stay clean. Lines
    printed with its `write` go to stdout above the bar."""
    return tqdm(total=total, desc=desc, disable=(not enabled) or None,
                file=sys.stderr if file is None else file, leave=True, dynamic_ncols=True)


def _energy_trace(model, variant, data, batch_size, solver: SolverConfig):
    x, y = variant.roles(data.x_test[:batch_size], data.y_test[:batch_size])
    ts = solver.save_times()
    model, init = variant.inference_setup(model)
    sol = infer(model, x=x, y=y, energy=variant.energy, init=init, key=jax.random.key(0),
                saveat=diffrax.SaveAt(ts=ts), throw=False, **solver.kwargs)
    if not (solver.adaptive or solver.is_optax):
        ts = jnp.round(ts / solver.dt0)  # constant steps: the x-axis counts steps
    return [float(t) for t in ts], [float(e) / x.shape[0] for e in sol.energies]


def train_pc(
    framework: str,
    model: PCModel,
    variant: AbstractVariant,
    solver: SolverConfig,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
    log: Callable[[str], None] | None = None,
    checkpoints: CheckpointManager | None = None,
    resume: bool = False,
    config: dict | None = None,
    data_parallel: bool = False,
) -> RunResult:
    """Train `model` with predictive coding; the batches depend on `seed` only.

    With `checkpoints`, the state is saved atomically after every epoch; with `resume`, the
    run continues from the latest valid checkpoint and gives the same weights as a run that
    was never interrupted. With `data_parallel`, each batch is sharded over all devices: those of
every process after `jax.distributed.initialize`, each process feeding its own rows.
    """
    optim = optax.adam(lr)
    opt_state = variant.init_opt(optim, model)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    first = 0
    if resume and checkpoints is not None and checkpoints.latest_step() is not None:
        ckpt = checkpoints.restore(model=model, opt_state=opt_state)
        model, opt_state, key, first = ckpt.model, ckpt.opt_state, ckpt.key, ckpt.step
        for _ in range(first):  # replay the shuffles of the epochs already done
            batches(data.x_train.shape[0], batch_size, rng)
        if log is not None:
            log(f"resumed from {checkpoints.path(first)} (epoch {first}/{epochs})")
    mesh = None
    if data_parallel:
        mesh, model, opt_state = _data_parallel(model, opt_state)
    accs, losses, times, steps, energies = [], [], [], [], []
    skipped, start = 0, time.perf_counter()
    first_energy = None
    n_batches = data.x_train.shape[0] // batch_size
    with progress_bar((epochs - first) * n_batches, f"{framework:>8}", progress) as bar:
        for epoch in range(first, epochs):
            epoch_loss, epoch_energy, epoch_skipped, epoch_raised = [], [], 0, 0
            for idx in batches(data.x_train.shape[0], batch_size, rng):
                key, sub = jax.random.split(key)
                if mesh is None:
                    x, y = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
                else:  # every process feeds its own rows of the global batch
                    n, i = jax.process_count(), jax.process_index()
                    rows = idx[i * len(idx) // n:(i + 1) * len(idx) // n]
                    x, y = _shard_batch((data.x_train[rows], data.y_train[rows]), mesh)
                (model, opt_state, stats), ms = _timed(
                    variant.step, model, optim, opt_state, x, y, solver, sub
                )
                times.append(ms)
                steps.append(int(stats.num_steps))
                epoch_skipped += int(not stats.updated)
                epoch_raised += int(stats.result == RESULTS.energy_increased)
                epoch_loss.append(float(stats.loss))
                epoch_energy.append(float(stats.energy))
                if first_energy is None:
                    first_energy = epoch_energy[-1]
                bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} energy {epoch_energy[-1]:.4f}",
                                    refresh=False)
                bar.update(1)
            accs.append(variant.accuracy(model, data.x_test, data.y_test))
            losses.append(float(np.mean(epoch_loss)))
            energies = epoch_energy
            skipped += epoch_skipped
            if log is not None:
                bar.write(log_line(framework, epoch, epochs, losses[-1], np.mean(energies), accs[-1],
                                   skipped=epoch_skipped, steps=len(epoch_loss),
                                   raised=epoch_raised))
            if checkpoints is not None:
                checkpoints.save(epoch + 1, model=model, opt_state=opt_state, key=key,
                                 config=config)
    if not accs:  # resumed after the last epoch: nothing left to train
        accs.append(variant.accuracy(model, data.x_test, data.y_test))
        losses.append(float("nan"))
    times_t, trace = _energy_trace(model, variant, data, batch_size, solver)
    return RunResult(
        framework=framework,
        test_accuracy=accs,
        train_loss=losses,
        final_energy=float(np.mean(energies)) if energies else float("nan"),
        step_ms=float(np.median(times[1:] if len(times) > 1 else times)) if times else 0.0,
        inference_steps=float(np.mean(steps)) if steps else 0.0,
        updates_skipped=skipped,
        seconds=time.perf_counter() - start,
        trace_times=times_t,
        energy_trace=trace,
        weights=canonical_weights(variant.network(model)),
        training_steps=len(times),
        first_step_energy=float("nan") if first_energy is None else first_energy,
    )


def log_line(name, epoch, epochs, loss, energy, acc, *, skipped: int = 0, steps: int = 0,
             raised: int = 0) -> str:
    """One epoch's line; with skipped updates, how many of the epoch's `steps` and why; with
    steps whose inference raised the energy (an unstable step size), how many and the fix."""
    line = (f"{name} epoch {epoch + 1:>3}/{epochs}  loss {loss:.4f}  energy {energy:.4f}  "
            f"test accuracy {100 * acc:.2f}%")
    if skipped:
        line += f"  skipped updates {skipped}/{steps} (inference diverged)"
    if raised:
        line += (f"  inference raised the energy on {raised}/{steps} steps (unstable: lower "
                 "--dt0 or use an adaptive solver)")
    return line


@eqx.filter_jit
def _backprop_step(model, optim, opt_state, x, y, energy):
    def loss_fn(params):
        prepared = energy.prepare(model.with_params(params))
        return energy.output_loss(energy.predict(prepared, x), y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(model.params)
    updates, opt_state = optim.update(grads, opt_state, model.params)
    return model.with_params(optax.apply_updates(model.params, updates)), opt_state, loss


def train_backprop(
    model: PCModel,
    variant: AbstractVariant,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> RunResult:
    """Backprop on the same architecture, starting weights, loss, batches and optimiser.

    `model` is a plain network laid out as `variant.network(...)`; it is trained and scored
    with `variant.backprop_energy`."""
    energy = variant.backprop_energy
    optim = optax.adam(lr)
    opt_state = optim.init(model.params)
    rng = np.random.default_rng(seed)
    accs, losses, times = [], [], []
    start = time.perf_counter()
    n_batches = data.x_train.shape[0] // batch_size
    with progress_bar(epochs * n_batches, "backprop", progress) as bar:
        for _ in range(epochs):
            epoch_loss = []
            for idx in batches(data.x_train.shape[0], batch_size, rng):
                x, y = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
                (model, opt_state, loss), ms = _timed(
                    _backprop_step, model, optim, opt_state, x, y, energy
                )
                times.append(ms)
                epoch_loss.append(float(loss))
                bar.update(1)
            accs.append(float(evaluate(model, data.x_test, data.y_test, energy=energy).accuracy))
            losses.append(float(np.mean(epoch_loss)))
    return RunResult(
        framework="backprop",
        test_accuracy=accs,
        train_loss=losses,
        final_energy=losses[-1],
        step_ms=float(np.median(times[1:] if len(times) > 1 else times)),
        inference_steps=0.0,
        updates_skipped=0,
        seconds=time.perf_counter() - start,
        trace_times=[],
        energy_trace=[],
        weights=canonical_weights(model),
        training_steps=len(times),
    )
