"""Adapter overhead: each adapter's `pccore.train_step` time as a ratio to the Equinox path.

784-300-300-10 tanh MLP, batch 64, T = 20 Euler steps (t1 = 2, dt0 = 0.1), the same weights
in every framework (copied from one canonical set), SGD. All frameworks are timed in one
process, round-robin with a rotating start (so that machine drift is shared), after a
warm-up; the median of many runs is reported. Target: every adapter within 5% of Equinox.

    python benchmarks/adapters.py            # full run
    python benchmarks/adapters.py --quick    # a short run for development
"""

import argparse
import collections
import json
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pccore  # noqa: E402
from tests import cases  # noqa: E402


def _hlo_ops(model, x, y) -> dict[str, int]:
    """Opcode histogram of the optimised program for the PC gradients (params, activities)."""

    def grads(params, z):
        m = model.with_params(params)
        return jax.grad(lambda p, z: pccore.energy(m.with_params(p), z, x=x, y=y), (0, 1))(params, z)

    z = pccore.init_activities(model, x=x, y=y)
    txt = jax.jit(grads).lower(model.params, z).compile().as_text()
    ops = collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", txt))
    return dict(sorted(ops.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few runs (development)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per framework")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapters.json"))
    args = ap.parse_args(argv)
    runs = args.runs or (15 if args.quick else 300)
    warmup = 3 if args.quick else 20

    sizes, batch = [784, 300, 300, 10], 64
    weights = cases.canonical_mlp(sizes, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]))
    y = jax.nn.one_hot(jax.random.randint(jax.random.key(2), (batch,), 0, 10), 10)
    optim = optax.sgd(0.01)
    kw = dict(x=x, y=y, t1=2.0, dt0=0.1)

    setups, losses = {}, {}
    for fw in cases.FRAMEWORKS:
        model = cases.build_mlp(fw, weights, jnp.tanh)
        state = optim.init(model.params)
        setups[fw] = (model, state)

    hlo = {fw: _hlo_ops(setups[fw][0], x, y) for fw in cases.FRAMEWORKS}

    def step(fw):
        model, state = setups[fw]
        t = time.perf_counter()
        new, _, stats = pccore.train_step(model, optim, state, **kw)
        jax.block_until_ready((new.params, stats))
        return time.perf_counter() - t, stats

    for fw in cases.FRAMEWORKS:
        for _ in range(warmup):
            _, stats = step(fw)
        losses[fw] = float(stats.energy)
    times = {fw: [] for fw in cases.FRAMEWORKS}
    order = list(cases.FRAMEWORKS)
    for r in range(runs):
        k = r % len(order)
        for fw in order[k:] + order[:k]:
            times[fw].append(step(fw)[0])

    med = {fw: statistics.median(t) for fw, t in times.items()}
    base = med["equinox"]
    rows = []
    print(f"train_step, 784-300-300-10 tanh, B={batch}, 20 Euler steps, {runs} runs (median)")
    print(f"{'adapter':<12} {'median µs':>10} {'p10 µs':>9} {'p90 µs':>9} {'ratio':>7}  {'HLO = eqx':>9}"
          "  energy")
    for fw in cases.FRAMEWORKS:
        t = sorted(times[fw])
        p10, p90 = t[len(t) // 10], t[(9 * len(t)) // 10]
        ratio = med[fw] / base
        rows.append({"adapter": fw, "median_us": med[fw] * 1e6, "p10_us": p10 * 1e6,
                     "p90_us": p90 * 1e6, "ratio": ratio, "energy": losses[fw],
                     "hlo_ops": hlo[fw], "hlo_equal_to_equinox": hlo[fw] == hlo["equinox"]})
        same = "yes" if hlo[fw] == hlo["equinox"] else "NO"
        print(f"{fw:<12} {med[fw] * 1e6:>10.0f} {p10 * 1e6:>9.0f} {p90 * 1e6:>9.0f} {ratio:>7.3f}  "
              f"{same:>9}  {losses[fw]:.6f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "adapters.train_step", "sizes": sizes, "batch": batch,
                               "euler_steps": 20, "runs": runs, "target_ratio": 1.05,
                               "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
