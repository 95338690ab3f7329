"""Checkpoints of the full training state, stored with orbax-checkpoint, verified on load.

A checkpoint is a directory `step_00000012/` that orbax-checkpoint writes and commits
atomically (a temporary `step_00000012.orbax-checkpoint-tmp` directory renamed into
place once every process has written its part). It holds two orbax items:

- `state/`: every array of the model, the optimiser state and the RNG key, one per leaf,
    named by its path (`model.params[0][0].weight`); a typed PRNG key anywhere in the model
    or optimiser state (e.g. `optax.noisy_sgd`'s) is stored as its key data and comes back
    as a typed key of the same implementation. Arrays sharded over several hosts are written
    by the processes that hold them.
- `manifest/manifest.json`: what pccore adds on top: the step, the configuration, the pccore
    version and framework, and the path, shape, dtype and SHA-256 (of the bytes) of every
    saved leaf.

After the commit, process 0 adds `files.json`, the size and SHA-256 of every file, so
that a checkpoint is verified (`latest_step`, `read_manifest`) without reading its arrays.

Orbax does the storage, the atomic commit, keep-N (`max_to_keep`) and the coordination of
several processes. pccore checks the manifest, `files.json`, the template (naming the first
mismatching parameter) and each array's SHA-256, which catches damage orbax reads back
silently (a flipped byte in an array's data); a damaged checkpoint's error names the first
damaged parameter. A save stopped between the commit and `files.json` leaves a complete
checkpoint, verified by reading its arrays.

**Atomicity.** A save interrupted at any point (an exception, `SIGKILL`) leaves no
`step_*` directory, only orbax's temporary one, which readers ignore and the next
[`pccore.CheckpointManager.save`][] removes. Replacing an existing checkpoint
(`overwrite=True`) first renames the old directory aside to `.old-step_...-*`; until the new
one is committed, readers use the set-aside checkpoint and the next save renames it back,
so an interrupted save never loses the previous checkpoint.

**One writer per directory.** A save holds an advisory lock (`flock`) on the directory it
writes into, and [`pccore.CheckpointManager.hold`][] holds it for a whole run; a second
writer gets a [`pccore.CheckpointError`][] naming the directory. With several processes
(`jax.distributed`), every process calls `save` (orbax writes each process's shards); the
lock and pccore's file operations are process 0's.

**Checkpoints of pccore 0.1** (`step_*/state.eqx` and `manifest.json`, written with
`equinox.tree_serialise_leaves`) are still read, verified by their file's SHA-256; new
saves write the orbax layout, also into a directory holding old steps.

Saves are synchronous: `save` returns once the checkpoint is committed and indexed.
orbax-checkpoint is the `checkpoint` extra (`pip install "pccore[checkpoint]"`), imported
when a checkpoint is written or an orbax checkpoint's arrays are read.
"""

import contextlib
import glob
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per directory is then on you
    fcntl = None

_FORMAT = "pccore-checkpoint"
_FORMAT_VERSION = 2  # 1: pccore 0.1 (state.eqx); 2: orbax-checkpoint
_MANIFEST = "manifest/manifest.json"
_MANIFEST_V1 = "manifest.json"
_FILES = "files.json"
_TMP = ".orbax-checkpoint-tmp"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_DIR = re.compile(r"^\.old-(step_(\d+))-[0-9a-f]{8}$")


def _ocp():
    """orbax.checkpoint, imported on first use (it is optional, and slow to import)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            "pccore checkpoints are stored with orbax-checkpoint, which is not installed: "
            'pip install "pccore[checkpoint]" (or pip install orbax-checkpoint).'
        ) from e
    return ocp


def _sync(name: str) -> None:
    """A barrier of all processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"pccore:{name}")


class CheckpointError(Exception):
    """A checkpoint is missing, truncated, corrupted, or does not fit the template."""


