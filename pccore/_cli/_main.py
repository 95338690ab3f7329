"""The `pccore` command: `pccore compare` (frameworks side by side) and `pccore train`.

Run `pccore compare --help` or `python -m pccore train --help` for every option.
"""

import argparse
import contextlib
import json
import math
import os
import pathlib
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence

from .._builders import (
    ACTIVATIONS,
    CANONICAL,
    DEFAULT_HIDDEN,
    FRAMEWORK_EXTRAS,
    MODELS,
    build_model,
    describe,
    image_side,
    max_weight_difference,
    same_layout,
)
from .._checkpoint._format import CheckpointError
from .._checkpoint._store import read_manifest
from ._options import (
    LOSSES,
    PARAMETERISATIONS,
    SOLVERS,
    VARIANT_NAMES,
    CLIError,
    TrainingFailed,
    make_parameterisation,
    make_solver,
    make_variant,
)

FRAMEWORKS = tuple(FRAMEWORK_EXTRAS)
DATASETS = ("digits", "mnist", "fashion-mnist")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


SEED_MAX = 2**32 - 1
"""The largest --seed (NumPy and JAX seeds are non-negative; a second network uses seed + 1)."""

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, as shells report it)."""


def _seed(text: str) -> int:
    """An integer 0..SEED_MAX (argparse names --seed in front of the message)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= SEED_MAX:
        got = repr(text) if value is None else value
        raise argparse.ArgumentTypeError(
            f"expected an integer from 0 to {SEED_MAX} (NumPy and JAX seeds are non-negative), "
            f"got {got}; pass e.g. --seed 0")
    return value


