"""Vocabulary metrics computed from token counts: ALP, Rényi efficiency, scripts.

ALP (Average Log Probability; Zheng et al. 2021, VoCapXLM `train_mono_spm.py:compute_alp`):
shuffle the evaluation lines with `random.seed(seed)` (1 in the reference), keep the first
`n_sample`, strip each line and tokenize it; p(t) = count(t) / total tokens on that same sample;

    ALP = (1/N) * sum over lines l of sum over tokens t in l of ln p(t)
        = (1/N) * sum over token types t of count(t) * ln(count(t) / total)

where N is the number of sampled lines. The second form needs only the count vector, which is why
nested candidates can be scored from one tokenization (analysis/nested.py). Higher (closer to 0)
is better; it grows with vocabulary size with diminishing returns.

Rényi efficiency (Zouhar et al. 2023, "Tokenization and the Noiseless Channel"), as the
`tokenization-scorer` package computes it with `metric="renyi"`:

    H_a(p) = 1/(1-a) * log2 sum_t p(t)^a,   efficiency = H_a(p) / log2 |V_observed|

with a = 2.5 and |V_observed| the number of distinct tokens seen on the sample.
"""
from __future__ import annotations

import math
import random
import re
from typing import Callable, Sequence

import numpy as np

from common.scripts import char_class

RENYI_ALPHA = 2.5
SCRIPTS = ("han", "latin", "digits", "other")

# Han is the one table in common/scripts.py (SentencePiece's ideograph blocks); Latin letters in the Latin blocks.
_HAN = char_class("Han")
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff\uff21-\uff3a\uff41-\uff5a"
_DIGIT = "0-9\uff10-\uff19"
_RE = {"han": re.compile(f"[{_HAN}]"), "latin": re.compile(f"[{_LATIN}]"), "digits": re.compile(f"[{_DIGIT}]")}
_FULL = {k: re.compile(f"[{v}]+") for k, v in (("han", _HAN), ("latin", _LATIN), ("digits", _DIGIT))}
_BYTE = re.compile(r"<0x[0-9A-F]{2}>")
SPACE = "\u2581"  # SentencePiece's visible space


def sample_lines(texts: Sequence[str], n_sample: int, seed: int = 1) -> list[str]:
    """The reference's sample: shuffle with `random.seed(seed)`, keep `n_sample`, strip each line."""
    lines = list(texts)
    random.Random(seed).shuffle(lines)  # same generator state as random.seed(seed); random.shuffle
    return [line.strip() for line in lines[:n_sample]]


def alp_from_counts(counts: np.ndarray, n_lines: int) -> float:
    """ALP from a vector of token counts (zeros ignored) over `n_lines` lines."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if n_lines <= 0 or c.size == 0:
        return float("nan")
    total = c.sum()
    return float(np.sum(c * np.log(c / total)) / n_lines)


def alp_by_lines(token_lines: Sequence[Sequence[int]]) -> float:
    """ALP exactly as the reference loop: per-line sums of ln p, then their mean (for tests)."""
    counts: dict[int, int] = {}
    total = 0
    for ids in token_lines:
        total += len(ids)
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    probs = {i: c / total for i, c in counts.items()}
    return float(np.mean([sum(math.log(probs[i]) for i in ids) for ids in token_lines]))


def renyi_efficiency(counts: np.ndarray, alpha: float = RENYI_ALPHA) -> float:
    """Rényi efficiency of the unigram distribution of `counts` (see module docstring)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size < 2:
        return float("nan")
    p = c / c.sum()
    if alpha == 1.0:
        h = -np.sum(p * np.log2(p))
    else:
        h = np.log2(np.sum(p ** alpha)) / (1.0 - alpha)
    return float(h / np.log2(c.size))


def piece_script(piece: str) -> str:
    """Script class of a token: han/latin/digits when all its characters (ignoring ▁) are; else other.

    Byte-fallback pieces (<0xE4>) and whitespace-only pieces are "other".
    """
    text = piece.replace(SPACE, "")
    if not text or _BYTE.fullmatch(piece):
        return "other"
    for name, rx in _FULL.items():
        if rx.fullmatch(text):
            return name
    return "other"


def is_byte_piece(piece: str) -> bool:
    return bool(_BYTE.fullmatch(piece))


def script_char_counts(text: str) -> dict[str, int]:
    """Characters of `text` per script (whitespace counts as other)."""
    out = {name: len(rx.findall(text)) for name, rx in _RE.items()}
    out["other"] = len(text) - sum(out.values())
    return out


def script_token_counts(counts: np.ndarray, classes: np.ndarray) -> dict[str, int]:
    """Sum `counts` per script class; `classes[i]` is the index in SCRIPTS of symbol i."""
    sums = np.bincount(classes, weights=counts.astype(np.float64), minlength=len(SCRIPTS))
    return {name: int(round(sums[i])) for i, name in enumerate(SCRIPTS)}


def script_classes(pieces: Sequence[str]) -> np.ndarray:
    return np.array([SCRIPTS.index(piece_script(p)) for p in pieces], dtype=np.int64)


def count_tokens(encode_batch: Callable[[list[str]], list], lines: list[str], batch: int = 4096) -> int:
    """Total tokens of `lines` with a batch encoder returning one sequence per line."""
    return sum(len(ids) for i in range(0, len(lines), batch) for ids in encode_batch(lines[i:i + batch]))