class Checkpoint(eqx.Module):
    """A restored training state.

    **Fields:**

    - `model`: the model, of the template's type (e.g. a [`pccore.PCModel`][]).
    - `opt_state`: the optimiser state, of the template's structure.
    - `step`: the step (or epoch) number it was saved at.
    - `key`: the saved PRNG key, or None.
    - `config`: the saved configuration (a JSON dict; tuples come back as lists).
    - `version`: the pccore version that wrote it.
    - `framework`: the model's framework (`"equinox"`, ...), or None if not a `PCModel`.
    """

    model: Any
    opt_state: Any
    step: int
    key: Any
    config: dict[str, Any]
    version: str
    framework: str | None


def _version() -> str:
    try:
        return importlib.metadata.version("pccore")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0"


def _is_saved_leaf(x: Any) -> bool:
    # Arrays and Python/NumPy scalars (what `eqx.default_serialise_filter_spec` wrote in 0.1).
    return isinstance(x, jax.Array | np.ndarray | np.generic | bool | int | float | complex)


def _is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _saved(tree: Any, prefix: str) -> list[tuple[str, Any, dict[str, Any]]]:
    """(path, leaf, spec) of every saved leaf of `tree`."""
    out = []
    for path, leaf in jtu.tree_leaves_with_path(tree):
        if not _is_saved_leaf(leaf):
            continue
        if _is_typed_key(leaf):
            impl = str(jax.random.key_impl(leaf))
            spec = {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "impl": impl}
        elif isinstance(leaf, jax.Array | np.ndarray | np.generic):
            spec = {"shape": list(np.shape(leaf)), "dtype": str(leaf.dtype)}
        else:
            spec = {"shape": [], "dtype": type(leaf).__name__}
        out.append((prefix + jtu.keystr(path), leaf, spec))
    return out


def _leaf_specs(tree: Any, prefix: str) -> list[dict[str, Any]]:
    return [{"path": name, **spec} for name, _, spec in _saved(tree, prefix)]


def _stored(leaf: Any) -> Any:
    """What orbax stores for a leaf: key data for a typed key; NumPy for host values and,
    with several processes, for arrays local to this process (orbax writes those from
    process 0, as it does NumPy arrays; they are the same on every process)."""
    if _is_typed_key(leaf):
        leaf = jax.random.key_data(leaf)
    if not isinstance(leaf, jax.Array) or (jax.process_count() > 1 and leaf.is_fully_addressable):
        return np.asarray(leaf)
    return leaf


def _array_sha256(a: Any) -> str | None:
    """SHA-256 of an array's bytes (host copy); None for an array no process holds whole."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        if not a.is_fully_replicated:
            return None
        a = a.addressable_data(0)
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()


def _describe(spec: dict[str, Any]) -> str:
    impl = f" ({spec['impl']})" if "impl" in spec else ""
    return f"shape {tuple(spec['shape'])} {spec['dtype']}{impl}"


def _key_parts(key: Any) -> tuple[Any, dict[str, Any] | None]:
    if key is None:
        return None, None
    if not isinstance(key, jax.Array | np.ndarray):
        raise TypeError(f"`key` must be a JAX PRNG key or None; got {type(key).__name__}.")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), {"kind": "typed", "impl": str(jax.random.key_impl(key))}
    return key, {"kind": "raw"}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stranded(path: Path) -> Path | None:
    """The checkpoint set aside as `.old-NAME-*` by an overwriting save that was interrupted
    before the new one was committed (so nothing is at `path`), or None."""
    if path.exists() or not path.parent.is_dir():
        return None
    name = re.compile(rf"\.old-{re.escape(path.name)}-[0-9a-f]{{8}}")
    olds = sorted(p for p in path.parent.iterdir() if p.is_dir() and name.fullmatch(p.name))
    return olds[0] if olds else None


def _resolve(path: Path) -> Path:
    """Where readers find the checkpoint `path`: itself, or its stranded set-aside copy."""
    return _stranded(path) or path


def _recover(path: Path) -> None:
    """Writers: rename a stranded set-aside checkpoint back to `path`."""
    old = _stranded(path)
    if old is not None:
        os.replace(old, path)
        _fsync_dir(path.parent)


def _remove_tmp(path: Path) -> None:
    """Remove orbax's temporary directories of an interrupted save of `path`."""
    if path.parent.is_dir():
        for p in path.parent.glob(f"{glob.escape(path.name)}{_TMP}*"):
            shutil.rmtree(p, ignore_errors=True)


