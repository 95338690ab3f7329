"""Where the first call's time goes: tracing, lowering to MLIR, XLA's compilation, the rest.

Each candidate's first call is compiled afresh (`jax.clear_caches()`) seven times,
alternating with the other; the phases are JAX's own compile events
(`jax.monitoring`), and "other" is the rest of the first call (Python checks, dispatch,
the run itself). Phases are medians; the ratio is the median of the per-round ratios of
the totals, and "worst round" the largest. `python benchmarks/compile_phases.py [--quick]`.
"""

import statistics

import jax
import optax
from _common import (
    compile_ratio,
    data,
    equinox_mlp,
    fresh_compiles,
    make_lean_step,
    mlp_weights,
    options,
    report,
    sizes_of,
)

import pccore


def row(name, arch, batch=64, T=20, dt=0.1, reps=7):
    sizes = sizes_of(arch)
    w = mlp_weights(sizes, jax.random.key(0))
    x, y = data(sizes, batch, jax.random.key(1))
    params = tuple(w)
    model = equinox_mlp(w)
    ls, ps = optax.adam(1e-3).init(params), optax.adam(1e-3).init(model.params)
    jobs = {
        "lean": lambda: make_lean_step(optax.adam(1e-3), T, dt)(params, ls, x, y),
        "pccore": lambda: pccore.train_step(model, optax.adam(1e-3), ps, x=x, y=y,
                                            t1=T * dt, dt0=dt),
    }
    runs = fresh_compiles(jobs, reps)
    out = {"name": name, "arch": arch}
    for k, rs in runs.items():
        for phase in ("trace", "lower", "xla", "other", "total"):
            out[f"{k}_{phase}"] = statistics.median(r[phase] for r in rs)
    r = compile_ratio(runs)
    out["ratio"], out["worst"] = r["ratio"], r["worst"]
    print(out, flush=True)
    return out


def configs(quick):
    rows = [("A", "784-300-300-10"), ("B", "784-128x5-10"), ("C", "784-128x19-10"),
            ("depth 50", "784-128x49-10")]
    return rows[:1] if quick else rows


COLS = [("name", "config", "{}"), ("arch", "architecture", "{}")] + [
    (f"{k}_{p}", f"{k} {p} s", "{:.2f}")
    for k in ("lean", "pccore") for p in ("trace", "lower", "xla", "other", "total")
] + [("ratio", "total ratio", "{:.2f}"), ("worst", "worst round", "{:.2f}")]


def main(argv=None):
    a = options("compile_phases", argv)
    rows = [row(n, arch, reps=1 if a.quick else 7) for n, arch in configs(a.quick)]
    return report(a.out, rows, COLS, a.quick)


if __name__ == "__main__":
    main()
