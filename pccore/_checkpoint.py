"""Checkpoints of the full training state, written atomically and verified on load.

A checkpoint is a directory `step_00000012/` holding

- `state.eqx`: the model, the optimiser state and the RNG key, written leaf by leaf with
    `equinox.tree_serialise_leaves` (NumPy `.npy` records, no custom binary format); a typed
    PRNG key anywhere in the model or optimiser state (e.g. `optax.noisy_sgd`'s) is stored as
    its key data and comes back as a typed key of the same implementation;
- `manifest.json`: the step, the configuration, the pccore version and framework, the path,
    shape and dtype of every saved leaf, and the size and SHA-256 of `state.eqx`.

**Atomicity.** Both files are written into a hidden temporary directory next to the target,
flushed to disk (`fsync`), and the directory is then renamed into place with `os.replace`,
an atomic operation on POSIX file systems. A save that is interrupted at any point (an
exception, `SIGKILL`, a power cut after the rename is durable) leaves every earlier
checkpoint untouched and no partial `step_*` directory; the leftover temporary directory is
ignored by readers and removed by the next save. Replacing an existing checkpoint
(`overwrite=True`) takes two renames, the old directory aside to `.old-step_...-*` and the
new one in; if a save is interrupted between them, readers use the set-aside checkpoint
and the next save renames it back, so the previous checkpoint is still never lost.

**Verification.** Loading checks the manifest, then the file's size and SHA-256, then that
the template has the same leaves (path, shape, dtype) as the checkpoint, before any array is
read, so a truncated or corrupted file or a model of another architecture gets a
[`pccore.CheckpointError`][] that says what is wrong.

**One writer per directory.** A save holds an advisory lock (`flock`) on the directory it
writes into, and [`pccore.CheckpointManager.hold`][] holds it for a whole run. A second
writer, from another run or process, gets a [`pccore.CheckpointError`][] naming the
directory instead of removing the first writer's temporary files; where no lock is
available (a file system without `flock`, or Windows), a save that another writer overtook
(its temporary directory removed, or its target written meanwhile) also ends in a
`CheckpointError`, never a half-written checkpoint.

One process writes (with several processes, `CheckpointManager` writes from process 0 only);
use orbax-checkpoint for sharded, multi-host-parallel writes of very large states.
"""

import contextlib
import errno
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
_FORMAT_VERSION = 1
_STATE = "state.eqx"
_MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_DIR = re.compile(r"^\.old-(step_(\d+))-[0-9a-f]{8}$")


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
    # What `eqx.default_serialise_filter_spec` writes: arrays and Python/NumPy scalars.
    return isinstance(x, jax.Array | np.ndarray | np.generic | bool | int | float | complex)


def _is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_as_data(tree: Any) -> Any:
    """Typed PRNG keys replaced by their key data (NumPy cannot write key arrays)."""
    return jtu.tree_map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _data_as_keys(tree: Any, template: Any) -> Any:
    """Key data read back into typed keys wherever `template` holds a typed key."""

    def wrap(a, t):
        return jax.random.wrap_key_data(a, impl=jax.random.key_impl(t)) if _is_typed_key(t) else a

    return jtu.tree_map(wrap, tree, template)


def _leaf_specs(tree: Any, prefix: str) -> list[dict]:
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
        out.append({"path": prefix + jtu.keystr(path), **spec})
    return out


def _describe(spec: dict) -> str:
    impl = f" ({spec['impl']})" if "impl" in spec else ""
    return f"shape {tuple(spec['shape'])} {spec['dtype']}{impl}"


def _key_parts(key: Any) -> tuple[Any, dict | None]:
    if key is None:
        return None, None
    if not isinstance(key, jax.Array | np.ndarray):
        raise TypeError(f"`key` must be a JAX PRNG key or None; got {type(key).__name__}.")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), {"kind": "typed", "impl": str(jax.random.key_impl(key))}
    return key, {"kind": "raw"}


def _host(tree: Any) -> Any:
    """Replicated multi-host arrays as their local copy (NumPy can read those)."""

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable and a.is_fully_replicated:
            return a.addressable_data(0)
        return a

    return jtu.tree_map(get, tree)


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


