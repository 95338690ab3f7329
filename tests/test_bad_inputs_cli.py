"""Issue 16, CLI / data / checkpoint part: every bad input gets a clear error (naming the
option or file, got vs expected, and the fix), or a documented result.

Each test drives the real code path; the CLI runs are tiny (digits, a few samples, one or
two epochs, no figure).
"""

import json
import re
import shlex
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from pccore import _builders, datasets
from pccore._checkpoint import _commit
from pccore._cli import _main as _cli
from pccore._cli import _run as _cli_run
from tests.test_datasets import fake_mnist, write_idx, write_mnist_dir

SMALL = ["--hidden", "8", "--batch-size", "16", "--steps", "3", "--train-limit", "32",
         "--test-limit", "16", "--no-plot"]


def train_argv(out, *extra, epochs=1):
    return ["train", *SMALL, "--epochs", str(epochs), "--out", str(out), *extra]


def error_of(capsys) -> str:
    """The CLI's stderr, checked to be one `pccore: ...` line and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def _no_training(monkeypatch):
    """Record whether training starts (it must not, for inputs refused up front)."""
    calls = []
    monkeypatch.setattr(_cli_run, "train_pc", lambda *a, **k: calls.append(a) or 1 / 0)
    return calls


def _tiny_model():
    model = _builders.build_mlp("equinox", _builders.canonical_mlp([4, 3, 2], 0), jnp.tanh)
    return model, optax.adam(1e-2).init(model.params)


# --- 1. non-finite data, skipped and never-made updates -------------------------------------


def test_npz_nan_pixel_names_file_array_and_count(tmp_path):
    x_tr, l_tr, x_te, l_te = fake_mnist(np.random.default_rng(0), n_train=20, n_test=8)
    x_tr = x_tr.astype(np.float32) / 255
    x_tr[3, 4, 5] = x_tr[7, 0, 0] = np.nan
    np.savez(tmp_path / "m.npz", x_train=x_tr, y_train=l_tr, x_test=x_te, y_test=l_te)
    with pytest.raises(ValueError, match=r"m\.npz: `x_train` holds 2 non-finite values \(NaN or "
                                         r"inf\) out of 15680, the first in sample 3; expected "
                                         r"finite pixel values\. Replace them"):
        datasets.load_mnist(tmp_path / "m.npz")


def test_idx_inf_in_test_images_names_x_test_and_file(tmp_path):
    x_tr, l_tr, x_te, l_te = fake_mnist(np.random.default_rng(0), n_train=20, n_test=8)
    x_te = x_te.astype(np.float32) / 255
    x_te[5, 1, 1] = np.inf
    write_mnist_dir(tmp_path, (x_tr, l_tr, x_te, l_te), gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x_te, code=0x0D)  # float32 IDX
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: `x_test` holds 1 non-finite "
                                         r"value \(NaN or inf\) out of 6272, the first in "
                                         r"sample 5"):
        datasets.load_fashion_mnist(tmp_path)
    x_te[5, 1, 1] = 0.5  # a finite float IDX file loads, unscaled
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x_te, code=0x0D)
    np.testing.assert_array_equal(datasets.load_fashion_mnist(tmp_path).x_test,
                                  x_te.reshape(8, -1))


def test_cli_refuses_data_with_a_nan_pixel(tmp_path, monkeypatch, capsys):
    calls = _no_training(monkeypatch)
    x_tr, l_tr, x_te, l_te = fake_mnist(np.random.default_rng(0), n_train=40, n_test=12)
    x_tr = x_tr.astype(np.float32) / 255
    x_tr[0, 0, 0] = np.nan
    np.savez(tmp_path / "m.npz", x_train=x_tr, y_train=l_tr, x_test=x_te, y_test=l_te)
    argv = ["train", "--data", "mnist", "--data-dir", str(tmp_path / "m.npz"), *SMALL,
            "--out", str(tmp_path / "out")]
    assert _cli.main(argv) == 2
    err = error_of(capsys)
    assert re.fullmatch(r"pccore: error: .*m\.npz: `x_train` holds 1 non-finite value \(NaN or "
                        r"inf\) out of 31360, the first in sample 0; .*\n", err), err
    assert not calls and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_run_that_never_updated_exits_1(tmp_path, capsys):
    """--dt0 1e30: inference diverges on every step, so no update is ever made."""
    assert _cli.main(train_argv(tmp_path, "--dt0", "1e30")) == 1
    err = error_of(capsys)
    assert re.fullmatch(
        r"pccore: error: equinox: inference diverged on every training step \(2 of 2 updates "
        r"skipped: the energy at the inferred activities was NaN or inf\), so the weights never "
        r"changed; expected at least one update\. Lower --dt0 \(got 1e\+30\) or use an adaptive "
        r"solver \(--solver tsit5 or adaptive-euler\); if the weights had blown up, lower --lr "
        r"\(got 0\.003\)\.\n", err), err
    assert not (tmp_path / "train.json").exists()


def _skip_first_update(monkeypatch):
    """Report the first training step as skipped, as `train_step` does when inference
    diverges (`TrainStats.updated` False)."""
    real, calls = _cli_run._timed, []

    def timed(fn, *args):
        (model, opt_state, stats), ms = real(fn, *args)
        calls.append(ms)
        if len(calls) == 1:
            stats = eqx.tree_at(lambda s: s.updated, stats, jnp.asarray(False))
        return (model, opt_state, stats), ms

    monkeypatch.setattr(_cli_run, "_timed", timed)


@pytest.mark.slow  # over 3.5 s: the fast set keeps a margin under its 5 minutes
def test_cli_reports_skipped_updates(tmp_path, monkeypatch, capsys):
    _skip_first_update(monkeypatch)
    assert _cli.main(train_argv(tmp_path)) == 0
    out = capsys.readouterr().out
    assert re.search(r"equinox epoch   1/1  loss \S+  energy \S+  test accuracy \S+%  skipped "
                     r"updates 1/2 \(inference diverged\)\n", out), out
    assert re.search(r"final test accuracy .* inference steps per training step; 1 of 2 updates "
                     r"skipped \(inference diverged: lower --dt0 or use an adaptive solver\)\n",
                     out), out
    result = json.loads((tmp_path / "train.json").read_text())["results"][0]
    assert (result["updates_skipped"], result["training_steps"]) == (1, 2)  # the record too


def test_compare_table_has_a_skipped_updates_column(tmp_path, monkeypatch, capsys):
    _skip_first_update(monkeypatch)
    argv = ["compare", "--frameworks", "equinox", *SMALL, "--epochs", "1", "--out",
            str(tmp_path), "--quiet"]
    assert _cli.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| framework | test accuracy | final energy | ms / step | "
                               "inference steps / step | skipped updates | max abs weight")
    assert table[2].startswith("| equinox |") and "| 1/2 |" in table[2], table
    assert table[3].startswith("| backprop |") and "| - | - |" in table[3], table


def test_cli_clean_run_reports_no_skipped_updates(tmp_path, capsys):
    assert _cli.main(train_argv(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out and out.count("epoch   1/1") == 1


# --- 2. --data-dir with the bundled digits --------------------------------------------------


def test_digits_with_data_dir_is_refused(tmp_path, monkeypatch, capsys):
    calls = _no_training(monkeypatch)
    assert _cli.main(train_argv(tmp_path / "out", "--data", "digits", "--data-dir",
                                str(tmp_path))) == 2
    assert error_of(capsys) == (
        f"pccore: error: --data-dir {tmp_path}: --data digits is bundled with scikit-learn and "
        "reads no files, so --data-dir would be ignored; expected --data-dir only with --data "
        "mnist or --data fashion-mnist. Drop --data-dir, or pass --data mnist (or "
        "fashion-mnist) to read the files there.\n")
    assert not calls


def test_load_digits_with_data_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`data_dir`: got '.*' with the digits data set, which "
                                         r"is bundled with scikit-learn and reads no files; "
                                         r"expected data_dir=None"):
        datasets.load("digits", data_dir=tmp_path)
    assert datasets.load("digits").name == "digits"  # without it: the bundled set


# --- 3. unwritable output folders, refused before training -----------------------------------


@pytest.mark.parametrize("command", ["train", "compare"])
def test_out_under_a_regular_file_is_refused_before_training(command, tmp_path, monkeypatch,
                                                             capsys):
    calls = _no_training(monkeypatch)
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "sub"
    argv = [command, *SMALL, "--epochs", "1", "--out", str(out)]
    assert _cli.main(argv) == 2
    assert error_of(capsys) == (
        f"pccore: error: --out {out}: the path lies under {tmp_path / 'file'}, which is a file, "
        "not a folder; expected a folder pccore can create and write into. Pass another --out, "
        "or move that file away.\n")
    assert not calls


def test_out_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    calls = _no_training(monkeypatch)
    (tmp_path / "file").write_text("not a folder")
    assert _cli.main(train_argv(tmp_path / "file")) == 2
    assert "--out " + str(tmp_path / "file") + ": the path is a file, not a folder" in \
        error_of(capsys)
    assert not calls


def test_checkpoint_dir_under_a_regular_file_is_refused_before_training(tmp_path, monkeypatch,
                                                                         capsys):
    calls = _no_training(monkeypatch)
    (tmp_path / "file").write_text("not a folder")
    ck = tmp_path / "file" / "ck"
    assert _cli.main(train_argv(tmp_path / "out", "--checkpoint-dir", str(ck))) == 2
    assert error_of(capsys) == (
        f"pccore: error: --checkpoint-dir {ck}: the path lies under {tmp_path / 'file'}, which "
        "is a file, not a folder; expected a folder pccore can create and write into. Pass "
        "another --checkpoint-dir, or move that file away.\n")
    assert not calls


def test_unwritable_folder_is_refused(tmp_path, monkeypatch):
    """A folder the file system refuses to write into (as for a read-only mount; root passes
    permission checks, so the refusal is simulated at the write itself)."""
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(_cli.CLIError, match=r"--out .*ro: cannot write there \(Permission "
                                            r"denied\); expected a writable folder\. Pass "
                                            r"another --out, or make it writable\."):
        _cli._writable_folder(tmp_path / "ro", "--out")


# --- 4. Ctrl-C -----------------------------------------------------------------------------


def _interrupt_at_step(monkeypatch, n):
    real, calls = _cli_run._timed, []

    def timed(fn, *args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(fn, *args)

    monkeypatch.setattr(_cli_run, "_timed", timed)


@pytest.mark.slow  # over 3.5 s: the fast set keeps a margin under its 5 minutes
def test_ctrl_c_ends_with_one_line_and_the_resume_command(tmp_path, monkeypatch, capsys):
    """Interrupted in epoch 2 (2 steps per epoch): status 130, one line naming the epoch-1
    checkpoint and the command that resumes it; that command then finishes the run."""
    _interrupt_at_step(monkeypatch, 3)
    ck = tmp_path / "ck"
    argv = train_argv(tmp_path / "out", "--checkpoint-dir", str(ck), "--quiet", epochs=2)
    assert _cli.main(argv) == 130
    err = error_of(capsys)
    command = shlex.join(["pccore", *argv, "--resume"])
    assert err == (f"pccore: interrupted (Ctrl-C); the latest checkpoint is {ck / 'step_00000001'} "
                   f"(epoch 1/2). Resume with: {command}\n")
    monkeypatch.undo()
    assert _cli.main(shlex.split(command)[1:]) == 0
    assert pccore.CheckpointManager(ck).latest_step() == 2
    assert (tmp_path / "out" / "train.json").is_file()


def test_ctrl_c_without_checkpoints(tmp_path, monkeypatch, capsys):
    _interrupt_at_step(monkeypatch, 1)
    argv = ["compare", "--frameworks", "equinox", *SMALL, "--epochs", "1", "--out",
            str(tmp_path), "--quiet"]
    assert _cli.main(argv) == 130
    assert error_of(capsys) == (
        "pccore: interrupted (Ctrl-C); no results were written (pccore train --checkpoint-dir "
        "DIR saves after every epoch, to resume from).\n")
    assert not (tmp_path / "compare.json").exists()


def test_ctrl_c_before_the_first_checkpoint(tmp_path, monkeypatch, capsys):
    _interrupt_at_step(monkeypatch, 1)
    ck = tmp_path / "ck"
    assert _cli.main(train_argv(tmp_path / "out", "--checkpoint-dir", str(ck))) == 130
    assert error_of(capsys) == (f"pccore: interrupted (Ctrl-C) before the first checkpoint in "
                                f"{ck}; rerun the command to start over.\n")


# --- 5. --seed -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, got", [("-1", "-1"), ("4294967296", "4294967296"),
                                        ("1.5", "'1.5'")])
def test_bad_seed_names_seed(value, got, capsys):
    for command in ("train", "compare"):
        with pytest.raises(SystemExit) as e:
            _cli.main([command, "--seed", value])
        assert e.value.code == 2
        assert (f"argument --seed: expected an integer from 0 to 4294967295 (NumPy and JAX seeds "
                f"are non-negative), got {got}; pass e.g. --seed 0") in capsys.readouterr().err


def test_seed_range_is_accepted():
    for seed in ("0", "4294967295"):
        assert _cli.parser().parse_args(["train", "--seed", seed]).seed == int(seed)


# --- 6. two writers in one checkpoint directory ----------------------------------------------


def _during_write(monkeypatch, other_writer):
    """Run `other_writer()` once, in the middle of the next save: its files are written in
    orbax-checkpoint's temporary directory, which is not yet renamed into place."""
    from orbax.checkpoint._src.path import async_path

    real, done = async_path.rename, []

    async def rename(src, dst):
        if not done and ".orbax-checkpoint-tmp" in Path(src).name and Path(dst).name.startswith(
            "step_"
        ):
            done.append(None)  # the other writer's own save writes normally
            done[0] = other_writer()
        return await real(src, dst)

    monkeypatch.setattr(async_path, "rename", rename)
    return done


