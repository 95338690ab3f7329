"""Shared pieces of the benchmarks: models, the lean reference step, timing helpers.

The lean reference is the physical limit of a predictive coding training step on a given
machine: one `jax.jit` holding the feed-forward initialisation, T Euler steps of
`jax.grad(F)` in one `lax.fori_loop`, one parameter gradient and one optax update. Nothing
else. It is written here in plain JAX, independently of pccore.
"""

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import optax

import pccore

# ----------------------------------------------------------------------------- models


def mlp_weights(sizes, key, dtype=jnp.float32):
    """Per layer `(W (in, out), b (out,))`, scaled 1/sqrt(fan-in)."""
    out = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        kw, kb = jax.random.split(k)
        W = jax.random.normal(kw, (n_in, n_out), dtype) / np.sqrt(n_in)
        b = 0.1 * jax.random.normal(kb, (n_out,), dtype)
        out.append((W, b))
    return out


def equinox_mlp(weights, act=jnp.tanh) -> pccore.PCModel:
    """The same MLP as an `eqx.nn.Sequential` of Linear/Lambda layers, wrapped by pccore."""
    layers = []
    for i, (W, b) in enumerate(weights):
        lin = eqx.nn.Linear(W.shape[0], W.shape[1], key=jax.random.key(0))
        lin = eqx.tree_at(lambda m: (m.weight, m.bias), lin, (W.T, b))
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(eqx.nn.Lambda(act))
    return pccore.wrap(eqx.nn.Sequential(layers))


def sizes_of(name: str):
    """`"784-300-300-10"` or `"784-128x5-10"` -> list of widths."""
    out = []
    for part in name.split("-"):
        if "x" in part:
            w, k = part.split("x")
            out += [int(w)] * int(k)
        else:
            out.append(int(part))
    return out


def data(sizes, batch, key, dtype=jnp.float32):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch, sizes[0]), dtype)
    y = jax.nn.one_hot(jax.random.randint(ky, (batch,), 0, sizes[-1]), sizes[-1], dtype=dtype)
    return x, y


# ------------------------------------------------------------------ the lean reference


def _layer(p, z, last, act, transposed=False):
    W, b = p
    h = z @ (W.T if transposed else W) + b
    return h if last else act(h)


def lean_energy(z, params, x, y, act=jnp.tanh, transposed=False):
    """Sum over the batch of sum_l 1/2 ||z_l - f_l(z_{l-1})||^2 + 1/2 ||y - f_L(z_{L-1})||^2.

    Weights are `(in, out)`, or `(out, in)` (Equinox's and PyTorch's layout) if `transposed`.
    """
    chain = (x, *z)
    L = len(params)
    e = 0.0
    for l in range(1, L):
        pred = _layer(params[l - 1], chain[l - 1], False, act, transposed)
        e = e + 0.5 * jnp.sum(jnp.square(chain[l] - pred))
    return e + 0.5 * jnp.sum(jnp.square(y - _layer(params[L - 1], chain[L - 1], True, act,
                                                      transposed)))


def _lean_pc_step(optim, relax, act, transposed=False):
    """Feed-forward init, `relax(z, grad_z)` (the inference), one parameter gradient, one
    optax update, in one `jax.jit`."""
    energy = lambda z, p, x, y: lean_energy(z, p, x, y, act, transposed)

    @jax.jit
    def step(params, opt_state, x, y):
        z, h = [], x
        for l in range(len(params) - 1):
            h = _layer(params[l], h, False, act, transposed)
            z.append(h)
        z = relax(tuple(z), lambda z: jax.grad(energy)(z, params, x, y))
        B = x.shape[0]
        grads = jax.grad(lambda p: energy(z, p, x, y) / B)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def make_lean_step(optim, T: int, dt: float, act=jnp.tanh, transposed=False):
    """The hand-written PC step: (params, opt_state, x, y) -> (params, opt_state), with T
    Euler steps in one `lax.fori_loop`. `transposed`: weights stored `(out, in)`."""

    def relax(z, grad_z):
        body = lambda _, z: jax.tree_util.tree_map(lambda a, b: a - dt * b, z, grad_z(z))
        return jax.lax.fori_loop(0, T, body, z)

    return _lean_pc_step(optim, relax, act, transposed)


def make_lean_diffrax_step(optim, solver, controller, t1: float, dt0: float, max_steps: int,
                           act=jnp.tanh):
    """The hand-written PC step for an adaptive solver: what a user writes with diffrax
    directly (`diffeqsolve` of dz/dt = -grad F from the feed-forward pass to `t1`, the
    final state only), then one parameter gradient and an optax update."""
    import diffrax

    def relax(z, grad_z):
        vf = lambda t, z, args: jax.tree_util.tree_map(jnp.negative, grad_z(z))
        sol = diffrax.diffeqsolve(diffrax.ODETerm(vf), solver, 0.0, t1, dt0, z,
                                  stepsize_controller=controller, max_steps=max_steps,
                                  saveat=diffrax.SaveAt(t1=True))
        return jax.tree_util.tree_map(lambda a: a[-1], sol.ys)

    return _lean_pc_step(optim, relax, act)


