"""SentencePiece's BPE encoding rule, in Python, for planning merges on short strings.

SentencePiece BPE does not store merge rules: starting from characters, it repeatedly joins the
adjacent pair whose concatenation is a piece with the highest score (ties: leftmost pair). A piece is
*reachable* when encoding its own text this way ends in that single piece. `vocab merge` uses this
to order, score and repair added pieces, then verifies the result with sentencepiece and tokenizers.
"""
from __future__ import annotations


def bpe_segment(text: str, scores: dict[str, float]) -> list[str]:
    """Segment `text` (already normalized: spaces as '▁') with SentencePiece's BPE rule."""
    symbols = list(text)
    while len(symbols) > 1:
        best, best_i = None, -1
        for i in range(len(symbols) - 1):
            s = scores.get(symbols[i] + symbols[i + 1])
            if s is not None and (best is None or s > best):
                best, best_i = s, i
        if best is None:
            break
        symbols[best_i:best_i + 2] = [symbols[best_i] + symbols[best_i + 1]]
    return symbols