def _write_state(path: Path, tree: Any) -> None:
    with open(path, "wb") as f:
        eqx.tree_serialise_leaves(f, tree)
        f.flush()
        os.fsync(f.fileno())


def _stranded(path: Path) -> Path | None:
    """The checkpoint set aside as `.old-NAME-*` by an overwriting save that was interrupted
    between its two renames (so nothing is at `path`), or None."""
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


def _raced(error: BaseException, tmp: Path, renamed: bool) -> str | None:
    """What another writer did if `error` comes from losing a race with it, else None."""
    if renamed or not isinstance(error, OSError):
        return None
    if not tmp.is_dir():
        return f"it removed this save's temporary directory {tmp.name}"
    if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
        return "it wrote the same checkpoint meanwhile"
    return None


def _check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"`step` must be a non-negative int; got {step!r}.")


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
    """Save the full training state to the directory `path`, atomically.

    **Arguments:**

    - `path`: the checkpoint directory to create (e.g. `runs/a/step_00000010`).
    - `model`: the model (a [`pccore.PCModel`][] or any pytree of arrays).
    - `opt_state`: the optimiser state.
    - `step`: a non-negative int (step or epoch count).
    - `key`: a PRNG key to resume the random stream with, or None.
    - `config`: a JSON-serialisable dict (the run's configuration), or None.
    - `overwrite`: replace an existing checkpoint at `path`. The new checkpoint is complete
        on disk before the old one is touched; the old one is then renamed aside to
        `.old-NAME-*` and the new one renamed in. If the save is interrupted between those two
        renames, readers ([`pccore.read_manifest`][], [`pccore.restore_checkpoint`][],
        [`pccore.CheckpointManager`][]) use the set-aside checkpoint and the next save to
        `path` (or in the manager's directory) renames it back, so an interrupted save always
        leaves the previous checkpoint.

    **Returns:** the checkpoint's path.

    **Raises:** [`pccore.CheckpointError`][] if another writer holds the directory (see
    "One writer per directory" above) or overtook this save.
    """
    path = Path(path)
    _check_step(step)
    config_json = _config_json(config)
    _key_parts(key)  # a bad key is refused before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(path.parent):
        return _save(path, model, opt_state, step, key, config_json, overwrite)


def _config_json(config: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return json.loads(json.dumps({} if config is None else config))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`config` must be JSON-serialisable (dicts, lists, str, numbers, bools, None); "
            f"{e}. Convert such values first, e.g. `str(value)` or `float(value)`."
        ) from None


def _save(path: Path, model, opt_state, step, key, config_json: dict, overwrite: bool) -> Path:
    """The save itself, with the writer lock of `path.parent` held by the caller."""
    _recover(path)  # an earlier overwriting save, interrupted between its two renames
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"`path`: checkpoint {str(path)!r} already exists. Pass `overwrite=True` to "
            "replace it, or save to a new path."
        )
    key_data, key_info = _key_parts(key)
    leaves = (
        _leaf_specs(model, "model")
        + _leaf_specs(opt_state, "opt_state")
        + _leaf_specs(key_data, "key")
    )
    tree = _host(_keys_as_data({"model": model, "opt_state": opt_state, "key": key_data}))
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    renamed = False
    try:
        _write_state(tmp / _STATE, tree)
        manifest = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "step": int(step),
            "pccore_version": _version(),
            "framework": getattr(model, "framework", None),
            "config": config_json,
            "key": key_info,
            "leaves": leaves,
            "file": _STATE,
            "bytes": (tmp / _STATE).stat().st_size,
            "sha256": _sha256(tmp / _STATE),
        }
        with open(tmp / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists() and not overwrite:  # absent at the start: another writer put it there
            raise _race_error(path, "it wrote the same checkpoint meanwhile")
        if path.exists():
            old = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            renamed = True
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            renamed = True
        _fsync_dir(path.parent)
    except BaseException as e:
        raced = _raced(e, tmp, renamed)
        shutil.rmtree(tmp, ignore_errors=True)
        _recover(path)  # interrupted between the two renames: put the old checkpoint back
        if raced is None:
            raise
        raise _race_error(path, f"{raced}: {e}") from e
    return path


def _race_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint directory {str(path.parent)!r}: another writer saved into it while this "
        f"save of {path.name} ran ({what}); expected one writer per directory. This save was "
        "abandoned: give each run its own directory (e.g. --checkpoint-dir), or stop the other "
        "run."
    )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _ok_key_info(v: Any) -> bool:
    return v is None or (
        isinstance(v, dict)
        and (v.get("kind") == "raw" or (v.get("kind") == "typed" and isinstance(v.get("impl"), str)))
    )


