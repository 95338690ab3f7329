"""Time to accuracy on deep residual nets: wall time and gradients until a target test accuracy.

    python benchmarks/time_to_accuracy.py            # 20- and 64-layer nets, target 90%
    python benchmarks/time_to_accuracy.py --quick    # 8-layer net, target 80%, short budget

The networks are those of `depth.py`: residual tanh MLPs of width 64 on sklearn digits
(64 -> 64, L - 2 residual 64 -> 64 layers, 64 -> 10, no biases), softmax cross-entropy,
Adam on the weights, batch 64, the same data split, batches and initial weights for every
method of one parameterisation. Methods:

- `PC Euler`: standard PC (SP), Euler gradient flow on the activities, fixed step count.
- `PC momentum`: standard PC (SP), optax SGD with momentum 0.9 on the activities
  (`pccore.OptaxInference`), the fastest inference method of the solver study
  (`solver_study.py`: 2.1-3.2x Euler's wall time to equilibrium on its 20-layer net).
- `ePC`: error-reparameterised PC (`pccore.EPC`, SP), Euler on the errors.
- `muPC`: PC with `pccore.MuPC` (W ~ N(0, 1)), Euler, as in `depth.py`.
- `backprop`: `jax.grad` of the cross-entropy of the feed-forward SP network (the forward
  pass `pccore.evaluate` uses), the same initial weights as the SP rows.

Each run is repeated `--reps` times (same seed, so the same steps; the methods alternate
within each round, so that load from elsewhere hits them alike) and the table gives the
median wall time (a run that misses the target is not repeated). Test accuracy
(feed-forward, 360 held-out digits) is evaluated every `--every` steps; the clock stops at
the first evaluation at or above the target. Timing excludes compilation (each method runs
one warm-up training step and one evaluation on a throwaway copy first) and evaluation
(the clock is paused while evaluating); every step is timed on its own
(`jax.block_until_ready` after each).

The summed wall time moves by 2x from run to run on a loaded machine, so the table also
gives a paired step-time ratio: the methods and backprop take one step each, in a random
order, `--rounds` times on the same batch, and the median of (method step) / (backprop
step), multiplied by the ratio of training steps to the target, estimates the time ratio
with far less sensitivity to load from elsewhere.

Gradient evaluations:
for PC methods the activity-gradient evaluations of inference (`TrainStats.num_grad_evals`,
summed over steps) plus one parameter gradient per step; for backprop one forward+backward
per step. One activity gradient of a chain energy costs about one forward and one backward
pass through the network, so the counts are comparable in kind.
"""

import argparse
import statistics
import time

import diffrax
import jax
import numpy as np
import optax
from depth import build, load_digits, make_bp_step

import pccore


def methods():
    """(name, parameterisation is muPC, energy, Adam lr, train_step keywords).

    Chosen in small sweeps on the 20-layer net (training steps to 90%; see RESULTS.md): for PC,
    1-8 inference steps of 0.1-0.5 with Adam 1e-3 to 1e-2; the fewest gradients and the
    least time came from 2 steps of 0.3 with Adam 1e-2. Backprop: Adam 3e-3 (1e-3 and 1e-2
    took more steps). ePC: one Euler step of 0.005 (larger or more steps make ePC train
    worse on this net: its energy is far stiffer in the errors than PC's in the activities)."""
    ce = pccore.CrossEntropy()
    pc, epc = pccore.PC(loss=ce), pccore.EPC(loss=ce)
    mupc = pccore.PC(loss=ce, parameterisation=pccore.MuPC(gamma=0.1))
    return [
        ("PC Euler (2 steps, dt 0.3)", False, pc, 1e-2,
         dict(solver=diffrax.Euler(), t1=0.6, dt0=0.3)),
        ("PC momentum (2 steps, sgd 0.3, m 0.9)", False, pc, 1e-2,
         dict(method=pccore.OptaxInference(optax.sgd(0.3, momentum=0.9)), max_steps=2)),
        ("PC momentum (4 steps, sgd 0.2, m 0.9)", False, pc, 3e-3,
         dict(method=pccore.OptaxInference(optax.sgd(0.2, momentum=0.9)), max_steps=4)),
        ("ePC (1 Euler step, dt 0.005)", False, epc, 3e-3,
         dict(solver=diffrax.Euler(), t1=0.005, dt0=0.005)),
        ("muPC (16 Euler steps, dt 0.5)", True, mupc, 1e-1,
         dict(solver=diffrax.Euler(), t1=8.0, dt0=0.5)),
        ("backprop", False, pc, 3e-3, None),
    ]


def make_step(model, energy, lr, kw):
    """(step, initial optimiser state); `step(model, state, x, y)` returns the new model and
    state and the number of activity-gradient evaluations (0 for backprop)."""
    opt = optax.adam(lr)
    if kw is None:
        f = make_bp_step(energy, opt, model)

        def step(m, s, x, y):
            params, s, _ = f(m.params, s, x, y)
            return m.with_params(params), s, 0
    else:
        def step(m, s, x, y):
            m, s, stats = pccore.train_step(m, opt, s, x=x, y=y, energy=energy, **kw)
            return m, s, stats.num_grad_evals
    return step, opt.init(model.params)


