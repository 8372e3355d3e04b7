"""Which characters belong to a target script (`--script`).

Python has no Unicode script property, so the ranges are listed here. "Han" is the CJK ideograph
blocks: CJK Unified Ideographs and extensions A-I, compatibility ideographs, radicals, and the ideographic
marks 々 〇 〡-〩 〸-〻. Hiragana/Katakana are not Han here (SentencePiece's trainer lumps them with Han
when splitting by script, but a Chinese vocabulary should not add kana pieces by accident).
"""
from __future__ import annotations

import re
from bisect import bisect_right

from common.errors import GraftError

_RANGES = {
    "Han": [
        (0x2E80, 0x2E99), (0x2E9B, 0x2EF3), (0x2F00, 0x2FD5), (0x3005, 0x3005), (0x3007, 0x3007),
        (0x3021, 0x3029), (0x3038, 0x303B), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFA6D),
        (0xFA70, 0xFAD9), (0x16FE2, 0x16FE3), (0x16FF0, 0x16FF1), (0x20000, 0x2A6DF), (0x2A700, 0x2EBEF),
        (0x2EBF0, 0x2EE5F), (0x2F800, 0x2FA1F), (0x30000, 0x3134F), (0x31350, 0x323AF),
    ],
    "Hangul": [(0x1100, 0x11FF), (0x3131, 0x318E), (0xA960, 0xA97C), (0xAC00, 0xD7A3), (0xD7B0, 0xD7FB)],
    "Cyrillic": [(0x0400, 0x052F), (0x1C80, 0x1C88), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)],
}
SCRIPTS = tuple(_RANGES) + ("any",)


def char_class(script: str) -> str:
    """The script's ranges as the inside of a regex character class, e.g. for `[...]+`."""
    return "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in _RANGES[script])


class ScriptFilter:
    """`filter.has(text)`: does the text contain at least one character of the script?"""

    def __init__(self, script: str):
        names = {s.lower(): s for s in SCRIPTS}
        if script.lower() not in names:
            raise GraftError(f"unknown script {script!r}. Fix: use one of {', '.join(SCRIPTS)} "
                             "('any' adds every piece whatever its script)")
        self.name = names[script.lower()]
        ranges = _RANGES.get(self.name, [])
        self._starts = [a for a, _ in ranges]
        self._ends = [b for _, b in ranges]
        self._re = re.compile(f"[{char_class(self.name)}]") if ranges else None

    def is_char(self, ch: str) -> bool:
        if self.name == "any":
            return True
        cp = ord(ch)
        i = bisect_right(self._starts, cp) - 1
        return i >= 0 and cp <= self._ends[i]

    def has(self, text: str) -> bool:
        return bool(text) if self._re is None else self._re.search(text) is not None

    def count(self, text: str) -> int:
        return len(text) if self._re is None else len(self._re.findall(text))
