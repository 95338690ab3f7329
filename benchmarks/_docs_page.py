"""docs/benchmarks.md carries benchmarks/RESULTS.md (written by `run_all.py`, or alone by
`python benchmarks/run_all.py --docs`)."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS_PAGE = os.path.join(HERE, "..", "docs", "benchmarks.md")
_DOCS_SPLIT = "## Performance benchmarks\n"


def docs_page(results: str, page: str) -> str:
    """The documentation's benchmark page: its own head (up to its "Performance benchmarks"
    heading and the paragraph after it), then RESULTS.md with every heading one level down."""
    head, rest = page.split(_DOCS_SPLIT, 1)
    intro = rest.split("\n\n", 1)[0]
    body = results.split("\n", 1)[1].lstrip("\n")  # without "# Benchmark results"
    body = "\n".join("#" + line if line.startswith("#") else line for line in body.split("\n"))
    return f"{head}{_DOCS_SPLIT}{intro}\n\n{body}"


def write_docs_page() -> None:
    """Copy RESULTS.md into docs/benchmarks.md (`python benchmarks/run_all.py --docs` alone)."""
    with open(os.path.join(HERE, "RESULTS.md")) as f:
        results = f.read()
    with open(DOCS_PAGE) as f:
        page = f.read()
    with open(DOCS_PAGE, "w") as f:
        f.write(docs_page(results, page))