def _ok_file_name(v: Any) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v


# The manifest fields a reader relies on: (check, what is expected).
_FIELDS = {
    "format_version": (_is_int, "a non-negative int"),
    "step": (_is_int, "a non-negative int"),
    "pccore_version": (lambda v: isinstance(v, str), "a string"),
    "framework": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "config": (lambda v: isinstance(v, dict), "a JSON object"),
    "key": (_ok_key_info, 'null, {"kind": "raw"} or {"kind": "typed", "impl": "<name>"}'),
    "leaves": (lambda v: isinstance(v, list), "a list"),
    "file": (_ok_file_name, "a file name in the checkpoint directory, e.g. \"state.eqx\""),
    "bytes": (_is_int, "a non-negative int"),
    "sha256": (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None,
               "64 lowercase hex digits"),
}
_LEAF_FIELDS = {
    "path": (lambda v: isinstance(v, str), "a string"),
    "shape": (lambda v: isinstance(v, list) and all(_is_int(d) for d in v),
              "a list of non-negative ints"),
    "dtype": (lambda v: isinstance(v, str), "a string"),
}


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


def _check_manifest(mpath: Path, manifest: dict) -> None:
    _check_fields(mpath, manifest, _FIELDS)
    for i, leaf in enumerate(manifest["leaves"]):
        _check_fields(mpath, leaf, _LEAF_FIELDS, f"leaves[{i}].")
        if "impl" in leaf:
            _check_fields(mpath, leaf, {"impl": _LEAF_FIELDS["dtype"]}, f"leaves[{i}].")


