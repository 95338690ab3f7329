"""Data parallelism: a batch sharded over 4 (forced host) devices gives the one-device result.

The multi-device check runs in a subprocess, because the number of host devices is fixed
when JAX starts (`XLA_FLAGS=--xla_force_host_platform_device_count=4`).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pccore
from tests import cases

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    import pccore
    from tests import cases

    assert len(jax.devices()) == 4, jax.devices()
    model = cases.build_mlp("equinox", cases.canonical_mlp([3, 8, 8, 2], jax.random.key(0)))
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (16, 3))
    y = jax.random.normal(ky, (16, 2))
    optim = optax.adam(1e-2)
    opt_state = optim.init(model.params)

    def run(model, opt_state, x, y):
        for _ in range(2):  # thread the state: the second step starts from a sharded result
            model, opt_state, stats = pccore.train_step(model, optim, opt_state, x=x, y=y)
        sol = pccore.infer(model, x=x, y=y)  # throw=True: the error check must not gather
        ev = pccore.evaluate(model, x, y)
        return model, opt_state, stats, sol, ev

    one = run(model, opt_state, x, y)
    mesh, model_r, opt_r = pccore.data_parallel(model, opt_state)
    xs, ys = pccore.shard_batch((x, y), mesh)
    many = run(model_r, opt_r, xs, ys)

    named = lambda a: isinstance(a.sharding, jax.sharding.NamedSharding)
    spec = lambda a: str(tuple(a.sharding.spec)) if named(a) else "single"
    ndev = lambda a: len(a.sharding.device_set)
    leaves = lambda t: [a for a in jax.tree.leaves(t) if isinstance(a, jax.Array)]
    err = lambda s, t: max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(s, t, strict=True))
    out = {
        "param_err": err(leaves(one[0].params), leaves(many[0].params)),
        "opt_err": err(leaves(one[1]), leaves(many[1])),
        "act_err": err(one[3].activities, many[3].activities),
        "loss": [float(one[4].loss), float(many[4].loss)],
        "energy": [float(one[2].energy), float(many[2].energy)],
        "input_spec": spec(xs),
        "param_specs": sorted({spec(a) for a in leaves(many[0].params)}),
        "param_ndev": sorted({ndev(a) for a in leaves(many[0].params) + leaves(many[1])}),
        "act_specs": sorted({spec(a) for a in many[3].activities}),
        "act_shard_shape": [list(a.addressable_shards[0].data.shape) for a in many[3].activities],
    }
    try:
        pccore.shard_batch((x[:6], y[:6]), mesh)
    except ValueError as e:
        out["indivisible"] = str(e)
    json.dump(out, sys.stdout)
    """
)


@pytest.mark.slow
def test_sharded_train_step_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    # Same parameters, optimiser state and activities as on one device (float32).
    assert out["param_err"] < 1e-5
    assert out["opt_err"] < 1e-5
    assert out["act_err"] < 1e-5
    np.testing.assert_allclose(*out["loss"], rtol=1e-5)
    np.testing.assert_allclose(*out["energy"], rtol=1e-5)
    # The placement is kept: data and activities sharded on the batch axis, state replicated.
    assert out["input_spec"] == "('batch',)"
    assert out["act_specs"] == ["('batch',)"]
    assert out["act_shard_shape"] == [[4, 8], [4, 8]]  # 16 samples / 4 devices
    assert out["param_specs"] == ["()"]
    assert out["param_ndev"] == [4]
    assert re.fullmatch(
        r"`batch`: \[0\] has shape \(6, 3\); expected a non-empty batch axis 0 whose size is a "
        r"multiple of the 4 local devices of the mesh\. Use a batch size divisible by 4, or drop "
        r"the last incomplete batch\.",
        out["indivisible"],
    )


def test_single_device_mesh_is_a_no_op(getkey):
    """On one device the helpers place the data and nothing changes (the default mesh)."""
    mesh = pccore.data_parallel_mesh()
    assert mesh.axis_names == ("batch",) and mesh.size == len(jax.devices())
    model = cases.build_mlp("equinox", cases.canonical_mlp([3, 4, 2], getkey()))
    x, y = jax.random.normal(getkey(), (4, 3)), jax.random.normal(getkey(), (4, 2))
    _, model_r, _ = pccore.data_parallel(model, None, mesh)
    xs, ys = pccore.shard_batch((x, y), mesh)
    assert xs.sharding.spec == jax.sharding.PartitionSpec("batch")
    e1, e2 = pccore.evaluate(model, x, y), pccore.evaluate(model_r, xs, ys)
    assert float(e1.loss) == float(e2.loss)
    assert type(model_r) is pccore.PCModel


def test_sharding_errors():
    with pytest.raises(ValueError, match=r"`batch`: the array has shape \(\); expected a non-empty"):
        pccore.shard_batch(jnp.zeros(()))
    with pytest.raises(ValueError, match=r"`batch`: \['x'\] has shape \(0, 3\)"):
        pccore.shard_batch({"x": np.zeros((0, 3))})
    with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh with an axis named 'batch'"):
        pccore.shard_batch(jnp.zeros((2,)), mesh="cpu")
    with pytest.raises(ValueError, match=r"`devices` is empty"):
        pccore.data_parallel_mesh([])


_TRAIN_MODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, optax
    import pccore
    from tests.test_train_mode import _equinox, _data

    assert len(jax.devices()) == 4, jax.devices()
    _, _, model = _equinox(0.5)  # train-mode BatchNorm and Dropout
    x, y = _data()
    optim = optax.adam(1e-2)

    def run(model, opt_state, x, y):
        for i in range(2):
            model, opt_state, stats = pccore.train_step(model, optim, opt_state, x=x, y=y,
                                                        key=jax.random.key(i))
        return model, stats

    one = run(model, optim.init(model.params), x, y)
    mesh, model_r, opt_r = pccore.data_parallel(model, optim.init(model.params))
    xs, ys = pccore.shard_batch((x, y), mesh)
    many = run(model_r, opt_r, xs, ys)
    err = lambda s, t: max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(s, t, strict=True))
    json.dump({
        "param_err": err(jax.tree.leaves(one[0].params), jax.tree.leaves(many[0].params)),
        "state_err": err(jax.tree.leaves(one[0].layers), jax.tree.leaves(many[0].layers)),
        "energy": [float(one[1].energy), float(many[1].energy)],
        "moved": err(jax.tree.leaves(one[0].layers), jax.tree.leaves(model.layers)),
    }, sys.stdout)
    """
)


@pytest.mark.slow
def test_training_mode_batchnorm_and_dropout_shard_like_one_device():
    """Batch statistics over the whole sharded batch, the same masks, the same running
    averages: 4 devices give the one-device step (float64)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _TRAIN_MODE_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["param_err"] < 1e-10 and out["state_err"] < 1e-10, out
    np.testing.assert_allclose(*out["energy"], rtol=1e-10)
    assert out["moved"] > 1e-3  # the running averages did change