def test_second_writer_in_a_held_directory_gets_checkpoint_error(tmp_path, monkeypatch):
    model, opt_state = _tiny_model()
    first, second = pccore.CheckpointManager(tmp_path), pccore.CheckpointManager(tmp_path)

    def other():
        with pytest.raises(pccore.CheckpointError) as e:
            second.save(2, model=model, opt_state=opt_state)
        return str(e.value)

    done = _during_write(monkeypatch, other)
    first.save(1, model=model, opt_state=opt_state)
    assert done == [
        f"Checkpoint directory {str(tmp_path)!r} is held by another writer (another run or "
        "process is saving checkpoints there); expected one writer per directory. Give this run "
        "its own directory (e.g. --checkpoint-dir), or wait for the other run to finish."]
    monkeypatch.undo()
    assert first.steps() == [1] and first.latest_step() == 1  # the first writer's save is whole
    second.save(2, model=model, opt_state=opt_state)  # once it is done, the second may write
    assert second.steps() == [1, 2]


def test_hold_refuses_another_writer_for_a_whole_run(tmp_path):
    model, opt_state = _tiny_model()
    run = pccore.CheckpointManager(tmp_path)
    with run.hold():
        run.save(1, model=model, opt_state=opt_state)  # re-entrant for the holder
        with pytest.raises(pccore.CheckpointError, match="is held by another writer"):
            pccore.save_checkpoint(tmp_path / "step_00000009", model=model,
                                   opt_state=opt_state, step=9)
    assert run.steps() == [1]
    pccore.save_checkpoint(tmp_path / "step_00000009", model=model, opt_state=opt_state, step=9)


