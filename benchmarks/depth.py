"""Depth: residual tanh networks (width 64) on sklearn digits, muPC vs SP vs backprop.

    python benchmarks/depth.py                       # depths 32, 64, 128 (a few minutes)
    python benchmarks/depth.py --depths 128 --only muPC --t1 16 --gamma 0.05   # a sweep point
    python benchmarks/depth.py --quick               # depths 8 and 16, 150 steps (seconds)

A network of L layers: 64 -> 64 (input layer), L - 2 residual hidden layers
z_l = tanh(a_l W_l z_{l-1}) + z_{l-1}, and 64 -> 10 (output), no biases. muPC scales each
weight by its a_l (1/sqrt(D), 1/sqrt(N L) on residual layers, 1/(N gamma) at the output) with
W ~ N(0, 1); SP uses Equinox's default initialisation and a_l = 1.

Methods, all on the same Equinox network, Adam on the weights, batch 64, the same batches:

- `muPC`: predictive coding with `pccore.MuPC(gamma)` (Euler inference on the activities from
  the feed-forward initialisation, then one Adam step on the weights, `pccore.train_step`).
- `SP`: the same predictive coding with the standard parameterisation.
- `BP muP`: backprop, `jax.grad` of the softmax cross-entropy of the feed-forward prediction
  of the *same* muPC-parameterised network (the forward pass `energy.predict` that
  `pccore.evaluate` uses, so the same a_l and the same initial weights as `muPC`).
- `BP SP`: backprop on the SP network (the same initial weights as `SP`).

The reported accuracy is the feed-forward test accuracy after the last step. "train s" is
the wall time of the training loop without the first step (which compiles); "compile s" is
that first step. Defaults (chosen in a small sweep at depth 32): Euler t1 = 8, dt0 = 0.5
(16 inference steps), gamma = 0.1, Adam 1e-1 for muPC, 1e-3 for SP and for backprop. At 128
layers these leave muPC at 75%; `--gamma 0.02 --dt0 0.25` (32 inference steps over the same
horizon) reaches 92.8% in 500 steps and 93.1% in 1500 (the sweep is in
benchmarks/NOTES.md, "Depth").
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

METHODS = ("muPC", "SP", "BP muP", "BP SP")


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


def inference(args):
    """The keyword arguments of `pccore.train_step` for the inference method `args.solver`."""
    if args.solver == "euler":
        return dict(solver=diffrax.Euler(), t1=args.t1, dt0=args.dt0)
    if args.solver == "heun":  # same horizon and step, two gradients per step
        return dict(solver=diffrax.Heun(), t1=args.t1, dt0=args.dt0)
    if args.solver == "momentum":  # optax SGD + momentum 0.9 on the activities, t1/dt0 steps
        n = round(args.t1 / args.dt0)
        return dict(method=pccore.OptaxInference(optax.sgd(args.dt0, momentum=0.9)),
                    max_steps=n)
    raise ValueError(args.solver)


def init_of(args):
    return {"ff": pccore.FeedForward(), "zeros": pccore.Zeros(),
            "random": pccore.RandomNormal(0.05)}[args.init]


def make_bp_step(energy, opt, model):
    """One backprop step, `jax.jit` over the parameters and optimiser state alone (the model's
    structure is closed over, so a call passes only the weight arrays, as a lean training
    loop does)."""
    def loss(params, x, y):
        pred = energy.predict(energy.prepare(model.with_params(params)), x)
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(pred, axis=-1), axis=-1))

    @jax.jit
    def step(params, state, x, y):
        l, g = jax.value_and_grad(loss)(params, x, y)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, l

    return step


def run(name, depth, data, args):
    x_tr, x_te, y_tr, y_te = data
    mupc = "muP" in name
    key = jax.random.key(args.seed)
    model = build(depth, args.width, key, mupc)
    ce = pccore.CrossEntropy()
    param = (pccore.MuPC(gamma=args.gamma, output_precision=args.precision) if mupc
             else pccore.SP())
    energy = pccore.PC(loss=ce, parameterisation=param)
    lr = args.lr_mupc if name == "muPC" else args.lr_bp if name.startswith("BP") else args.lr_sp
    opt = optax.adam(lr)
    state = opt.init(model.params)
    steps = args.steps
    rng = np.random.default_rng(args.seed)  # the same batches for every method
    n = len(x_tr)
    if name.startswith("BP"):
        bp = make_bp_step(energy, opt, model)
    else:
        kw = dict(inference(args), init=init_of(args))
    grads = 0
    t_compile = 0.0
    t0 = time.perf_counter()
    for step in range(steps):
        i = rng.choice(n, args.batch, replace=False)
        if name.startswith("BP"):
            params, state, _ = bp(model.params, state, x_tr[i], y_tr[i])
            model = model.with_params(params)
        else:
            model, state, stats = pccore.train_step(model, opt, state, x=x_tr[i], y=y_tr[i],
                                                    energy=energy, **kw)
            grads += int(stats.num_grad_evals) if step == 0 else 0
        if step == 0:
            jax.block_until_ready(model.params)
            t_compile = time.perf_counter() - t0
            t0 = time.perf_counter()
    jax.block_until_ready(model.params)
    elapsed = time.perf_counter() - t0
    ev = pccore.evaluate(model, x_te, y_te, energy=energy)
    row = dict(depth=depth, method=name, acc=100 * float(ev.accuracy), steps=steps,
               lr=lr, train_s=elapsed, compile_s=t_compile,
               grads="1 fwd+bwd" if name.startswith("BP") else grads)
    print(f"  depth {depth:3d} {name:6s} test accuracy {row['acc']:5.1f}%  ({steps} steps, "
          f"Adam {lr:g}, {elapsed:.1f} s + {t_compile:.1f} s first step)", flush=True)
    return row


def table(rows, args):
    inf = (f"{args.solver} t1={args.t1} dt0={args.dt0}, init {args.init}, "
           f"gamma {args.gamma}, output precision {args.precision}")
    lines = [f"Inference: {inf}; batch {args.batch}, seed {args.seed}.", "",
             "| depth | method | test accuracy | steps | Adam lr | ∇z evals / step | "
             "train s | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['method']} | {r['acc']:.1f}% | {r['steps']} | "
                     f"{r['lr']:g} | {r['grads']} | {r['train_s']:.1f} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="depths 8 and 16, 150 steps")
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--only", nargs="+", default=None, choices=METHODS)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--solver", default="euler", choices=("euler", "heun", "momentum"))
    p.add_argument("--init", default="ff", choices=("ff", "zeros", "random"))
    p.add_argument("--t1", type=float, default=8.0, help="inference horizon (16 Euler steps)")
    p.add_argument("--dt0", type=float, default=0.5)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--precision", type=float, default=1.0, help="muPC output precision")
    p.add_argument("--lr-mupc", type=float, default=1e-1)
    p.add_argument("--lr-sp", type=float, default=1e-3)
    p.add_argument("--lr-bp", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.depths = args.depths or ([8, 16] if args.quick else [32, 64, 128])
    args.steps = args.steps or (150 if args.quick else 1500)
    data = load_digits(args.seed)
    print(f"width {args.width}, residual tanh, digits (chance 10%), jax {jax.__version__}, "
          f"{jax.devices()[0].platform}", flush=True)
    rows = [run(name, d, data, args) for d in args.depths for name in (args.only or METHODS)]
    md = table(rows, args)
    print(md)
    return rows


if __name__ == "__main__":
    main()
