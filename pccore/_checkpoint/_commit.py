"""Committing a checkpoint safely on top of orbax's atomic rename: one writer per
directory (an advisory `flock` held by process 0), and `overwrite` that never loses the
previous checkpoint (set aside as `.old-NAME-*` until the new one is committed)."""

import contextlib
import glob
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

from . import _files
from ._format import TMP, CheckpointError, first_line, sync

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per directory is then on you
    fcntl = None


def stranded(path: Path) -> Path | None:
    """The checkpoint set aside as `.old-NAME-*` by an overwriting save that has not
    committed (so nothing is at `path`), or None."""
    if path.exists() or not path.parent.is_dir():
        return None
    name = re.compile(rf"\.old-{re.escape(path.name)}-[0-9a-f]{{8}}")
    olds = sorted(p for p in path.parent.iterdir() if p.is_dir() and name.fullmatch(p.name))
    return olds[0] if olds else None


def recover(path: Path) -> None:
    """Writers: rename a stranded set-aside checkpoint back to `path`."""
    old = stranded(path)
    if old is not None:
        os.replace(old, path)
        _files.fsync_dir(path.parent)


def abandon(path: Path) -> None:
    """After a failed save of `path`: remove orbax's temporary directory, and put a
    set-aside checkpoint back."""
    if path.parent.is_dir():
        for p in path.parent.glob(f"{glob.escape(path.name)}{TMP}*"):
            shutil.rmtree(p, ignore_errors=True)
    recover(path)


def _raced(error: BaseException, path: Path) -> str | None:
    """What another writer did if a save of `path` failed by losing a race with it (possible
    only where no `flock` lock is available), else None."""
    if not isinstance(error, Exception):
        return None
    if path.exists():  # absent when this save started (or set aside by it)
        return "it wrote the same checkpoint meanwhile"
    tmp = path.parent / f"{path.name}{TMP}"
    if isinstance(error, FileNotFoundError) and not tmp.exists():
        return f"it removed this save's temporary directory {tmp.name}: {first_line(error)}"
    return None


@contextlib.contextmanager


def writer_lock(directory: Path) -> Iterator[None]:
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


def write_committed(path: Path, args: Any, overwrite: bool, write: Callable[[Any], None]) -> Path | None:
    """Commit `args` at `path` with `write` (the caller holds the writer lock). An existing
    checkpoint is set aside first; returns where (None if none), for the caller to remove
    once the new one is committed. A failed write puts it back."""
    primary = jax.process_index() == 0
    if primary:
        recover(path)  # an earlier overwriting save that did not commit
    sync("save:recovered")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"`path`: checkpoint {str(path)!r} already exists. Pass `overwrite=True` to "
            "replace it, or save to a new path."
        )
    old = None
    if primary and path.exists():
        old = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        _files.fsync_dir(path.parent)
    sync("save:set-aside")
    try:
        write(args)
    except BaseException as e:
        raced = _raced(e, path) if primary else None
        if primary:
            abandon(path)
        if raced is None:
            raise
        raise CheckpointError(
            f"Checkpoint directory {str(path.parent)!r}: another writer saved into it while this "
            f"save of {path.name} ran ({raced}); expected one writer per "
            "directory. This save was abandoned: give each run its own directory (e.g. "
            "--checkpoint-dir), or stop the other run."
        ) from e
    return old