def make_backprop_step(optim, act=jnp.tanh):
    """Ordinary training of the same network (forward, MSE, gradient, optax update)."""

    def loss(params, x, y):
        h = x
        for l, p in enumerate(params):
            h = _layer(p, h, l == len(params) - 1, act)
        return 0.5 * jnp.sum(jnp.square(y - h)) / x.shape[0]

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


# ------------------------------------------------------------------------- timing


def block(tree):
    return jax.block_until_ready(tree)


def time_once(fn, sync=block):
    t = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t


def first_leaf(tree):
    """Wait for one output array: an XLA executable finishes all its outputs together, so
    this waits for the whole call without flattening a large output tree in the timing."""
    while isinstance(tree, tuple | list):
        tree = tree[0]
    return tree.block_until_ready()


class Loop:
    """A training loop's calls: each call passes back what the previous one returned
    (`step(*state) -> (*state, ...)`), as real training does, so the timed calls see the
    same objects a user's loop hands over (pccore reuses what it returned)."""

    def __init__(self, step, *state):
        self.step, self.state = step, state

    def __call__(self):
        out = self.step(*self.state)
        self.state = tuple(out[: len(self.state)])
        return out


def paired(fa, fb, reps: int, warmup: int = 3, sync_a=block, sync_b=block):
    """Time `fa` and `fb` alternately (ABBA order); returns medians and the median ratio b/a."""
    r = rotated([fa, fb], reps, [sync_a, sync_b], warmup)
    return {"a_ms": r["ms"][0], "b_ms": r["ms"][1], "ratio": r["ratio"][1], "reps": reps}


def rotated(fns, reps: int, syncs, warmup: int = 3):
    """Time several candidates in rotation (each round starts one later); returns each
    one's median ms and the median per-round ratio of each to the first."""
    k = len(fns)
    for _ in range(warmup):
        for f in fns:
            block(f())
    times = [[] for _ in fns]
    for i in range(reps):
        for j in [(i + r) % k for r in range(k)]:
            times[j].append(time_once(fns[j], syncs[j]))
    return {
        "ms": [1e3 * statistics.median(t) for t in times],
        "ratio": [statistics.median(b / a for a, b in zip(times[0], t)) for t in times],
        "reps": reps,
    }


# JAX's own compile events: the phases of a first call.
PHASES = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "xla",
}
_seen: collections.Counter = collections.Counter()
_listening: list = []


def _listen(event, duration, **_):
    if event in PHASES:
        _seen[PHASES[event]] += duration


def first_call(call) -> dict:
    """Seconds of a first call compiled afresh (`jax.clear_caches()`): `total`, and its
    `trace`, `lower` and `xla` phases from `jax.monitoring`; `other` is the rest (Python
    checks, dispatch, the run itself)."""
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_listen)
        _listening.append(True)
    jax.clear_caches()
    _seen.clear()
    t = time.perf_counter()
    block(call())
    total = time.perf_counter() - t
    out = {k: _seen[k] for k in PHASES.values()}
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out


def fresh_compiles(jobs: dict, reps: int = 5) -> dict:
    """`first_call` of each job `reps` times, the order alternating between rounds (the
    first compilation in a process also pays one-off start-up costs)."""
    names = list(jobs)
    out = {k: [] for k in names}
    for i in range(reps):
        for k in (names if i % 2 == 0 else names[::-1]):
            out[k].append(first_call(jobs[k]))
    return out


def compile_ratio(runs: dict, a: str = "lean", b: str = "pccore") -> dict:
    """The first-call ratio `b / a` of `fresh_compiles` rounds, as every other comparison
    here: the median of the per-round ratios (each round compiles both, back to back), so a
    round in which the machine was slow for both cancels. Also the largest round's ratio."""
    pairs = [rb["total"] / ra["total"] for ra, rb in zip(runs[a], runs[b])]
    return {"ratio": statistics.median(pairs), "worst": max(pairs), "pairs": pairs}


def median_time(fn, reps: int, warmup: int = 3):
    for _ in range(warmup):
        block(fn())
    return 1e3 * statistics.median(time_once(fn) for _ in range(reps))


# -------------------------------------------------------------------------- output


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write_json(path, payload):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine(), **payload}, f, indent=1)


def report(path, rows, cols, quick: bool, **extra) -> str:
    """Print the markdown table of `rows`, save it with the rows as JSON; returns the table."""
    md = table(rows, cols)
    print(md)
    write_json(path, {"rows": rows, "markdown": md, "quick": quick, **extra})
    return md


def table(rows, cols) -> str:
    """A markdown table of `rows` (dicts) with `cols` as (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = [
        "| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "–" for k, _, fmt in cols)
        + " |"
        for r in rows
    ]
    return "\n".join([head, sep, *body])


def options(name: str, argv=None):
    """The shared command line of a run_all benchmark: `--quick` and `--out` (JSON path,
    `benchmarks/results/<name>.json` by default)."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=out_path(name))
    return p.parse_args(argv)


def out_path(name: str) -> str:
    """`benchmarks/results/<name>.json`, wherever the script is run from."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