def _raced(error: BaseException, path: Path) -> str | None:
    """What another writer did if a save of `path` failed by losing a race with it (possible
    only where no `flock` lock is available), else None."""
    if not isinstance(error, Exception):
        return None
    if path.exists():  # absent when this save started (or set aside by it)
        return "it wrote the same checkpoint meanwhile"
    tmp = path.parent / f"{path.name}{_TMP}"
    if isinstance(error, FileNotFoundError) and not tmp.exists():
        return f"it removed this save's temporary directory {tmp.name}: {_first_line(error)}"
    return None


@contextlib.contextmanager
def _writer_lock(directory: Path):
    """Hold the advisory writer lock of `directory` (an `flock` on the directory itself, so
    no lock file appears in it); a CheckpointError if another writer holds it."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"Checkpoint directory {str(directory)!r} is held by another writer (another "
                "run or process is saving checkpoints there); expected one writer per "
                "directory. Give this run its own directory (e.g. --checkpoint-dir), or wait "
                "for the other run to finish."
            ) from None
        except OSError:  # a file system without flock (some network mounts): no lock
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"`step` must be a non-negative int; got {step!r}.")


def _config_json(config: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return json.loads(json.dumps({} if config is None else config))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`config` must be JSON-serialisable (dicts, lists, str, numbers, bools, None); "
            f"{e}. Convert such values first, e.g. `str(value)` or `float(value)`."
        ) from None


def _handlers(ocp) -> dict[str, Any]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "manifest": ocp.JsonCheckpointHandler(filename=Path(_MANIFEST).name),
    }


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

    **Returns:** the checkpoint's path.

    **Raises:** [`pccore.CheckpointError`][] if another writer holds the directory (see
    "One writer per directory" above).
    """
    path = Path(path)
    _check_step(step)
    config_json = _config_json(config)
    _key_parts(key)  # a bad key is refused before anything is written
    ocp = _ocp()

    def write(args) -> None:
        with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers(ocp)))) as c:
            c.save(path, args=args)

    primary = jax.process_index() == 0
    if primary:
        path.parent.mkdir(parents=True, exist_ok=True)
    _sync("save_checkpoint:mkdir")
    with _writer_lock(path.parent) if primary else contextlib.nullcontext():
        return _save(path, model, opt_state, step, key, config_json, overwrite, write)


def _save(path: Path, model, opt_state, step, key, config_json: dict[str, Any], overwrite: bool,
          write) -> Path:
    """The save itself (the caller holds the writer lock): `write(args)` commits `path`."""
    ocp = _ocp()
    primary = jax.process_index() == 0
    if primary:
        _recover(path)  # an earlier overwriting save, interrupted before its commit
    _sync("save:recovered")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"`path`: checkpoint {str(path)!r} already exists. Pass `overwrite=True` to "
            "replace it, or save to a new path."
        )
    key_data, key_info = _key_parts(key)
    arrays, leaves = {}, []
    for name, leaf, spec in _saved(model, "model") + _saved(opt_state, "opt_state") + _saved(
        key_data, "key"
    ):
        arrays[name] = _stored(leaf)
        leaves.append({"path": name, **spec, "sha256": _array_sha256(arrays[name]) if primary else None})
    manifest = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "step": int(step),
        "pccore_version": _version(),
        "framework": getattr(model, "framework", None),
        "config": config_json,
        "key": key_info,
        "storage": f"orbax-checkpoint {importlib.metadata.version('orbax-checkpoint')}",
        "leaves": leaves,
    }
    old = None
    if primary and path.exists():
        old = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        _fsync_dir(path.parent)
    _sync("save:set-aside")
    committed = False
    try:
        write(ocp.args.Composite(state=ocp.args.StandardSave(arrays), manifest=ocp.args.JsonSave(manifest)))
        committed = True
        if primary:  # committed: index its files, to verify them without reading the arrays
            _write_file_index(path)
    except BaseException as e:
        raced = None if committed or not primary else _raced(e, path)
        if primary:
            _remove_tmp(path)
            _recover(path)  # put the set-aside checkpoint back
        if raced is None:
            raise
        raise CheckpointError(
            f"Checkpoint directory {str(path.parent)!r}: another writer saved into it while this "
            f"save of {path.name} ran ({raced}); expected one writer per "
            "directory. This save was abandoned: give each run its own directory (e.g. "
            "--checkpoint-dir), or stop the other run."
        ) from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _ok_key_info(v: Any) -> bool:
    return v is None or (
        isinstance(v, dict)
        and (v.get("kind") == "raw" or (v.get("kind") == "typed" and isinstance(v.get("impl"), str)))
    )


