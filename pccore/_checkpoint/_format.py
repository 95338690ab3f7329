"""What a checkpoint holds and how its manifest describes it: the saved leaves (path,
shape, dtype, SHA-256), the manifest's fields and their checks, and the errors."""

import hashlib
import importlib.metadata
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

FORMAT = "pccore-checkpoint"
FORMAT_VERSION = 2  # 1: pccore 0.1 (state.eqx); 2: orbax-checkpoint
MANIFEST = "manifest/manifest.json"
MANIFEST_V1 = "manifest.json"  # pccore 0.1: at the checkpoint's top
TMP = ".orbax-checkpoint-tmp"  # orbax's temporary directory of a save not yet committed
STEP_DIR = re.compile(r"^step_(\d+)$")
OLD_DIR = re.compile(r"^\.old-(step_(\d+))-[0-9a-f]{8}$")  # set aside by `overwrite`


def load_orbax() -> Any:
    """orbax.checkpoint, imported on first use (it is optional, and slow to import)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            "pccore checkpoints are stored with orbax-checkpoint, which is not installed: "
            'pip install "pccore[checkpoint]" (or pip install orbax-checkpoint).'
        ) from e
    return ocp


def sync(name: str) -> None:
    """A barrier of all processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"pccore:{name}")


class CheckpointError(Exception):
    """A checkpoint is missing, truncated, corrupted, or does not fit the template."""


class Damaged(CheckpointError):
    """The checkpoint's files are damaged (as opposed to a template that does not fit)."""


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


def version() -> str:
    try:
        return importlib.metadata.version("pccore")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0"


def is_saved_leaf(x: Any) -> bool:
    # Arrays and Python/NumPy scalars (what `eqx.default_serialise_filter_spec` wrote in 0.1).
    return isinstance(x, jax.Array | np.ndarray | np.generic | bool | int | float | complex)


def is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def saved_leaves(tree: Any, prefix: str) -> list[tuple[str, Any, dict[str, Any]]]:
    """(path, leaf, spec) of every saved leaf of `tree`."""
    out: list[tuple[str, Any, dict[str, Any]]] = []
    for path, leaf in jtu.tree_leaves_with_path(tree):
        if not is_saved_leaf(leaf):
            continue
        if is_typed_key(leaf):
            impl = str(jax.random.key_impl(leaf))
            spec = {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "impl": impl}
        elif isinstance(leaf, jax.Array | np.ndarray | np.generic):
            spec = {"shape": list(np.shape(leaf)), "dtype": str(leaf.dtype)}
        else:
            spec = {"shape": [], "dtype": type(leaf).__name__}
        out.append((prefix + jtu.keystr(path), leaf, spec))
    return out


def stored(leaf: Any) -> Any:
    """What orbax stores for a leaf: key data for a typed key; NumPy for host values and,
    with several processes, for arrays local to this process (orbax writes those from
    process 0, as it does NumPy arrays; they are the same on every process)."""
    if is_typed_key(leaf):
        leaf = jax.random.key_data(leaf)
    if not isinstance(leaf, jax.Array) or (jax.process_count() > 1 and leaf.is_fully_addressable):
        return np.asarray(leaf)
    return leaf


def array_sha256(a: Any) -> str | None:
    """SHA-256 of an array's bytes (host copy); None for an array no process holds whole."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        if not a.is_fully_replicated:
            return None
        a = a.addressable_data(0)
    return hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()


def describe(spec: dict[str, Any]) -> str:
    impl = f" ({spec['impl']})" if "impl" in spec else ""
    return f"shape {tuple(spec['shape'])} {spec['dtype']}{impl}"


def key_parts(key: Any) -> tuple[Any, dict[str, Any] | None]:
    if key is None:
        return None, None
    if not isinstance(key, jax.Array | np.ndarray):
        raise TypeError(f"`key` must be a JAX PRNG key or None; got {type(key).__name__}.")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), {"kind": "typed", "impl": str(jax.random.key_impl(key))}
    return key, {"kind": "raw"}


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"`step` must be a non-negative int; got {step!r}.")


def config_to_json(config: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return json.loads(json.dumps({} if config is None else config))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`config` must be JSON-serialisable (dicts, lists, str, numbers, bools, None); "
            f"{e}. Convert such values first, e.g. `str(value)` or `float(value)`."
        ) from None


def handlers(ocp: Any) -> dict[str, Any]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "manifest": ocp.JsonCheckpointHandler(filename=Path(MANIFEST).name),
    }


def save_args(model: Any, opt_state: Any, step: int, key: Any, config: dict[str, Any] | None) -> Any:
    """orbax's save arguments: the arrays, and the manifest that describes them."""
    check_step(step)
    config_json = config_to_json(config)
    key_data, key_info = key_parts(key)
    ocp = load_orbax()
    primary = jax.process_index() == 0
    arrays: dict[str, Any] = {}
    leaves: list[dict[str, Any]] = []
    for name, leaf, spec in (
        saved_leaves(model, "model") + saved_leaves(opt_state, "opt_state") + saved_leaves(key_data, "key")
    ):
        arrays[name] = stored(leaf)
        leaves.append({"path": name, **spec, "sha256": array_sha256(arrays[name]) if primary else None})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "pccore_version": version(),
        "framework": getattr(model, "framework", None),
        "config": config_json,
        "key": key_info,
        "storage": f"orbax-checkpoint {importlib.metadata.version('orbax-checkpoint')}",
        "leaves": leaves,
    }
    return ocp.args.Composite(state=ocp.args.StandardSave(arrays), manifest=ocp.args.JsonSave(manifest))


