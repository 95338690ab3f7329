"""The API reference documents every public name (its pages are generated from docstrings)."""

import pathlib
import re
import types

import pccore
from pccore import datasets

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"


def documented() -> set[str]:
    text = "\n".join(p.read_text() for p in API.glob("*.md"))
    return set(re.findall(r"^::: (\S+)", text, flags=re.M))


def test_every_public_name_is_in_the_api_reference():
    public = {
        n for n in dir(pccore)
        if not n.startswith("_") and not isinstance(getattr(pccore, n), types.ModuleType)
    }
    missing = sorted(n for n in public if f"pccore.{n}" not in documented())
    assert not missing, f"add `::: pccore.NAME` to a page in docs/api/ for: {missing}"


def test_public_submodules_are_documented_whole():
    names = documented()
    assert {"pccore.theory", "pccore.datasets", "pccore.testing", "adapters"} <= names
    assert set(datasets.__all__) <= set(dir(datasets))


def test_nav_pages_exist():
    root = API.parent.parent
    nav = re.findall(r":\s*(\S+\.md)\s*$", (root / "mkdocs.yml").read_text(), flags=re.M)
    assert nav and all((root / "docs" / page).is_file() for page in nav)


def test_benchmark_page_holds_the_current_results():
    """docs/benchmarks.md carries benchmarks/RESULTS.md as it is (`run_all.py --docs`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_page", ROOT / "benchmarks" / "_docs_page.py")
    assert spec is not None and spec.loader is not None
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert page == run_all.docs_page(results, page), (
        "docs/benchmarks.md is out of date: run `python benchmarks/run_all.py --docs`")