def _is_sha(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None


# The manifest fields a reader relies on: (check, what is expected).
_FIELDS = {
    "format_version": (_is_int, "a non-negative int"),
    "step": (_is_int, "a non-negative int"),
    "pccore_version": (lambda v: isinstance(v, str), "a string"),
    "framework": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "config": (lambda v: isinstance(v, dict), "a JSON object"),
    "key": (_ok_key_info, 'null, {"kind": "raw"} or {"kind": "typed", "impl": "<name>"}'),
    "leaves": (lambda v: isinstance(v, list), "a list"),
}
_FIELDS_V1 = {  # pccore 0.1: one data file
    "file": (lambda v: v == "state.eqx", '"state.eqx"'),
    "bytes": (_is_int, "a non-negative int"),
    "sha256": (_is_sha, "64 lowercase hex digits"),
}
_LEAF_FIELDS = {
    "path": (lambda v: isinstance(v, str), "a string"),
    "shape": (lambda v: isinstance(v, list) and all(_is_int(d) for d in v),
              "a list of non-negative ints"),
    "dtype": (lambda v: isinstance(v, str), "a string"),
}
_LEAF_FIELDS_V2 = {"sha256": (lambda v: v is None or _is_sha(v), "64 lowercase hex digits or null")}


def _check_fields(mpath: Path, obj: Any, fields: dict, prefix: str = "") -> None:
    for name, (ok, want) in fields.items():
        if not isinstance(obj, dict) or name not in obj:
            got = "missing"
        elif ok(obj[name]):
            continue
        else:
            got = repr(obj[name])
            got = f"{got[:60]}..." if len(got) > 63 else got
        raise CheckpointError(
            f"{str(mpath)!r}: field `{prefix}{name}` is {got}, expected {want}. The manifest "
            "was edited or damaged; restore an earlier step, or save the checkpoint again."
        )


def _check_manifest(mpath: Path, manifest: dict[str, Any]) -> None:
    v1 = manifest["format_version"] == 1
    _check_fields(mpath, manifest, {**_FIELDS, **(_FIELDS_V1 if v1 else {})})
    for i, leaf in enumerate(manifest["leaves"]):
        _check_fields(mpath, leaf, {**_LEAF_FIELDS, **({} if v1 else _LEAF_FIELDS_V2)}, f"leaves[{i}].")
        if "impl" in leaf:
            _check_fields(mpath, leaf, {"impl": _LEAF_FIELDS["dtype"]}, f"leaves[{i}].")


def _manifest_path(path: Path) -> Path:
    """The manifest of the checkpoint at `path` (a pccore 0.1 one at its top)."""
    old = path / _MANIFEST_V1
    return old if old.is_file() and not (path / _MANIFEST).is_file() else path / _MANIFEST


def _load_manifest(path: Path) -> tuple[Path, dict[str, Any]]:
    """(path, manifest) of the checkpoint at `path`, checked; the files are not read."""
    path = _resolve(path)
    mpath = _manifest_path(path)
    if not path.is_dir():
        raise CheckpointError(f"No checkpoint at {str(path)!r}: the directory does not exist.")
    if not mpath.is_file():
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has no {_MANIFEST}: it is incomplete or not a pccore "
            "checkpoint. Restore an earlier step."
        )
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint {str(path)!r}: {mpath.relative_to(path)} is corrupted ({e}). "
            "Restore an earlier step."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise CheckpointError(f"{str(mpath)!r} is not a pccore checkpoint manifest.")
    _check_fields(mpath, manifest, {"format_version": _FIELDS["format_version"]})
    if manifest["format_version"] > _FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has format version {manifest['format_version']}, newer "
            f"than this pccore ({_version()}) reads ({_FORMAT_VERSION}). Upgrade pccore."
        )
    _check_manifest(mpath, manifest)
    return path, manifest


