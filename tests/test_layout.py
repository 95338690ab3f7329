"""The package layout's promise (docs/architecture.md): pccore's import graph has no cycle,
counting imports inside functions too, and every module the map names exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_graph() -> dict[str, set[str]]:
    mods: dict[str, tuple[Path, bool]] = {}
    for f in (ROOT / "pccore").glob("**/*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, (f, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for c in [target, *(f"{target}.{a.name}" for a in node.names)]:
                    if c in mods and c != m:
                        graph[m].add(c)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    assert len(graph) > 40  # the whole package was read
    assert _cycles(graph) == []
    # the check finds a cycle when there is one (its own oracle)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_every_module_in_the_package_map_exists():
    text = (ROOT / "docs" / "architecture.md").read_text()
    tree = text[text.index("```"):text.index("```", text.index("```") + 3)]
    folder = ROOT / "pccore"
    named = 0
    for line in tree.splitlines():
        sub = re.match(r"[│├└─ ]*(_[a-z_]+)/", line)
        if sub and (ROOT / "pccore" / sub.group(1)).is_dir():
            folder = ROOT / "pccore" / sub.group(1)
        for name in re.findall(r"\b([_a-z]+\.py)\b", line):
            here = folder / name if (folder / name).exists() else ROOT / "pccore" / name
            assert here.exists() or (ROOT / "adapters" / name).exists(), name
            named += 1
    assert named > 30


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject.toml lists pccore's packages by name; a subpackage left out installs a
    broken package (the editable install of the README would not show it)."""
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(pccore[\w.]*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    found = {".".join(p.relative_to(ROOT).parent.parts) for p in (ROOT / "pccore").glob("**/__init__.py")}
    assert found <= listed | {"pccore.adapters"}, found - listed
