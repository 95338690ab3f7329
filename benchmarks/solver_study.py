"""Time and gradient evaluations to the equilibrium, per solver (issue: solver study).

For each configuration (the three standard MLPs at batch 64 on random data and on
digits-shaped data, i.e. sklearn digits upsampled to 28x28, and a network trained for a
few epochs on those digits) and each solver, run `pccore.infer` until the vector field
meets `SteadyState(rtol=0, atol=TOL)` (max-norm per sample and layer) and record the wall
time (median over runs after compilation), the number of activity-gradient evaluations
(`num_grad_evals`) and whether it got there. Euler runs at the largest step of a grid that
converges. `python benchmarks/solver_study.py [--quick]`.
"""

import argparse
import statistics
import time

import diffrax
import jax
import optax
import optimistix as optx
from _common import block, data, equinox_mlp, mlp_weights, out_path, report, sizes_of
from _digits import digits

import pccore

TOL = 1e-3
MAX = 2000
SS = pccore.SteadyState(rtol=0.0, atol=TOL)


def solvers(quick):
    # The controller's tolerance must sit well below the steady-state one: with rtol = atol
    # = 1e-3 Heun and Tsit5 hover at their stability limit on these stiff energies and the
    # vector field stalls at 0.01-0.1 (never reaching 1e-3); 1e-5 converges.
    pid = diffrax.PIDController(rtol=1e-5, atol=1e-5)
    out = [
        ("heun + PID", dict(solver=diffrax.Heun(), stepsize_controller=pid, t1=1e3, dt0=0.1,
                                  max_steps=600)),
        ("tsit5 + PID", dict(solver=diffrax.Tsit5(), stepsize_controller=pid, t1=1e3, dt0=0.1,
                                   max_steps=300)),
        ("AdaptiveEuler + PID", dict(solver=pccore.AdaptiveEuler(), stepsize_controller=pid,
                                     t1=1e3, dt0=0.1, max_steps=1200)),
        ("optax sgd+momentum 0.9", dict(solver=optax.sgd(0.1, momentum=0.9))),
        ("optax adam 0.05", dict(solver=optax.adam(0.05))),
        ("optx BFGS", dict(solver=optx.BFGS(rtol=1e-6, atol=1e-6))),
        ("optx NonlinearCG", dict(solver=optx.NonlinearCG(rtol=1e-6, atol=1e-6))),
        ("optx LBFGS", dict(solver=optx.LBFGS(rtol=1e-6, atol=1e-6))),
    ]
    if quick:
        out = [out[1], out[2], out[3], out[5], out[6], out[7]]
    return out


def feasible(arch, name):
    """(Adaptive solvers get 600/300/1200 steps, 1200-1800 gradients at most, to keep the run
    short.)
    Per-sample dense BFGS on the 20-layer net keeps 64 x 2432^2 floats (1.5 GB) and
    takes seconds per solve: left out there."""
    return not (name == "optx BFGS" and arch.startswith("784-128x19"))


def run(model, x, y, kw, reps):
    kw = {"max_steps": MAX, **kw}
    f = lambda: pccore.infer(model, x=x, y=y, steady_state=SS, throw=False, **kw)
    t = time.perf_counter()
    sol = block(f())
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        block(f())
        times.append(time.perf_counter() - t)
    return {
        "ms": 1e3 * statistics.median(times),
        "compile_s": compile_s,
        "grad_evals": int(sol.num_grad_evals),
        "steps": int(sol.num_steps),
        "converged": bool(sol.result == pccore.RESULTS.converged),
        "field": float(sol.vector_field_norm),
    }


def euler_largest_stable(model, x, y, reps, grid=(1.0, 0.5, 0.3, 0.2, 0.1)):
    for dt in grid:
        r = run(model, x, y, dict(t1=dt * MAX, dt0=dt), reps)
        if r["converged"]:
            return dt, r
    return dt, r


def trained_model(sizes, xtr, ytr, epochs):
    model = equinox_mlp(mlp_weights(sizes, jax.random.key(0)))
    optim = optax.adam(1e-3)
    state = optim.init(model.params)
    for _ in range(epochs):
        for i in range(0, len(xtr) - 63, 64):
            model, state, _ = pccore.train_step(model, optim, state, x=xtr[i:i + 64],
                                                y=ytr[i:i + 64], t1=2.0, dt0=0.1)
    return model


def configurations(quick):
    xtr, ytr, xte, yte = digits(28)
    archs = ["784-128x5-10"] if quick else ["784-300-300-10", "784-128x5-10", "784-128x19-10"]
    for arch in archs:
        sizes = sizes_of(arch)
        model = equinox_mlp(mlp_weights(sizes, jax.random.key(0)))
        yield arch, "random", model, *data(sizes, 64, jax.random.key(1))
        yield arch, "digits", model, xte[:64], yte[:64]
    sizes = sizes_of("784-128x5-10")
    model = trained_model(sizes, xtr, ytr, 1 if quick else 5)
    acc = float(pccore.evaluate(model, xte, yte).accuracy)
    yield f"784-128x5-10 trained (test acc {acc:.2f})", "digits", model, xte[:64], yte[:64]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=out_path("solver_study"))
    a = p.parse_args(argv)
    reps = 2 if a.quick else 3
    rows = []
    for arch, kind, model, x, y in configurations(a.quick):
        dt, r = euler_largest_stable(model, x, y, reps)
        base = dict(r, arch=arch, data=kind, solver=f"euler dt={dt}")
        rows.append(base)
        print(base, flush=True)
        for name, kw in solvers(a.quick):
            if not feasible(arch, name):
                continue
            r = dict(run(model, x, y, kw, reps), arch=arch, data=kind, solver=name)
            r["speedup_vs_euler"] = base["ms"] / r["ms"] if base["converged"] else None
            rows.append(r)
            print(r, flush=True)
    cols = [
        ("arch", "network", "{}"), ("data", "data", "{}"), ("solver", "solver", "{}"),
        ("converged", "reached tol", "{}"), ("steps", "steps", "{}"),
        ("grad_evals", "∇z evals", "{}"), ("ms", "wall ms", "{:.1f}"),
        ("speedup_vs_euler", "Euler time / this", "{:.2f}"), ("compile_s", "compile s", "{:.1f}"),
    ]
    return report(a.out, rows, cols, a.quick, tol=TOL)


if __name__ == "__main__":
    main()
