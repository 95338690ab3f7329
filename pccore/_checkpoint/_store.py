"""One checkpoint: save it, verify it, restore it into a template (naming the first damaged
or mismatching parameter)."""

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from . import _files, _legacy
from ._commit import stranded, write_committed, writer_lock
from ._format import (
    Checkpoint,
    CheckpointError,
    Damaged,
    array_sha256,
    describe,
    first_line,
    handlers,
    is_saved_leaf,
    is_typed_key,
    load_manifest,
    load_orbax,
    save_args,
    saved_leaves,
    stored_target,
    sync,
)


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: Any,
    opt_state: Any,
    step: int,
    key: Any = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the full training state to the directory `path`, atomically (orbax-checkpoint).

    **Arguments:**

    - `path`: the checkpoint directory to create (e.g. `runs/a/step_00000010`).
    - `model`: the model (a [`pccore.PCModel`][] or any pytree of arrays).
    - `opt_state`: the optimiser state.
    - `step`: a non-negative int (step or epoch count).
    - `key`: a PRNG key to resume the random stream with, or None.
    - `config`: a JSON-serialisable dict (the run's configuration), or None.
    - `overwrite`: replace an existing checkpoint at `path`. The old one is renamed aside to
        `.old-NAME-*` and removed once the new one is committed; if the save is interrupted
        before that, readers ([`pccore.read_manifest`][], [`pccore.restore_checkpoint`][],
        [`pccore.CheckpointManager`][]) use the set-aside checkpoint and the next save to
        `path` (or in the manager's directory) renames it back, so an interrupted save always
        leaves the previous checkpoint.

    With several processes, every process calls it (each writes the shards it holds).

    **Returns:** the checkpoint's path, once it is committed.

    **Raises:** [`pccore.CheckpointError`][] if another writer holds the directory (one
    writer per directory, an advisory lock held by process 0).
    """
    path = Path(path)
    args = save_args(model, opt_state, step, key, config)
    ocp = load_orbax()

    def write(args: Any) -> None:
        with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers(ocp)))) as c:
            c.save(path, args=args)

    primary = jax.process_index() == 0
    if primary:
        path.parent.mkdir(parents=True, exist_ok=True)
    sync("save_checkpoint:mkdir")
    with writer_lock(path.parent) if primary else contextlib.nullcontext():
        old = write_committed(path, args, overwrite, write)
        if primary:
            _files.write_index(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _damaged(path: Path, manifest: dict[str, Any], what: str) -> Damaged:
    """The error for a damaged checkpoint, naming the first parameter that orbax cannot read
    or reads back with another SHA-256 (each read alone, one after the other), and `what`
    is wrong with the files."""
    ocp = load_orbax()
    for leaf in manifest["leaves"]:
        name = leaf["path"]
        try:
            with contextlib.closing(ocp.Checkpointer(ocp.PyTreeCheckpointHandler())) as c:
                got = c.restore(path / "state", args=ocp.args.PyTreeRestore(
                    {name: stored_target(leaf)}, partial_restore=True,
                    restore_args={name: ocp.RestoreArgs(restore_type=np.ndarray)},
                ))[name]
        except Exception as e:
            why = f"orbax-checkpoint cannot read it: {first_line(e)}"
        else:
            if leaf["sha256"] is None or array_sha256(got) == leaf["sha256"]:
                continue
            why = "its data does not match the SHA-256 in the manifest"
        return Damaged(
            f"Checkpoint {str(path)!r} is truncated or corrupted: the first damaged parameter is "
            f"`{name}` ({why}; {what}). Restore an earlier step."
        )
    return Damaged(
        f"Checkpoint {str(path)!r} is truncated or corrupted: {what}. Restore an earlier step."
    )


def _read(path: Path, manifest: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
    """The arrays of the checkpoint, read into `targets` and checked against their SHA-256
    (this is the verification of an orbax checkpoint: orbax reads a flipped byte in an
    array's data back without complaint)."""
    if manifest["format_version"] == 1:
        try:
            _legacy.verify(path, manifest)
        except _legacy.LegacyError as e:
            raise Damaged(str(e)) from None
        return targets
    damage = _files.damage(path)
    if damage is not None:  # found before orbax reads a damaged file
        raise _damaged(path, manifest, damage)
    ocp = load_orbax()
    with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers(ocp)))) as c:
        try:
            arrays = c.restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore(targets)))
        except Exception as e:
            raise _damaged(path, manifest, "orbax-checkpoint cannot read the arrays") from e
    arrays = arrays["state"]
    for leaf in manifest["leaves"]:
        if leaf["sha256"] is not None and array_sha256(arrays[leaf["path"]]) not in (None, leaf["sha256"]):
            raise _damaged(path, manifest, "orbax-checkpoint read back other bytes than were saved")
    return arrays


