"""pccore's `train_step` against a hand-written lean PC step (and backprop for scale).

Every comparison is a ratio measured in one process, the two candidates alternating; the
table shows medians of the per-pair ratios. Run `python benchmarks/bench_step.py [--quick]`.
"""

import os
import statistics
import sys

import diffrax
import jax
import optax
from _common import (
    Loop,
    block,
    compile_ratio,
    data,
    equinox_mlp,
    first_leaf,
    fresh_compiles,
    make_backprop_step,
    make_lean_diffrax_step,
    make_lean_step,
    median_time,
    mlp_weights,
    options,
    paired,
    report,
    sizes_of,
)

import pccore

DT = 0.1


def row(name, arch, batch=64, T=20, solver="euler", reps=30, backprop=True):
    sizes = sizes_of(arch)
    w = mlp_weights(sizes, jax.random.key(0))
    x, y = data(sizes, batch, jax.random.key(1))
    optim = optax.adam(1e-3)
    params = tuple(w)
    ls = optim.init(params)
    model = equinox_mlp(w)
    ps = optim.init(model.params)
    kw = dict(t1=T * DT, dt0=DT)
    make_lean = lambda: make_lean_step(optim, T, DT)
    if solver != "euler":
        # The lean reference of an adaptive solver is the same step written with
        # `diffrax.diffeqsolve` directly (same solver, controller, steps).
        kw = dict(
            solver=diffrax.Heun() if solver == "heun-pid" else diffrax.Tsit5(),
            stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3),
            t1=T * DT, dt0=DT, max_steps=1000,
        )
        make_lean = lambda: make_lean_diffrax_step(
            optim, kw["solver"], kw["stepsize_controller"], kw["t1"], kw["dt0"], kw["max_steps"])
    lean = make_lean()
    # Compile time: each candidate's first call, compiled afresh (`jax.clear_caches()`, a new
    # optimiser object for pccore so its checks and plan run too) five times, alternating;
    # the ratio is the median of the per-round ratios. The first compilation in a process
    # also pays one-off start-up costs.
    jobs = {
        "lean": lambda: make_lean()(params, ls, x, y),
        "pccore": lambda: pccore.train_step(model, optax.adam(1e-3), ps, x=x, y=y, **kw),
    }
    firsts = fresh_compiles(jobs)
    lean_compile = statistics.median(r["total"] for r in firsts["lean"])
    pc_compile = statistics.median(r["total"] for r in firsts["pccore"])
    compiles = compile_ratio(firsts)
    block(lean(params, ls, x, y))
    stats = block(pccore.train_step(model, optim, ps, x=x, y=y, **kw))[2]
    lean_loop = Loop(lambda p, s: lean(p, s, x, y), params, ls)
    pc_loop = Loop(lambda m, s: pccore.train_step(m, optim, s, x=x, y=y, **kw), model, ps)
    sync_pc = lambda out: out[2].energy.block_until_ready()
    r = paired(lean_loop, pc_loop, reps, sync_a=first_leaf, sync_b=sync_pc)
    out = {
        "name": name, "arch": arch, "batch": batch, "T": T, "solver": solver,
        "lean_ms": r["a_ms"], "pccore_ms": r["b_ms"], "ratio": r["ratio"],
        "grad_evals": int(stats.num_grad_evals),
        "lean_compile_s": lean_compile, "pccore_compile_s": pc_compile,
        "compile_ratio": compiles["ratio"], "compile_worst": compiles["worst"],
    }
    if backprop:
        bp = make_backprop_step(optim)
        out["backprop_ms"] = median_time(lambda: bp(params, ls, x, y), reps)
    print(out, flush=True)
    return out


def adapter_rows(reps):
    """Every adapter in the conformance list (`tests/cases.py`) against the Equinox path,
    on configuration A, same weights and data (target: within 5%)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests import cases

    sizes = sizes_of("784-300-300-10")
    w = mlp_weights(sizes, jax.random.key(0))
    x, y = data(sizes, 64, jax.random.key(1))
    optim = optax.adam(1e-3)
    ref = equinox_mlp(w)
    ref_state = optim.init(ref.params)
    train = lambda m, s: pccore.train_step(m, optim, s, x=x, y=y, t1=2.0, dt0=DT)
    ref_step = Loop(train, ref, ref_state)
    sync = lambda out: out[2].energy.block_until_ready()
    rows = []
    for fw in cases.FRAMEWORKS:
        if fw == "equinox":
            continue
        model = cases.build_mlp(fw, w)
        state = optim.init(model.params)
        r = paired(ref_step, Loop(train, model, state), reps, sync_a=sync, sync_b=sync)
        row = {"name": f"A via {fw}", "arch": "784-300-300-10", "batch": 64, "T": 20,
               "solver": "euler", "lean_ms": r["a_ms"], "pccore_ms": r["b_ms"],
               "ratio": r["ratio"], "note": "lean column = the Equinox path"}
        print(row, flush=True)
        rows.append(row)
    return rows


def configs(quick):
    main = [
        ("A", "784-300-300-10"), ("B", "784-128x5-10"), ("C", "784-128x19-10"),
    ]
    if quick:
        rows = [dict(name=n, arch=a) for n, a in main]
        return rows[:2] + [dict(name="A heun-pid", arch=main[0][1], solver="heun-pid")]
    # The three target configurations get more pairs: the ratio's run-to-run spread on a
    # small shared machine is a few percent.
    rows = [dict(name=n, arch=a, reps=200) for n, a in main]
    rows += [dict(name=f"A batch {b}", arch=main[0][1], batch=b) for b in (16, 256, 1024)]
    rows += [dict(name=f"depth {d}", arch=f"784-128x{d - 1}-10") for d in (3, 10, 50)]
    rows += [dict(name=f"B T={T}", arch=main[1][1], T=T) for T in (5, 50, 100)]
    rows += [dict(name=f"A {s}", arch=main[0][1], solver=s) for s in ("heun-pid", "tsit5-pid")]
    return rows


COLS = [
    ("name", "config", "{}"), ("arch", "architecture", "{}"), ("batch", "batch", "{}"),
    ("T", "T", "{}"), ("solver", "solver", "{}"), ("grad_evals", "∇z evals", "{}"),
    ("lean_ms", "lean ms", "{:.2f}"), ("pccore_ms", "pccore ms", "{:.2f}"),
    ("ratio", "pccore / lean", "{:.3f}"), ("backprop_ms", "backprop ms", "{:.2f}"),
    ("lean_compile_s", "lean compile s", "{:.2f}"), ("pccore_compile_s", "pccore compile s", "{:.2f}"),
    ("compile_ratio", "compile ratio", "{:.2f}"), ("compile_worst", "worst round", "{:.2f}"),
]


def main(argv=None):
    a = options("step", argv)
    reps = 10 if a.quick else 40
    rows = [row(**{"reps": reps, **c}) for c in configs(a.quick)]
    rows += adapter_rows(reps)
    return report(a.out, rows, COLS, a.quick)


if __name__ == "__main__":
    main()
