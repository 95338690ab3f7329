import io
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore
from pccore import _builders, datasets
from pccore._cli import _main as _cli
from pccore._cli._run import progress_bar
from tests.test_datasets import fake_mnist, write_mnist_dir

TINY = ["--hidden", "16", "--epochs", "1", "--batch-size", "16", "--steps", "5", "--seed", "1"]


def available_frameworks():
    """Frameworks whose extra is installed and whose adapter is registered in this build."""
    out = []
    weights = _builders.canonical_mlp([4, 3, 2], 0)
    for fw in _cli.FRAMEWORKS:
        try:
            _builders.build_mlp(fw, weights, jnp.tanh)
        except (ImportError, TypeError):
            continue
        out.append(fw)
    return out


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mnist")
    arrays = fake_mnist(np.random.default_rng(0), n_train=48, n_test=20)
    write_mnist_dir(d, arrays, gz=True)
    return d


@pytest.fixture(scope="module")
def mnist_run(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    frameworks = available_frameworks()
    argv = ["compare", "--data", "mnist", "--data-dir", str(mnist_dir), "--out", str(out),
            "--quiet", "--frameworks", *frameworks, *TINY]
    assert _cli.main(argv) == 0
    return out, frameworks


def train_by_hand(data, frameworks_weights, steps=5, lr=3e-3, batch=16, seed=1):
    """The same run written directly against the public API (the oracle for the CLI)."""
    model = pccore.wrap(_builders.native_mlp("equinox", frameworks_weights, jnp.tanh)[0])
    energy = pccore.PC(loss=pccore.CrossEntropy())
    optim = optax.adam(lr)
    state = optim.init(model.params)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(data.x_train.shape[0])
    for b in range(data.x_train.shape[0] // batch):
        idx = perm[b * batch:(b + 1) * batch]
        model, state, _ = pccore.train_step(model, optim, state, x=data.x_train[idx],
                                            y=data.y_train[idx], energy=energy, t1=steps * 0.1,
                                            dt0=0.1)
    acc = pccore.evaluate(model, data.x_test, data.y_test, energy=energy).accuracy
    return model, float(acc)


@pytest.mark.slow
def test_compare_mnist_from_idx_files(mnist_dir, mnist_run, capsys):
    out, frameworks = mnist_run
    record = json.loads((out / "compare.json").read_text())
    rows = {r["framework"]: r for r in record["results"]}
    assert list(rows) == [*frameworks, "backprop"]
    data = datasets.load_mnist(mnist_dir)
    weights = _builders.canonical_mlp([784, 16, 10], 1)
    model, acc = train_by_hand(data, weights)
    ref = rows["equinox"]
    assert ref["test_accuracy"] == [pytest.approx(acc, abs=1e-6)]
    assert ref["inference_steps"] == 5
    # the reference's final weights are the hand-trained ones
    final = _builders.canonical_weights(model)
    for fw in frameworks:  # every framework agrees with Equinox from identical weights
        assert abs(rows[fw]["final_accuracy"] - acc) <= 0.005
        assert rows[fw]["weight_difference"] < 1e-4
    assert record["config"]["data"] == "mnist"
    np.testing.assert_allclose(
        _builders.max_weight_difference(final, final), 0.0
    )
    bp = rows["backprop"]
    assert bp["inference_steps"] == 0 and bp["weight_difference"] > 0


@pytest.mark.slow
def test_figure_is_a_real_png(mnist_run):
    plt = pytest.importorskip("matplotlib.pyplot")
    out, frameworks = mnist_run
    img = plt.imread(out / "compare.png")
    assert img.shape == (400, 1000, 4)  # FIGURE_SIZE * FIGURE_DPI
    rgb = img[..., :3]
    ink = (rgb.min(axis=2) < 0.5).mean()  # dark pixels: axes, text, lines
    colour = (rgb.max(axis=2) - rgb.min(axis=2) > 0.3).mean()  # coloured curve pixels
    assert 0.005 < ink < 0.5 and colour > 0.001


def test_canonical_weights_round_trip_per_framework():
    weights = _builders.canonical_mlp([5, 4, 3], 2)
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    ref = np.tanh(x @ weights[0][0] + weights[0][1]) @ weights[1][0] + weights[1][1]
    for fw in available_frameworks():
        model = _builders.build_mlp(fw, weights, jnp.tanh)
        np.testing.assert_allclose(model(x), ref, rtol=1e-5, atol=1e-6)
        assert _builders.max_weight_difference(_builders.canonical_weights(model), weights) == 0


@pytest.mark.parametrize("framework", ["haiku", "linen", "nnx"])
def test_native_builders_match_numpy(framework):
    pytest.importorskip("haiku" if framework == "haiku" else "flax")
    weights = _builders.canonical_mlp([5, 4, 3], 2)
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    ref = np.tanh(x @ weights[0][0] + weights[0][1]) @ weights[1][0] + weights[1][1]
    model, variables = _builders.native_mlp(framework, weights, jnp.tanh)
    if framework == "haiku":
        got = model.apply(variables, None, x)
    elif framework == "linen":
        got = model.apply(variables, x)
    else:
        got = model(x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_adaptive_solvers_agree(mnist_dir, tmp_path):
    """`adaptive-euler` and `tsit5` at a tight tolerance integrate the same flow: the whole
    runs agree, down to the energy along the final model's inference on the first test
    batch."""
    runs = {}
    for solver in ("adaptive-euler", "tsit5"):
        out = tmp_path / solver
        argv = ["train", "--data", "mnist", "--data-dir", str(mnist_dir), "--solver", solver,
                "--rtol", "1e-6", "--atol", "1e-6", "--out", str(out), "--quiet", "--no-plot",
                *TINY]
        assert _cli.main(argv) == 0
        runs[solver] = json.loads((out / "train.json").read_text())["results"][0]
    a, b = (np.asarray(runs[s]["energy_trace"]) for s in ("adaptive-euler", "tsit5"))
    np.testing.assert_allclose(a, b, rtol=1e-3)
    assert a[-1] < a[0]
    assert runs["adaptive-euler"]["final_energy"] == pytest.approx(
        runs["tsit5"]["final_energy"], rel=1e-3)


@pytest.mark.slow
def test_sgd_on_activities_equals_euler(mnist_dir, tmp_path):
    """optax.sgd(η) on the activities is Euler with dt0 = η: two CLI runs must agree."""
    runs = {}
    for solver in ("euler", "sgd"):
        out = tmp_path / solver
        argv = ["train", "--data", "mnist", "--data-dir", str(mnist_dir), "--solver", solver,
                "--out", str(out), "--quiet", "--no-plot", *TINY]
        assert _cli.main(argv) == 0
        runs[solver] = json.loads((out / "train.json").read_text())["results"][0]
    assert runs["sgd"]["final_energy"] == pytest.approx(runs["euler"]["final_energy"], rel=1e-5)
    assert runs["sgd"]["test_accuracy"] == runs["euler"]["test_accuracy"]
    np.testing.assert_allclose(runs["sgd"]["energy_trace"], runs["euler"]["energy_trace"],
                               rtol=1e-5)
    trace = runs["euler"]["energy_trace"]
    assert len(trace) == 6 and trace[-1] < trace[0]  # the energy falls along inference


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--data", "mnist"], "--data mnist reads files from disk: pass --data-dir"),
        (["train", "--data", "mnist", "--data-dir", "{tmp}"],
         r"No mnist data found in .*train-images-idx3-ubyte"),
        (["compare", "--frameworks", "equinox", "equinox"], "lists a framework twice"),
        (["train", "--variant", "generative", "--loss", "ce"], "use --loss mse"),
        (["train", "--batch-size", "5000"], "--batch-size 5000 is larger than the training set"),
        (["train", "--t1", "1e308", "--dt0", "1e-10"],
         r"--t1 1e\+308 holds too many steps of --dt0 1e-10 \(t1 / dt0 = inf\); expected a "
         "finite number. Lower --t1 or raise --dt0"),
        (["train", "--solver", "sgd", "--t1", "2"],
         r"--t1 2: the optax solver 'sgd' takes --steps updates of the activities and has no "
         "time horizon"),
        (["train", "--steps", "20", "--dt0", "1e308"],
         r"--steps 20 x --dt0 1e\+308 overflows to t1 = inf; expected a finite horizon"),
    ],
)
def test_clear_errors(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _cli.main([*argv, "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pccore: error: ")
    assert re.search(message, err), err


def _write_npz(path, **changes):
    x_tr, l_tr, x_te, l_te = fake_mnist(np.random.default_rng(0), n_train=40, n_test=12)
    arrays = {**dict(x_train=x_tr, y_train=l_tr, x_test=x_te, y_test=l_te), **changes}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _idx_dir(path, gz=False):
    path.mkdir()
    write_mnist_dir(path, fake_mnist(np.random.default_rng(0), n_train=40, n_test=12), gz=gz)
    return path


def _truncated_header(tmp):
    d = _idx_dir(tmp / "idx")
    (d / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    return d


def _not_gzipped(tmp):
    d = _idx_dir(tmp / "idx", gz=True)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip data")
    return d


@pytest.mark.parametrize(
    "make, message",
    [
        (_truncated_header, r"t10k-images-idx3-ubyte: the header declares 3 dimensions.* The file "
                            "is truncated or not an IDX file"),
        (_not_gzipped, r"train-labels-idx1-ubyte\.gz is not a readable gzip file"),
        (lambda t: _write_npz(t / "m.npz", y_train=np.arange(30) % 10),
         r"m\.npz\['x_train'\] holds 40 images but .*m\.npz\['y_train'\] holds 30 labels"),
        (lambda t: _write_npz(t / "m.npz", y_test=None), r"m\.npz lacks the arrays \['y_test'\]"),
        (lambda t: _write_npz(t / "m.npz", y_test=np.arange(12) + 0.5),
         r"m\.npz\['y_test'\]: expected integer class indices 0\.\.9"),
        (lambda t: _write_npz(t / "m.npz", y_test=np.arange(12)),
         r"m\.npz\['y_test'\]: expected class indices 0\.\.9; got values from 0 to 11"),
        (lambda t: _idx_dir(t / "idx") / "train-labels-idx1-ubyte",
         r"--data-dir: .*train-labels-idx1-ubyte exists but is neither a folder nor an \.npz "
         "file; expected a folder holding the mnist IDX files"),
    ],
)
def test_unusable_data_files_are_cli_errors(make, message, tmp_path, capsys):
    """The loader's ValueErrors (and gzip's errors) come out as `pccore: error:`, status 2."""
    path = make(tmp_path)
    argv = ["train", "--data", "mnist", "--data-dir", str(path), "--out", str(tmp_path / "out"),
            "--quiet", "--no-plot"]
    assert _cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pccore: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_number_options_refuse_non_finite_values(capsys):
    """Every option parsed as a positive number refuses inf, -inf and nan by name."""
    options = sorted({
        opt for sub in ("compare", "train")
        for action in _cli.parser()._subparsers._group_actions[0].choices[sub]._actions
        if action.type is _cli._positive_float for opt in action.option_strings
    })
    assert options == ["--atol", "--dt0", "--gamma", "--lr", "--output-precision", "--rtol",
                       "--t1"]
    for command in ("compare", "train"):
        for opt in options:
            for value in ("inf", "-inf", "nan", "0"):
                with pytest.raises(SystemExit) as e:
                    _cli.main([command, f"{opt}={value}"])
                assert e.value.code == 2
                got = str(float(value))
                assert (f"argument {opt}: expected a finite positive number (0 < value < inf), "
                        f"got {got}") in capsys.readouterr().err


def test_missing_framework_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "haiku", None)  # as if dm-haiku were not installed
    argv = ["compare", "--frameworks", "equinox", "haiku", "--out", str(tmp_path), "--quiet"]
    assert _cli.main(argv) == 2
    err = capsys.readouterr().err
    assert 'needs `dm-haiku`, which is not installed' in err
    assert 'pip install "pccore[haiku]"' in err


def test_missing_plot_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _cli.main(["train", "--out", str(tmp_path), "--quiet"]) == 2
    assert 'pip install "pccore[plot]" (or pass --no-plot)' in capsys.readouterr().err


def test_unknown_option_values(capsys):
    for argv, message in [
        (["train", "--solver", "rk4"], "argument --solver: invalid choice: 'rk4'"),
        (["compare", "--frameworks", "torch"], "argument --frameworks: invalid choice: 'torch'"),
        (["train", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
        (["train", "--parameterisation", "mup"], "argument --parameterisation: invalid choice"),
    ]:
        with pytest.raises(SystemExit) as e:
            _cli.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "pccore", "fit"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'fit'" in proc.stderr, proc.stderr


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar():
    stream = _TTY()
    with progress_bar(4, "run", True, file=stream) as bar:
        for _ in range(4):
            bar.set_postfix_str("ok", refresh=False)
            bar.update(1)
    text = stream.getvalue()
    assert "run: 100%" in text and "4/4" in text and "ok" in text and "\r" in text, text
    for enabled, s in ((True, io.StringIO()), (False, _TTY())):  # no terminal, or disabled
        with progress_bar(4, "run", enabled, file=s) as bar:
            bar.update(4)
        assert s.getvalue() == ""


def test_solver_objects():
    from pccore._cli._options import make_solver

    s = make_solver("heun", steps=10, dt0=0.2, t1=None, rtol=1e-3, atol=1e-3)
    assert s.t1 == pytest.approx(2.0) and s.dt0 == 0.2 and s.max_steps is None
    s = make_solver("euler", steps=10, dt0=0.3, t1=1.0, rtol=1e-3, atol=1e-3)
    assert s.dt0 * round(s.t1 / s.dt0) == pytest.approx(1.0)  # t1 wins; dt0 fits t1
    s = make_solver("adam", steps=7, dt0=0.05, t1=None, rtol=1e-3, atol=1e-3)
    assert s.max_steps == 7 and s.is_optax
    # the momentum optimiser is optax's: same updates on a quadratic
    g = {"a": jnp.ones(3)}
    m = make_solver("momentum", steps=3, dt0=0.1, t1=None, rtol=1e-3, atol=1e-3).method.optim
    ref = optax.sgd(0.1, momentum=0.5)
    u1, _ = m.update(g, m.init(g))
    u2, _ = ref.update(g, ref.init(g))
    assert jax.tree.map(lambda a, b: bool(jnp.all(a == b)), u1, u2) == {"a": True}
    s = make_solver("tsit5", steps=10, dt0=0.1, t1=3.0, rtol=1e-4, atol=1e-5)
    assert s.adaptive and s.t1 == 3.0 and s.dt0 == 0.1
    assert (s.method.stepsize_controller.rtol, s.method.stepsize_controller.atol) == (1e-4, 1e-5)
    assert float(s.save_times()[-1]) == 3.0
    s = make_solver("adaptive-euler", steps=10, dt0=0.1, t1=3.0, rtol=1e-4, atol=1e-5)
    assert isinstance(s.method.solver, pccore.AdaptiveEuler) and s.adaptive
    assert (s.method.stepsize_controller.rtol, s.method.stepsize_controller.atol) == (1e-4, 1e-5)


def test_generative_accuracy_is_the_least_squares_label():
    """One linear generative layer μ = W x + b: the inferred label is the least-squares x."""
    import equinox as eqx

    from pccore._cli._options import make_parameterisation, make_variant

    variant = make_variant("generative", loss=None,
                           parameterisation=make_parameterisation("sp", gamma=1.0,
                                                                  output_precision=1.0))
    W, b = _builders.canonical_mlp([10, 64], 3)[0]
    lin = eqx.nn.Linear(10, 64, key=jax.random.key(0))
    lin = eqx.tree_at(lambda m: (m.weight, m.bias), lin, (jnp.asarray(W.T), jnp.asarray(b)))
    model = pccore.wrap(eqx.nn.Sequential([lin]))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 64)).astype(np.float32)
    labels = datasets.one_hot(rng.integers(0, 10, 40), 10)
    x_ls = np.linalg.lstsq(W.T.astype(np.float64), (images - b).T.astype(np.float64), rcond=None)[0].T
    expected = np.mean(x_ls.argmax(1) == labels.argmax(1))
    assert variant.accuracy(model, images, labels) == pytest.approx(expected)
    assert variant.layer_sizes(64, [32], 10) == (10, 32, 64)
    assert variant.roles("image", "label") == ("label", "image")


@pytest.mark.slow
def test_compare_bidirectional_backprop_row_trains_the_forward_network(mnist_dir, tmp_path):
    """The backprop row of `--variant bidirectional` is backprop on its forward network (the
    classifier): the same run as the backprop row of `--variant pc --loss mse`."""
    runs = {}
    for name, extra in [("bidirectional", []), ("pc", ["--loss", "mse"])]:
        out = tmp_path / name
        argv = ["compare", "--variant", name, *extra, "--data", "mnist", "--data-dir",
                str(mnist_dir), "--frameworks", "equinox", "--out", str(out), "--quiet",
                "--no-plot", *TINY]
        assert _cli.main(argv) == 0
        record = json.loads((out / "compare.json").read_text())
        runs[name] = {r["framework"]: r for r in record["results"]}
    bidir, pc = runs["bidirectional"], runs["pc"]
    assert list(bidir) == ["equinox", "backprop"]
    for key in ("test_accuracy", "train_loss", "final_energy"):
        assert bidir["backprop"][key] == pytest.approx(pc["backprop"][key], rel=1e-6), key
    # compared with the forward network that bPC trained from the same starting weights
    assert 0 < bidir["backprop"]["weight_difference"] < 1


def test_bidirectional_accuracy_uses_the_parameterisation():
    """The forward network classifies with its parameterised weights (NTP: W / sqrt(fan-in)),
    as bPC trains it."""
    from pccore._cli._options import make_parameterisation, make_variant

    variant = make_variant("bidirectional", loss=None, parameterisation=make_parameterisation(
        "ntp", gamma=1.0, output_precision=1.0))
    sizes = [5, 4, 3]
    fwd = _builders.build_mlp("equinox", _builders.canonical_mlp(sizes, 0), jnp.tanh)
    bwd = _builders.build_mlp("equinox", _builders.canonical_mlp(sizes[::-1], 1), jnp.tanh)
    model = pccore.Bidirectional(fwd, bwd)
    (W0, b0), (W1, b1) = _builders.canonical_mlp(sizes, 0)
    x = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32) * 3
    ntp = np.tanh(x @ W0 / np.sqrt(5) + b0) @ W1 / np.sqrt(4) + b1
    raw = np.tanh(x @ W0 + b0) @ W1 + b1
    labels = datasets.one_hot(ntp.argmax(1), 3)
    assert np.mean(raw.argmax(1) == ntp.argmax(1)) < 1  # the scalings change the predictions
    assert variant.accuracy(model, x, labels) == 1.0
    assert variant.backprop_energy.parameterisation == variant.energy.parameterisation


def test_training_compiles_once(caplog):
    """Fixed batch shapes: the jitted training step compiles once, not once per batch."""
    import logging

    from pccore._cli._options import make_parameterisation, make_solver, make_variant
    from pccore._cli._run import train_pc

    rng = np.random.default_rng(0)
    data = datasets.Dataset(rng.random((52, 8), np.float32),
                            datasets.one_hot(rng.integers(0, 3, 52), 3),
                            rng.random((10, 8), np.float32),
                            datasets.one_hot(rng.integers(0, 3, 10), 3), "toy")
    model = _builders.build_mlp("equinox", _builders.canonical_mlp([8, 4, 3], 0), jnp.tanh)
    variant = make_variant("pc", loss="mse", parameterisation=make_parameterisation(
        "sp", gamma=1.0, output_precision=1.0))
    solver = make_solver("euler", steps=3, dt0=0.1, t1=None, rtol=1e-3, atol=1e-3)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        r = train_pc("equinox", model, variant, solver, data, epochs=2, batch_size=16, lr=1e-3,
                     seed=0, progress=False)
    compiles = [m for m in caplog.messages if "Compiling" in m and "_train_step" in m]
    assert len(compiles) == 1, compiles
    assert len(r.test_accuracy) == 2 and r.inference_steps == 3  # 3 batches x 2 epochs, 52 % 16 dropped


@pytest.mark.slow
def test_train_resume_equals_uninterrupted_and_refuses_other_settings(mnist_dir, tmp_path,
                                                                      capsys):
    """`pccore train --resume` after one epoch ends in the same checkpoint, byte for byte, as
    two epochs straight; resuming with other settings, or fewer epochs than done, is refused."""
    base = ["train", "--data", "mnist", "--data-dir", str(mnist_dir), "--quiet", "--no-plot",
            *TINY[:2], *TINY[4:]]

    def run(folder, epochs, *extra):
        return _cli.main([*base, "--epochs", str(epochs), "--out", str(tmp_path / folder),
                          "--checkpoint-dir", str(tmp_path / folder / "ck"), *extra])

    assert run("straight", 2) == 0
    assert run("resumed", 1) == 0
    assert run("resumed", 2, "--resume") == 0
    straight, resumed = (pccore.read_manifest(tmp_path / f / "ck" / "step_00000002")
                         for f in ("straight", "resumed"))
    assert straight["leaves"] == resumed["leaves"]  # the SHA-256 of weights, Adam state and key
    capsys.readouterr()
    assert run("resumed", 3, "--resume", "--lr", "0.01", "--batch-size", "8") == 2
    err = capsys.readouterr().err
    assert re.search(r"pccore: error: --resume: the checkpoint .*step_00000002 was written with "
                     r"other settings \(--batch-size was 16, now 8; --lr was 0\.003, now 0\.01\)",
                     err), err
    assert run("resumed", 1, "--resume") == 2
    assert re.search(r"--epochs 1: the checkpoint .*step_00000002 is already at epoch 2; pass "
                     r"--epochs 2 or more", capsys.readouterr().err)


# --- compare --model cnn / resnet, --variants (issue 20, item 4) ------------------------------

MODEL_BUDGET = ["--train-limit", "64", "--test-limit", "32", "--epochs", "1", "--batch-size",
                "16", "--steps", "3", "--no-plot", "--quiet"]


def _cnn_by_hand(weights, x, activation=np.tanh):
    """The CNN written with jax.lax.conv from the canonical weights (the oracle)."""
    (K, bK), (W, b) = weights
    img = jnp.asarray(x).reshape(-1, 1, 8, 8)  # NCHW
    h = jax.lax.conv(img, jnp.transpose(jnp.asarray(K), (3, 2, 0, 1)), (1, 1), "VALID")
    h = activation(h + bK[None, :, None, None])  # (B, C, 6, 6)
    h = h.reshape(h.shape[0], h.shape[1], 3, 2, 3, 2).mean((3, 5))
    return jnp.transpose(h, (0, 2, 3, 1)).reshape(h.shape[0], -1) @ W + b  # flatten HWC


def _resnet_by_hand(weights, x, activation=np.tanh):
    (Ws, bs), *blocks, (Wh, bh) = weights
    h = x @ Ws + bs
    for W1, W2, b1, b2 in blocks:
        h = h + activation(activation(h) @ W1 + b1) @ W2 + b2
    return h @ Wh + bh


def test_cnn_and_resnet_forward_equal_hand_written_oracles():
    weights = _builders.canonical_cnn((64, 4, 10), 3)
    x = datasets.load("digits", seed=0).x_test[:7]
    model = _builders.build_model("cnn", "equinox", weights, jnp.tanh, 64)
    np.testing.assert_allclose(model(x), _cnn_by_hand(weights, x), atol=1e-5, rtol=1e-5)
    assert model.names == ("pool", "head")
    assert [z.shape for z in pccore.init_activities(model, x=x, y=None)][:1] == [(7, 36)]
    assert _builders.max_weight_difference(_builders.canonical_weights(model), weights) == 0
    weights = _builders.canonical_resnet((64, 5, 5, 5, 10), 3)
    model = _builders.build_model("resnet", "equinox", weights, jnp.tanh, 64)
    np.testing.assert_allclose(model(x), _resnet_by_hand(weights, x), atol=1e-5, rtol=1e-5)
    assert model.names == ("stem", "blocks[0]", "blocks[1]", "blocks[2]", "head")
    assert _builders.max_weight_difference(_builders.canonical_weights(model), weights) == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind, sizes", [("cnn", (64, 3, 10)), ("resnet", (64, 6, 6, 10))])
def test_model_builders_agree_across_frameworks(kind, sizes):
    """Every framework's model from the same canonical weights: the same forward (the
    hand-written oracle), weights read back exactly, the same latents, energy and activity
    gradients at perturbed activities."""
    weights = _builders.CANONICAL[kind](sizes, 1)
    data = datasets.load("digits", seed=0)
    x, y = data.x_test[:5], data.y_test[:5]
    oracle = (_cnn_by_hand if kind == "cnn" else _resnet_by_hand)(weights, x)
    pc = pccore.PC(loss=pccore.CrossEntropy())
    ref = None
    for fw in available_frameworks():
        model = _builders.build_model(kind, fw, weights, jnp.tanh, 64)
        np.testing.assert_allclose(model(x), oracle, atol=1e-5, rtol=1e-5, err_msg=fw)
        assert _builders.max_weight_difference(_builders.canonical_weights(model), weights) == 0
        z = pccore.init_activities(model, x=x, y=y, energy=pc)
        z = tuple(a + 0.1 * np.cos(np.arange(a.size)).reshape(a.shape).astype(np.float32)
                  for a in z)
        e, g = jax.value_and_grad(lambda z: pccore.energy(model, z, x=x, y=y, energy=pc))(z)
        if ref is None:
            ref = (e, g)
            continue
        assert float(e) == pytest.approx(float(ref[0]), rel=1e-5), fw
        for a, b in zip(g, ref[1]):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=fw)
    assert _builders.describe(kind, sizes).startswith(kind)


def _compare(tmp_path, *argv):
    out = tmp_path / "out"
    assert _cli.main(["compare", *MODEL_BUDGET, "--out", str(out), *argv]) == 0  # argv last
    return json.loads((out / "compare.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind, hidden", [("cnn", ["4"]), ("resnet", ["8", "8"])])
def test_compare_models_agree_across_frameworks(kind, hidden, tmp_path):
    """`pccore compare --model cnn|resnet`: every framework trains the same network from the
    same weights, so the weights after training agree to float32 rounding, the first step's
    energies are equal, and the backprop row trains the same architecture."""
    frameworks = available_frameworks()
    record = _compare(tmp_path, "--model", kind, "--hidden", *hidden, "--frameworks",
                      *frameworks)
    rows = {r["framework"]: r for r in record["results"]}
    assert list(rows) == [*frameworks, "backprop"]
    assert record["config"]["model"] == kind
    first = rows[frameworks[0]]
    for fw in frameworks:
        assert rows[fw]["weight_difference"] < 1e-4, fw
        assert rows[fw]["first_step_energy"] == pytest.approx(first["first_step_energy"],
                                                              rel=1e-5), fw
        assert rows[fw]["test_accuracy"] == first["test_accuracy"], fw
        assert rows[fw]["final_energy"] == pytest.approx(first["final_energy"], rel=1e-4), fw
    bp = rows["backprop"]
    assert bp["weight_difference"] is not None and bp["weight_difference"] > 1e-4  # trained
    assert np.isfinite(first["first_step_energy"])


@pytest.mark.slow
def test_compare_variants_one_row_each(tmp_path, capsys):
    """`--variants pc epc`: one row per variant on one framework (equinox by default). With a
    few inference steps ePC ends elsewhere than PC; run to convergence they share equilibria
    and parameter gradients (pccore.EPC's docs), so they train to the same weights. (Two
    hidden layers: with one, z_1 = mu_1(x) + eps_1 is a shift and the flows coincide.)"""
    few = _compare(tmp_path, "--variants", "pc", "epc", "--hidden", "16", "16")
    table = capsys.readouterr().out
    assert "| variant (equinox) |" in table and "| epc |" in table
    assert [(r["label"], r["variant"], r["framework"]) for r in few["results"]] == [
        ("pc", "pc", "equinox"), ("epc", "epc", "equinox"), ("backprop", None, "backprop")]
    pc, epc, _ = few["results"]
    assert pc["first_step_energy"] != pytest.approx(epc["first_step_energy"], rel=1e-4)
    assert epc["weight_difference"] > 1e-3
    many = _compare(tmp_path, "--variants", "pc", "epc", "--hidden", "16", "16", "--steps", "300",
                    "--dt0", "0.2", "--no-backprop", "--frameworks", "linen")
    pc, epc = many["results"]
    assert [r["framework"] for r in many["results"]] == ["linen", "linen"]
    assert epc["weight_difference"] < 1e-5
    assert epc["first_step_energy"] == pytest.approx(pc["first_step_energy"], rel=1e-4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "pc", "epc", "--frameworks", "haiku", "linen"],
         r"--variants compares variants on one framework; got --frameworks haiku linen"),
        (["--variants", "pc", "epc", "--variant", "pc"],
         r"--variant pc and --variants pc epc: pass one of them"),
        (["--variants", "pc", "pc"], r"--variants lists a variant twice: pc pc"),
        (["--model", "cnn", "--variant", "generative"],
         r"--model cnn trains the network from images to labels: variant generative needs a "
         r"network from labels to images, which only --model mlp builds; use pc or epc"),
        (["--model", "resnet", "--variants", "pc", "hybrid", "bidirectional"],
         r"variant hybrid, bidirectional needs"),
        (["--model", "cnn", "--hidden", "4", "4"], r"--model cnn has one convolution; pass one "
                                                   r"value, its channels"),
        (["--model", "resnet", "--hidden", "8", "16"],
         r"--model resnet has one residual width; pass equal values"),
    ],
)
def test_compare_model_and_variants_errors(argv, message, tmp_path, capsys, monkeypatch):
    from pccore._cli import _run

    monkeypatch.setattr(_run, "train_pc", lambda *a, **k: 1 / 0)  # refused before training
    assert _cli.main(["compare", *argv, "--out", str(tmp_path), "--quiet", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pccore: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_cnn_needs_square_images():
    assert _builders.image_side(64) == 8 and _builders.image_side(784) == 28
    with pytest.raises(ValueError, match="50 features are not a square one-channel image"):
        _builders.image_side(50)


def test_compare_cli_exit_status_for_bad_model_combination():
    proc = subprocess.run([sys.executable, "-m", "pccore", "compare", "--model", "bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'bogus'" in proc.stderr