def _positive_float(text: str) -> float:
    """A finite number > 0 (argparse names the option in front of the message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a finite positive number (0 < value < inf), got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"expected a finite positive number (0 < value < inf), got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("predictive coding")
    g.add_argument("--variant", choices=VARIANT_NAMES, default=None, help="PC variant (default: pc)")
    g.add_argument("--parameterisation", choices=PARAMETERISATIONS, default="sp",
                   help="weight scalings: standard, neural tangent or muPC (default: sp)")
    g.add_argument("--gamma", type=_positive_float, default=1.0, help="muPC output scaling gamma")
    g.add_argument("--output-precision", type=_positive_float, default=1.0,
                   help="output precision lambda (weight of the output energy)")
    g.add_argument("--loss", choices=tuple(LOSSES), default=None,
                   help="output loss: softmax cross-entropy or squared error (default: ce for "
                        "pc, mse for generative)")
    s = p.add_argument_group("inference solver")
    s.add_argument("--solver", choices=SOLVERS, default="euler",
                   help="diffrax euler/heun (constant steps), tsit5 or adaptive-euler (adaptive "
                        "steps), or an optax optimiser on the activities: sgd, momentum, adam "
                        "(default: euler)")
    s.add_argument("--steps", type=_positive_int, default=20,
                   help="inference steps per training step (default: 20)")
    s.add_argument("--dt0", type=_positive_float, default=0.1,
                   help="step size; the learning rate for optax solvers (default: 0.1)")
    s.add_argument("--t1", type=_positive_float, default=None,
                   help="integration horizon of the ODE solvers, instead of --steps "
                        "(default: steps * dt0)")
    s.add_argument("--rtol", type=_positive_float, default=1e-3, help="adaptive steps: relative tolerance")
    s.add_argument("--atol", type=_positive_float, default=1e-3, help="adaptive steps: absolute tolerance")
    t = p.add_argument_group("training")
    t.add_argument("--hidden", type=_positive_int, nargs="+", default=None,
                   help="hidden widths of the MLP (default: 64 64); with compare --model cnn "
                        "one value, the convolution's channels (default: 8); with --model "
                        "resnet the residual width, one block per value, all equal "
                        "(default: 32 32)")
    t.add_argument("--activation", choices=tuple(ACTIVATIONS), default="tanh")
    t.add_argument("--epochs", type=_positive_int, default=20, help="(default: 20)")
    t.add_argument("--batch-size", type=_positive_int, default=32, help="(default: 32)")
    t.add_argument("--lr", type=_positive_float, default=3e-3,
                   help="Adam learning rate of the parameters (default: 3e-3)")
    t.add_argument("--seed", type=_seed, default=0,
                   help=f"seeds the weights, the data split and the batch order, 0..{SEED_MAX} "
                        "(default: 0)")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=DATASETS, default="digits",
                   help="digits (bundled with scikit-learn) or MNIST / Fashion-MNIST files")
    d.add_argument("--data-dir", type=pathlib.Path, default=None,
                   help="mnist / fashion-mnist only: folder with the MNIST-style IDX files "
                        "(gzipped or not) or an .npz")
    d.add_argument("--train-limit", type=_positive_int, default=None,
                   help="use only the first N training samples")
    d.add_argument("--test-limit", type=_positive_int, default=None,
                   help="use only the first N test samples")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=pathlib.Path, default=pathlib.Path("pccore_results"),
                   help="folder for the JSON record and the figure (default: pccore_results)")
    o.add_argument("--no-plot", action="store_true", help="do not write the PNG figure")
    o.add_argument("--quiet", action="store_true", help="print only the final table / summary")
    o.add_argument("--data-parallel", action="store_true",
                   help="shard every batch over all devices (jax.sharding; parameters "
                        "replicated): the local ones, or every process's with the options "
                        "below. The batch size must divide by the number of devices.")
    m = p.add_argument_group(
        "several processes (jax.distributed; launch the same command once per process)")
    m.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
    m.add_argument("--num-processes", type=_positive_int,
                   help="number of processes (default: $JAX_NUM_PROCESSES)")
    m.add_argument("--process-id", type=int,
                   help="this process's index, 0..N-1 (default: $JAX_PROCESS_ID)")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise CLIError(f"${name}={value!r}: expected a whole number.") from None


def _join_processes(args) -> None:
    """`jax.distributed.initialize` when the run spans several processes (before any JAX
    computation); CPU collectives go through gloo, so this works on CPUs too."""
    if args.coordinator is None:
        args.coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if args.num_processes is None:
        args.num_processes = _env_int("JAX_NUM_PROCESSES")
    if args.process_id is None:
        args.process_id = _env_int("JAX_PROCESS_ID")
    given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    if all(v is None for v in given.values()):
        return
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise CLIError(
            f"{', '.join(missing)} missing: a run over several processes needs all three of "
            "--coordinator HOST:PORT, --num-processes N and --process-id I (or "
            "$JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID).")
    if not 0 <= args.process_id < args.num_processes:
        raise CLIError(f"--process-id {args.process_id}: expected 0..{args.num_processes - 1} "
                       f"(--num-processes {args.num_processes}).")
    if not args.data_parallel:
        raise CLIError("--coordinator/--num-processes/--process-id split the batches over the "
                       "processes' devices: add --data-parallel.")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)


def _lead() -> bool:
    """Whether this process writes the results (process 0 of a multi-process run)."""
    import jax

    return jax.process_index() == 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pccore",
        description="Train predictive coding networks with pccore.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{compare,train}")
    c = sub.add_parser(
        "compare",
        help="train one network from the same weights in every framework, and with backprop",
        description="Train the same network (an MLP, a small CNN or a small ResNet), from "
                    "identical starting weights, through the Equinox, Haiku, Flax Linen and "
                    "Flax NNX adapters with the same PC settings, plus backprop; or several PC "
                    "variants on one framework (--variants). Print a table, write JSON and a "
                    "PNG figure.",
    )
    c.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=None,
                   help="frameworks to compare; the first is the weight reference "
                        "(default: equinox haiku linen nnx; with --variants: equinox, and "
                        "at most one may be named)")
    c.add_argument("--model", choices=MODELS, default="mlp",
                   help="mlp; cnn: conv 3x3 (--hidden channels) -> activation -> 2x2 average "
                        "pool -> dense, on square one-channel images; resnet: dense stem, "
                        "residual blocks h + W2 act(W1 act(h)), dense head (default: mlp)")
    c.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=None,
                   metavar="VARIANT",
                   help="compare these PC variants on one framework, one row each (instead "
                        f"of --variant); choose from {', '.join(VARIANT_NAMES)}")
    c.add_argument("--no-backprop", action="store_true", help="skip the backprop reference row")
    _common(c)
    t = sub.add_parser("train", help="train one framework with one PC variant",
                       description="Train an MLP with predictive coding through one adapter.")
    t.add_argument("--framework", choices=FRAMEWORKS, default="equinox")
    _common(t)
    k = t.add_argument_group("checkpoints")
    k.add_argument("--checkpoint-dir", type=pathlib.Path, default=None,
                   help="save the training state atomically after every epoch "
                        "(default: OUT/checkpoints when --resume or --keep is given)")
    k.add_argument("--keep", type=_positive_int, default=None,
                   help="keep the newest N checkpoints (default: 3)")
    k.add_argument("--resume", action="store_true",
                   help="continue from the latest valid checkpoint, if there is one (same "
                        "options as the saved run; --epochs may grow)")
    return p


def _load_data(args):
    from .. import datasets

    if args.data_parallel:
        import jax

        n = jax.device_count()
        if args.batch_size % n:
            raise CLIError(
                f"--data-parallel shards each batch over {n} devices, so --batch-size must be a "
                f"multiple of {n}; got {args.batch_size}."
            )
    if args.data == "digits" and args.data_dir is not None:
        raise CLIError(
            f"--data-dir {args.data_dir}: --data digits is bundled with scikit-learn and reads "
            "no files, so --data-dir would be ignored; expected --data-dir only with --data "
            f"{' or --data '.join(d for d in DATASETS if d != 'digits')}. Drop --data-dir, or "
            "pass --data mnist (or fashion-mnist) to read the files there."
        )
    if args.data != "digits" and args.data_dir is None:
        raise CLIError(
            f"--data {args.data} reads files from disk: pass --data-dir DIR, a folder holding "
            f"{', '.join(datasets.IDX_FILES)} (each may end in .gz) or an .npz with x_train, "
            "y_train, x_test, y_test."
        )
    try:
        data = datasets.load(args.data, data_dir=args.data_dir, seed=args.seed)
    except (ValueError, OSError) as e:  # unusable files: the loader's message names them
        raise CLIError(str(e).replace("`data_dir`", "--data-dir")) from e
    data = data.subset(args.train_limit, args.test_limit)
    if data.x_train.shape[0] < args.batch_size:
        raise CLIError(
            f"--batch-size {args.batch_size} is larger than the training set "
            f"({data.x_train.shape[0]} samples); lower --batch-size or raise --train-limit."
        )
    return data


def _writable_folder(path: pathlib.Path, option: str) -> None:
    """Create `path` and check that a file can be written there, before anything trains (the
    results of a long run would otherwise be lost at the end)."""
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == path else f"lies under {blocker}, which is a file"
        raise CLIError(
            f"{option} {path}: the path {where}, not a folder; expected a folder pccore can "
            f"create and write into. Pass another {option}, or move that file away."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CLIError(
            f"{option} {path}: cannot write there ({e.strerror or e}); expected a writable "
            f"folder. Pass another {option}, or make it writable."
        ) from e


def _checkpoint_folder(args) -> pathlib.Path | None:
    """Where `train` saves checkpoints, or None when it does not."""
    if args.command != "train":
        return None
    if args.checkpoint_dir is None and not args.resume and args.keep is None:
        return None
    return args.checkpoint_dir or args.out / "checkpoints"


def _open_checkpoints(args, stack: contextlib.ExitStack):
    """The run's CheckpointManager, writable and held for the run (None without checkpoints);
    refuses a folder of another run unless resuming it with the same settings."""
    import jax

    from .._checkpoint._manager import CheckpointManager

    folder = _checkpoint_folder(args)
    if folder is None:
        return None
    _writable_folder(folder, "--checkpoint-dir")
    # Saved in the background while the next epoch trains (one process; with several,
    # each save completes before training goes on).
    checkpoints = CheckpointManager(folder, keep=args.keep or 3, async_save=jax.process_count() == 1)
    stack.enter_context(checkpoints)  # the last save is committed when the run ends
    if _lead():  # process 0 writes (and holds the folder); the others read on --resume
        stack.enter_context(checkpoints.hold())  # a second run into this folder is refused
    if not args.resume and checkpoints.steps():
        raise CLIError(
            f"--checkpoint-dir {folder} already holds checkpoints (steps "
            f"{checkpoints.steps()}); pass --resume to continue that run, or choose an empty "
            "folder (--checkpoint-dir or --out)."
        )
    if args.resume:
        _check_resume(checkpoints, args)
    return checkpoints


def _check_updated(r, args) -> None:
    """A run whose every update was skipped (inference diverged each time) is an error."""
    if not r.never_updated:
        return
    adaptive = args.solver in ("tsit5", "adaptive-euler")
    solver = ("tighten --rtol / --atol" if adaptive
              else "use an adaptive solver (--solver tsit5 or adaptive-euler)")
    raise TrainingFailed(
        f"{r.framework}: inference diverged on every training step ({r.updates_skipped} of "
        f"{r.training_steps} updates skipped: the energy at the inferred activities was NaN or "
        "inf), so the weights never changed; expected at least one update. Lower --dt0 (got "
        f"{args.dt0:g}) or {solver}; if the weights had blown up, lower --lr (got {args.lr:g})."
    )


def _skipped_note(r) -> str:
    if not r.updates_skipped:
        return ""
    return (f"; {r.updates_skipped} of {r.training_steps} updates skipped (inference diverged: "
            "lower --dt0 or use an adaptive solver)")


def _interrupted(args, argv: Sequence[str]) -> str:
    """The one line printed after Ctrl-C: what was saved, and how to resume from it."""
    line = "pccore: interrupted (Ctrl-C)"
    folder = _checkpoint_folder(args)
    if folder is None:
        return (f"{line}; no results were written (pccore train --checkpoint-dir DIR saves after "
                "every epoch, to resume from).")
    from .._checkpoint._manager import CheckpointManager

    manager = CheckpointManager(folder)
    step = manager.latest_step()
    if step is None:
        return f"{line} before the first checkpoint in {folder}; rerun the command to start over."
    command = shlex.join(["pccore", *argv, *([] if "--resume" in argv else ["--resume"])])
    return (f"{line}; the latest checkpoint is {manager.path(step)} (epoch {step}/{args.epochs}). "
            f"Resume with: {command}")


def _build(framework: str, weights, activation, kind="mlp", num_features=None):
    try:
        return build_model(kind, framework, weights, activation, num_features)
    except TypeError as e:  # no adapter registered for this framework's models
        raise CLIError(f"--frameworks {framework}: {e}") from e


def _make(variant, framework, sizes, seed, activation, kind="mlp", num_features=None):
    """The variant's `kind` model in `framework`; its k-th network starts from weights seeded
    seed+k (`CANONICAL[kind]`)."""
    return variant.make_model(
        lambda s, k: _build(framework, CANONICAL[kind](s, seed + k), activation, kind,
                            num_features),
        sizes,
    )


def _resolve_defaults(args) -> None:
    """Fill in the options whose default depends on others (before the config is recorded)."""
    model = getattr(args, "model", "mlp")
    if args.hidden is None:
        args.hidden = list(DEFAULT_HIDDEN[model])
    if getattr(args, "variants", None) is None and args.variant is None:
        args.variant = "pc"


def _variant(args, name):
    param = make_parameterisation(args.parameterisation, gamma=args.gamma,
                                  output_precision=args.output_precision)
    return make_variant(name, loss=args.loss, parameterisation=param)


def _solver(args):
    return make_solver(args.solver, steps=args.steps, dt0=args.dt0, t1=args.t1,
                       rtol=args.rtol, atol=args.atol)


def _settings(args):
    return _variant(args, args.variant), _solver(args)


def _config(args) -> dict:
    return {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}


# Options a resumed run may change: where things are written or read from, how much is
# printed, how many epochs in all, and sharding (the same result to rounding).
_RESUMABLE = frozenset({"epochs", "out", "quiet", "no_plot", "checkpoint_dir", "keep", "resume",
                        "data_dir", "data_parallel", "coordinator", "num_processes",
                        "process_id"})


def _check_resume(checkpoints, args) -> None:
    """A resumed run continues the saved one: the same settings, and not fewer epochs."""
    step = checkpoints.latest_step()
    if step is None:
        return
    path = checkpoints.path(step)
    saved = read_manifest(path, verify=False)["config"]
    now = json.loads(json.dumps(_config(args)))  # as the manifest stores it
    changed = [k for k in sorted(set(saved) | set(now))
               if k not in _RESUMABLE and saved.get(k) != now.get(k)]
    if changed:
        flags = "; ".join(f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {now.get(k)!r}"
                          for k in changed)
        raise CLIError(
            f"--resume: the checkpoint {path} was written with other settings ({flags}). Pass "
            "the saved run's options to continue it, or start a new run in an empty folder "
            "(--checkpoint-dir or --out)."
        )
    if args.epochs < step:
        raise CLIError(
            f"--epochs {args.epochs}: the checkpoint {path} is already at epoch {step}; pass "
            f"--epochs {step} or more to continue that run."
        )


def _describe(args, sizes, solver, variants=None, kind="mlp") -> str:
    arch = describe(kind, sizes)
    variants = variants or [args.variant]
    losses = {args.loss or ("ce" if v in ("pc", "epc") else "mse") for v in variants}
    loss = losses.pop() if len(losses) == 1 else "each variant's default loss"
    steps = f"{args.steps} steps" if solver.is_optax else f"t1={solver.t1:g}, dt0={args.dt0:g}"
    return (f"{args.data} {arch} {args.activation}, {','.join(variants)}/"
            f"{args.parameterisation}/{loss}, {args.solver} ({steps}), {args.epochs} epochs, "
            f"batch {args.batch_size}, seed {args.seed}")


def _time_axis(solver) -> str:
    if solver.is_optax:
        return "inference step (optax update)"
    return "time t (adaptive steps)" if solver.adaptive else f"inference step (dt0 = {solver.dt0:g})"


FORWARD_VARIANTS = ("pc", "epc")
"""The variants that train the network as built (input at the bottom, label at the top): the
only ones `--model cnn`/`resnet` take (the others need a network from labels to images)."""


def _compare_plan(args) -> tuple[list[str], list[str]]:
    """The frameworks and variant names of a compare run (one row per pair), checked."""
    if args.variants is not None:
        if args.variant is not None:
            raise CLIError(
                f"--variant {args.variant} and --variants {' '.join(args.variants)}: pass one "
                "of them (--variants compares several variants, one row each).")
        if len(set(args.variants)) != len(args.variants):
            raise CLIError(f"--variants lists a variant twice: {' '.join(args.variants)}.")
        frameworks = args.frameworks or ["equinox"]
        if len(frameworks) != 1:
            raise CLIError(
                f"--variants compares variants on one framework; got --frameworks "
                f"{' '.join(frameworks)}. Name one framework (e.g. --frameworks "
                f"{frameworks[0]}), or compare frameworks with one --variant.")
        variants = list(args.variants)
    else:
        frameworks = args.frameworks or list(FRAMEWORKS)
        if len(set(frameworks)) != len(frameworks):
            raise CLIError(f"--frameworks lists a framework twice: {' '.join(frameworks)}.")
        variants = [args.variant]
    if args.model != "mlp":
        other = [v for v in variants if v not in FORWARD_VARIANTS]
        if other:
            raise CLIError(
                f"--model {args.model} trains the network from images to labels: variant "
                f"{', '.join(other)} needs a network from labels to images, which only --model "
                f"mlp builds; use {' or '.join(FORWARD_VARIANTS)} with --model {args.model}.")
    if args.model == "cnn" and len(args.hidden) != 1:
        raise CLIError(
            f"--hidden {' '.join(map(str, args.hidden))}: --model cnn has one convolution; "
            "pass one value, its channels (e.g. --hidden 8).")
    if args.model == "resnet" and len(set(args.hidden)) != 1:
        raise CLIError(
            f"--hidden {' '.join(map(str, args.hidden))}: --model resnet has one residual "
            f"width; pass equal values, one per residual block (e.g. --hidden "
            f"{args.hidden[0]} {args.hidden[0]}).")
    return frameworks, variants


def _sizes(args, variant, data) -> tuple[int, ...]:
    if args.model == "mlp":
        return tuple(variant.layer_sizes(data.num_features, args.hidden, data.num_classes))
    if args.model == "cnn":
        try:
            image_side(data.num_features)
        except ValueError as e:
            raise CLIError(f"--model cnn on --data {args.data}: {e}") from None
    return (data.num_features, *args.hidden, data.num_classes)


def compare(args) -> int:
    from ._report import require_matplotlib, table, write_figure, write_json
    from ._run import train_backprop, train_pc

    _resolve_defaults(args)
    frameworks, names = _compare_plan(args)
    by_variant = len(names) > 1 or args.variants is not None
    if not args.no_plot:
        require_matplotlib()
    variants = {name: _variant(args, name) for name in names}
    solver = _solver(args)
    data = _load_data(args)
    sizes = {name: _sizes(args, v, data) for name, v in variants.items()}
    activation = ACTIVATIONS[args.activation]
    n_in = data.num_features
    runs = [(fw, name, _make(variants[name], fw, sizes[name], args.seed, activation, args.model,
                             n_in))  # fail early
            for fw in frameworks for name in names]
    say = (lambda s: None) if args.quiet else print
    progress = not args.quiet
    _writable_folder(args.out, "--out")
    title = _describe(args, sizes[names[0]], solver, names, args.model)
    if by_variant:
        title = f"{frameworks[0]}: {title}"
    say(f"pccore compare: {title}")
    results = []
    for fw, name, model in runs:
        label = name if by_variant else fw
        r = train_pc(label, model, variants[name], solver, data, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=progress,
                     data_parallel=args.data_parallel)
        r.framework, r.variant, r.label = fw, name, label
        _check_updated(r, args)
        say(f"{label:>8}: test accuracy {100 * r.final_accuracy:.2f}% after {args.epochs} "
            f"epochs ({r.seconds:.1f} s){_skipped_note(r)}")
        results.append(r)
    with_reference = [n for n in names if variants[n].has_backprop_reference]
    if not args.no_backprop and not with_reference:
        say(f"backprop: no reference row for the {' / '.join(repr(n) for n in names)} "
            f"variant{'s' if len(names) > 1 else ''}")
    elif not args.no_backprop:
        name = with_reference[0]  # one row: the first variant's loss and network
        weights = CANONICAL[args.model](sizes[name], args.seed)
        ref_model = _build("equinox", weights, activation, args.model, n_in)
        r = train_backprop(ref_model, variants[name], data, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           progress=progress)
        r.label = "backprop"
        say(f"backprop: test accuracy {100 * r.final_accuracy:.2f}% ({r.seconds:.1f} s)")
        results.append(r)
    if not _lead():  # one result per run: process 0 writes it
        return 0
    reference = results[0]
    for r in results:
        if same_layout(r.weights, reference.weights):
            r.weight_difference = max_weight_difference(r.weights, reference.weights)
    print(table(results, reference.name, column=f"variant ({frameworks[0]})" if by_variant
                else "framework"))
    write_json(args.out / "compare.json", _config(args), results)
    written = [args.out / "compare.json"]
    if not args.no_plot:
        write_figure(args.out / "compare.png", results, title, _time_axis(solver))
        written.append(args.out / "compare.png")
    say("wrote " + ", ".join(str(p) for p in written))
    return 0


def train(args) -> int:
    from ._report import require_matplotlib, write_figure, write_json
    from ._run import train_pc

    _resolve_defaults(args)
    if not args.no_plot:
        require_matplotlib()
    variant, solver = _settings(args)
    data = _load_data(args)
    sizes = variant.layer_sizes(data.num_features, args.hidden, data.num_classes)
    model = _make(variant, args.framework, sizes, args.seed, ACTIVATIONS[args.activation])
    _writable_folder(args.out, "--out")
    if not args.quiet:
        print(f"pccore train ({args.framework}): {_describe(args, sizes, solver)}")
    with contextlib.ExitStack() as stack:
        checkpoints = _open_checkpoints(args, stack)
        r = train_pc(args.framework, model, variant, solver, data, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     progress=not args.quiet, log=None if args.quiet else print,
                     checkpoints=checkpoints, resume=args.resume, config=_config(args),
                     data_parallel=args.data_parallel)
    _check_updated(r, args)
    if not _lead():  # one result per run: process 0 writes it
        return 0
    print(f"final test accuracy {100 * r.final_accuracy:.2f}%, energy {r.final_energy:.4f}, "
          f"{r.step_ms:.2f} ms per training step, {r.inference_steps:g} inference steps per "
          f"training step{_skipped_note(r)}")
    write_json(args.out / "train.json", _config(args), [r])
    if not args.no_plot:
        write_figure(args.out / "train.png", [r], _describe(args, sizes, solver), _time_axis(solver))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pccore` console script and of `python -m pccore`.

    Exit status: 0 on success; 2 for a bad option value, unusable data or output folder, or a
    checkpoint problem; 1 when inference diverged on every training step (nothing learnt);
    130 after Ctrl-C (with the checkpoint and the command to resume from, if any).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    start = time.perf_counter()
    try:
        _join_processes(args)
        if not _lead():
            args.quiet = True  # one voice per run: process 0's
        status = compare(args) if args.command == "compare" else train(args)
    except (CLIError, CheckpointError, ImportError, FileNotFoundError) as e:
        print(f"pccore: error: {e}", file=sys.stderr)
        return e.status if isinstance(e, CLIError) else 2
    except KeyboardInterrupt:
        print(_interrupted(args, argv), file=sys.stderr)
        return INTERRUPTED
    if not args.quiet:
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return status
