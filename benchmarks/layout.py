"""How much of pccore's gap to the lean step is the Equinox weight layout.

The lean reference stores each weight `(in, out)` and computes `z @ W`; an `eqx.nn.Linear`
stores `(out, in)` and computes `W @ z` per sample (`z @ W.T` for a batch), as PyTorch
does. The same hand-written step in that layout runs at a different speed, mostly on
small batches. Three candidates run in rotation in one process: the lean step, the lean
step with `(out, in)` weights, and pccore's `train_step` on the Equinox model holding those
same `(out, in)` weights. Before timing, each row checks that the three compute the same
update from the same start. `python benchmarks/layout.py [--quick]`.
"""


import equinox as eqx
import jax
import numpy as np
import optax
from _common import (
    Loop,
    data,
    equinox_mlp,
    first_leaf,
    make_lean_step,
    mlp_weights,
    options,
    report,
    rotated,
    sizes_of,
)

import pccore

T, DT = 20, 0.1


def _check_same_step(w, x, y):
    """The three candidates compute the same update from the same start (checked with SGD:
    Adam's normalisation would magnify rounding in near-zero gradients)."""
    sgd = optax.sgd(0.1)
    p_in_out, p_out_in = tuple(w), tuple((W.T, b) for W, b in w)
    a, _ = make_lean_step(sgd, T, DT)(p_in_out, sgd.init(p_in_out), x, y)
    b, _ = make_lean_step(sgd, T, DT, transposed=True)(p_out_in, sgd.init(p_out_in), x, y)
    model = equinox_mlp(w)
    m, _, _ = pccore.train_step(model, sgd, sgd.init(model.params), x=x, y=y, t1=T * DT,
                                dt0=DT)
    c = [(lin.weight, lin.bias) for lin in m.unwrap().layers
         if isinstance(lin, eqx.nn.Linear)]
    for (Wa, ba), (Wb, bb), (Wc, bc) in zip(a, b, c, strict=True):
        for u, v in ((Wa.T, Wb), (Wb, Wc), (ba, bb), (bb, bc)):
            assert np.allclose(u, v, rtol=1e-4, atol=1e-6), "the candidates disagree"


def row(name, arch, batch=64, reps=60):
    sizes = sizes_of(arch)
    w = mlp_weights(sizes, jax.random.key(0))
    x, y = data(sizes, batch, jax.random.key(1))
    optim = optax.adam(1e-3)
    p_in_out = tuple(w)
    p_out_in = tuple((W.T, b) for W, b in w)  # the arrays an eqx.nn.Linear holds
    lean = make_lean_step(optim, T, DT)
    lean_t = make_lean_step(optim, T, DT, transposed=True)
    model = equinox_mlp(w)
    _check_same_step(w, x, y)
    fns = [
        Loop(lambda p, s: lean(p, s, x, y), p_in_out, optim.init(p_in_out)),
        Loop(lambda p, s: lean_t(p, s, x, y), p_out_in, optim.init(p_out_in)),
        Loop(lambda m, s: pccore.train_step(m, optim, s, x=x, y=y, t1=T * DT, dt0=DT),
             model, optim.init(model.params)),
    ]
    syncs = [first_leaf, first_leaf, lambda out: out[2].energy.block_until_ready()]
    r = rotated(fns, reps, syncs)
    out = {
        "name": name, "arch": arch, "batch": batch,
        "lean_ms": r["ms"][0], "lean_t_ms": r["ms"][1], "pccore_ms": r["ms"][2],
        "layout_ratio": r["ratio"][1], "pccore_vs_lean": r["ratio"][2],
        "pccore_vs_lean_t": r["ratio"][2] / r["ratio"][1],
    }
    print(out, flush=True)
    return out


def configs(quick):
    rows = [
        ("A batch 16", "784-300-300-10", 16), ("A", "784-300-300-10", 64),
        ("A batch 1024", "784-300-300-10", 1024), ("B", "784-128x5-10", 64),
        ("C", "784-128x19-10", 64), ("depth 3", "784-128x2-10", 64),
        ("depth 10", "784-128x9-10", 64),
    ]
    return rows[:2] if quick else rows


COLS = [
    ("name", "config", "{}"), ("arch", "architecture", "{}"), ("batch", "batch", "{}"),
    ("lean_ms", "lean (in, out) ms", "{:.2f}"), ("lean_t_ms", "lean (out, in) ms", "{:.2f}"),
    ("pccore_ms", "pccore ms", "{:.2f}"),
    ("layout_ratio", "lean (out, in) / lean (in, out)", "{:.3f}"),
    ("pccore_vs_lean", "pccore / lean (in, out)", "{:.3f}"),
    ("pccore_vs_lean_t", "pccore / lean (out, in)", "{:.3f}"),
]


def main(argv=None):
    a = options("layout", argv)
    reps = 10 if a.quick else 60
    rows = [row(n, arch, b, reps) for n, arch, b in configs(a.quick)]
    return report(a.out, rows, COLS, a.quick)


if __name__ == "__main__":
    main()
