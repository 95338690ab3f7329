"""The adapter registry: registration through the public API, entry points, lazy imports."""

import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pccore.adapters as adapters
import pytest

import pccore
from tests import cases, toy_adapter


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(adapters, "_REGISTRY", dict(adapters._REGISTRY))
    monkeypatch.setattr(adapters, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(adapters, "entry_points", lambda group: [])


def _pairs(weights):
    fns = [toy_adapter.dense_tanh] * (len(weights) - 1) + [toy_adapter.dense]
    return toy_adapter.Pairs((f, {"W": W, "b": b}) for f, (W, b) in zip(fns, weights))


def _train(model, x, y, steps=3):
    optim = optax.sgd(0.1)
    state = optim.init(model.params)
    for _ in range(steps):
        model, state, stats = pccore.train_step(model, optim, state, x=x, y=y, t1=1.0, dt0=0.1)
    return model, stats


def test_toy_adapter_registered_through_public_api_trains_like_equinox(clean_registry):
    adapters.register("toy.pairs", toy_adapter.PairsAdapter())
    assert "toy.pairs" in adapters.registered()
    w = cases.canonical_mlp([4, 6, 3], jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    y = jax.random.normal(jax.random.key(2), (5, 3))
    toy, stats = _train(pccore.wrap(_pairs(w)), x, y)
    ref, ref_stats = _train(cases.build_mlp("equinox", w), x, y)  # the oracle: the Equinox path
    assert toy.framework == "toy.pairs"
    np.testing.assert_allclose(stats.energy, ref_stats.energy, rtol=1e-5)
    back = pccore.transfer_weights(toy, ref)
    for a, b in zip(jax.tree_util.tree_leaves(back.params), jax.tree_util.tree_leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    native = toy.unwrap()
    assert isinstance(native, toy_adapter.Pairs)
    assert pccore.MuPC().scalings(toy) == pccore.MuPC().scalings(ref)


def test_register_by_path_and_errors(clean_registry):
    adapters.register("toy.pairs", "tests.toy_adapter:PairsAdapter", framework_module="tests.toy_adapter",
                      priority=5)
    w = cases.canonical_mlp([4, 3], jax.random.key(0))
    assert pccore.wrap(_pairs(w)).framework == "toy.pairs"
    with pytest.raises(ValueError, match="already registered; pass `override=True`"):
        adapters.register("toy.pairs", toy_adapter.PairsAdapter())
    with pytest.raises(ValueError, match="'module:attribute' path"):
        adapters.register("bad", "no_colon", framework_module="x")
    with pytest.raises(TypeError, match="no predictive-coding adapter for an object of type builtins.object"):
        pccore.wrap(object())
    adapters.unregister("toy.pairs")
    with pytest.raises(KeyError, match="no adapter named 'toy.pairs'"):
        adapters.unregister("toy.pairs")


def test_entry_point_adapter_is_found(clean_registry, monkeypatch):
    ep = EntryPoint(name="tests", value="tests.toy_adapter:PairsAdapter", group="pccore.adapters")
    monkeypatch.setattr(adapters, "entry_points", lambda group: [ep] if group == "pccore.adapters" else [])
    assert "tests" in adapters.registered()
    w = cases.canonical_mlp([4, 3], jax.random.key(0))
    model = pccore.wrap(_pairs(w))
    assert model.framework == "toy.pairs"
    np.testing.assert_allclose(model(jnp.ones((2, 4))), jnp.ones((2, 4)) @ w[0][0] + w[0][1], rtol=1e-6)


def test_lazy_imports_and_missing_framework_in_a_fresh_interpreter():
    code = textwrap.dedent("""
        import sys
        import jax, jax.numpy as jnp, equinox as eqx, optax
        import pccore
        seq = eqx.nn.Sequential([eqx.nn.Linear(4, 3, key=jax.random.key(0))])
        model = pccore.wrap(seq)
        optim = optax.sgd(0.1)
        pccore.train_step(model, optim, optim.init(model.params), x=jnp.ones((2, 4)), y=jnp.ones((2, 3)))
        print("loaded:", sorted(m for m in ("haiku", "flax") if m in sys.modules))
        sys.modules["haiku"] = None  # as if dm-haiku were not installed
        try:
            pccore.adapters.require("haiku")
        except ImportError as e:
            print("error:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "loaded: []" in out.stdout
    assert "error: pccore's 'haiku' adapter needs `dm-haiku`, which is not installed." in out.stdout
    assert 'Install it with: pip install "pccore[haiku]"' in out.stdout


def test_missing_flax_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax", None)
    with pytest.raises(ImportError, match=r'pip install "pccore\[flax\]"'):
        adapters.require("flax")


class ClaimsSequential(adapters.AbstractAdapter):
    """A third-party adapter that must win over the built-in Equinox one by its own priority."""

    name = "claims.sequential"
    framework_module = "equinox"
    priority = 5

    def matches(self, model):
        return isinstance(model, eqx.nn.Sequential)

    def wrap(self, model, variables=None, **options):
        return adapters.get_adapter([*model.layers]).wrap(list(model.layers), variables, **options)


@pytest.mark.parametrize("how", ["instance", "path", "entry point", "explicit priority"])
def test_adapter_registered_by_path_keeps_its_own_priority(clean_registry, monkeypatch, how):
    path = "tests.test_adapters_registry:ClaimsSequential"
    if how == "instance":
        adapters.register("claims", ClaimsSequential())
    elif how == "path":
        adapters.register("claims", path, framework_module="equinox")
    elif how == "entry point":
        ep = EntryPoint(name="equinox.nn", value=path, group="pccore.adapters")  # a module
        monkeypatch.setattr(adapters, "entry_points", lambda group: [ep])
    else:  # an explicit `priority` below the built-in's still loses to it
        adapters.register("claims", path, framework_module="equinox", priority=-1)
    seq = eqx.nn.Sequential([eqx.nn.Linear(4, 3, key=jax.random.key(0))])
    expected = "equinox" if how == "explicit priority" else "claims.sequential"
    assert adapters.get_adapter(seq).name == expected
    x = jnp.ones((2, 4))
    np.testing.assert_allclose(pccore.wrap(seq)(x), jax.vmap(seq)(x), rtol=1e-6)


def _eqx_mlp():
    return eqx.nn.MLP(4, 3, 6, 1, key=jax.random.key(0))


def test_a_plugin_that_fails_to_import_is_skipped_with_a_warning(clean_registry, monkeypatch):
    adapters.unregister("equinox")  # a plugin will take the name of a built-in...
    adapters.register("equinox.builtin", "pccore.adapters._equinox:EquinoxAdapter",
                      framework_module="equinox", priority=0)  # ...which stays under another
    ep = EntryPoint(name="equinox", value="tests._no_such_plugin:Adapter", group="pccore.adapters")
    monkeypatch.setattr(adapters, "entry_points", lambda group: [ep])
    monkeypatch.setattr(adapters, "_ENTRY_POINTS_LOADED", False)
    with pytest.warns(RuntimeWarning, match=r"pccore adapter 'equinox' \(tests._no_such_plugin:Adapter\) "
                                            r"failed to load and is skipped: ModuleNotFoundError"):
        model = pccore.wrap(_eqx_mlp())
    x = jax.random.normal(jax.random.key(1), (2, 4))
    np.testing.assert_allclose(model(x), jax.vmap(_eqx_mlp())(x), rtol=1e-6)
    import warnings
    with warnings.catch_warnings():  # warned once: the broken plugin is not retried
        warnings.simplefilter("error")
        pccore.wrap(_eqx_mlp())


def test_entry_points_are_gated_by_their_full_module_path(clean_registry, monkeypatch):
    """A plugin for `jax.example_libraries` is not imported because `jax` is."""
    ep = EntryPoint(name="jax.example_libraries_never_imported", value="tests._no_such_plugin:A",
                    group="pccore.adapters")
    monkeypatch.setattr(adapters, "entry_points", lambda group: [ep])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never tried, so never warned about
        assert pccore.wrap(_eqx_mlp()).framework == "equinox"
    assert "jax.example_libraries_never_imported" in adapters.registered()


def test_unregister_and_override_work_before_and_after_entry_points_load(clean_registry, monkeypatch):
    ep = EntryPoint(name="tests", value="tests.toy_adapter:PairsAdapter", group="pccore.adapters")
    monkeypatch.setattr(adapters, "entry_points", lambda group: [ep])
    adapters.unregister("tests")  # before they are read: no KeyError
    assert "tests" not in adapters.registered()
    monkeypatch.setattr(adapters, "_ENTRY_POINTS_LOADED", False)
    adapters.register("tests", toy_adapter.PairsAdapter(), override=True)  # before: replaces it
    assert adapters._REGISTRY["tests"].adapter.__class__ is toy_adapter.PairsAdapter
    adapters.register("tests", "tests.toy_adapter:PairsAdapter", framework_module="tests",
                      override=True)  # after: replaces it again
    assert isinstance(adapters._REGISTRY["tests"].adapter, str)


@pytest.mark.slow
def test_the_shipped_conformance_suite_passes_on_a_third_party_adapter(clean_registry, x64):
    """`pccore.testing.check_conformance`, the code the built-in adapters are tested with,
    run on the toy adapter: a builder from the framework-neutral weights is all it needs."""
    import pccore.testing

    adapters.register("toy.pairs", toy_adapter.PairsAdapter())

    def forward(pairs, x):
        for f, p in pairs:
            x = f(p, x)
        return x

    def build(kind, weights, activation):
        assert kind == "mlp" and activation is jnp.tanh
        return pccore.testing.Built(pccore.wrap(_pairs(weights)), forward)

    ref = pccore.testing.check_conformance(build, "mlp")
    assert float(ref["losses"][0][-1]) < float(ref["losses"][0][0])
    # a broken adapter fails it, naming what differs (here: a layer that drops its bias)
    def broken(kind, weights, activation):
        return build(kind, [(W, 0.0 * b) for W, b in weights], activation)

    with pytest.raises(AssertionError, match=r"mlp: energy differs from the Equinox reference"):
        pccore.testing.check_conformance(broken, "mlp")
    with pytest.raises(ValueError, match=r"`kind` must be one of"):
        pccore.testing.check_conformance(build, "rnn")
