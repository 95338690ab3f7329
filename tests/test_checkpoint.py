"""Checkpoints: resume equals uninterrupted, interrupted saves lose nothing, bad files and
wrong templates get clear errors."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from tests import cases

ROOT = Path(__file__).resolve().parents[1]
SIZES = [4, 8, 3]
OPTIM = optax.adam(1e-2)


def build(sizes=SIZES, dtype=jnp.float32):
    model = cases.build_mlp("equinox", cases.canonical_mlp(sizes, jax.random.key(0), dtype))
    return model, OPTIM.init(model.params)


def data():
    kx, ky = jax.random.split(jax.random.key(1))
    return np.asarray(jax.random.normal(kx, (16, 4))), np.asarray(jax.random.normal(ky, (16, 3)))


def train_epochs(model, opt_state, key, epochs):
    """Shuffled minibatch epochs; the key drives the shuffle, so it must be restored too."""
    x, y = data()
    for _ in range(epochs):
        key, sub = jax.random.split(key)
        perm = np.asarray(jax.random.permutation(sub, len(x)))
        for i in range(0, len(x), 4):
            idx = perm[i : i + 4]
            model, opt_state, _ = pccore.train_step(model, OPTIM, opt_state, x=x[idx], y=y[idx])
    return model, opt_state, key


def is_key(a):
    return eqx.is_array(a) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)


def arrays(tree):
    """The array leaves as NumPy arrays (a typed key as its key data)."""
    return [
        np.asarray(jax.random.key_data(a) if is_key(a) else a)
        for a in jax.tree.leaves(tree)
        if eqx.is_array(a)
    ]


def data_file(path: Path) -> Path:
    """orbax's OCDBT data file of a checkpoint (the small test model's arrays are all in it)."""
    (file,) = (path / "state" / "d").iterdir()
    return file


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def trained():
    model, opt_state = build()
    return train_epochs(model, opt_state, jax.random.key(7), 2)


@pytest.mark.slow
def test_resume_in_new_process_equals_uninterrupted(tmp_path, trained):
    model, opt_state, key = trained
    manager = pccore.CheckpointManager(tmp_path, keep=2)
    manager.save(2, model=model, opt_state=opt_state, key=key, config={"epochs": 4, "sizes": SIZES})
    straight = train_epochs(model, opt_state, key, 2)  # epochs 3 and 4, no interruption

    proc = run_python(
        f"""
        import pccore
        from tests.test_checkpoint import build, train_epochs
        manager = pccore.CheckpointManager({str(tmp_path)!r}, keep=2)
        model, opt_state = build()
        ck = manager.restore(model=model, opt_state=opt_state)
        assert ck.step == 2 and ck.config == {{"epochs": 4, "sizes": {SIZES}}}, ck
        model, opt_state, key = train_epochs(ck.model, ck.opt_state, ck.key, 2)
        manager.save(4, model=model, opt_state=opt_state, key=key, config=ck.config)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    template = build()
    resumed = manager.restore(model=template[0], opt_state=template[1])
    assert resumed.step == 4 and manager.steps() == [2, 4]
    assert type(resumed.model) is pccore.PCModel and resumed.framework == "equinox"
    # Bitwise equal weights, optimiser state and RNG key.
    for a, b in zip(
        arrays((straight[0], straight[1])), arrays((resumed.model, resumed.opt_state)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.random.key_data(straight[2]), jax.random.key_data(resumed.key))
    assert resumed.version == pccore.__version__


def interrupt_commit(name: str, action) -> None:
    """Make orbax-checkpoint call `action()` just before it commits the checkpoint `name`.

    orbax writes a checkpoint into `NAME.orbax-checkpoint-tmp`, each item into its own
    temporary directory there, renames the items' directories and then commits the checkpoint
    by renaming `NAME.orbax-checkpoint-tmp` to `NAME` (`async_path.rename`). `action` runs
    at that last rename, when every file of the new checkpoint is written.
    """
    from orbax.checkpoint._src.path import async_path

    real = async_path.rename

    async def rename(src, dst):
        if Path(dst).name == name:
            action()
        return await real(src, dst)

    async_path.rename = rename


def die():
    os.kill(os.getpid(), signal.SIGKILL)


_KILL_MIDWAY = """
import pccore
from tests.test_checkpoint import build, die, interrupt_commit

manager = pccore.CheckpointManager({dir!r}, keep=3)
model, opt_state = build()
manager.save(1, model=model, opt_state=opt_state)
interrupt_commit("step_00000002", die)
manager.save(2, model=model, opt_state=opt_state)
"""

ORBAX_TMP = ".orbax-checkpoint-tmp"


@pytest.mark.slow
def test_save_killed_midway_keeps_previous_checkpoint(tmp_path):
    proc = run_python(_KILL_MIDWAY.format(dir=str(tmp_path)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("step_00000002" + ORBAX_TMP)]
    assert len(leftovers) == 1  # the writer really died in the middle of saving step 2
    assert (leftovers[0] / "state").is_dir() and (leftovers[0] / "manifest").is_dir()
    manager = pccore.CheckpointManager(tmp_path, keep=3)
    assert manager.steps() == [1] and manager.latest_step() == 1
    model, opt_state = build()
    ck = manager.restore(model=model, opt_state=opt_state)
    for a, b in zip(arrays(model), arrays(ck.model), strict=True):
        np.testing.assert_array_equal(a, b)
    manager.save(2, model=model, opt_state=opt_state)  # the next save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]


_KILL_AFTER_COMMIT = """
import pccore
from pccore._checkpoint import _files
from tests.test_checkpoint import build, die

manager = pccore.CheckpointManager({dir!r}, keep=1)
model, opt_state = build()
manager.save(1, model=model, opt_state=opt_state)
_files.write_index = lambda path: die()
manager.save(2, model=model, opt_state=opt_state)
"""


@pytest.mark.slow
def test_save_killed_after_commit_before_file_index_is_complete(tmp_path):
    proc = run_python(_KILL_AFTER_COMMIT.format(dir=str(tmp_path)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # orbax committed step 2 (and, keep=1, deleted step 1); the file index is missing, so
    # verification reads every array and checks its SHA-256.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
    assert not (tmp_path / "step_00000002" / "files.json").exists()
    manager = pccore.CheckpointManager(tmp_path, keep=1)
    assert manager.latest_step() == 2
    model, opt_state = build()
    ck = manager.restore(model=model, opt_state=opt_state)
    for a, b in zip(arrays((model, opt_state)), arrays((ck.model, ck.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)


_KILL_ASYNC = """
import pccore
from tests.test_checkpoint import build, die, interrupt_commit

manager = pccore.CheckpointManager({dir!r}, keep=3, async_save=True)
model, opt_state = build()
manager.save(1, model=model, opt_state=opt_state)
interrupt_commit("step_00000002", die)
manager.save(2, model=model, opt_state=opt_state)  # returns; the commit is in the background
print("save returned", flush=True)
manager.wait()
"""


@pytest.mark.slow
def test_async_save_killed_in_the_background_keeps_previous_checkpoint(tmp_path):
    proc = run_python(_KILL_ASYNC.format(dir=str(tmp_path)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert proc.stdout == "save returned\n"  # killed by the background commit, after save returned
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("step_00000002" + ORBAX_TMP)]
    assert len(leftovers) == 1
    manager = pccore.CheckpointManager(tmp_path, keep=3)
    assert manager.steps() == [1] and manager.latest_step() == 1
    model, opt_state = build()
    ck = manager.restore(model=model, opt_state=opt_state)
    for a, b in zip(arrays((model, opt_state)), arrays((ck.model, ck.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    manager.save(2, model=model, opt_state=opt_state)  # the next save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]


def test_async_save_returns_before_its_commit_and_needs_no_device_buffers(tmp_path, monkeypatch):
    import threading

    from orbax.checkpoint._src.path import async_path

    model, opt_state = build()
    manager = pccore.CheckpointManager(tmp_path, keep=3, async_save=True)
    manager.save(1, model=model, opt_state=opt_state)
    monkeypatch.setattr(async_path, "rename", async_path.rename)  # undone below
    release = threading.Event()
    interrupt_commit("step_00000002", lambda: release.wait(60))
    # The state saved at step 2 lives in buffers that training then donates or frees.
    changed = jax.tree.map(lambda a: a * 3 if eqx.is_inexact_array(a) else a, (model, opt_state))
    expected = arrays(changed)
    manager.save(2, model=changed[0], opt_state=changed[1])
    for leaf in jax.tree.leaves(changed):
        if eqx.is_inexact_array(leaf):  # the new arrays (the int count is shared with opt_state)
            leaf.delete()
    # In flight: not committed, readers see step 1, and the directory is held.
    assert (tmp_path / ("step_00000002" + ORBAX_TMP)).is_dir()
    assert not (tmp_path / "step_00000002").exists()
    assert pccore.CheckpointManager(tmp_path).steps() == [1]
    with pytest.raises(pccore.CheckpointError, match="is held by another writer"):
        pccore.save_checkpoint(tmp_path / "step_00000009", model=model, opt_state=opt_state, step=9)
    release.set()
    manager.wait()
    monkeypatch.undo()
    assert manager.steps() == [1, 2]
    ck = manager.restore(model=model, opt_state=opt_state)
    assert ck.step == 2
    for a, b in zip(expected, arrays((ck.model, ck.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    pccore.save_checkpoint(tmp_path / "step_00000009", model=model, opt_state=opt_state, step=9)


def _disk_full_at_step_2(tmp_path, monkeypatch, async_save):
    """A manager with step 1 saved whose save of step 2 fails at the commit (a full disk)
    until `monkeypatch.undo()`; and the model, a changed model and the optimiser state."""
    from orbax.checkpoint._src.path import async_path

    model, opt_state = build()
    manager = pccore.CheckpointManager(tmp_path, async_save=async_save)
    manager.save(1, model=model, opt_state=opt_state)

    def disk_full():
        raise OSError("disk full")

    monkeypatch.setattr(async_path, "rename", async_path.rename)  # undone by monkeypatch.undo()
    interrupt_commit("step_00000002", disk_full)
    changed = jax.tree.map(lambda a: a + 1 if eqx.is_inexact_array(a) else a, model)
    return manager, model, changed, opt_state


def test_async_save_that_fails_raises_at_wait_and_keeps_previous(tmp_path, monkeypatch):
    manager, model, changed, opt_state = _disk_full_at_step_2(tmp_path, monkeypatch, True)
    with manager.hold():
        manager.save(2, model=changed, opt_state=opt_state)  # returns: the commit fails later
        with pytest.raises(OSError, match="disk full"):
            manager.save(3, model=changed, opt_state=opt_state)  # waits for step 2 first
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    assert manager.restore(model=model, opt_state=opt_state).step == 1
    manager.save(2, model=changed, opt_state=opt_state)  # the lock was given back
    manager.wait()
    assert manager.latest_step() == 2


def test_save_raising_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    manager, model, changed, opt_state = _disk_full_at_step_2(tmp_path, monkeypatch, False)
    with pytest.raises(OSError, match="disk full"):
        manager.save(2, model=changed, opt_state=opt_state)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    ck = manager.restore(model=model, opt_state=opt_state)
    assert ck.step == 1
    for a, b in zip(arrays(model), arrays(ck.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_corrupted_checkpoints_get_clear_errors(tmp_path):
    model, opt_state = build()
    manager = pccore.CheckpointManager(tmp_path, keep=5)
    for step in (1, 2, 3, 4):
        manager.save(step, model=model, opt_state=opt_state)
    state = data_file(manager.path(4))
    state.write_bytes(state.read_bytes()[:-7])  # truncated
    with pytest.raises(
        pccore.CheckpointError,
        match=r"step_00000004' is truncated or corrupted: the first damaged parameter is "
        r"`model\.params\[0\]\[0\]\.weight` \(orbax-checkpoint cannot read it: OUT_OF_RANGE.*; "
        r"state/d/\w+ has \d+ bytes, files\.json expects \d+\)",
    ):
        manager.restore(4, model=model, opt_state=opt_state)
    state = data_file(manager.path(3))
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, same size
    state.write_bytes(bytes(raw))
    with pytest.raises(
        pccore.CheckpointError,
        match=r"step_00000003' is truncated or corrupted: the first damaged parameter is "
        r"`model\.params\[0\]\[0\]\.weight` \(orbax-checkpoint cannot read it: DATA_LOSS.*; "
        r"the SHA-256 checksum of state/d/\w+ does not match files\.json\)",
    ):
        manager.restore(3, model=model, opt_state=opt_state)
    (manager.path(2) / "manifest/manifest.json").write_text('{"format": "pccore-chec')
    assert manager.steps() == [1, 2, 3, 4]
    assert manager.latest_step() == 1  # newest that verifies
    with pytest.raises(pccore.CheckpointError, match=r"manifest/manifest.json is corrupted"):
        manager.restore(2, model=model, opt_state=opt_state)
    (manager.path(2) / "manifest/manifest.json").unlink()
    with pytest.raises(
        pccore.CheckpointError, match=r"has no manifest/manifest.json: it is incomplete"
    ):
        pccore.restore_checkpoint(manager.path(2), model=model, opt_state=opt_state)
    with pytest.raises(pccore.CheckpointError, match=r"No checkpoint at .*: the directory does not"):
        pccore.restore_checkpoint(tmp_path / "nope", model=model, opt_state=opt_state)
    with pytest.raises(pccore.CheckpointError, match=r"No valid checkpoint in .* \(found steps \[\]\)"):
        pccore.CheckpointManager(tmp_path / "empty").restore(model=model, opt_state=opt_state)
    ck = manager.restore(model=model, opt_state=opt_state)
    assert ck.step == 1
    # Resuming around the damage: saving over a corrupted step replaces it, no `overwrite`.
    manager.save(2, model=model, opt_state=opt_state)
    assert manager.latest_step() == 2
    with pytest.raises(ValueError, match=r"`step`=0, but .* holds a newer valid checkpoint \(step 2\)"):
        manager.save(0, model=model, opt_state=opt_state)


def test_restore_into_another_architecture_names_first_mismatch(tmp_path):
    model, opt_state = build()
    pccore.save_checkpoint(tmp_path / "c", model=model, opt_state=opt_state, step=0)
    wide = build([4, 9, 3])
    with pytest.raises(
        pccore.CheckpointError,
        match=(
            r"first mismatching parameter is `model\.params\[0\]\[0\]\.weight`: got shape \(8, 4\) "
            r"float32 in the checkpoint, expected shape \(9, 4\) float32"
        ),
    ):
        pccore.restore_checkpoint(tmp_path / "c", model=wide[0], opt_state=wide[1])
    deep = build([4, 8, 8, 3])
    with pytest.raises(
        pccore.CheckpointError,
        match=(
            r"first mismatching parameter is `model\.params\[1\]\[0\]\.weight`: got shape \(3, 8\) "
            r"float32 in the checkpoint, expected shape \(8, 8\)"
        ),
    ):
        pccore.restore_checkpoint(tmp_path / "c", model=deep[0], opt_state=deep[1])
    sgd_state = optax.sgd(0.1, momentum=0.9).init(model.params)
    with pytest.raises(pccore.CheckpointError, match=r"does not fit the template: .*`opt_state"):
        pccore.restore_checkpoint(tmp_path / "c", model=model, opt_state=sgd_state)


def test_restore_dtype_mismatch_and_roundtrip(tmp_path, x64):
    model64, opt64 = build(dtype=jnp.float64)
    pccore.save_checkpoint(
        tmp_path / "c", model=model64, opt_state=opt64, step=3, key=jax.random.PRNGKey(5)
    )  # a raw uint32 key
    model32, opt32 = build()
    with pytest.raises(
        pccore.CheckpointError,
        match=(
            r"`model\.params\[0\]\[0\]\.weight`: got shape \(8, 4\) float64 in the checkpoint, "
            r"expected shape \(8, 4\) float32"
        ),
    ):
        pccore.restore_checkpoint(tmp_path / "c", model=model32, opt_state=opt32)
    ck = pccore.restore_checkpoint(tmp_path / "c", model=model64, opt_state=opt64)
    np.testing.assert_array_equal(ck.key, jax.random.PRNGKey(5))
    assert ck.step == 3 and ck.config == {}


def test_keep_last_n_and_argument_errors(tmp_path):
    model, opt_state = build()
    manager = pccore.CheckpointManager(tmp_path, keep=2)
    for step in range(5):
        manager.save(step, model=model, opt_state=opt_state)
    assert manager.steps() == [3, 4]
    manifest = pccore.read_manifest(manager.path(4))
    assert manifest["step"] == 4 and manifest["framework"] == "equinox"
    saved = json.loads((manager.path(4) / "manifest/manifest.json").read_text())
    assert saved["leaves"] == manifest["leaves"] and all(len(x["sha256"]) == 64 for x in saved["leaves"])
    with pytest.raises(
        FileExistsError, match=r"`path`: checkpoint .* already exists\. Pass `overwrite=True`"
    ):
        manager.save(4, model=model, opt_state=opt_state)
    manager.save(4, model=model, opt_state=opt_state, overwrite=True)
    assert manager.steps() == [3, 4]
    with pytest.raises(ValueError, match=r"`keep` must be a positive int; got 0"):
        pccore.CheckpointManager(tmp_path, keep=0)
    with pytest.raises(ValueError, match=r"`step` must be a non-negative int; got -1"):
        manager.save(-1, model=model, opt_state=opt_state)
    with pytest.raises(TypeError, match=r"`config` must be JSON-serialisable"):
        manager.save(9, model=model, opt_state=opt_state, config={"optim": OPTIM})
    with pytest.raises(TypeError, match=r"`key` must be a JAX PRNG key or None; got int"):
        manager.save(9, model=model, opt_state=opt_state, key=3)


def test_manifest_and_template_errors(tmp_path):
    import dataclasses

    model, opt_state = build()
    path = pccore.save_checkpoint(tmp_path / "c", model=model, opt_state=opt_state, step=0)
    with pytest.raises(
        pccore.CheckpointError,
        match=r"holds a model from 'equinox'; the template `model` is from 'haiku'\. Pass a equinox",
    ):
        pccore.restore_checkpoint(
            path, model=dataclasses.replace(model, framework="haiku"), opt_state=opt_state
        )
    with pytest.raises(
        pccore.CheckpointError,
        match=(
            r"the checkpoint has 13 saved leaves, the template 4; the first mismatching parameter is "
            r"`opt_state\[0\]\.count`, present only in the checkpoint"
        ),
    ):
        pccore.restore_checkpoint(path, model=model, opt_state=optax.sgd(0.1).init(model.params))
    with pytest.raises(
        pccore.CheckpointError,
        match=(
            r"parameter is `opt_state\[0\]\.trace\[0\]\[0\]\.weight` in the template but "
            r"`opt_state\[0\]\.count` in the checkpoint"
        ),
    ):
        pccore.restore_checkpoint(
            path, model=model, opt_state=optax.sgd(0.1, momentum=0.9).init(model.params)
        )
    mpath = path / "manifest/manifest.json"
    manifest = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(pccore.CheckpointError, match=r"has format version 99, newer than this pccore"):
        pccore.restore_checkpoint(path, model=model, opt_state=opt_state)
    mpath.write_text(json.dumps({"hello": 1}))
    with pytest.raises(pccore.CheckpointError, match=r"manifest.json' is not a pccore checkpoint manifest"):
        pccore.read_manifest(path)
    mpath.write_text(json.dumps(manifest))
    shutil.rmtree(path / "state")  # the arrays are missing
    with pytest.raises(
        pccore.CheckpointError,
        match=r"truncated or corrupted: the first damaged parameter is `model\.params\[0\]\[0\]\.weight` "
        r"\(orbax-checkpoint cannot read it: .*; the data file state/\S+ is missing\)",
    ):
        pccore.restore_checkpoint(path, model=model, opt_state=opt_state)


def test_overwrite_below_newer_step_keeps_the_checkpoint_it_wrote(tmp_path):
    model, opt_state = build()
    changed = jax.tree.map(lambda a: a + 1 if eqx.is_inexact_array(a) else a, model)
    manager = pccore.CheckpointManager(tmp_path / "one", keep=1)
    manager.save(5, model=model, opt_state=opt_state)
    with pytest.raises(ValueError, match=r"pass `overwrite=True` to write here anyway"):
        manager.save(3, model=changed, opt_state=opt_state)
    path = manager.save(3, model=changed, opt_state=opt_state, overwrite=True)
    # The write is kept; with keep=1 it is the only one left.
    assert path == manager.path(3) and manager.steps() == [3] and manager.latest_step() == 3
    ck = manager.restore(model=model, opt_state=opt_state)
    for a, b in zip(arrays(changed), arrays(ck.model), strict=True):
        np.testing.assert_array_equal(a, b)
    # keep=3: the step just written plus the newest keep - 1 = 2 others.
    manager = pccore.CheckpointManager(tmp_path / "three", keep=3)
    for step in (8, 9, 10):
        manager.save(step, model=model, opt_state=opt_state)
    manager.save(1, model=model, opt_state=opt_state, overwrite=True)
    assert manager.steps() == [1, 9, 10]
    manager.save(9, model=changed, opt_state=opt_state, overwrite=True)  # a middle step
    assert manager.steps() == [1, 9, 10]
    manager.save(11, model=model, opt_state=opt_state)  # ascending again: the newest 3
    assert manager.steps() == [9, 10, 11]


class KeyHolder(eqx.Module):
    weight: jax.Array
    fry: jax.Array
    rbg: jax.Array
    many: jax.Array


def key_holder(seed):
    k = jax.random.key(seed)
    return KeyHolder(
        weight=jnp.arange(3.0) + seed,
        fry=k,
        rbg=jax.random.key(seed, impl="rbg"),
        many=jax.random.split(jax.random.fold_in(k, 1), (2, 3)),
    )


def test_typed_key_leaves_roundtrip_with_their_impl(tmp_path):
    saved = key_holder(3)
    path = pccore.save_checkpoint(tmp_path / "c", model=saved, opt_state=None, step=0)
    leaves = {leaf["path"]: leaf for leaf in pccore.read_manifest(path)["leaves"]}
    assert leaves["model.fry"].pop("sha256") == hashlib.sha256(
        np.asarray(jax.random.key_data(saved.fry)).tobytes()
    ).hexdigest()
    assert leaves["model.fry"] == {
        "path": "model.fry", "shape": [], "dtype": "key<fry>", "impl": "threefry2x32"
    }
    assert leaves["model.many"]["shape"] == [2, 3] and leaves["model.rbg"]["impl"] == "rbg"
    ck = pccore.restore_checkpoint(path, model=key_holder(0), opt_state=None)
    assert type(ck.model) is KeyHolder
    np.testing.assert_array_equal(ck.model.weight, saved.weight)
    for name in ("fry", "rbg", "many"):
        got, want = getattr(ck.model, name), getattr(saved, name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert jax.random.key_impl(got) == jax.random.key_impl(want)
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
    # The restored keys draw what the saved ones draw.
    np.testing.assert_array_equal(
        jax.random.normal(ck.model.rbg, (4,)), jax.random.normal(saved.rbg, (4,))
    )
    other_impl = eqx.tree_at(lambda m: m.fry, key_holder(0), jax.random.key(0, impl="rbg"))
    with pytest.raises(
        pccore.CheckpointError,
        match=(
            r"`model\.fry`: got shape \(\) key<fry> \(threefry2x32\) in the checkpoint, "
            r"expected shape \(\) key<rbg> \(rbg\)"
        ),
    ):
        pccore.restore_checkpoint(path, model=other_impl, opt_state=None)
    raw = eqx.tree_at(lambda m: m.fry, key_holder(0), jax.random.PRNGKey(0))
    with pytest.raises(
        pccore.CheckpointError,
        match=r"`model\.fry`: got shape \(\) key<fry> \(threefry2x32\) .* expected shape \(2,\) uint32",
    ):
        pccore.restore_checkpoint(path, model=raw, opt_state=None)


def test_noisy_sgd_state_key_resume_equals_uninterrupted(tmp_path):
    # optax.noisy_sgd keeps a typed key in its state and splits it on every update.
    optim = optax.noisy_sgd(0.1, key=jax.random.key(0))
    x, y = data()

    def steps(model, opt_state, n):
        for i in range(n):
            b = slice(4 * i, 4 * i + 4)
            model, opt_state, _ = pccore.train_step(model, optim, opt_state, x=x[b], y=y[b])
        return model, opt_state

    model, _ = build()
    model, opt_state = steps(model, optim.init(model.params), 2)
    manager = pccore.CheckpointManager(tmp_path)
    manager.save(2, model=model, opt_state=opt_state)
    straight = steps(model, opt_state, 2)

    template, _ = build()
    fresh_state = optim.init(template.params)  # its key is the initial one, not the saved one
    ck = manager.restore(model=template, opt_state=fresh_state)
    (saved_key,) = [a for a in jax.tree.leaves(opt_state) if is_key(a)]
    (got_key,) = [a for a in jax.tree.leaves(ck.opt_state) if is_key(a)]
    assert got_key.dtype == saved_key.dtype and got_key.dtype == jax.random.key(0).dtype
    np.testing.assert_array_equal(jax.random.key_data(got_key), jax.random.key_data(saved_key))
    resumed = steps(ck.model, ck.opt_state, 2)
    for a, b in zip(arrays(straight), arrays(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    # The key matters: continuing with the initial key gives other weights.
    wrong = steps(ck.model, fresh_state, 2)
    assert not all(
        np.array_equal(a, b) for a, b in zip(arrays(straight[0]), arrays(wrong[0]), strict=True)
    )


def test_manifest_with_missing_or_mistyped_field_gets_checkpoint_error(tmp_path):
    model, opt_state = build()
    manager = pccore.CheckpointManager(tmp_path, keep=5)
    manager.save(1, model=model, opt_state=opt_state)
    manager.save(2, model=model, opt_state=opt_state)
    mpath = manager.path(2) / "manifest/manifest.json"
    good = json.loads(mpath.read_text())
    leaves = [dict(leaf) for leaf in good["leaves"]]
    del leaves[1]["dtype"]
    bad_sha = [dict(leaf) for leaf in good["leaves"]]
    del bad_sha[2]["sha256"]
    cases_ = [
        ({k: v for k, v in good.items() if k != "config"},
         r"field `config` is missing, expected a JSON object"),
        ({**good, "leaves": bad_sha}, r"field `leaves\[2\]\.sha256` is missing, expected 64 lowercase"),
        ({**good, "format_version": "2"}, r"field `format_version` is '2', expected a non-negative int"),
        ({**good, "step": None}, r"field `step` is None, expected a non-negative int"),
        ({**good, "leaves": leaves}, r"field `leaves\[1\]\.dtype` is missing, expected a string"),
        ({**good, "leaves": "x"}, r"field `leaves` is 'x', expected a list"),
        ({**good, "key": {"kind": "typed"}}, r"field `key` is \{'kind': 'typed'\}, expected null"),
    ]
    for manifest, message in cases_:
        mpath.write_text(json.dumps(manifest))
        full = r"step_00000002/manifest/manifest\.json': " + message + r".*The manifest was edited or damaged"
        with pytest.raises(pccore.CheckpointError, match=full):
            pccore.read_manifest(manager.path(2), verify=False)
        with pytest.raises(pccore.CheckpointError, match=full):
            manager.restore(2, model=model, opt_state=opt_state)
        assert manager.latest_step() == 1  # skipped as invalid, like a corrupted file


_KILL_BETWEEN_RENAMES = """
import os, signal
import jax
import equinox as eqx
import pccore
from tests.test_checkpoint import build, die, interrupt_commit

manager = pccore.CheckpointManager({dir!r})
model, opt_state = build()
manager.save(1, model=model, opt_state=opt_state)
interrupt_commit("step_00000001", die)  # the old checkpoint set aside, the new one written
changed = jax.tree.map(lambda a: a + 1 if eqx.is_inexact_array(a) else a, model)
manager.save(1, model=changed, opt_state=opt_state, overwrite=True)
"""


@pytest.mark.slow
def test_overwrite_killed_between_renames_keeps_previous_checkpoint(tmp_path):
    proc = run_python(_KILL_BETWEEN_RENAMES.format(dir=str(tmp_path)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    # Nothing at step_00000001: the old checkpoint set aside, the new one in orbax's temporary.
    assert len(names) == 2 and names[0].startswith(".old-step_00000001-"), names
    assert names[1].startswith("step_00000001" + ORBAX_TMP), names
    model, opt_state = build()
    manager = pccore.CheckpointManager(tmp_path)
    # Readers find the set-aside checkpoint (the previous one) without touching the directory.
    assert manager.steps() == [1] and manager.latest_step() == 1
    assert pccore.read_manifest(manager.path(1))["step"] == 1
    ck = manager.restore(model=model, opt_state=opt_state)
    for a, b in zip(arrays(model), arrays(ck.model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    # A writer renames it back first: it exists again, so a plain save is refused.
    with pytest.raises(FileExistsError, match=r"step_00000001' already exists"):
        pccore.save_checkpoint(manager.path(1), model=model, opt_state=opt_state, step=1)
    assert (manager.path(1) / "manifest/manifest.json").is_file()
    manager.save(2, model=model, opt_state=opt_state)  # and the manager clears orbax's leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]
    ck = manager.restore(1, model=model, opt_state=opt_state)
    for a, b in zip(arrays(model), arrays(ck.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_overwrite_raising_before_commit_puts_previous_back(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import async_path

    model, opt_state = build()
    path = pccore.save_checkpoint(tmp_path / "c", model=model, opt_state=opt_state, step=1)

    def interrupt():  # the old checkpoint is set aside, the new one written
        assert [p.name[:7] for p in tmp_path.iterdir() if p.name.startswith(".old-c-")] == [".old-c-"]
        raise KeyboardInterrupt("before the commit")

    monkeypatch.setattr(async_path, "rename", async_path.rename)  # undone below
    interrupt_commit("c", interrupt)
    changed = jax.tree.map(lambda a: a + 1 if eqx.is_inexact_array(a) else a, model)
    with pytest.raises(KeyboardInterrupt, match="before the commit"):
        pccore.save_checkpoint(path, model=changed, opt_state=opt_state, step=1, overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # put back, orbax's temporary removed
    ck = pccore.restore_checkpoint(path, model=model, opt_state=opt_state)
    for a, b in zip(arrays(model), arrays(ck.model), strict=True):
        np.testing.assert_array_equal(a, b)


class Wide(eqx.Module):
    weight: jax.Array
    bias: jax.Array


def test_flipped_byte_in_array_data_names_the_parameter(tmp_path):
    # Arrays too large to sit in orbax's index are stored in data files of their own, and a
    # flipped byte there is read back without complaint: pccore's SHA-256 per array catches it.
    saved = Wide(jax.random.normal(jax.random.key(0), (2048,)), jnp.zeros(3))
    path = pccore.save_checkpoint(tmp_path / "c", model=saved, opt_state=None, step=0)
    data = max((path / "state").rglob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(
        pccore.CheckpointError,
        match=r"c' is truncated or corrupted: the first damaged parameter is `model\.weight` \(its "
        r"data does not match the SHA-256 in the manifest; the SHA-256 checksum of "
        r"state/ocdbt\.process_0/d/\w+ does not match files\.json\)",
    ):
        pccore.restore_checkpoint(path, model=saved, opt_state=None)
    with pytest.raises(pccore.CheckpointError, match=r"the first damaged parameter is `model\.weight`"):
        pccore.read_manifest(path)
    assert pccore.read_manifest(path, verify=False)["step"] == 0
    # Without files.json (a save stopped right after orbax's commit) the arrays' SHA-256 catch it.
    (path / "files.json").unlink()
    with pytest.raises(
        pccore.CheckpointError,
        match=r"the first damaged parameter is `model\.weight` \(its data does not match the SHA-256 "
        r"in the manifest; orbax-checkpoint read back other bytes than were saved\)",
    ):
        pccore.restore_checkpoint(path, model=saved, opt_state=None)


LEGACY = ROOT / "tests" / "data" / "checkpoints-0.1"  # written by pccore 0.1 (state.eqx)


def test_reads_checkpoints_of_pccore_0_1(tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(LEGACY, directory)
    model, opt_state = build()
    doubled = jax.tree.map(lambda a: a * 2 if eqx.is_inexact_array(a) else a, model)
    manager = pccore.CheckpointManager(directory, keep=3)
    assert manager.steps() == [2] and manager.latest_step() == 2
    assert pccore.read_manifest(manager.path(2))["format_version"] == 1
    ck = manager.restore(model=model, opt_state=opt_state)
    assert ck.step == 2 and ck.config == {"epochs": 4, "sizes": SIZES} and ck.framework == "equinox"
    assert type(ck.model) is pccore.PCModel
    # The fixture holds 2 x build() as one CPU computed it; another CPU's rounding of the
    # random initialisation differs by an ulp or two (float32), so compare to 4 ulp.
    for a, b in zip(arrays((doubled, opt_state)), arrays((ck.model, ck.opt_state)), strict=True):
        np.testing.assert_allclose(a, b, rtol=4 * float(np.finfo(np.float32).eps), atol=0)
    np.testing.assert_array_equal(jax.random.key_data(ck.key), jax.random.key_data(jax.random.key(7)))
    # A run resumed from it goes on in the orbax layout, in the same directory.
    manager.save(3, model=ck.model, opt_state=ck.opt_state, key=ck.key, config=ck.config)
    assert manager.steps() == [2, 3] and manager.latest_step() == 3
    assert (manager.path(3) / "state").is_dir() and (manager.path(2) / "state.eqx").is_file()
    ck3 = manager.restore(model=model, opt_state=opt_state)
    for a, b in zip(arrays(ck.model), arrays(ck3.model), strict=True):
        np.testing.assert_array_equal(a, b)
    # Its checks are those of 0.1.
    wide = build([4, 9, 3])
    with pytest.raises(pccore.CheckpointError, match=r"first mismatching parameter is `model\.params"):
        manager.restore(2, model=wide[0], opt_state=wide[1])
    state = manager.path(2) / "state.eqx"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    with pytest.raises(pccore.CheckpointError, match=r"step_00000002' is corrupted: the SHA-256"):
        manager.restore(2, model=model, opt_state=opt_state)


def test_orbax_is_imported_only_for_checkpoints(tmp_path, monkeypatch):
    proc = run_python(
        """
        import sys
        import pccore
        assert not [m for m in sys.modules if m.startswith("orbax")], "orbax imported"
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # as if not installed
    model, opt_state = build()
    with pytest.raises(ImportError, match=r'orbax-checkpoint, which is not installed: pip install "pccore\[checkpoint\]"'):
        pccore.CheckpointManager(tmp_path).save(1, model=model, opt_state=opt_state)


def test_restore_latest_refuses_a_wrong_template_instead_of_falling_back(tmp_path):
    model, opt_state = build()
    with pccore.CheckpointManager(tmp_path, async_save=True) as manager:
        manager.save(1, model=model, opt_state=opt_state)
        manager.save(2, model=model, opt_state=opt_state)
    assert manager.steps() == [1, 2]  # leaving the block waited for step 2
    wide = build([4, 9, 3])
    with pytest.raises(pccore.CheckpointError,
                       match=r"step_00000002' does not fit the template: the first mismatching "
                             r"parameter is `model\.params\[0\]\[0\]\.weight`"):
        manager.restore(model=wide[0], opt_state=wide[1])
