"""One exception type for problems the user can fix, so the CLI prints them without a traceback."""
from __future__ import annotations

from pathlib import Path


class GraftError(Exception):
    """A user-facing error. The message says what is wrong, where, and what to do."""


def input_error(path: str | Path | None, problem: str, fix: str, line: int | None = None) -> GraftError:
    """Build an error naming the file (and line, when known), the problem and the fix.

    >>> str(input_error("a.jsonl", "bad JSON", "fix the line", line=3))
    'a.jsonl:3: bad JSON. Fix: fix the line'
    """
    where = "" if path is None else (f"{path}:{line}: " if line is not None else f"{path}: ")
    return GraftError(f"{where}{problem}. Fix: {fix}")
