"""Reading checkpoints written by pccore 0.1: `step_*/state.eqx` (written with
`equinox.tree_serialise_leaves`) and `step_*/manifest.json`, whose `sha256` and `bytes`
cover the one data file. They are read as they are; new saves write the orbax layout."""

from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu

from ._files import sha256
from ._format import is_typed_key

class LegacyError(Exception):
    """What is wrong with a pccore 0.1 checkpoint (the caller raises it as a CheckpointError)."""


def verify(path: Path, manifest: dict[str, Any]) -> None:
    """Check `state.eqx` against the size and SHA-256 its manifest records."""
    data = path / manifest["file"]
    if not data.is_file():
        raise LegacyError(f"Checkpoint {str(path)!r}: the data file {data.name} is missing.")
    size = data.stat().st_size
    if size != manifest["bytes"]:
        raise LegacyError(
            f"Checkpoint {str(path)!r} is truncated or corrupted: {data.name} has {size} "
            f"bytes, the manifest expects {manifest['bytes']}. Restore an earlier step."
        )
    if sha256(data) != manifest["sha256"]:
        raise LegacyError(
            f"Checkpoint {str(path)!r} is corrupted: the SHA-256 checksum of {data.name} "
            "does not match its manifest. Restore an earlier step."
        )


def read(path: Path, manifest: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """The saved leaves read into `template` (typed keys and device placement as its own)."""

    def as_data(tree: Any) -> Any:
        return jtu.tree_map(lambda x: jax.random.key_data(x) if is_typed_key(x) else x, tree)

    try:
        tree = eqx.tree_deserialise_leaves(path / manifest["file"], as_data(template))
    except Exception as e:  # verified before: anything here is an unexpected read failure
        raise LegacyError(f"Checkpoint {str(path)!r} could not be read: {e}") from e

    def place(a: Any, t: Any) -> Any:
        if is_typed_key(t):
            a = jax.random.wrap_key_data(a, impl=jax.random.key_impl(t))
        if isinstance(a, jax.Array) and isinstance(t, jax.Array) and t.is_fully_addressable:
            return jax.device_put(a, t.sharding)
        return a

    return jtu.tree_map(place, tree, template)
