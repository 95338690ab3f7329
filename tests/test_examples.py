"""Every example runs on its tiny budget (PCCORE_EXAMPLE_QUICK=1). Each example checks its own
claims with assertions against an oracle (e.g. a hand-written loop equals `train_step`,
`optax.sgd(h)` equals Euler with `dt0 = h`, frameworks agree with Equinox)."""

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def test_every_example_is_listed():
    assert SCRIPTS == ["custom_training_loop.py", "mupc_resnet.py", "solvers.py", "transformer.py",
                       "variants.py", "wrap_each_framework.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("PCCORE_EXAMPLE_QUICK", "1")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr("sys.argv", [script, "--quick"])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert capsys.readouterr().out.strip()
