"""Bad inputs to the public API: each gets a clear error (the argument, got vs expected, the
fix) or a correct, documented result. The CLI's cases are in `test_bad_inputs_cli.py`."""

import re

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pccore

B = 8


@pytest.fixture
def mlp(getkey):
    return pccore.wrap(eqx.nn.MLP(4, 3, 8, 1, key=getkey()))


@pytest.fixture
def data(getkey):
    x = jax.random.normal(getkey(), (B, 4))
    return x, jax.nn.one_hot(jnp.arange(B) % 3, 3)


# ----------------------------------------------------------------------------- silent before
def test_parameter_free_model_is_refused():
    with pytest.raises(ValueError, match=r"`model` has no trainable parameters \(layers "
                                         r"\['0:Lambda'\]\)"):
        pccore.wrap(eqx.nn.Sequential([eqx.nn.Lambda(jnp.tanh)]), input_shape=(3,))


def test_one_hot_targets_with_more_classes_than_outputs_are_refused(mlp, data):
    x, _ = data
    y = jax.nn.one_hot(jnp.arange(B), 3)  # labels 3..7 encode to all-zero rows
    optim = optax.adam(1e-3)
    ce = pccore.PC(loss=pccore.CrossEntropy())
    msg = (r"`y`: with CrossEntropy every target row must be a distribution over the 3 outputs"
           r".*got 5 of 8 rows that are not, the first at index \(3,\).*labels have more "
           r"classes than the model's 3 outputs")
    with pytest.raises(ValueError, match=msg):
        pccore.train_step(mlp, optim, optim.init(mlp.params), x=x, y=y, energy=ce)
    with pytest.raises(ValueError, match=msg):  # host data, on every entry point
        pccore.infer(mlp, x=np.asarray(x), y=np.asarray(y), energy=ce)
    with pytest.raises(ValueError, match=r"\(sum 0\.5, min -0\.5\)"):
        pccore.evaluate(mlp, x, jnp.tile(jnp.array([[1.0, -0.5, 0.0]]), (B, 1)), energy=ce)


def test_cross_entropy_accepts_soft_targets(mlp, data):
    """Probabilities summing to 1 within float32 rounding are valid targets (label smoothing)."""
    x, y = data
    soft = optax.smooth_labels(y, 0.1)
    sol = pccore.infer(mlp, x=np.asarray(x), y=np.asarray(soft),
                       energy=pccore.PC(loss=pccore.CrossEntropy()))
    assert sol.result == pccore.RESULTS.completed


@pytest.mark.parametrize("cls", [pccore.WeightDecay, pccore.SpectralPenalty])
def test_negative_regulariser_coefficient_is_refused(cls):
    with pytest.raises(ValueError, match=rf"`{cls.__name__}`: `coef` must be finite and >= 0; "
                                         r"got -1\.0"):
        cls(-1.0)


def test_optax_solver_refuses_a_horizon_and_a_controller(mlp, data):
    x, y = data
    with pytest.raises(ValueError, match=r"`t1=5\.0`: `solver` is an optax optimiser, which has "
                                         r"no time horizon.*`max_steps=`"):
        pccore.infer(mlp, x=x, y=y, solver=optax.sgd(0.1), t1=5.0)
    pid = diffrax.PIDController(rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"`stepsize_controller=PIDController\(\.\.\.\)`: "
                                         r"`solver` is an optax optimiser"):
        pccore.infer(mlp, x=x, y=y, solver=optax.sgd(0.1), stepsize_controller=pid)
    optim = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"`t1=5\.0`: `solver` is an optax optimiser"):
        pccore.train_step(mlp, optim, optim.init(mlp.params), x=x, y=y, solver=optax.sgd(0.1),
                          t1=5.0)


def test_optimistix_solver_refuses_a_horizon(mlp, data):
    optx = pytest.importorskip("optimistix")
    x, y = data
    with pytest.raises(ValueError, match=r"`t1=3\.0`: `solver` is an optimistix minimiser"):
        pccore.infer(mlp, x=x, y=y, solver=optx.BFGS(rtol=1e-5, atol=1e-5), t1=3.0)


def test_overflowing_update_is_skipped(mlp, data):
    """Finite gradients, but a learning rate that sends the parameters to inf: the guard
    tests the new parameters, so nothing changes and `updated` is False."""
    x, _ = data
    y = 1e3 * jnp.ones((B, 3))
    optim = optax.sgd(1e38)
    new, state, stats = pccore.train_step(mlp, optim, optim.init(mlp.params), x=x, y=y)
    assert np.isfinite(float(stats.energy))  # inference was fine: the update overflowed
    assert not bool(stats.updated)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(mlp.params)):
        np.testing.assert_array_equal(a, b)
    # a sane learning rate from the same state does update
    optim = optax.sgd(1e-3)
    _, _, ok = pccore.train_step(mlp, optim, optim.init(mlp.params), x=x, y=y)
    assert bool(ok.updated)


