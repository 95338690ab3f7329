"""Checkpoints of the full training state, written atomically and verified on load.

A checkpoint is a directory `step_00000012/` holding

- `state.eqx`: the model, the optimiser state and the RNG key, written leaf by leaf with
    `equinox.tree_serialise_leaves` (NumPy `.npy` records, no custom binary format);
- `manifest.json`: the step, the configuration, the pccore version and framework, the path,
    shape and dtype of every saved leaf, and the size and SHA-256 of `state.eqx`.

**Atomicity.** Both files are written into a hidden temporary directory next to the target,
flushed to disk (`fsync`), and the directory is then renamed into place with `os.replace`,
an atomic operation on POSIX file systems. A save that is interrupted at any point (an
exception, `SIGKILL`, a power cut after the rename is durable) leaves every earlier
checkpoint untouched and no partial `step_*` directory; the leftover temporary directory is
ignored by readers and removed by the next save.

**Verification.** Loading checks the manifest, then the file's size and SHA-256, then that
the template has the same leaves (path, shape, dtype) as the checkpoint, before any array is
read, so a truncated or corrupted file or a model of another architecture gets a
[`pccore.CheckpointError`][] that says what is wrong.

One process writes (with several processes, `CheckpointManager` writes from process 0 only);
use orbax-checkpoint for sharded, multi-host-parallel writes of very large states.
"""

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

_FORMAT = "pccore-checkpoint"
_FORMAT_VERSION = 1
_STATE = "state.eqx"
_MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    config: dict
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


def _leaf_specs(tree: Any, prefix: str) -> list[dict]:
    out = []
    for path, leaf in jtu.tree_leaves_with_path(tree):
        if not _is_saved_leaf(leaf):
            continue
        if isinstance(leaf, jax.Array | np.ndarray | np.generic):
            spec = {"shape": list(np.shape(leaf)), "dtype": str(leaf.dtype)}
        else:
            spec = {"shape": [], "dtype": type(leaf).__name__}
        out.append({"path": prefix + jtu.keystr(path), **spec})
    return out


def _describe(spec: dict) -> str:
    return f"shape {tuple(spec['shape'])} {spec['dtype']}"


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