def _verify_v1(path: Path, manifest: dict[str, Any]) -> None:
    data = path / manifest["file"]
    if not data.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r}: the data file {data.name} is missing.")
    size = data.stat().st_size
    if size != manifest["bytes"]:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is truncated or corrupted: {data.name} has {size} "
            f"bytes, the manifest expects {manifest['bytes']}. Restore an earlier step."
        )
    if _sha256(data) != manifest["sha256"]:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is corrupted: the SHA-256 checksum of {data.name} "
            "does not match its manifest. Restore an earlier step."
        )


def _stored_target(spec: dict[str, Any]) -> np.ndarray:
    """A NumPy array of the shape and dtype orbax stored for a manifest leaf."""
    if "impl" in spec:
        data = jax.random.key_data(jax.random.key(0, impl=spec["impl"]))
        return np.zeros(spec["shape"] + list(data.shape), data.dtype)
    dtype = {"bool": np.bool_, "int": np.int64, "float": np.float64, "complex": np.complex128}
    return np.zeros(spec["shape"], dtype.get(spec["dtype"]) or jnp.dtype(spec["dtype"]))


def _read(path: Path, manifest: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
    """The arrays of `state/`, read into `targets` and checked against their SHA-256."""
    ocp = _ocp()
    with contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers(ocp)))) as c:
        try:
            arrays = c.restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore(targets)))
        except Exception as e:
            raise _damaged(path, manifest, f"orbax-checkpoint: {_first_line(e)}") from e
    arrays = arrays["state"]
    for leaf in manifest["leaves"]:
        if leaf["sha256"] is not None and _array_sha256(arrays[leaf["path"]]) not in (None, leaf["sha256"]):
            raise _damaged(path, manifest, "orbax-checkpoint read back other bytes than were saved")
    return arrays


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _damaged(path: Path, manifest: dict[str, Any], what: str) -> CheckpointError:
    """The error for a damaged checkpoint, naming the first parameter that orbax cannot read
    or reads back with another SHA-256 (each read alone, one after the other)."""
    ocp = _ocp()
    for leaf in manifest["leaves"]:
        name = leaf["path"]
        try:
            with contextlib.closing(ocp.Checkpointer(ocp.PyTreeCheckpointHandler())) as c:
                got = c.restore(path / "state", args=ocp.args.PyTreeRestore(
                    {name: _stored_target(leaf)}, partial_restore=True,
                    restore_args={name: ocp.RestoreArgs(restore_type=np.ndarray)},
                ))[name]
        except Exception as e:
            why = f"orbax-checkpoint cannot read it: {_first_line(e)}"
        else:
            if leaf["sha256"] is None or _array_sha256(got) == leaf["sha256"]:
                continue
            why = "its data does not match the SHA-256 in the manifest"
        return CheckpointError(
            f"Checkpoint {str(path)!r} is truncated or corrupted: the first damaged parameter is "
            f"`{name}` ({why}; {what}). Restore an earlier step."
        )
    return CheckpointError(
        f"Checkpoint {str(path)!r} is truncated or corrupted: {what}. Restore an earlier step."
    )


