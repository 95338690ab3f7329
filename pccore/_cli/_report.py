"""The comparison table, the JSON record and the figure written by the command-line tool."""

import json
import pathlib
from typing import Any

from ._run import RunResult

FIGURE_SIZE = (10.0, 4.0)
FIGURE_DPI = 100
"""The figure is `FIGURE_SIZE * FIGURE_DPI` = 1000 x 400 pixels."""


def require_matplotlib():
    """Import matplotlib (the `plot` extra) with the non-interactive Agg backend."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            'Writing the figure needs matplotlib, which is not installed. Install it with: '
            'pip install "pccore[plot]" (or pass --no-plot).'
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table(results: list[RunResult], reference: str, column: str = "framework") -> str:
    """A Markdown table: one row per run (framework, or variant with `pccore compare
    --variants`: the first `column` is its header), then backprop.

    `skipped updates` counts the training steps whose update was skipped because inference
    diverged, out of all training steps (backprop has none).
    """
    head = (
        f"| {column} | test accuracy | final energy | ms / step | inference steps / step "
        f"| skipped updates | max abs weight diff vs {reference} |"
    )
    rows = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        diff = "-" if r.weight_difference is None else f"{r.weight_difference:.2e}"
        pc = r.framework != "backprop"
        steps = f"{r.inference_steps:g}" if pc else "-"
        skipped = f"{r.updates_skipped}/{r.training_steps}" if pc else "-"
        rows.append(
            f"| {r.name} | {100 * r.final_accuracy:.2f}% | {r.final_energy:.4f} | "
            f"{r.step_ms:.2f} | {steps} | {skipped} | {diff} |"
        )
    return "\n".join(rows)


def write_json(path: pathlib.Path, config: dict[str, Any], results: list[RunResult]) -> None:
    import jax

    record = {
        "config": config,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                        "devices": [str(d) for d in jax.devices()]},
        "results": [r.to_json() for r in results],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


_STYLES = ["-", "--", ":", "-."]


def write_figure(path: pathlib.Path, results: list[RunResult], title: str, time_axis: str) -> None:
    """Test accuracy per epoch (every run) and energy along one inference solve (PC runs)."""
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    pc = [r for r in results if r.framework != "backprop"]
    for i, r in enumerate(results):
        epochs = range(1, len(r.test_accuracy) + 1)
        style = "-" if r.framework == "backprop" else _STYLES[i % len(_STYLES)]
        width = 3.0 - 0.6 * i if r.framework != "backprop" else 1.5
        left.plot(epochs, [100 * a for a in r.test_accuracy], style, lw=max(width, 1.0),
                  label=r.name, color="black" if r.framework == "backprop" else None)
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_xlabel("epoch")
    left.set_ylabel("test accuracy (%)")
    left.set_title("test accuracy per epoch")
    left.grid(alpha=0.3)
    left.legend()
    for i, r in enumerate(pc):
        right.plot(r.trace_times, r.energy_trace, _STYLES[i % len(_STYLES)], lw=max(3.0 - 0.6 * i, 1.0),
                   label=r.name)
    if "step" in time_axis:
        right.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel(time_axis)
    right.set_ylabel("energy (batch mean)")
    right.set_yscale("log")
    right.set_title("energy along inference (test batch, final weights)")
    right.grid(alpha=0.3)
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
