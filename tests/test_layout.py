"""The house's layout, read from the source: stages talk through folders, only workflows/ chains them, and
the product never reaches into the demo or the tests (issue 14)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("common", "vocab", "analysis", "embed_init", "corpus", "continual", "export")
PRODUCT = (*STAGES, "workflows")
TOP = (*PRODUCT, "demo", "tests", "tiny_continual", "tiny_export")


def imports_of(package: str) -> dict[str, set[str]]:
    """{top-level package imported: files of `package` importing it}, function-level imports included."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in TOP and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_only_workflows_chains_the_stages_and_nothing_imports_the_demo_or_tests():
    graph = {p: imports_of(p) for p in PRODUCT}
    # the reader sees imports at any depth: workflows reaches every stage it chains
    assert {"analysis", "continual", "corpus", "common"} <= set(graph["workflows"])
    upward = {p: sorted(graph[p]["workflows"]) for p in STAGES if "workflows" in graph[p]}
    assert upward == {}, f"stages importing workflows/ (move the shared code down): {upward}"
    demo = {p: sorted(graph[p][t]) for p in PRODUCT for t in ("demo", "tests", "tiny_continual", "tiny_export")
            if t in graph[p]}
    assert demo == {}, f"product modules importing demo/ or test helpers: {demo}"
    assert set(imports_of("common")) == set(), "common/ is the bottom layer: it imports no other package"
