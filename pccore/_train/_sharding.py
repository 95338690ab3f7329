r"""Data parallelism on JAX's own machinery: a 1-D device mesh and `NamedSharding`.

pccore's engine is jitted end to end, so data parallelism needs no special code path: place
the batch sharded along its first axis over a mesh and the parameters replicated, and
[`pccore.train_step`][], [`pccore.infer`][] and [`pccore.evaluate`][] run on every device,
each on its slice of the batch. XLA inserts the one all-reduce the parameter gradient needs
(the batch mean $\frac1B\sum_i \nabla_\theta F_i$); inference is per sample and needs no
communication at all. Outputs keep the placement: activities stay sharded, parameters and
optimiser state stay replicated.

Multi-host: call `jax.distributed.initialize()` first in every process; the mesh then spans
every device of every process, and each process passes its own slice of the global batch to
[`pccore.shard_batch`][] (see `docs/scaling.md`).
"""

from collections.abc import Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"
"""The name of the data-parallel mesh axis."""

T = TypeVar("T")


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices`, with its one axis named `"batch"`.

    **Arguments:**

    - `devices`: the devices to spread the batch over; default `jax.devices()`, that is all
        local devices on one host, and every device of every process after
        `jax.distributed.initialize()`.

    **Returns:** a `jax.sharding.Mesh` of shape `(len(devices),)`.
    """
    if isinstance(devices, str | bytes) or (
        devices is not None and not isinstance(devices, Sequence | np.ndarray)
    ):
        raise TypeError(
            f"`devices` must be a sequence of jax.Device or None; got {type(devices).__name__} "
            f"{devices!r}. E.g. `jax.devices()` or `jax.devices('cpu')` (a platform name is "
            "not a device list)."
        )
    devices = jax.devices() if devices is None else list(devices)
    bad = [d for d in devices if not isinstance(d, jax.Device)]
    if bad:
        raise TypeError(
            f"`devices` must hold jax.Device objects; got {type(bad[0]).__name__} "
            f"{bad[0]!r}. Pass e.g. `jax.devices()`."
        )
    if len(devices) == 0:
        raise ValueError("`devices` is empty; pass at least one device, e.g. `jax.devices()`.")
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def _mesh(mesh: Mesh | None) -> Mesh:
    if mesh is None:
        return data_parallel_mesh()
    if not isinstance(mesh, Mesh) or BATCH_AXIS not in mesh.axis_names:
        raise TypeError(
            f"`mesh` must be a jax.sharding.Mesh with an axis named {BATCH_AXIS!r}; got "
            f"{mesh!r}. Build one with `pccore.data_parallel_mesh()`."
        )
    return mesh


def _place(a: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    # Multi-host: every process holds its own slice (batch) or a full copy (replicated).
    return jax.make_array_from_process_local_data(sharding, np.asarray(a))


def shard_batch(batch: T, mesh: Mesh | None = None) -> T:
    """Place a batch (an array or a pytree of arrays) sharded along axis 0 over `mesh`.

    Every leaf is split into `mesh.shape["batch"]` equal slices along its first axis, one per
    device (`NamedSharding(mesh, PartitionSpec("batch"))`). With several processes, each
    process passes its *own* slice of the global batch and the result is the global array.

    **Arguments:**

    - `batch`: e.g. `x` or `(x, y)`; NumPy or JAX arrays with the batch on axis 0.
    - `mesh`: a mesh with a `"batch"` axis; default [`pccore.data_parallel_mesh`][]`()`.

    **Returns:** the same structure of globally sharded `jax.Array`s.
    """
    mesh = _mesh(mesh)
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    n_local = mesh.shape[BATCH_AXIS] // jax.process_count()

    def place(path, a):
        shape = np.shape(a)
        if len(shape) == 0 or shape[0] % n_local != 0 or shape[0] == 0:
            where = jtu.keystr(path) or "the array"
            raise ValueError(
                f"`batch`: {where} has shape {shape}; expected a non-empty batch axis 0 whose "
                f"size is a multiple of the {n_local} local devices of the mesh. Use a batch "
                f"size divisible by {n_local}, or drop the last incomplete batch."
            )
        return _place(a, sharding)

    return jtu.tree_map_with_path(place, batch)


def replicate(tree: T, mesh: Mesh | None = None) -> T:
    """Copy every array of `tree` (a model, an optimiser state, ...) to every device of `mesh`.

    Non-array leaves (layer functions, static metadata) are left as they are, so a
    [`pccore.PCModel`][] stays a `PCModel`.

    **Arguments:**

    - `tree`: any pytree, e.g. `(model, opt_state)`.
    - `mesh`: a mesh with a `"batch"` axis; default [`pccore.data_parallel_mesh`][]`()`.

    **Returns:** `tree` with its arrays replicated (`NamedSharding(mesh, PartitionSpec())`).
    """
    sharding = NamedSharding(_mesh(mesh), PartitionSpec())
    return jtu.tree_map(lambda a: _place(a, sharding) if eqx.is_array(a) else a, tree)


def data_parallel(model: T, opt_state: Any = None, mesh: Mesh | None = None) -> tuple[Mesh, T, Any]:
    """Set up data-parallel training in one call: a mesh, and the state replicated on it.

    **Arguments:**

    - `model`: the [`pccore.PCModel`][] (any pytree).
    - `opt_state`: its optimiser state, or None.
    - `mesh`: default [`pccore.data_parallel_mesh`][]`()` (all devices).

    **Returns:** `(mesh, model, opt_state)`; then place each batch with
    `x, y = pccore.shard_batch((x, y), mesh)`.
    """
    mesh = _mesh(mesh)
    model, opt_state = replicate((model, opt_state), mesh)
    return mesh, model, opt_state