def _verify(path: Path, manifest: dict[str, Any]) -> None:
    """Check the checkpoint's files against `files.json`, or without one, read its arrays."""
    if manifest["format_version"] == 1 or not _files.has_index(path):
        _read(path, manifest, {leaf["path"]: stored_target(leaf) for leaf in manifest["leaves"]})
        return
    damage = _files.damage(path)
    if damage is not None:
        raise _damaged(path, manifest, damage)


def read_manifest(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`, checked; with `verify`, the data too: every
    array is read and compared with the SHA-256 its manifest records (a pccore 0.1
    checkpoint's `state.eqx` as a whole).

    **Raises:** [`pccore.CheckpointError`][] if the checkpoint is missing, unreadable,
    truncated or corrupted (naming the first damaged parameter), or its manifest lacks a
    field or has one of the wrong type.
    """
    path = stranded(Path(path)) or Path(path)  # set aside by an `overwrite` not yet committed
    manifest = load_manifest(path)
    if verify:
        _verify(path, manifest)
    return manifest


def _energy_params_hint(*paths: str) -> str:
    """The fix when a mismatch is the energy's parameters held on one side only."""
    if not any(".energy_params" in p for p in paths):
        return ""
    return (" The model of one side holds energy parameters (`model.energy_params`) and the "
            "other does not: build the template as the saved run did, "
            "`model = model.with_energy_params(energy.init_params(model))` and "
            "`opt_state = optim.init(model.trainable)`.")


def _check_fits(path: Path, saved: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    for got, want in zip(saved, expected):
        if got["path"] != want["path"]:
            raise CheckpointError(
                f"Checkpoint {str(path)!r} does not fit the template: the first mismatching "
                f"parameter is `{want['path']}` in the template but `{got['path']}` in the "
                "checkpoint (a different architecture or optimiser). Build the model and "
                "optimiser exactly as for the saved run."
                + _energy_params_hint(got["path"], want["path"])
            )
        if (got["shape"], got["dtype"], got.get("impl")) != (
            want["shape"], want["dtype"], want.get("impl")
        ):
            raise CheckpointError(
                f"Checkpoint {str(path)!r} does not fit the template: the first mismatching "
                f"parameter is `{want['path']}`: got {describe(got)} in the checkpoint, "
                f"expected {describe(want)} (the template's). Build the model with the same "
                "architecture and dtype as the saved run."
            )
    if len(saved) != len(expected):
        longer, side = (saved, "checkpoint") if len(saved) > len(expected) else (expected, "template")
        extra = longer[min(len(saved), len(expected))]["path"]
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not fit the template: the checkpoint has "
            f"{len(saved)} saved leaves, the template {len(expected)}; the first mismatching "
            f"parameter is `{extra}`, present only in the {side}. Build the model and optimiser "
            "exactly as for the saved run." + _energy_params_hint(extra)
        )


def _target(leaf: Any) -> Any:
    """What orbax restores a leaf into: the template array's shape, dtype and sharding."""
    data = jax.random.key_data(leaf) if is_typed_key(leaf) else leaf
    if isinstance(data, jax.Array):
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)
    return np.zeros_like(np.asarray(data))


def _fill(tree: Any, prefix: str, arrays: dict[str, Any]) -> Any:
    """`tree` with every saved leaf replaced by its restored array, of the leaf's kind."""

    def fill(path: Any, leaf: Any) -> Any:
        if not is_saved_leaf(leaf):
            return leaf
        a = arrays[prefix + jtu.keystr(path)]
        if is_typed_key(leaf):
            return jax.random.wrap_key_data(a, impl=jax.random.key_impl(leaf))
        if isinstance(leaf, bool | int | float | complex):
            return type(leaf)(np.asarray(a).item())
        if isinstance(leaf, np.generic):
            return leaf.dtype.type(np.asarray(a))
        return np.asarray(a) if isinstance(leaf, np.ndarray) else a

    return jtu.tree_map_with_path(fill, tree)


def restore_checkpoint(path: str | os.PathLike[str], *, model: Any, opt_state: Any) -> Checkpoint:
    """Restore the training state saved at `path` into a template.

    **Arguments:**

    - `path`: a checkpoint directory written by [`pccore.save_checkpoint`][] (or by
        pccore 0.1).
    - `model`, `opt_state`: a freshly built model and `optim.init(model.trainable)` (for a
        model without energy parameters, `optim.init(model.params)`) of the same
        architecture, dtype and optimiser; they give the types and structure to fill, and
        the sharding of each array (a template sharded over several hosts is restored so).
        A model saved with energy parameters needs a template holding them too:
        `model.with_energy_params(energy.init_params(model))`.

    **Returns:** a [`pccore.Checkpoint`][] with your own model type.

    **Raises:** [`pccore.CheckpointError`][] if the checkpoint is missing, truncated or
    corrupted (naming the first damaged parameter), or does not fit the template (naming the
    first mismatching parameter).
    """
    path = stranded(Path(path)) or Path(path)  # set aside by an `overwrite` not yet committed
    manifest = load_manifest(path)
    framework = getattr(model, "framework", None)
    if manifest["framework"] is not None and framework is not None and manifest["framework"] != framework:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds a model from {manifest['framework']!r}; the "
            f"template `model` is from {framework!r}. Pass a {manifest['framework']} model of "
            "the same architecture, wrapped with `pccore.wrap`."
        )
    expected = [{"path": name, **spec} for part, tree in (("model", model), ("opt_state", opt_state))
                for name, _, spec in saved_leaves(tree, part)]
    saved = [leaf for leaf in manifest["leaves"] if not leaf["path"].startswith("key")]
    _check_fits(path, saved, expected)
    key_leaves = [leaf for leaf in manifest["leaves"] if leaf["path"].startswith("key")]
    key_template = jnp.zeros(key_leaves[0]["shape"], key_leaves[0]["dtype"]) if key_leaves else None
    template = {"model": model, "opt_state": opt_state, "key": key_template}
    if manifest["format_version"] == 1:
        _read(path, manifest, {})  # verifies state.eqx
        try:
            tree = _legacy.read(path, manifest, template)
        except _legacy.LegacyError as e:
            raise CheckpointError(str(e)) from e.__cause__
    else:
        targets = {name: _target(leaf) for part, t in template.items() for name, leaf, _ in saved_leaves(t, part)}
        arrays = _read(path, manifest, targets)
        tree = {part: _fill(t, part, arrays) for part, t in template.items()}
    key = tree["key"]
    if manifest["key"] is not None and manifest["key"]["kind"] == "typed":
        key = jax.random.wrap_key_data(key, impl=manifest["key"]["impl"])
    return Checkpoint(
        model=tree["model"],
        opt_state=tree["opt_state"],
        step=manifest["step"],
        key=key,
        config=manifest["config"],
        version=manifest["pccore_version"],
        framework=manifest["framework"],
    )