def _check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"`step` must be a non-negative int; got {step!r}.")


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: Any,
    opt_state: Any,
    step: int,
    key: Any = None,
    config: dict | None = None,
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
    - `overwrite`: replace an existing checkpoint at `path` (itself atomically).

    **Returns:** the checkpoint's path.
    """
    path = Path(path)
    _check_step(step)
    try:
        config_json = json.loads(json.dumps({} if config is None else config))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`config` must be JSON-serialisable (dicts, lists, str, numbers, bools, None); "
            f"{e}. Convert such values first, e.g. `str(value)` or `float(value)`."
        ) from None
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"`path`: checkpoint {str(path)!r} already exists. Pass `overwrite=True` to "
            "replace it, or save to a new path."
        )
    key_data, key_info = _key_parts(key)
    tree = _host({"model": model, "opt_state": opt_state, "key": key_data})
    leaves = (
        _leaf_specs(tree["model"], "model")
        + _leaf_specs(tree["opt_state"], "opt_state")
        + _leaf_specs(tree["key"], "key")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
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
        if path.exists():
            old = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """The manifest of the checkpoint at `path`, checked; with `verify`, the data file too.

    **Raises:** [`pccore.CheckpointError`][] if the checkpoint is missing, unreadable,
    truncated or corrupted.
    """
    path = Path(path)
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
    if manifest.get("format_version", 0) > _FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has format version {manifest['format_version']}, newer "
            f"than this pccore ({_version()}) reads ({_FORMAT_VERSION}). Upgrade pccore."
        )
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


def _check_fits(path: Path, saved: list[dict], expected: list[dict]) -> None:
    for got, want in zip(saved, expected):
        if got["path"] != want["path"]:
            raise CheckpointError(
                f"Checkpoint {str(path)!r} does not fit the template: the first mismatching "
                f"parameter is `{want['path']}` in the template but `{got['path']}` in the "
                "checkpoint (a different architecture or optimiser). Build the model and "
                "optimiser exactly as for the saved run."
            )
        if got["shape"] != want["shape"] or got["dtype"] != want["dtype"]:
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
            "exactly as for the saved run."
        )


def _place_like(new: Any, template: Any) -> Any:
    def place(a, t):
        if isinstance(a, jax.Array) and isinstance(t, jax.Array) and t.is_fully_addressable:
            return jax.device_put(a, t.sharding)
        return a

    return jtu.tree_map(place, new, template)


def restore_checkpoint(path: str | os.PathLike, *, model: Any, opt_state: Any) -> Checkpoint:
    """Restore the training state saved at `path` into a template.

    **Arguments:**

    - `path`: a checkpoint directory written by [`pccore.save_checkpoint`][].
    - `model`, `opt_state`: a freshly built model and `optim.init(model.params)` of the same
        architecture, dtype and optimiser; they give the types and structure to fill (and,
        on one host, the device placement of each array).

    **Returns:** a [`pccore.Checkpoint`][] with your own model type.

    **Raises:** [`pccore.CheckpointError`][] if the checkpoint is missing, truncated or
    corrupted, or does not fit the template (naming the first mismatching parameter).
    """
    path = Path(path)
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
        tree = eqx.tree_deserialise_leaves(path / manifest["file"], template)
    except Exception as e:  # verified above: anything here is an unexpected read failure
        raise CheckpointError(f"Checkpoint {str(path)!r} could not be read: {e}") from e
    tree = _place_like(tree, template)
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
    - `keep`: how many of the newest checkpoints to keep (>= 1); older ones are deleted
        after each successful save.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"`keep` must be a positive int; got {keep!r}. E.g. keep=3.")
        self.directory = Path(directory)
        self.keep = keep

    def path(self, step: int) -> Path:
        """The directory of checkpoint `step`."""
        return self.directory / f"step_{int(step):08d}"

    def steps(self) -> list[int]:
        """The steps that have a complete checkpoint directory, ascending (not verified)."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / _MANIFEST).is_file():
                out.append(int(m.group(1)))
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
        config: dict | None = None, overwrite: bool = False,
    ) -> Path:
        """Save checkpoint `step` atomically, then delete all but the newest `keep`.

        Arguments as in [`pccore.save_checkpoint`][]. A checkpoint that fails verification
        (say, the corrupted one a run resumed around) is replaced without `overwrite`.
        Saving below a newer valid checkpoint is refused (that is a fresh run in an old
        directory; pruning would delete the new checkpoint). With several processes only
        process 0 writes (the state is replicated); the others return the path at once.
        """
        _check_step(step)
        path = self.path(step)
        if jax.process_index() != 0:
            return path
        if not overwrite:
            newer = [s for s in self.steps() if s > step and self._valid(s)]
            if newer:
                raise ValueError(
                    f"`step`={step}, but {str(self.directory)!r} already holds a newer valid "
                    f"checkpoint (step {newer[-1]}). Resume from it, save to a new directory, "
                    "or pass `overwrite=True` to write here anyway."
                )
            overwrite = path.exists() and not self._valid(step)
        self.directory.mkdir(parents=True, exist_ok=True)
        for p in self.directory.iterdir():  # leftovers of interrupted saves (single writer)
            if p.is_dir() and (p.name.startswith(".tmp-step_") or p.name.startswith(".old-step_")):
                shutil.rmtree(p, ignore_errors=True)
        save_checkpoint(
            path, model=model, opt_state=opt_state, step=step, key=key, config=config,
            overwrite=overwrite,
        )
        steps = self.steps()
        for old in steps[: max(len(steps) - self.keep, 0)]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return path

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
