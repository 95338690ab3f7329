"""Checkpoints: resume equals uninterrupted, interrupted saves lose nothing, bad files and
wrong templates get clear errors."""

import json
import os
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


_KILL_MIDWAY = """
import io, os, signal
import equinox as eqx
import pccore
from tests.test_checkpoint import build

manager = pccore.CheckpointManager({dir!r}, keep=3)
model, opt_state = build()

def half_then_die(f, tree):
    buf = io.BytesIO()
    eqx_serialise(buf, tree)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

manager.save(1, model=model, opt_state=opt_state)
eqx_serialise = eqx.tree_serialise_leaves
eqx.tree_serialise_leaves = half_then_die
manager.save(2, model=model, opt_state=opt_state)
"""


def test_save_killed_midway_keeps_previous_checkpoint(tmp_path):
    proc = run_python(_KILL_MIDWAY.format(dir=str(tmp_path)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-step_00000002")]
    assert len(leftovers) == 1  # the writer really died halfway through step 2
    manager = pccore.CheckpointManager(tmp_path, keep=3)
    assert manager.steps() == [1] and manager.latest_step() == 1
    model, opt_state = build()
    ck = manager.restore(model=model, opt_state=opt_state)
    for a, b in zip(arrays(model), arrays(ck.model), strict=True):
        np.testing.assert_array_equal(a, b)
    manager.save(2, model=model, opt_state=opt_state)  # the next save clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]


def test_save_raising_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt_state = build()
    manager = pccore.CheckpointManager(tmp_path)
    manager.save(1, model=model, opt_state=opt_state)
    real = eqx.tree_serialise_leaves

    def half_then_raise(f, tree):
        real(f, tree["model"])  # the model is written, the optimiser state is not
        raise OSError("disk full")

    monkeypatch.setattr(eqx, "tree_serialise_leaves", half_then_raise)
    changed = jax.tree.map(lambda a: a + 1 if eqx.is_inexact_array(a) else a, model)
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
    state = manager.path(4) / "state.eqx"
    state.write_bytes(state.read_bytes()[:-7])  # truncated
    with pytest.raises(
        pccore.CheckpointError,
        match=r"step_00000004' is truncated or corrupted: "
        r"state.eqx has \d+ bytes, the manifest expects \d+",
    ):
        manager.restore(4, model=model, opt_state=opt_state)
    state = manager.path(3) / "state.eqx"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, same size
    state.write_bytes(bytes(raw))
    with pytest.raises(pccore.CheckpointError, match=r"step_00000003' is corrupted: the SHA-256"):
        manager.restore(3, model=model, opt_state=opt_state)
    (manager.path(2) / "manifest.json").write_text('{"format": "pccore-chec')
    assert manager.steps() == [1, 2, 3, 4]
    assert manager.latest_step() == 1  # newest that verifies
    with pytest.raises(pccore.CheckpointError, match=r"manifest.json is corrupted"):
        manager.restore(2, model=model, opt_state=opt_state)
    (manager.path(2) / "manifest.json").unlink()
    with pytest.raises(pccore.CheckpointError, match=r"has no manifest.json: it is incomplete"):
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
    assert json.loads((manager.path(4) / "manifest.json").read_text())["sha256"] == manifest["sha256"]
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
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(pccore.CheckpointError, match=r"has format version 99, newer than this pccore"):
        pccore.restore_checkpoint(path, model=model, opt_state=opt_state)
    (path / "manifest.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(pccore.CheckpointError, match=r"manifest.json' is not a pccore checkpoint manifest"):
        pccore.read_manifest(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "state.eqx").unlink()
    with pytest.raises(pccore.CheckpointError, match=r"the data file state\.eqx is missing"):
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
    mpath = manager.path(2) / "manifest.json"
    good = json.loads(mpath.read_text())
    leaves = [dict(leaf) for leaf in good["leaves"]]
    del leaves[1]["dtype"]
    cases_ = [
        ({k: v for k, v in good.items() if k != "sha256"},
         r"field `sha256` is missing, expected 64 lowercase hex digits"),
        ({**good, "bytes": "x"}, r"field `bytes` is 'x', expected a non-negative int"),
        ({**good, "format_version": "2"}, r"field `format_version` is '2', expected a non-negative int"),
        ({**good, "step": None}, r"field `step` is None, expected a non-negative int"),
        ({**good, "leaves": leaves}, r"field `leaves\[1\]\.dtype` is missing, expected a string"),
        ({**good, "file": "../state.eqx"}, r"field `file` is '\.\./state\.eqx', expected a file name"),
        ({**good, "key": {"kind": "typed"}}, r"field `key` is \{'kind': 'typed'\}, expected null"),
    ]
    for manifest, message in cases_:
        mpath.write_text(json.dumps(manifest))
        full = r"step_00000002/manifest\.json': " + message + r".*The manifest was edited or damaged"
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
from tests.test_checkpoint import build

manager = pccore.CheckpointManager({dir!r})
model, opt_state = build()
manager.save(1, model=model, opt_state=opt_state)
real, calls = os.replace, []

def die_on_second(a, b):
    calls.append(a)
    if len(calls) == 2:  # the old checkpoint is set aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return real(a, b)

os.replace = die_on_second
changed = jax.tree.map(lambda a: a + 1 if eqx.is_inexact_array(a) else a, model)
manager.save(1, model=changed, opt_state=opt_state, overwrite=True)
"""


def test_overwrite_killed_between_renames_keeps_previous_checkpoint(tmp_path):
    proc = run_python(_KILL_BETWEEN_RENAMES.format(dir=str(tmp_path)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    # Nothing at step_00000001: the old checkpoint set aside, the new one still in .tmp-.
    assert [n[:19] for n in names] == [".old-step_00000001-", ".tmp-step_00000001-"], names
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
    assert (manager.path(1) / "manifest.json").is_file()
    manager.save(2, model=model, opt_state=opt_state)  # and the manager clears the .tmp- leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]
    ck = manager.restore(1, model=model, opt_state=opt_state)
    for a, b in zip(arrays(model), arrays(ck.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_overwrite_raising_between_renames_puts_previous_back(tmp_path, monkeypatch):
    model, opt_state = build()
    path = pccore.save_checkpoint(tmp_path / "c", model=model, opt_state=opt_state, step=1)
    real, calls = os.replace, []

    def interrupt_second(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt("between the renames")
        return real(a, b)

    monkeypatch.setattr(os, "replace", interrupt_second)
    changed = jax.tree.map(lambda a: a + 1 if eqx.is_inexact_array(a) else a, model)
    with pytest.raises(KeyboardInterrupt, match="between the renames"):
        pccore.save_checkpoint(path, model=changed, opt_state=opt_state, step=1, overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3  # set aside, (interrupted), put back
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    ck = pccore.restore_checkpoint(path, model=model, opt_state=opt_state)
    for a, b in zip(arrays(model), arrays(ck.model), strict=True):
        np.testing.assert_array_equal(a, b)
