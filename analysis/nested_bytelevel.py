"""Scores of byte-level candidates (`vocab train --base BYTE_LEVEL_BASE`): one tokenization for the whole grid.

A byte-level candidate of size K is the base plus the first K new merges of the largest candidate L.
Why one tokenization with L gives every K:
- BPE applies the lowest-ranked available merge; a merge's parts are made by lower-ranked merges, so within a
  word the ranks of the merges applied never decrease. Every base merge ranks below every new one, so the
  segmentation under K new merges is L's merge sequence stopped before its first new merge of index >= K;
- each new token has exactly one merge (`vocab train` never adds a second merge to an existing token), so
  "stopped before index K" means: split every new token of index >= K into the two parts of its merge,
  recursively, down to tokens of index < K or base tokens. Base tokens are never split;
- with `ignore_merges` (tekken, Llama-3) a pre-token that is a whole token of L is taken directly, and under K
  it is built by merges instead; `vocab check` verifies that every new token's merges build it from its own
  bytes (`unreachable_merges` = 0), so the same split applies.
`tests/test_analysis_bytelevel.py` checks the derived counts against tokenizing with every candidate.
Candidates that are not prefixes of L are tokenized on their own ("direct").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import input_error


def candidate_tokenizer(base, merges: list[tuple[str, str]]):
    """A `tokenizers.Tokenizer`: `base` with `merges` appended (what `vocab merge` writes, without --special)."""
    from tokenizers import Tokenizer

    from vocab.bytelevel import extended_json

    data, _ = extended_json(base, merges, [])
    return Tokenizer.from_str(json.dumps(data))


def _counts(tok, lines: list[str], size: int, chunk: int = 8192) -> np.ndarray:
    import itertools

    counts = np.zeros(size, dtype=np.int64)
    for i in range(0, len(lines), chunk):
        encs = tok.encode_batch_fast(lines[i:i + chunk], add_special_tokens=False)
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int64)
        counts += np.bincount(flat, minlength=size)[:size]
    return counts


def nested_counts(large_counts: np.ndarray, first: int, parts: list[tuple[int, int]], ks: list[int]) -> dict[int, np.ndarray]:
    """{K: count vector over ids 0..first+K-1} from L's counts (see the module docstring). `parts[j]` are the ids
    of the two parts of new token first + j."""
    out = {}
    n_new = len(parts)
    for k in sorted(set(ks)):
        vec = large_counts[:first + n_new].copy()
        # Split from the last new token down: a token's parts have smaller ids, so they are split after it.
        for j in range(n_new - 1, k - 1, -1):
            c = vec[first + j]
            if c:
                a, b = parts[j]
                vec[a] += c
                vec[b] += c
                vec[first + j] = 0
        out[k] = vec[:first + k]
    return out


def score_bytelevel(cands: list[dict[str, Any]], sample, *, nested: bool, base_path: str | None,
                    progress: bool = False) -> list[dict[str, Any]]:
    """Rows (as analysis/score.py writes them) for byte-level candidates of one `vocab train` folder."""
    from tqdm.auto import tqdm

    from analysis.alp import script_classes
    from analysis.score import metrics_row
    from common.bytelevel import load_bytelevel, token_text, unicode_to_byte
    from vocab.bytelevel_stages import load_candidate, model_fingerprint

    loaded = [(c, load_candidate(c["path"], base_path or "BASE")) for c in cands]
    recorded = loaded[0][1].base
    where = base_path or recorded.get("path")
    if not where or not Path(where).exists():
        raise input_error(where or cands[0]["path"], "the byte-level base these candidates continue is not found",
                          "pass it as --base (the tokenizer given to `graft vocab train --base`)")
    base = load_bytelevel(where)
    if model_fingerprint(base) != recorded.get("model_sha256"):
        raise input_error(where, f"is not the base the candidates of {Path(cands[0]['path']).parent.parent} were "
                          "trained on", "pass the tokenizer given to `graft vocab train --base` as --base")
    first = base.size()
    _, large = max(loaded, key=lambda t: len(t[1].merges))
    large_merges = large.merges
    rows = []

    base_pieces = [""] * first
    for t, i in base.vocab.items():
        base_pieces[i] = token_text(t)
    for t in base.added_tokens:
        base_pieces[int(t["id"])] = t["content"]
    base_classes = script_classes(base_pieces)
    u2b = unicode_to_byte()
    byte_ids = [i for t, i in base.vocab.items() if u2b.get(t, 0) >= 0x80]

    def row_for(c, cand, counts, method, reason=None):
        merges = cand.merges
        classes = np.concatenate([base_classes, script_classes([token_text(a + b) for a, b in merges])])
        byte_mask = np.zeros(len(classes), dtype=bool)
        byte_mask[byte_ids] = True  # single non-ASCII bytes: what the base falls back to for unknown characters
        learned = np.zeros(len(classes), dtype=bool)
        learned[first:] = True  # never_produced counts the candidate's own (added) tokens
        row = {"chars": 0, "size": c["size"], "vocab_pieces": first + len(merges), "merges": len(merges),
               "method": method, "path": c["path"]}
        if reason:
            row["direct_reason"] = reason
        row.update(metrics_row(counts[:len(classes)], classes, byte_mask, learned, sample))
        return row

    fast, direct = [], []
    for c, cand in loaded:
        ok = nested and cand.merges == large_merges[:len(cand.merges)]
        (fast if ok else direct).append((c, cand, None if ok else (
            "--no-nested" if not nested else "its merges are not a prefix of the largest candidate's")))
    bar = tqdm(total=len(cands), desc="byte-level candidates", unit="cand", disable=not progress, leave=False)
    if fast:
        vocab = dict(base.vocab)
        parts = []
        for j, (a, b) in enumerate(large_merges):
            parts.append((vocab[a], vocab[b]))
            vocab[a + b] = first + j
        tok = candidate_tokenizer(base, large_merges)
        large_counts = _counts(tok, sample.lines, first + len(large_merges))
        by_k = nested_counts(large_counts, first, parts, [len(cand.merges) for _, cand, _ in fast])
        for c, cand, _ in fast:
            rows.append(row_for(c, cand, by_k[len(cand.merges)], "nested"))
            bar.update()
    for c, cand, reason in direct:
        tok = candidate_tokenizer(base, cand.merges)
        rows.append(row_for(c, cand, _counts(tok, sample.lines, first + len(cand.merges)), "direct",
                            None if reason == "--no-nested" else reason))
        bar.update()
    bar.close()
    return rows


__all__ = ["score_bytelevel", "nested_counts", "candidate_tokenizer"]