def step_ratios(depth, chosen, data, args, rounds):
    """Median over `rounds` of (one training step of a method) / (one backprop step), the
    methods taking turns in a random order within a round, on the same batch: cost per
    step relative to backprop, robust to load that drifts over seconds."""
    x, y = data[0][:args.batch], data[2][:args.batch]
    live = {}
    for name, mupc, energy, lr, kw in chosen:
        model = build(depth, 64, jax.random.key(args.seed), mupc)
        step, state = make_step(model, energy, lr, kw)
        model, state, _ = step(model, state, x, y)  # compile
        jax.block_until_ready(model.params)
        live[name] = [step, model, state, []]
    order = np.random.default_rng(1)
    for _ in range(rounds):
        for j in order.permutation(len(live)):  # a fresh order each round: no position bias
            v = list(live.values())[j]
            t0 = time.perf_counter()
            v[1], v[2], _ = v[0](v[1], v[2], x, y)
            jax.block_until_ready(v[1].params)
            v[3].append(time.perf_counter() - t0)
    bp = live["backprop"][3]
    return {n: statistics.median(t / b for t, b in zip(v[3], bp, strict=True))
            for n, v in live.items()}


def time_to_target(name, model, energy, lr, kw, data, args):
    x_tr, x_te, y_tr, y_te = data
    step, state = make_step(model, energy, lr, kw)
    acc = lambda m: float(pccore.evaluate(m, x_te, y_te, energy=energy).accuracy)
    # warm-up: compile the step and the evaluation on a throwaway copy
    jax.block_until_ready(step(model, state, x_tr[:args.batch], y_tr[:args.batch])[0].params)
    acc(model)
    rng = np.random.default_rng(args.seed)  # the same batches for every method
    n = len(x_tr)
    times, counts, best = [], [], 0.0
    hit = None
    for k in range(1, args.max_steps + 1):
        i = rng.choice(n, args.batch, replace=False)
        t0 = time.perf_counter()
        model, state, g = step(model, state, x_tr[i], y_tr[i])
        jax.block_until_ready(model.params)
        times.append(time.perf_counter() - t0)
        counts.append(g)
        if k % args.every == 0:
            a = acc(model)
            best = max(best, a)
            if a >= args.target:
                hit = k
                break
    zgrads = int(sum(int(c) for c in counts))
    steps = hit or args.max_steps
    grads = steps + zgrads  # one parameter gradient (or fwd+bwd) per step
    wall = sum(times)
    row = dict(name=name, reached=hit is not None, steps=steps, wall=wall, grads=grads,
               zgrads=zgrads, best=100 * best, final=100 * a, step_ms=1e3 * np.median(times))
    print(f"  {name:40s} {'reached' if hit else 'MISSED '} {100 * args.target:.0f}% "
          f"after {steps} steps, {wall:.2f} s, {grads} gradients (best {100 * best:.1f}%)",
          flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8-layer net, target 80%%, 300 steps")
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--every", type=int, default=5, help="evaluate every this many steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=None,
                   help="repeat each run (same seed, same steps) and report the median wall time "
                        "(default 5, quick 1)")
    p.add_argument("--only", nargs="+", default=None, help="method name prefixes")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of the paired step-time comparison (default 100, quick 20)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.rounds = args.rounds or (20 if args.quick else 100)
    args.depths = args.depths or ([8] if args.quick else [20, 64])
    args.target = args.target or (0.8 if args.quick else 0.9)
    args.max_steps = args.max_steps or (300 if args.quick else 2000)
    args.reps = args.reps or (1 if args.quick else 5)
    data = load_digits(args.seed)
    print(f"digits, target {100 * args.target:.0f}% test accuracy, evaluated every "
          f"{args.every} steps, at most {args.max_steps} steps; jax {jax.__version__}", flush=True)
    out = []
    for depth in args.depths:
        print(f"depth {depth}:", flush=True)
        chosen = [m for m in methods()
                  if not args.only or any(m[0].startswith(o) for o in args.only)]
        runs = {}  # name -> repeats; the methods alternate within each round to share drift
        for rnd in range(args.reps):
            for name, mupc, energy, lr, kw in chosen:
                if rnd and not runs[name][0]["reached"]:
                    continue  # a run that misses the target is not repeated
                model = build(depth, 64, jax.random.key(args.seed), mupc)
                runs.setdefault(name, []).append(
                    time_to_target(name, model, energy, lr, kw, data, args))
        rows = []
        for name, reps in runs.items():
            row = dict(reps[0], wall=statistics.median(r["wall"] for r in reps),
                       step_ms=statistics.median(r["step_ms"] for r in reps))
            row["walls"] = [r["wall"] for r in reps]
            row["est"] = row["steps"] * row["step_ms"] / 1e3
            rows.append(row)
        bp = next((r for r in rows if r["name"] == "backprop" and r["reached"]), None)
        ratios = step_ratios(depth, chosen, data, args, args.rounds) if bp else {}
        lines = [f"Depth {depth}, target {100 * args.target:.0f}%:", "",
                 f"| method | reached | training steps | gradients (∇z + per-step) | wall s "
                 f"(median of {args.reps}) | range s | wall / backprop | step time / backprop "
                 f"(paired) | steps × step time / backprop | best acc |",
                 "|" + " --- |" * 10]
        for r in rows:
            ok = bp and r["reached"]
            ratio = f"{r['wall'] / bp['wall']:.1f}×" if ok else "–"
            q = ratios.get(r["name"])
            paired = f"{q:.2f}×" if q else "–"
            est = f"{q * r['steps'] / bp['steps']:.1f}×" if ok and q else "–"
            lines.append(f"| {r['name']} | {'yes' if r['reached'] else 'no'} | {r['steps']} | "
                         f"{r['grads']} | {r['wall']:.2f} | "
                         f"{min(r['walls']):.2f}–{max(r['walls']):.2f} | {ratio} | {paired} | "
                         f"{est} | {r['best']:.1f}% |")
        print("\n".join(lines) + "\n", flush=True)
        out.append((depth, rows))
    return out


if __name__ == "__main__":
    main()