def _file_index(path: Path) -> dict[str, list[Any]]:
    """{relative path: [bytes, SHA-256]} of every file of a committed checkpoint."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != _FILES)
    return {p.relative_to(path).as_posix(): [p.stat().st_size, _sha256(p)] for p in files}


def _write_file_index(path: Path) -> None:
    index = {"format": _FORMAT, "files": _file_index(path)}
    tmp = path / f".{_FILES}.tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / _FILES)
    _fsync_dir(path)


def _ok_index(index: Any) -> bool:
    return (
        isinstance(index, dict) and index.get("format") == _FORMAT
        and isinstance(index.get("files"), dict)
        and all(
            isinstance(rel, str) and rel and not rel.startswith("/") and ".." not in rel.split("/")
            and isinstance(v, list) and len(v) == 2 and _is_int(v[0]) and _is_sha(v[1])
            for rel, v in index["files"].items()
        )
    )


def _file_damage(path: Path) -> str | None:
    """What differs from the checkpoint's `files.json` (size or SHA-256 of a file), or None.

    A checkpoint whose save was stopped between orbax's commit and `files.json` has none;
    its arrays are then checked against their SHA-256 as they are read.
    """
    ipath = path / _FILES
    if not ipath.is_file():
        return None
    try:
        index = json.loads(ipath.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{_FILES} is corrupted ({e})"
    if not _ok_index(index):
        return f"{_FILES} is not a pccore file index (edited or damaged)"
    for rel, (size, sha) in index["files"].items():
        file = path / rel
        if not file.is_file():
            return f"the data file {rel} is missing"
        if file.stat().st_size != size:
            return f"{rel} has {file.stat().st_size} bytes, {_FILES} expects {size}"
        if _sha256(file) != sha:
            return f"the SHA-256 checksum of {rel} does not match {_FILES}"
    return None


def _verify(path: Path, manifest: dict[str, Any]) -> None:
    """Raise a CheckpointError if the files of the checkpoint at `path` are damaged."""
    if manifest["format_version"] == 1:
        _verify_v1(path, manifest)
        return
    damage = _file_damage(path)
    if damage is not None:
        raise _damaged(path, manifest, damage)
    if not (path / _FILES).is_file():  # no file index: read every array
        _read(path, manifest, {leaf["path"]: _stored_target(leaf) for leaf in manifest["leaves"]})


def read_manifest(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`, checked; with `verify`, the data too: the
    size and SHA-256 of every file, as `files.json` records them (a pccore 0.1 checkpoint's
    `state.eqx`, as its manifest does).

    **Raises:** [`pccore.CheckpointError`][] if the checkpoint is missing, unreadable,
    truncated or corrupted (naming the first damaged parameter), or its manifest lacks a
    field or has one of the wrong type.
    """
    path, manifest = _load_manifest(Path(path))
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
                f"parameter is `{want['path']}`: got {_describe(got)} in the checkpoint, "
                f"expected {_describe(want)} (the template's). Build the model with the same "
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
    data = jax.random.key_data(leaf) if _is_typed_key(leaf) else leaf
    if isinstance(data, jax.Array):
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)
    return np.zeros_like(np.asarray(data))


def _fill(tree: Any, prefix: str, arrays: dict[str, Any]) -> Any:
    """`tree` with every saved leaf replaced by its restored array, of the leaf's kind."""

    def fill(path, leaf):
        if not _is_saved_leaf(leaf):
            return leaf
        a = arrays[prefix + jtu.keystr(path)]
        if _is_typed_key(leaf):
            return jax.random.wrap_key_data(a, impl=jax.random.key_impl(leaf))
        if isinstance(leaf, bool | int | float | complex):
            return type(leaf)(np.asarray(a).item())
        if isinstance(leaf, np.generic):
            return leaf.dtype.type(np.asarray(a))
        return np.asarray(a) if isinstance(leaf, np.ndarray) else a

    return jtu.tree_map_with_path(fill, tree)


