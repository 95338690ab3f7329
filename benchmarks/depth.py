"""Depth: a 32-layer residual tanh network (width 64) on sklearn digits, muPC vs SP.

    python benchmarks/depth.py            # full run
    python benchmarks/depth.py --quick    # a short run for development

The network has L = 32 layers: 64 -> 64 (input layer), 30 residual hidden layers
z_l = tanh(a_l W_l z_{l-1}) + z_{l-1}, and 64 -> 10 (output). muPC scales each weight by its
a_l (1/sqrt(D), 1/sqrt(N L) on residual layers, 1/(N gamma) at the output) with W ~ N(0, 1);
SP uses Equinox's default initialisation and a_l = 1. Both train with predictive coding
(Euler inference on the activities, Adam on the weights) through `pccore.train_step`, with a
softmax cross-entropy output; the reported accuracy is the feed-forward test accuracy.

Defaults (chosen in a small sweep of the quick mode): Euler t1 = 8, dt0 = 0.5 (16 inference
steps; longer inference trained worse at this depth), gamma = 0.1, Adam 1e-1 for muPC and
1e-3 for SP (try `--lr-sp 1e-2`).
"""

import argparse
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pccore


def load_digits(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[d.target]
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=d.target)


def build(depth, width, key, mupc):
    keys = jax.random.split(key, depth)
    sizes = [64] + [width] * (depth - 1) + [10]
    layers = []
    for i, k in enumerate(keys):
        lin = eqx.nn.Linear(sizes[i], sizes[i + 1], use_bias=False, key=k)
        if mupc:  # muPC: W ~ N(0, 1), drawn from a key of its own
            w = jax.random.normal(jax.random.fold_in(k, 1), lin.weight.shape)
            lin = eqx.tree_at(lambda m: m.weight, lin, w)
        layers.append(lin)
        if i < depth - 1:
            layers.append(eqx.nn.Lambda(jnp.tanh))
    return pccore.wrap(eqx.nn.Sequential(layers), skips=True)


def run(name, energy, model, data, args):
    x_tr, x_te, y_tr, y_te = data
    opt = optax.adam(args.lr_mupc if name == "muPC" else args.lr_sp)
    state = opt.init(model.params)
    rng = np.random.default_rng(args.seed)
    solver = dict(solver=diffrax.Euler(), t1=args.t1, dt0=args.dt0)
    t0 = time.perf_counter()
    n = len(x_tr)
    for step in range(args.steps):
        i = rng.choice(n, args.batch, replace=False)
        model, state, stats = pccore.train_step(model, opt, state, x=x_tr[i], y=y_tr[i],
                                                energy=energy, **solver)
        if step == 0:
            jax.block_until_ready(model.params)
            t_compile = time.perf_counter() - t0
    jax.block_until_ready(model.params)
    elapsed = time.perf_counter() - t0
    ev = pccore.evaluate(model, x_te, y_te, energy=energy)
    print(f"{name:5s} test accuracy {100 * float(ev.accuracy):5.1f}%  "
          f"(final train energy {float(stats.energy):.4f}, {args.steps} steps, "
          f"{elapsed:.1f} s incl. {t_compile:.1f} s first step)", flush=True)
    return float(ev.accuracy)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run (300 steps)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--t1", type=float, default=8.0, help="inference horizon (16 Euler steps)")
    p.add_argument("--dt0", type=float, default=0.5)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--lr-mupc", type=float, default=1e-1)
    p.add_argument("--lr-sp", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.steps = args.steps or (300 if args.quick else 1500)
    data = load_digits(args.seed)
    key = jax.random.key(args.seed)
    print(f"depth {args.depth}, width {args.width}, residual tanh, digits; "
          f"Euler t1={args.t1} dt0={args.dt0}, batch {args.batch}, chance 10%")
    ce = pccore.CrossEntropy()
    mu = run("muPC", pccore.PC(loss=ce, parameterisation=pccore.MuPC(gamma=args.gamma)),
             build(args.depth, args.width, key, True), data, args)
    sp = run("SP", pccore.PC(loss=ce), build(args.depth, args.width, key, False), data, args)
    return mu, sp


if __name__ == "__main__":
    main()
