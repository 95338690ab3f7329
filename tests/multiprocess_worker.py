"""One process of a multi-process data-parallel run (started by tests/test_multiprocess.py).

`python -m tests.multiprocess_worker PROCESS_ID NUM_PROCESSES PORT OUT [RESUME]`: joins the
`jax.distributed` run on localhost (CPU, gloo collectives; the parent sets
`XLA_FLAGS=--xla_force_host_platform_device_count=2`), trains 5 steps on the global batch of
`tests.multiprocess_worker.data()` sharded over every process's devices, each process feeding
its own rows, and saves a checkpoint of the result in OUT (step 5). With RESUME, a checkpoint
directory, it starts from that checkpoint instead of the initial model.
"""

import sys
from pathlib import Path

STEPS = 5
GLOBAL_BATCH = 8


def setup():
    """The model and optimiser every process (and the one-process reference) builds."""
    import jax
    import optax

    from tests import cases

    model = cases.build_mlp("equinox", cases.canonical_mlp([3, 8, 8, 2], jax.random.key(0)))
    return model, optax.adam(1e-2)


def data():
    """The global batch, float32."""
    import jax

    kx, ky = jax.random.split(jax.random.key(1))
    return (jax.random.normal(kx, (GLOBAL_BATCH, 3)), jax.random.normal(ky, (GLOBAL_BATCH, 2)))


def main(argv: list[str]) -> None:
    pid, n, port, out = int(argv[0]), int(argv[1]), argv[2], Path(argv[3])
    resume = Path(argv[4]) if len(argv) > 4 else None
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=n, process_id=pid)
    import numpy as np

    import pccore

    assert jax.process_count() == n and jax.device_count() == 2 * n, jax.devices()
    model, optim = setup()
    opt_state = optim.init(model.params)
    if resume is not None:
        ckpt = pccore.restore_checkpoint(resume, model=model, opt_state=opt_state)
        model, opt_state = ckpt.model, ckpt.opt_state
    mesh, model, opt_state = pccore.data_parallel(model, opt_state)
    x, y = data()
    rows = slice(pid * GLOBAL_BATCH // n, (pid + 1) * GLOBAL_BATCH // n)  # this process's rows
    x_local, y_local = np.asarray(x)[rows], np.asarray(y)[rows]
    for _ in range(STEPS):
        xs, ys = pccore.shard_batch((x_local, y_local), mesh)
        model, opt_state, stats = pccore.train_step(model, optim, opt_state, x=xs, y=ys)
        assert bool(stats.updated)
    pccore.CheckpointManager(out).save(STEPS, model=model, opt_state=opt_state)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
