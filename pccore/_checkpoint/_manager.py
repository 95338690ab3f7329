"""Numbered checkpoints in one directory, through orbax's CheckpointManager (keep-N,
asynchronous saves)."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from . import _files
from ._commit import abandon, recover, stranded, write_committed, writer_lock
from ._format import (
    OLD_DIR,
    STEP_DIR,
    Checkpoint,
    CheckpointError,
    Damaged,
    handlers,
    load_orbax,
    manifest_path,
    save_args,
    sync,
)
from ._store import read_manifest, restore_checkpoint


class CheckpointManager:
    """Numbered checkpoints in one directory: keep the last `keep`, find the latest valid one.

    ```python
    manager = pccore.CheckpointManager("runs/a", keep=3)
    if manager.latest_step() is not None:                    # resume
        ckpt = manager.restore(model=model, opt_state=opt_state)
        model, opt_state, start, key = ckpt.model, ckpt.opt_state, ckpt.step, ckpt.key
    with manager:                                            # waits for the last save
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
    - `async_save`: return from `save` once the arrays are copied off the devices and hashed,
        and write and commit the checkpoint in the background (orbax's asynchronous
        checkpointing) while training goes on. One save is in flight at a time: the next
        `save`, and `wait`, `restore`, `latest_step` and leaving a `with manager:` block,
        wait for it and raise its error if it failed. Until it commits, readers see the
        checkpoints before it, and the manager holds the directory's writer lock.
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3, *, async_save: bool = False):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"`keep` must be a positive int; got {keep!r}. E.g. keep=3.")
        if not isinstance(async_save, bool):
            raise TypeError(f"`async_save` must be a bool; got {async_save!r}.")
        self.directory: Path = Path(directory)
        self.keep = keep
        self.async_save = async_save
        self._holding = False
        self._pending: tuple[Any, Path, Path | None, contextlib.ExitStack] | None = None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wait()

    @contextlib.contextmanager
    def hold(self) -> Iterator["CheckpointManager"]:
        """Hold the directory's writer lock for a whole run (creating the directory).

        ```python
        with manager.hold():  # a second run into this directory is refused from here on
            for epoch in ...:
                manager.save(epoch + 1, model=model, opt_state=opt_state)
        ```

        Each `save` takes the lock for its own duration anyway; `hold` also refuses another
        writer between saves. Re-entrant for this manager; a no-op on processes other than 0
        (the lock is process 0's). Leaving it waits for an asynchronous save.

        **Raises:** [`pccore.CheckpointError`][] if another writer holds the directory;
        `ImportError` if orbax-checkpoint is not installed (before a run, not at its first save).
        """
        load_orbax()
        if self._holding or jax.process_index() != 0:
            yield self
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with writer_lock(self.directory):
            self._holding = True
            try:
                yield self
            finally:
                try:
                    self.wait()  # an asynchronous save in flight commits before the lock goes
                finally:
                    self._holding = False

    def path(self, step: int) -> Path:
        """The directory of checkpoint `step`."""
        return self.directory / f"step_{int(step):08d}"

    def steps(self) -> list[int]:
        """The steps that have a checkpoint directory with a manifest, ascending (not verified).

        Includes a step whose checkpoint an overwriting save has set aside and not replaced.
        """
        if not self.directory.is_dir():
            return []
        out: set[int] = set()
        for p in self.directory.iterdir():
            m = STEP_DIR.match(p.name)
            if m and manifest_path(p).is_file():
                out.add(int(m.group(1)))
            m = OLD_DIR.match(p.name)
            if m and stranded(self.directory / m.group(1)) == p and manifest_path(p).is_file():
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
        self.wait()
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

        **Returns:** the checkpoint's path; with `async_save`, before it is committed.

        **Raises:** [`pccore.CheckpointError`][] if another writer holds the directory (another
        manager's save or [`pccore.CheckpointManager.hold`][]); the error of an asynchronous
        save that failed.
        """
        self.wait()
        path = self.path(step)
        args = save_args(model, opt_state, step, key, config)
        ocp = load_orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, step_prefix="step", step_format_fixed_length=8,
            enable_async_checkpointing=self.async_save, cleanup_tmp_directories=True,
        )
        lock = contextlib.ExitStack()
        lock.enter_context(self.hold())  # held until an asynchronous save commits
        managers: list[Any] = []

        def write(args: Any) -> None:
            # Made here, once the lock is held and an old checkpoint set aside: orbax's
            # manager removes temporary directories, and reads the steps there, as it starts.
            managers.append(ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers(ocp)))
            managers[0].save(step, args=args, force=True)

        try:
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
            old = write_committed(path, args, overwrite, write)
        except BaseException:
            for m in managers:
                m.close()
            lock.close()
            raise
        self._pending = (managers[0], path, old, lock)
        if not self.async_save:
            self.wait()
        return path

    def wait(self) -> None:
        """Wait until an asynchronous save has committed (nothing if none is in flight).

        **Raises:** the error of the save, if it failed; the checkpoints before it are kept.
        """
        if self._pending is None:
            return
        orbax, path, old, lock = self._pending
        self._pending = None
        with lock:  # released last
            try:
                orbax.wait_until_finished()
            except BaseException:
                if jax.process_index() == 0:
                    abandon(path)
                raise
            finally:
                orbax.close()
            if jax.process_index() == 0:
                _files.write_index(path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def _clear_leftovers(self) -> None:
        """Process 0, lock held: put back what overwriting saves that did not commit set
        aside, and remove what committed ones left (orbax removes its temporary directories)."""
        if jax.process_index() == 0 and self.directory.is_dir():
            for p in list(self.directory.iterdir()):
                m = OLD_DIR.match(p.name)
                if m:
                    recover(self.directory / m.group(1))
                    shutil.rmtree(p, ignore_errors=True)  # if its step was committed anew
        sync("manager:cleared")

    def restore(self, step: int | None = None, *, model: Any, opt_state: Any) -> Checkpoint:
        """Restore checkpoint `step`, or the latest valid one (see [`pccore.restore_checkpoint`][]).

        Without `step`, the checkpoints are tried newest first, each read once: a damaged one
        is passed over for the one before it.

        **Raises:** [`pccore.CheckpointError`][] if there is none, or it does not fit.
        """
        self.wait()
        if step is not None:
            return restore_checkpoint(self.path(step), model=model, opt_state=opt_state)
        for s in reversed(self.steps()):
            try:
                return restore_checkpoint(self.path(s), model=model, opt_state=opt_state)
            except Damaged:
                continue
            except CheckpointError:
                if self._valid(s):  # the checkpoint is whole: the template does not fit it
                    raise
        raise CheckpointError(
            f"No valid checkpoint in {str(self.directory)!r} (found steps "
            f"{self.steps()}). Start from scratch, or point to the right directory."
        )