def test_save_overtaken_without_a_lock_is_checkpoint_error(tmp_path, monkeypatch):
    """Without flock (some network file systems), another manager's save removes this save's
    temporary directory as a leftover: a CheckpointError, not a FileNotFoundError on it."""
    monkeypatch.setattr(_commit, "fcntl", None)
    model, opt_state = _tiny_model()
    loser, winner = pccore.CheckpointManager(tmp_path), pccore.CheckpointManager(tmp_path)
    _during_write(monkeypatch, lambda: winner.save(1, model=model, opt_state=opt_state))
    with pytest.raises(pccore.CheckpointError,
                       match=rf"Checkpoint directory {re.escape(repr(str(tmp_path)))}: another "
                             r"writer saved into it while this save of step_00000002 ran \(it "
                             r"removed this save's temporary directory "
                             r"step_00000002\.orbax-checkpoint-tmp: .*\); expected one writer per "
                             r"directory\. This save "
                             r"was abandoned"):
        loser.save(2, model=model, opt_state=opt_state)
    assert winner.latest_step() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_same_checkpoint_written_meanwhile_is_checkpoint_error(tmp_path, monkeypatch):
    """Without a lock, a writer that finds its target written by another one meanwhile gives
    up with a CheckpointError and leaves the other's checkpoint in place."""
    monkeypatch.setattr(_commit, "fcntl", None)
    model, opt_state = _tiny_model()
    path = tmp_path / "step_00000001"
    _during_write(monkeypatch, lambda: pccore.save_checkpoint(
        path, model=model, opt_state=opt_state, step=1, config={"writer": "winner"}))
    with pytest.raises(pccore.CheckpointError,
                       match=r"another writer saved into it while this save of step_00000001 "
                             r"ran \(it wrote the same checkpoint meanwhile\)"):
        pccore.save_checkpoint(path, model=model, opt_state=opt_state, step=1,
                               config={"writer": "loser"})
    assert pccore.read_manifest(path)["config"] == {"writer": "winner"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_cli_second_run_into_a_held_checkpoint_dir(tmp_path, monkeypatch, capsys):
    calls = _no_training(monkeypatch)
    ck = tmp_path / "ck"
    with pccore.CheckpointManager(ck).hold():  # another run is writing there
        assert _cli.main(train_argv(tmp_path / "out", "--checkpoint-dir", str(ck))) == 2
    assert error_of(capsys) == (
        f"pccore: error: Checkpoint directory {str(ck)!r} is held by another writer (another "
        "run or process is saving checkpoints there); expected one writer per directory. Give "
        "this run its own directory (e.g. --checkpoint-dir), or wait for the other run to "
        "finish.\n")
    assert not calls


# --- several processes ----------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--data-parallel", "--coordinator", "localhost:1234"],
     r"--num-processes, --process-id missing: a run over several processes needs all three"),
    (["--data-parallel", "--coordinator", "localhost:1234", "--num-processes", "2",
      "--process-id", "2"], r"--process-id 2: expected 0..1 \(--num-processes 2\)"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "0"],
     r"split the batches over the processes' devices: add --data-parallel"),
])
def test_cli_refuses_an_incomplete_multi_process_setup(tmp_path, monkeypatch, capsys, extra,
                                                      message):
    calls = _no_training(monkeypatch)
    assert _cli.main(train_argv(tmp_path / "out", *extra)) == 2
    assert re.search(message, error_of(capsys))
    assert not calls


def test_cli_reads_the_process_layout_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    assert _cli.main(train_argv(tmp_path / "out")) == 2
    assert "$JAX_NUM_PROCESSES='two': expected a whole number." in error_of(capsys)
