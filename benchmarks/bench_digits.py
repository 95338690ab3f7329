"""Time to accuracy on digits: wall time until test accuracy first reaches 95%.

Same architecture (64-128-128-10 tanh, MSE, adam 1e-3, batch 64) and the same data order
for (a) Euler with a fixed number of steps, (b) an adaptive solver stopping at the steady
state, (c) the optax path on the activities (sgd with momentum, fixed steps). Accuracy is
checked after every epoch; evaluation time and the first call (compilation) are not
counted. `python benchmarks/bench_digits.py [--quick]`.
"""

import argparse
import time

import diffrax
import jax
import optax
from _common import block, equinox_mlp, mlp_weights, out_path, table, write_json
from _digits import digits

import pccore

TARGET = 0.95


def runs(quick):
    # controller tolerance well below the steady-state one (see solver_study.py)
    pid = diffrax.PIDController(rtol=1e-4, atol=1e-4)
    out = [
        ("(a) Euler, T=20 fixed (dt 0.1)", dict(t1=2.0, dt0=0.1)),
        ("(a) Euler, T=50 fixed (dt 0.1)", dict(t1=5.0, dt0=0.1)),
        ("(b) Tsit5 + PID 1e-4, steady state 1e-2", dict(
            solver=diffrax.Tsit5(), stepsize_controller=pid, t1=100.0, dt0=0.5,
            steady_state=pccore.SteadyState(1e-2, 1e-2), max_steps=500)),
        ("(b) Euler dt 0.5, steady state 1e-2", dict(
            t1=100.0, dt0=0.5, steady_state=pccore.SteadyState(1e-2, 1e-2), max_steps=500)),
        ("(c) optax sgd 0.1 momentum 0.5, 20 steps", dict(
            solver=optax.sgd(0.1, momentum=0.5), max_steps=20)),
    ]
    return out[:1] + out[2:3] if quick else out


def train(kw, data, epochs):
    xtr, ytr, xte, yte = data
    model = equinox_mlp(mlp_weights([64, 128, 128, 10], jax.random.key(0)))
    optim = optax.adam(1e-3)
    state = optim.init(model.params)
    block(pccore.train_step(model, optim, state, x=xtr[:64], y=ytr[:64], **kw))  # compile
    wall, evals, hist = 0.0, 0, []
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        for i in range(0, len(xtr) - 63, 64):
            model, state, stats = pccore.train_step(model, optim, state, x=xtr[i:i + 64],
                                                    y=ytr[i:i + 64], **kw)
            evals += int(stats.num_grad_evals)
        block(model)
        wall += time.perf_counter() - t
        acc = float(pccore.evaluate(model, xte, yte).accuracy)
        hist.append(acc)
        if acc >= TARGET:
            return {"epochs": epoch, "wall_s": wall, "grad_evals": evals, "acc": acc,
                    "reached": True, "history": hist}
    return {"epochs": epochs, "wall_s": None, "grad_evals": evals, "acc": hist[-1],
            "reached": False, "history": hist}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=out_path("digits"))
    a = p.parse_args(argv)
    data = digits(8)
    rows = []
    for name, kw in runs(a.quick):
        r = dict(train(kw, data, 10 if a.quick else 30), run=name)
        print(r, flush=True)
        rows.append(r)
    cols = [
        ("run", "run", "{}"), ("reached", "reached 95%", "{}"), ("epochs", "epochs", "{}"),
        ("wall_s", "wall s to 95%", "{:.2f}"), ("grad_evals", "∇z evals (all steps)", "{}"),
        ("acc", "test acc", "{:.3f}"),
    ]
    md = table(rows, cols)
    print(md)
    write_json(a.out, {"rows": rows, "markdown": md, "quick": a.quick})
    return md


if __name__ == "__main__":
    main()
