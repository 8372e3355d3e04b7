"""README.md's "Reliability" table is this suite's: one row per fault class, counted from the cases' markers."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import outcome_table

HERE = Path(__file__).resolve().parent


def declared_cases() -> list[tuple[str, str, str]]:
    """(file, fault class, outcome) of every `@pytest.mark.fault(...)` in this folder, read from the source."""
    cases = []
    for f in sorted(HERE.glob("test_*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "fault"
                    and ast.unparse(node.func.value) == "pytest.mark"):
                cls, outcome = (a.value for a in node.args)
                cases.append((f.name, cls, outcome))
    return cases


def test_readme_reliability_table_is_the_suites():
    cases = declared_cases()
    assert len(cases) >= 20
    readme = (HERE.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Reliability"):]
    assert outcome_table(cases) in section, outcome_table(cases)
    assert f"**{len(cases)} cases**" in section
