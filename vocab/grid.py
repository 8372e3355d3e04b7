"""Parse the candidate grid: `--chars 4451,5435` x `--sizes 5000:40000:1000` (or a list)."""
from __future__ import annotations

from common.errors import GraftError


def _int(text: str, what: str, spec: str) -> int:
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise GraftError(f"bad {what} {spec!r}: {text.strip()!r} is not a whole number. "
                         f"Fix: {_HELP[what]}") from None
    if value <= 0:
        raise GraftError(f"bad {what} {spec!r}: {value} is not positive. Fix: {_HELP[what]}")
    return value


_HELP = {
    "sizes": "use START:STOP:STEP (inclusive, e.g. 5000:40000:1000) or a list like 8000,16000,32000",
    "chars": "use a list of single-character counts, e.g. 4451,5435,6414,7434",
}


def parse_sizes(spec: str | int | list) -> list[int]:
    """`"5000:40000:1000"` -> [5000, 6000, ..., 40000] (STOP included); `"8000,16000"` or a list -> sorted unique.

    >>> parse_sizes("5000:8000:1000")
    [5000, 6000, 7000, 8000]
    """
    if isinstance(spec, int):
        return [_int(str(spec), "sizes", str(spec))]
    if isinstance(spec, (list, tuple)):
        items = [str(s) for s in spec]
        if len(items) == 1 and ":" in items[0]:
            return parse_sizes(items[0])
        spec_text = ",".join(items)
        if any(":" in s for s in items):
            raise GraftError(f"bad sizes {spec_text!r}: a range START:STOP:STEP cannot be mixed with a list. "
                             f"Fix: {_HELP['sizes']}")
        values = [_int(s, "sizes", spec_text) for item in items for s in item.split(",") if s.strip()]
    else:
        spec_text = str(spec).strip()
        if ":" in spec_text:
            parts = spec_text.split(":")
            if len(parts) != 3:
                raise GraftError(f"bad sizes {spec_text!r}: a range needs three parts. Fix: {_HELP['sizes']}")
            start, stop, step = (_int(p, "sizes", spec_text) for p in parts)
            if stop < start:
                raise GraftError(f"bad sizes {spec_text!r}: STOP {stop} is below START {start}. Fix: {_HELP['sizes']}")
            values = list(range(start, stop + 1, step))
        else:
            values = [_int(s, "sizes", spec_text) for s in spec_text.split(",") if s.strip()]
    if not values:
        raise GraftError(f"bad sizes {spec!r}: no size given. Fix: {_HELP['sizes']}")
    return sorted(set(values))


def parse_chars(values: list[int] | list[str] | str) -> list[int]:
    if isinstance(values, (str, int)):
        values = [values]
    spec_text = ",".join(str(v) for v in values)
    out = [_int(s, "chars", spec_text) for v in values for s in str(v).split(",") if s.strip()]
    if not out:
        raise GraftError(f"bad chars {spec_text!r}: no value given. Fix: {_HELP['chars']}")
    return sorted(set(out))
