"""References between workflow stages, as written in a stage's values (see docs/workflows.md).

    "@stage"          that stage's output folder
    "@stage/a/b"      a path inside it
    "@stage#a.b"      a value from its manifest.json
    "1:{@stage}, ..." a reference inside a longer string
    "@@text"          the literal string "@text"
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import input_error

_REF = re.compile(r"^@(?P<stage>[A-Za-z0-9_.\-]+)(?:(?P<path>/.*)|#(?P<key>.+))?$")
# A reference inside a longer string, e.g. spec = "1:{@prep_zh}, 2:{@prep_en}".
_EMBEDDED = re.compile(r"\{(@[A-Za-z0-9_.\-]+(?:/[^{}#]*|#[^{}]+)?)\}")


@dataclass
class Ref:
    """A reference to an earlier stage: its folder, a path inside it, or a manifest value."""

    stage: str
    path: str | None = None  # relative path inside the stage's output folder
    key: str | None = None  # dotted key into the stage's manifest.json

    def text(self) -> str:
        return f"@{self.stage}" + (self.path or "") + (f"#{self.key}" if self.key else "")


def parse_ref(value: Any) -> Ref | None:
    if not isinstance(value, str) or not value.startswith("@") or value.startswith("@@"):
        return None
    m = _REF.match(value)
    if not m:
        return None
    path = m.group("path")
    return Ref(m.group("stage"), path=path if path and path != "/" else None, key=m.group("key"))


def refs_in(value: Any) -> list[str]:
    """Every reference in `value` (whole-string ones and '{@...}' ones inside strings)."""
    out = []
    for s in iter_strings(value):
        if parse_ref(s) is not None:
            out.append(s)
        elif "{@" in s:
            out.extend(m.group(1) for m in _EMBEDDED.finditer(s))
    return out


def iter_strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from iter_strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_strings(v)


def _unescape(s: str) -> str:
    return s[1:] if s.startswith("@@") else s


class _Placeholders(dict):
    """Stand-in output folders for references while validating."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> Path:
        return Path(f"<{key}>")


def resolve_value(value: Any, outputs: dict[str, Path], manifest_of) -> Any:
    """Replace references in `value` by paths or manifest values (strings stay strings)."""
    if isinstance(value, list):
        return [resolve_value(v, outputs, manifest_of) for v in value]
    if isinstance(value, dict):
        return {k: resolve_value(v, outputs, manifest_of) for k, v in value.items()}
    ref = parse_ref(value)
    if ref is None:
        if isinstance(value, str) and "{@" in value:
            return _EMBEDDED.sub(lambda m: str(resolve_value(m.group(1), outputs, manifest_of)), value)
        return value
    stage = ref.stage if ref.stage in outputs else ref.stage.replace(".", "_")
    folder = outputs[stage]
    if ref.key is not None:
        obj: Any = manifest_of(stage)
        for part in ref.key.split("."):
            if isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
                obj = obj[int(part)]
            elif isinstance(obj, dict) and part in obj:
                obj = obj[part]
            else:
                raise input_error(folder / "manifest.json", f"no key {ref.key!r} (needed by {value!r})",
                                  f"check the key, or re-run stage {stage!r}")
        return obj
    return str(folder / ref.path.lstrip("/")) if ref.path else str(folder)