# ------------------------------------------------------------------ library errors, named
def test_optimiser_state_mismatches_are_named(mlp, data, getkey):
    x, y = data
    adam = optax.adam(1e-3)
    with pytest.raises(TypeError, match=r"`opt_state` is None; expected the optimiser's state.*"
                                        r"`opt_state = optim\.init\(model\.params\)`"):
        pccore.train_step(mlp, adam, None, x=x, y=y)
    other_optim = optax.sgd(1e-3, momentum=0.9).init(mlp.params)
    with pytest.raises(ValueError, match=r"`opt_state` does not match its optimiser and model: "
                                         r"got a state of \(TraceState, EmptyState\) with 4 "
                                         r"leaves; expected \(ScaleByAdamState, EmptyState\)"):
        pccore.train_step(mlp, adam, other_optim, x=x, y=y)
    wider = pccore.wrap(eqx.nn.MLP(4, 3, 16, 1, key=getkey()))
    with pytest.raises(ValueError, match=r"`opt_state` does not match.*a state made for "
                                         r"another model"):
        pccore.train_step(mlp, adam, adam.init(wider.params), x=x, y=y)


def test_hybrid_optimiser_states_are_named(getkey):
    gen = pccore.wrap([eqx.nn.Linear(3, 4, key=getkey()), eqx.nn.Linear(4, 6, key=getkey())])
    amort = pccore.wrap([eqx.nn.Linear(6, 4, key=getkey()), eqx.nn.Linear(4, 3, key=getkey())])
    y, x = jnp.ones((B, 6)), jnp.ones((B, 3))
    adam = optax.adam(1e-3)
    with pytest.raises(TypeError, match=r"`amortiser_state` is None"):
        pccore.hybrid_train_step(gen, amort, adam, adam.init(gen.params), adam, None, x=x, y=y)
    with pytest.raises(ValueError, match=r"`opt_state` does not match its optimiser and model"):
        pccore.hybrid_train_step(gen, amort, adam, optax.sgd(1e-3, momentum=0.5).init(
            gen.params), adam, adam.init(amort.params), x=x, y=y)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: pccore.PC(loss="ce"), r"`PC`: `loss` must be an instance of pccore\.AbstractLoss"
                                       r"; got the string 'ce'\. Pass an object, one of: "
                                       r"pccore\.MSE\(\), pccore\.CrossEntropy\(\)"),
        (lambda: pccore.PC(loss=pccore.CrossEntropy), r"`PC`: `loss` must be an instance of "
         r"pccore\.AbstractLoss; got the class CrossEntropy itself\. Call it: "
         r"`loss=CrossEntropy\(\)`"),
        (lambda: pccore.PC(parameterisation="mupc"), r"`PC`: `parameterisation` must be an "
         r"instance of pccore\.AbstractParameterisation; got the string 'mupc'.*pccore\.MuPC\(\)"),
        (lambda: pccore.EPC(loss=pccore.MSE), r"`EPC`: `loss`.*got the class MSE itself"),
        (lambda: pccore.BPC(parameterisation=pccore.NTP), r"`BPC`: `parameterisation`.*got the "
         r"class NTP itself"),
        (lambda: pccore.GraphPC(loss="mse"), r"`GraphPC`: `loss`.*got the string 'mse'"),
        (lambda: pccore.PC(regularisers=[pccore.WeightDecay(1e-4)]), r"`PC`: `regularisers` must "
         r"be a tuple of pccore regularisers; got list"),
        (lambda: pccore.PC(regularisers=(pccore.WeightDecay,)), r"`PC`: `regularisers\[0\]` must "
         r"be an instance of pccore\.AbstractRegulariser; got the class WeightDecay itself"),
    ],
)
def test_energy_parts_are_checked_when_built(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_initialiser_and_key_are_checked(mlp, data):
    x, y = data
    with pytest.raises(TypeError, match=r"`init` must be an instance of pccore\.AbstractInit; "
                                        r"got the string 'zeros'.*pccore\.Zeros\(\)"):
        pccore.infer(mlp, x=x, y=y, init="zeros")
    with pytest.raises(TypeError, match=r"`key` must be a JAX PRNG key; got int 0\. Make one "
                                        r"with `key=jax\.random\.key\(0\)`"):
        pccore.infer(mlp, x=x, y=y, init=pccore.RandomNormal(), key=0)
    optim = optax.sgd(0.1)
    with pytest.raises(TypeError, match=r"`key` must be a JAX PRNG key; got an array of dtype "
                                        r"float32"):
        pccore.train_step(mlp, optim, optim.init(mlp.params), x=x, y=y,
                          init=pccore.RandomNormal(), key=jnp.zeros(2))
    # both key flavours are accepted, and give the same draw
    typed = pccore.infer(mlp, x=x, y=y, init=pccore.RandomNormal(), key=jax.random.key(3))
    raw = pccore.infer(mlp, x=x, y=y, init=pccore.RandomNormal(), key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(typed.activities[0], raw.activities[0])


@pytest.mark.parametrize("solver", [diffrax.EulerHeun(), diffrax.SemiImplicitEuler(),
                                    diffrax.KenCarp4()])
def test_solvers_of_several_terms_are_refused(mlp, data, solver):
    x, y = data
    name = type(solver).__name__
    with pytest.raises(TypeError, match=rf"`solver={name}\(\)` solves an equation with several "
                                        r"terms.*inference is one ODE"):
        pccore.infer(mlp, x=x, y=y, solver=solver)


def test_wrong_input_shape_names_the_layer_and_both_shapes(getkey):
    mlp = eqx.nn.MLP(4, 3, 8, 1, key=getkey())
    with pytest.raises(ValueError, match=r"layer 0 \('layers\[0\]'\) gets per-sample shape "
                                         r"\(5,\) from the model input \(`input_shape`\); it "
                                         r"expects per-sample shape \(4,\) \(its in_features\)"):
        pccore.wrap(mlp, input_shape=(5,))


def test_layers_that_do_not_fit_name_the_layer_and_both_shapes(getkey):
    layers = [eqx.nn.Linear(4, 3, key=getkey()), eqx.nn.Linear(5, 2, key=getkey())]
    with pytest.raises(ValueError, match=r"layer 1 \('1:Linear'\) gets per-sample shape \(3,\) "
                                         r"from layer 0's output; it expects per-sample shape "
                                         r"\(5,\).*Make layer 0's output size match"):
        pccore.wrap(layers)


def test_channels_last_shape_for_a_channels_first_cnn(getkey):
    cnn = eqx.nn.Sequential([eqx.nn.Conv2d(1, 2, 3, key=getkey()),
                             eqx.nn.Lambda(lambda a: a.reshape(-1)),
                             eqx.nn.Linear(2 * 6 * 6, 3, key=getkey())])
    with pytest.raises(ValueError, match=r"gets per-sample shape \(8, 8, 1\).*expects per-sample "
                                         r"shape \(1, H, W\): channels first.*pass "
                                         r"input_shape=\(1, 8, 8\)"):
        pccore.wrap(cnn, input_shape=(8, 8, 1))
    assert pccore.wrap(cnn, input_shape=(1, 8, 8)).out_shapes[-1].shape == (3,)


@pytest.mark.parametrize("model, match", [
    (eqx.nn.Sequential([]), r"`model` is an empty eqx\.nn\.Sequential; expected at least one"),
    ([], r"`model` is an empty list; expected at least one layer"),
    ((), r"`model` is an empty tuple"),
])
def test_empty_models_are_refused(model, match):
    with pytest.raises(ValueError, match=match):
        pccore.wrap(model)


def test_integer_and_complex_parameters_are_refused(getkey):
    lin = eqx.nn.Linear(4, 3, key=getkey())
    as_int = eqx.tree_at(lambda m: m.weight, lin, jnp.ones((3, 4), jnp.int32))
    with pytest.raises(TypeError, match=r"`model`: model\[0\]\.weight is an array of dtype int32;"
                                        r" expected float32 or float64 parameters"):
        pccore.wrap([as_int])
    as_complex = eqx.tree_at(lambda m: m.weight, lin, jnp.ones((3, 4), jnp.complex64))
    with pytest.raises(TypeError, match=r"`model\.params\[0\]\[0\]\.weight` has dtype complex64; "
                                        r"expected float32 or float64"):
        pccore.wrap([as_complex])


def test_horizon_as_a_zero_d_array(mlp, data):
    """A concrete 0-d array is a number; the result equals the float's. A traced one is
    refused with the reason."""
    x, y = data
    a = pccore.infer(mlp, x=x, y=y, t1=jnp.array(1.0), dt0=np.float32(0.25))
    b = pccore.infer(mlp, x=x, y=y, t1=1.0, dt0=0.25)
    assert int(a.num_steps) == int(b.num_steps) == 4
    np.testing.assert_array_equal(a.activities[0], b.activities[0])
    with pytest.raises(ValueError, match=r"`t1` must be a number; got an array of shape \(2,\)"):
        pccore.infer(mlp, x=x, y=y, t1=jnp.ones(2))

    @jax.jit
    def traced(t1):
        return pccore.infer(mlp, x=x, y=y, t1=t1).energy

    with pytest.raises(TypeError, match=r"`t1` is a traced array; it must be a concrete number"):
        traced(1.0)


def test_transfer_weights_checks_its_arguments(mlp):
    with pytest.raises(TypeError, match=r"`dst` must be a pccore\.PCModel; got str"):
        pccore.transfer_weights(mlp, "x")
    with pytest.raises(TypeError, match=r"`src` must be a pccore\.PCModel; got list"):
        pccore.transfer_weights([1], mlp)


def test_unknown_wrap_options_list_the_valid_ones(getkey):
    mlp = eqx.nn.MLP(4, 3, 8, 1, key=getkey())
    with pytest.raises(TypeError, match=r"`pccore\.wrap`: unknown option\(s\) 'foo' for the "
                                        r"'equinox' adapter; valid options: 'skips', "
                                        r"'input_shape', 'dtype'"):
        pccore.wrap(mlp, foo=1)


def test_data_parallel_mesh_refuses_a_string():
    with pytest.raises(TypeError, match=r"`devices` must be a sequence of jax\.Device or None; "
                                        r"got str 'cpu'.*jax\.devices\('cpu'\)"):
        pccore.data_parallel_mesh("cpu")
    with pytest.raises(TypeError, match=r"`devices` must hold jax\.Device objects; got int"):
        pccore.data_parallel_mesh([0])
    assert pccore.data_parallel_mesh(jax.devices()).shape == {"batch": len(jax.devices())}


_MESHES = r"""
import jax, jax.numpy as jnp, equinox as eqx, optax, pccore
mlp = pccore.wrap(eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(0)))
optim = optax.sgd(0.1)
devs = jax.devices()
mesh_a, mesh_b = pccore.data_parallel_mesh(devs[:2]), pccore.data_parallel_mesh(devs[2:])
_, model, state = pccore.data_parallel(mlp, optim.init(mlp.params), mesh_a)
x, y = pccore.shard_batch((jnp.ones((8, 4)), jnp.ones((8, 3))), mesh_b)
try:
    pccore.train_step(model, optim, state, x=x, y=y)
except ValueError as e:
    print(e)
x, y = pccore.shard_batch((jnp.ones((8, 4)), jnp.ones((8, 3))), mesh_a)
print(bool(pccore.train_step(model, optim, state, x=x, y=y)[2].updated))
"""


def test_data_and_parameters_on_different_meshes_are_named():
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _MESHES], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message, same_mesh = proc.stdout.strip().splitlines()
    assert re.fullmatch(
        r"`x` lives on devices \[\S*2, \S*3\] but the model's parameters on "
        r"\[\S*0, \S*1\]; expected the same devices \(one mesh\)\. Place both on one "
        r"mesh: .*pccore\.shard_batch\(\(x, y\), mesh\)`\.", message)
    assert same_mesh == "True"


def test_a_model_wrapped_as_one_layer_with_several_weights_warns(getkey):
    """One parameterised submodule around the others (a transformer's top module) gives one
    layer: no latent. The wrap says so, and how to place latents."""
    inner = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=getkey()), eqx.nn.Lambda(jnp.tanh),
                               eqx.nn.Linear(4, 2, key=getkey())])
    with pytest.warns(UserWarning, match=r"the model became ONE layer \('0:Sequential'\) holding "
                                         r"2 weight matrices, so predictive coding has no "
                                         r"latent.*`boundaries=`"):
        pccore.wrap([inner], input_shape=(3,))
    pccore.wrap(list(inner.layers))  # its layers: three latents' worth, no warning


def test_a_forward_that_mutates_state_is_refused_at_wrap_time():
    """An NNX model counting its calls in a Variable wrapped and evaluated, then crashed in
    the first train_step; the wrap-time trial step refuses it, naming the cause."""
    nnx = pytest.importorskip("flax.nnx")

    class Counter(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)
            self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

        def __call__(self, x):
            self.calls[...] += 1
            return self.l2(jnp.tanh(self.l1(x)))

    with pytest.raises(ValueError, match=r"`model`: a trial training step failed at wrap time "
                                         r"\(TraceContextError: Cannot mutate Variable.*Move the "
                                         r"state update out of the forward"):
        pccore.wrap(Counter(nnx.Rngs(0)))
