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


_NO_SPACE = (28, 122)  # ENOSPC, EDQUOT


def _errno_of(exc: BaseException) -> int | None:
    """The errno of an OSError, also when a library (pyarrow) only put it into the message."""
    import re

    if getattr(exc, "errno", None):
        return exc.errno
    text = f"{exc} {getattr(exc, 'strerror', '') or ''}"
    m = re.search(r"errno:? ?(\d+)", text, re.I)
    if m:
        return int(m.group(1))
    if "no space left on device" in text.lower():
        return 28
    return None


def io_failure(exc: BaseException, output: str | Path | None, state: str, what: str = "") -> GraftError:
    """One clear error for a full disk or another I/O error while a stage writes `output`: which output,
    what became of the partial output (`state`, from common.io.settle_partial_output) and what to do."""
    import errno as errno_mod
    import os

    code = _errno_of(exc)
    reason = os.strerror(code) if code else (getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200])
    name = errno_mod.errorcode.get(code, "") if code else ""
    file = None
    for candidate in (getattr(exc, "filename2", None), getattr(exc, "filename", None)):  # copy errors: (src, dst)
        if candidate and output and Path(str(candidate)).resolve().is_relative_to(Path(output).resolve().parent):
            file = candidate  # a file being written (or its temporary); a source file would mislead
            break
    target = f"writing {output}" if output else "writing the output"
    head = f"{what + ': ' if what else ''}{reason}{f' ({name})' if name else ''} while {target}" + \
           (f" (file {file})" if file else "")
    if code in _NO_SPACE:
        fix = (f"free space on the filesystem holding {output or 'the output'} (df -h "
               f"{Path(output).parent if output else '.'}) or write to another one, then re-run the same command")
    elif code == 30:  # EROFS
        fix = "write to a writable filesystem (another --out), then re-run"
    elif code == 13:  # EACCES
        fix = "make the output folder writable, or choose another --out, then re-run"
    else:
        fix = "check the disk or filesystem (dmesg, df -h), then re-run the same command"
    return GraftError(f"{head}. {state}. Fix: {fix}")