def read_manifest(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`, checked; with `verify`, the data file too.

    **Raises:** [`pccore.CheckpointError`][] if the checkpoint is missing, unreadable,
    truncated or corrupted, or its manifest lacks a field or has one of the wrong type.
    """
    path = _resolve(Path(path))
    mpath = path / _MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"No checkpoint at {str(path)!r}: the directory does not exist.")
    if not mpath.is_file():
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has no {_MANIFEST}: it is incomplete (an interrupted "
            "save, or not a pccore checkpoint). Restore an earlier step."
        )
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint {str(path)!r}: {_MANIFEST} is corrupted ({e}). Restore an earlier step."
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
    if verify:
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
    return manifest


def _energy_params_hint(*paths: str) -> str:
    """The fix when a mismatch is the energy's parameters held on one side only."""
    if not any(".energy_params" in p for p in paths):
        return ""
    return (" The model of one side holds energy parameters (`model.energy_params`) and the "
            "other does not: build the template as the saved run did, "
            "`model = model.with_energy_params(energy.init_params(model))` and "
            "`opt_state = optim.init(model.trainable)`.")


def _check_fits(path: Path, saved: list[dict], expected: list[dict]) -> None:
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


def _place_like(new: Any, template: Any) -> Any:
    def place(a, t):
        if isinstance(a, jax.Array) and isinstance(t, jax.Array) and t.is_fully_addressable:
            return jax.device_put(a, t.sharding)
        return a

    return jtu.tree_map(place, new, template)


def restore_checkpoint(path: str | os.PathLike[str], *, model: Any, opt_state: Any) -> Checkpoint:
    """Restore the training state saved at `path` into a template.

    **Arguments:**

    - `path`: a checkpoint directory written by [`pccore.save_checkpoint`][].
    - `model`, `opt_state`: a freshly built model and `optim.init(model.trainable)` (for a
        model without energy parameters, `optim.init(model.params)`) of the same
        architecture, dtype and optimiser; they give the types and structure to fill (and,
        on one host, the device placement of each array). A model saved with energy
        parameters needs a template holding them too:
        `model.with_energy_params(energy.init_params(model))`.

    **Returns:** a [`pccore.Checkpoint`][] with your own model type.

    **Raises:** [`pccore.CheckpointError`][] if the checkpoint is missing, truncated or
    corrupted, or does not fit the template (naming the first mismatching parameter).
    """
    path = _resolve(Path(path))
    manifest = read_manifest(path, verify=True)
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
    key_template = None
    if key_leaves:
        spec = key_leaves[0]
        key_template = jnp.zeros(spec["shape"], spec["dtype"])
    template = {"model": model, "opt_state": opt_state, "key": key_template}
    try:
        tree = eqx.tree_deserialise_leaves(path / manifest["file"], _keys_as_data(template))
    except Exception as e:  # verified above: anything here is an unexpected read failure
        raise CheckpointError(f"Checkpoint {str(path)!r} could not be read: {e}") from e
    tree = _place_like(_data_as_keys(tree, template), template)
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
        (they do not write).

        **Raises:** [`pccore.CheckpointError`][] if another writer holds the directory.
        """
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
        """The steps that have a complete checkpoint directory, ascending (not verified).

        Includes a step whose checkpoint an interrupted `overwrite` save left set aside.
        """
        if not self.directory.is_dir():
            return []
        out = set()
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / _MANIFEST).is_file():
                out.add(int(m.group(1)))
            m = _OLD_DIR.match(p.name)
            if m and _stranded(self.directory / m.group(1)) == p and (p / _MANIFEST).is_file():
                out.add(int(m.group(2)))
        return sorted(out)

    def _valid(self, step: int) -> bool:
        try:
            read_manifest(self.path(step), verify=True)
        except CheckpointError:
            return False
        return True

    def latest_step(self) -> int | None:
        """The newest step whose checkpoint verifies (manifest, size, checksum), or None."""
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

        **Pruning:** the checkpoint just written is never deleted by its own save; besides
        it, the newest `keep - 1` other steps are kept (by step number) and the rest deleted.
        So with `keep=1`, `save(3, overwrite=True)` next to step 5 leaves only step 3.

        With several processes only process 0 writes (the state is replicated); the others
        return the path at once.

        **Raises:** [`pccore.CheckpointError`][] if another writer holds the directory (another
        manager's save or [`pccore.CheckpointManager.hold`][]) or overtook this save.
        """
        _check_step(step)
        path = self.path(step)
        if jax.process_index() != 0:
            return path
        config_json = _config_json(config)
        _key_parts(key)
        with self.hold():
            self._save_held(step, path, model, opt_state, key, config_json, overwrite)
        return path

    def _save_held(self, step, path, model, opt_state, key, config_json, overwrite) -> None:
        """`save` with the writer lock held: clear leftovers, write, prune."""
        if self.directory.is_dir():  # leftovers of interrupted saves (the lock is ours)
            for p in list(self.directory.iterdir()):
                m = _OLD_DIR.match(p.name)
                if m:  # set aside by an overwriting save interrupted between its renames
                    _recover(self.directory / m.group(1))
            for p in list(self.directory.iterdir()):
                if p.is_dir() and (p.name.startswith(".tmp-step_") or p.name.startswith(".old-step_")):
                    shutil.rmtree(p, ignore_errors=True)
        if not overwrite:
            newer = [s for s in self.steps() if s > step and self._valid(s)]
            if newer:
                raise ValueError(
                    f"`step`={step}, but {str(self.directory)!r} already holds a newer valid "
                    f"checkpoint (step {newer[-1]}). Resume from it, save to a new directory, "
                    "or pass `overwrite=True` to write here anyway."
                )
            overwrite = path.exists() and not self._valid(step)
        _save(path, model, opt_state, step, key, config_json, overwrite)
        others = [s for s in self.steps() if s != step]
        for old in others[: max(len(others) - (self.keep - 1), 0)]:
            shutil.rmtree(self.path(old), ignore_errors=True)

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
