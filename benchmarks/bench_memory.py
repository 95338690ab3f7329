"""Peak memory of a solve that saves its trajectory at a few times, against `max_steps`.

Measured from XLA itself: `jax.jit(...).lower(...).compile().memory_analysis()` gives the
sizes of the buffers the compiled program allocates (arguments, outputs and temporaries).
This is the real allocation plan on CPU (XLA allocates exactly these buffers), whereas
`tracemalloc` only sees Python objects and misses XLA's buffers. A solve that kept one
state per possible step would need `max_steps` × (size of the activities) of temporaries.
"""

import diffrax
import jax
import jax.numpy as jnp
import optax
from _common import data, equinox_mlp, mlp_weights, options, report, sizes_of

import pccore


def measure(model, x, y, solver, controller, max_steps, n_save, dt0=0.05):
    is_optax = isinstance(solver, optax.GradientTransformation)
    ts = jnp.arange(n_save) * (max_steps // n_save) if is_optax else jnp.linspace(0.0, 2.0, n_save)

    def run(model, x, y):
        return pccore.infer(
            model, x=x, y=y, solver=solver, stepsize_controller=controller,
            t1=None if is_optax else 2.0, dt0=dt0,
            max_steps=max_steps, saveat=diffrax.SaveAt(ts=ts), throw=False,
        )

    m = jax.jit(run).lower(model, x, y).compile().memory_analysis()
    return {
        "temp_MB": m.temp_size_in_bytes / 2**20,
        "output_MB": m.output_size_in_bytes / 2**20,
        "args_MB": m.argument_size_in_bytes / 2**20,
    }


def main(argv=None):
    a = options("memory", argv)
    sizes = sizes_of("784-300-300-10")
    model = equinox_mlp(mlp_weights(sizes, jax.random.key(0)))
    x, y = data(sizes, 64, jax.random.key(1))
    act_MB = 64 * (300 + 300) * 4 / 2**20
    rows = []
    cases = [
        ("tsit5 + PID", diffrax.Tsit5(), diffrax.PIDController(rtol=1e-3, atol=1e-3)),
        ("euler", diffrax.Euler(), diffrax.ConstantStepSize()),
        ("optax sgd", optax.sgd(0.05), diffrax.ConstantStepSize()),
    ]
    budgets = (1_000, 100_000) if a.quick else (1_000, 10_000, 100_000)
    for name, solver, ctrl in cases:
        for max_steps in budgets:
            for n_save in (10,) if a.quick else (10, 100):
                r = measure(model, x, y, solver, ctrl, max_steps, n_save)
                r.update(solver=name, max_steps=max_steps, n_save=n_save,
                         max_steps_copies_MB=max_steps * act_MB, activities_MB=act_MB)
                print(r, flush=True)
                rows.append(r)
    cols = [
        ("solver", "solver", "{}"), ("max_steps", "max_steps", "{}"), ("n_save", "saved times", "{}"),
        ("activities_MB", "one state MB", "{:.3f}"), ("temp_MB", "XLA temp MB", "{:.2f}"),
        ("output_MB", "output MB", "{:.2f}"),
        ("max_steps_copies_MB", "max_steps copies would be MB", "{:.0f}"),
    ]
    return report(a.out, rows, cols, a.quick)


if __name__ == "__main__":
    main()
