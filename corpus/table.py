"""Plain-text tables for the corpus commands (`corpus list`, `corpus count`, `corpus mix`)."""
from __future__ import annotations


def format_table(rows: list[tuple]) -> str:
    """`rows[0]` is the header; first column left-aligned, the others right-aligned, a dashed rule below."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
