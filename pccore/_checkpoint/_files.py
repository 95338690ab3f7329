"""`files.json`: the size and SHA-256 of every file of a committed checkpoint.

orbax-checkpoint has no checksums of its own: it reads a flipped byte in an array's data
back without complaint, and reading a truncated file fails deep inside tensorstore. pccore
writes this index once orbax has committed a checkpoint, so that a checkpoint is verified
(`latest_step`, `read_manifest`, before `restore` reads it) by hashing its files, without
reading its arrays through orbax. A checkpoint without one (its writer stopped between the
commit and the index) is verified by its arrays' SHA-256 in the manifest instead.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ._format import FORMAT, is_count, is_sha

FILES = "files.json"


def sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_index(path: Path) -> None:
    """Write `files.json` into the committed checkpoint `path`, atomically."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != FILES)
    index = {
        "format": FORMAT,
        "files": {p.relative_to(path).as_posix(): [p.stat().st_size, sha256(p)] for p in files},
    }
    tmp = path / f".{FILES}.tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / FILES)
    fsync_dir(path)


def _ok_entry(rel: Any, v: Any) -> bool:
    return (
        isinstance(rel, str) and bool(rel) and not rel.startswith("/") and ".." not in rel.split("/")
        and isinstance(v, list) and len(v) == 2
        and is_count(v[0]) and is_sha(v[1])
    )


def has_index(path: Path) -> bool:
    return (path / FILES).is_file()


def damage(path: Path) -> str | None:
    """What differs from the checkpoint's `files.json` (a file's size or SHA-256), or None
    (also when there is no index)."""
    ipath = path / FILES
    if not ipath.is_file():
        return None
    try:
        index = json.loads(ipath.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{FILES} is corrupted ({e})"
    if not (isinstance(index, dict) and index.get("format") == FORMAT
            and isinstance(index.get("files"), dict)
            and all(_ok_entry(rel, v) for rel, v in index["files"].items())):
        return f"{FILES} is not a pccore file index (edited or damaged)"
    for rel, (size, sha) in index["files"].items():
        file = path / rel
        if not file.is_file():
            return f"the data file {rel} is missing"
        if file.stat().st_size != size:
            return f"{rel} has {file.stat().st_size} bytes, {FILES} expects {size}"
        if sha256(file) != sha:
            return f"the SHA-256 checksum of {rel} does not match {FILES}"
    return None