def _read_v1(path: Path, manifest: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """A pccore 0.1 checkpoint (`state.eqx`, `equinox.tree_serialise_leaves`) into `template`."""

    def as_data(tree):
        return jtu.tree_map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)

    try:
        tree = eqx.tree_deserialise_leaves(path / manifest["file"], as_data(template))
    except Exception as e:  # verified above: anything here is an unexpected read failure
        raise CheckpointError(f"Checkpoint {str(path)!r} could not be read: {e}") from e

    def place(a, t):
        if _is_typed_key(t):
            a = jax.random.wrap_key_data(a, impl=jax.random.key_impl(t))
        if isinstance(a, jax.Array) and isinstance(t, jax.Array) and t.is_fully_addressable:
            return jax.device_put(a, t.sharding)
        return a

    return jtu.tree_map(place, tree, template)


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
    corrupted, or does not fit the template (naming the first mismatching parameter).
    """
    path, manifest = _load_manifest(Path(path))
    v1 = manifest["format_version"] == 1
    _verify(path, manifest)
    framework = getattr(model, "framework", None)
    if manifest["framework"] is not None and framework is not None and manifest["framework"] != framework:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds a model from {manifest['framework']!r}; the "
            f"template `model` is from {framework!r}. Pass a {manifest['framework']} model of "
            "the same architecture, wrapped with `pccore.wrap`."
        )
    expected = _leaf_specs(model, "model") + _leaf_specs(opt_state, "opt_state")
    saved = [leaf for leaf in manifest["leaves"] if not leaf["path"].startswith("key")]
    _check_fits(path, saved, expected)
    key_leaves = [leaf for leaf in manifest["leaves"] if leaf["path"].startswith("key")]
    key_template = jnp.zeros(key_leaves[0]["shape"], key_leaves[0]["dtype"]) if key_leaves else None
    template = {"model": model, "opt_state": opt_state, "key": key_template}
    if v1:
        tree = _read_v1(path, manifest, template)
    else:
        targets = {name: _target(leaf) for part, t in template.items() for name, leaf, _ in _saved(t, part)}
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


class CheckpointManager:
    """Numbered checkpoints in one directory: keep the last `keep`, find the latest valid one.

    ```python
    manager = pccore.CheckpointManager("runs/a", keep=3)
    if manager.latest_step() is not None:                    # resume
        ckpt = manager.restore(model=model, opt_state=opt_state)
        model, opt_state, start, key = ckpt.model, ckpt.opt_state, ckpt.step, ckpt.key
    for epoch in range(start, epochs):
        ...
        manager.save(epoch + 1, model=model, opt_state=opt_state, key=key, config=config)
    ```

    Saves go through an `orbax.checkpoint.CheckpointManager` (`max_to_keep=keep`, step
    directories `step_00000012`); pccore adds the manifest, the checks and the messages.

    **Arguments:**

    - `directory`: where the `step_00000012/`-style checkpoints live (created if needed).
    - `keep`: how many checkpoints to keep (>= 1). After each successful save, the
        checkpoint just written and the newest `keep - 1` other steps are kept and the rest
        deleted: in a run that saves ascending steps, the newest `keep`.
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"`keep` must be a positive int; got {keep!r}. E.g. keep=3.")
        self.directory: Path = Path(directory)
        self.keep = keep
        self._holding = False

    @contextlib.contextmanager
    def hold(self):
        """Hold the directory's writer lock for a whole run (creating the directory).

        ```python
        with manager.hold():  # a second run into this directory is refused from here on
            for epoch in ...:
                manager.save(epoch + 1, model=model, opt_state=opt_state)
        ```

        Each `save` takes the lock for its own duration anyway; `hold` also refuses another
        writer between saves. Re-entrant for this manager; a no-op on processes other than 0
        (the lock is process 0's).

        **Raises:** [`pccore.CheckpointError`][] if another writer holds the directory;
        `ImportError` if orbax-checkpoint is not installed (before a run, not at its first save).
        """
        _ocp()
        if self._holding or jax.process_index() != 0:
            yield self
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with _writer_lock(self.directory):
            self._holding = True
            try:
                yield self
            finally:
                self._holding = False

    def path(self, step: int) -> Path:
        """The directory of checkpoint `step`."""
        return self.directory / f"step_{int(step):08d}"

    def steps(self) -> list[int]:
        """The steps that have a checkpoint directory with a manifest, ascending (not verified).

        Includes a step whose checkpoint an interrupted `overwrite` save left set aside.
        """
        if not self.directory.is_dir():
            return []
        out = set()
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and _manifest_path(p).is_file():
                out.add(int(m.group(1)))
            m = _OLD_DIR.match(p.name)
            if m and _stranded(self.directory / m.group(1)) == p and _manifest_path(p).is_file():
                out.add(int(m.group(2)))
        return sorted(out)

    def _valid(self, step: int) -> bool:
        try:
            read_manifest(self.path(step), verify=True)
        except CheckpointError:
            return False
        return True

    def latest_step(self) -> int | None:
        """The newest step whose checkpoint verifies (manifest, every array's SHA-256), or None."""
        return next((s for s in reversed(self.steps()) if self._valid(s)), None)

    def save(
        self, step: int, *, model: Any, opt_state: Any, key: Any = None,
        config: dict[str, Any] | None = None, overwrite: bool = False,
    ) -> Path:
        """Save checkpoint `step` atomically, then prune to `keep` checkpoints.

        Arguments as in [`pccore.save_checkpoint`][]. A checkpoint that fails verification
        (say, the corrupted one a run resumed around) is replaced without `overwrite`.
        Saving below a newer valid checkpoint is refused (that is usually a fresh run in an
        old directory, and resuming would pick the newer step); with `overwrite=True` it is
        written anyway.

        **Pruning** (orbax's `max_to_keep`): the checkpoint just written is never deleted by
        its own save; besides it, the newest `keep - 1` other steps are kept (by step number)
        and the rest deleted. So with `keep=1`, `save(3, overwrite=True)` next to step 5
        leaves only step 3.

        With several processes every process calls `save` (orbax writes each process's
        shards); process 0 holds the lock and writes the manifest.

        **Raises:** [`pccore.CheckpointError`][] if another writer holds the directory (another
        manager's save or [`pccore.CheckpointManager.hold`][]).
        """
        _check_step(step)
        path = self.path(step)
        config_json = _config_json(config)
        _key_parts(key)
        ocp = _ocp()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, step_prefix="step", step_format_fixed_length=8,
            enable_async_checkpointing=False,
        )

        def write(args) -> None:
            with contextlib.closing(
                ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers(ocp))
            ) as manager:
                manager.save(step, args=args, force=True)

        with self.hold():
            self._clear_leftovers()
            if not overwrite:
                newer = [s for s in self.steps() if s > step and self._valid(s)]
                if newer:
                    raise ValueError(
                        f"`step`={step}, but {str(self.directory)!r} already holds a newer valid "
                        f"checkpoint (step {newer[-1]}). Resume from it, save to a new directory, "
                        "or pass `overwrite=True` to write here anyway."
                    )
                overwrite = path.exists() and not self._valid(step)
            _save(path, model, opt_state, step, key, config_json, overwrite, write)
        return path

    def _clear_leftovers(self) -> None:
        """Process 0, lock held: undo or remove what interrupted saves left."""
        if jax.process_index() == 0 and self.directory.is_dir():
            for p in list(self.directory.iterdir()):
                m = _OLD_DIR.match(p.name)
                if m:  # set aside by an overwriting save interrupted before its commit
                    _recover(self.directory / m.group(1))
            for p in list(self.directory.iterdir()):
                if p.is_dir() and (_TMP in p.name or p.name.startswith((".tmp-step_", ".old-step_"))):
                    shutil.rmtree(p, ignore_errors=True)
        _sync("manager:cleared")

    def restore(self, step: int | None = None, *, model: Any, opt_state: Any) -> Checkpoint:
        """Restore checkpoint `step`, or the latest valid one (see [`pccore.restore_checkpoint`][]).

        **Raises:** [`pccore.CheckpointError`][] if there is none, or it does not fit.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(
                    f"No valid checkpoint in {str(self.directory)!r} (found steps "
                    f"{self.steps()}). Start from scratch, or point to the right directory."
                )
        return restore_checkpoint(self.path(step), model=model, opt_state=opt_state)
