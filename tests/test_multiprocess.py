"""Training across processes with `jax.distributed`: 2 processes on localhost, 2 CPU devices
each, a batch sharded over the 4 global devices, against one process on one device.

CPU collectives go through gloo, so this runs on one machine with no accelerator. The
worker is `tests/multiprocess_worker.py`; `docs/scaling.md` shows the same recipe.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import pccore
from tests import multiprocess_worker as worker

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args_of, n: int = 2, timeout: float = 240) -> None:
    """Start `n` processes (`args_of(pid, port)` is each one's argv) and wait for all."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    port = _port()
    procs = [subprocess.Popen([sys.executable, *args_of(pid, port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(n)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for pid, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {pid} exited with {p.returncode}:\n{out[-3000:]}"


def _one_process(model, opt_state, steps: int = worker.STEPS):
    step = pccore.TrainStep(worker.setup()[1])
    x, y = worker.data()
    for _ in range(steps):
        model, opt_state, _ = step(model, opt_state, x=x, y=y)
    return model, opt_state


def _max_err(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(la, lb))


def _restore(path: Path):
    model, optim = worker.setup()
    return pccore.restore_checkpoint(path, model=model, opt_state=optim.init(model.params))


def test_two_processes_train_as_one_and_share_checkpoints(tmp_path):
    model, optim = worker.setup()
    ref_model, ref_opt = _one_process(model, optim.init(model.params))

    # 2 processes x 2 devices: 5 steps, checkpoint at step 5
    mp = tmp_path / "mp"
    launch(lambda pid, port: ["-m", "tests.multiprocess_worker", str(pid), "2", str(port),
                              str(mp)])
    ckpt = _restore(mp / "step_00000005")
    assert ckpt.step == 5
    assert _max_err(ckpt.model.params, ref_model.params) < 1e-5
    assert _max_err(ckpt.opt_state, ref_opt) < 1e-5

    # a one-process checkpoint resumed by two processes: 5 more steps, as one process does
    one = tmp_path / "one"
    pccore.CheckpointManager(one).save(5, model=ref_model, opt_state=ref_opt)
    again = tmp_path / "again"
    launch(lambda pid, port: ["-m", "tests.multiprocess_worker", str(pid), "2", str(port),
                              str(again), str(one / "step_00000005")])
    ref2_model, ref2_opt = _one_process(ref_model, ref_opt)
    ckpt2 = _restore(again / "step_00000005")
    assert _max_err(ckpt2.model.params, ref2_model.params) < 1e-5
    assert _max_err(ckpt2.opt_state, ref2_opt) < 1e-5
    # and the two-process checkpoint resumes in one process like the one-process run
    cont_model, _ = _one_process(ckpt.model, ckpt.opt_state)
    assert _max_err(cont_model.params, ref2_model.params) < 1e-5


def test_the_cli_trains_over_two_processes_and_writes_one_result(tmp_path):
    """`pccore train --data-parallel`, launched once per process, as docs/scaling.md shows;
    against the same command in one process on one device."""
    import json

    common = ["-m", "pccore", "train", "--framework", "equinox", "--epochs", "1",
              "--train-limit", "256", "--test-limit", "64", "--batch-size", "32",
              "--hidden", "16", "--steps", "5", "--no-plot"]
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    launch(lambda pid, port: [*common, "--data-parallel", "--coordinator", f"localhost:{port}",
                              "--num-processes", "2", "--process-id", str(pid),
                              "--out", str(out), "--checkpoint-dir", str(ckpt)])
    assert sorted(p.name for p in out.iterdir()) == ["train.json"]
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == \
        ["step_00000001"]
    run = json.loads((out / "train.json").read_text())["results"][0]

    one = tmp_path / "one"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, *common, "--out", str(one)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=240)
    ref = json.loads((one / "train.json").read_text())["results"][0]
    assert run["training_steps"] == ref["training_steps"] == 8
    np.testing.assert_allclose(run["train_loss"], ref["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(run["final_energy"], ref["final_energy"], rtol=1e-4)
    assert abs(run["final_accuracy"] - ref["final_accuracy"]) <= 1 / 64