def is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def is_sha(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None


def _ok_key_info(v: Any) -> bool:
    return v is None or (
        isinstance(v, dict)
        and (v.get("kind") == "raw" or (v.get("kind") == "typed" and isinstance(v.get("impl"), str)))
    )


_Fields = dict[str, tuple[Callable[[Any], bool], str]]


# The manifest fields a reader relies on: (check, what is expected).


_FIELDS: _Fields = {
    "format_version": (is_count, "a non-negative int"),
    "step": (is_count, "a non-negative int"),
    "pccore_version": (lambda v: isinstance(v, str), "a string"),
    "framework": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "config": (lambda v: isinstance(v, dict), "a JSON object"),
    "key": (_ok_key_info, 'null, {"kind": "raw"} or {"kind": "typed", "impl": "<name>"}'),
    "leaves": (lambda v: isinstance(v, list), "a list"),
}


_FIELDS_V1: _Fields = {  # pccore 0.1: one data file
    "file": (lambda v: v == "state.eqx", '"state.eqx"'),
    "bytes": (is_count, "a non-negative int"),
    "sha256": (is_sha, "64 lowercase hex digits"),
}


_LEAF_FIELDS: _Fields = {
    "path": (lambda v: isinstance(v, str), "a string"),
    "shape": (lambda v: isinstance(v, list) and all(is_count(d) for d in v),
              "a list of non-negative ints"),
    "dtype": (lambda v: isinstance(v, str), "a string"),
}


_LEAF_FIELDS_V2: _Fields = {"sha256": (lambda v: v is None or is_sha(v), "64 lowercase hex digits or null")}


def _check_fields(mpath: Path, obj: Any, fields: _Fields, prefix: str = "") -> None:
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


def manifest_path(path: Path) -> Path:
    """The manifest of the checkpoint at `path` (a pccore 0.1 one at its top)."""
    old = path / MANIFEST_V1
    return old if old.is_file() and not (path / MANIFEST).is_file() else path / MANIFEST


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`, checked; the arrays are not read."""
    mpath = manifest_path(path)
    if not path.is_dir():
        raise CheckpointError(f"No checkpoint at {str(path)!r}: the directory does not exist.")
    if not mpath.is_file():
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has no {MANIFEST}: it is incomplete or not a pccore "
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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(mpath)!r} is not a pccore checkpoint manifest.")
    _check_fields(mpath, manifest, {"format_version": _FIELDS["format_version"]})
    if manifest["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has format version {manifest['format_version']}, newer "
            f"than this pccore ({version()}) reads ({FORMAT_VERSION}). Upgrade pccore."
        )
    v1 = manifest["format_version"] == 1
    _check_fields(mpath, manifest, {**_FIELDS, **(_FIELDS_V1 if v1 else {})})
    for i, leaf in enumerate(manifest["leaves"]):
        _check_fields(mpath, leaf, {**_LEAF_FIELDS, **({} if v1 else _LEAF_FIELDS_V2)}, f"leaves[{i}].")
        if "impl" in leaf:
            _check_fields(mpath, leaf, {"impl": _LEAF_FIELDS["dtype"]}, f"leaves[{i}].")
    return manifest


def stored_target(spec: dict[str, Any]) -> np.ndarray:
    """A NumPy array of the shape and dtype orbax stored for a manifest leaf."""
    if "impl" in spec:
        data = jax.random.key_data(jax.random.key(0, impl=spec["impl"]))
        return np.zeros(spec["shape"] + list(data.shape), data.dtype)
    dtype = {"bool": np.bool_, "int": np.int64, "float": np.float64, "complex": np.complex128}
    return np.zeros(spec["shape"], dtype.get(spec["dtype"]) or jnp.dtype(spec["dtype"]))
