"""Token counts of every nested BPE candidate from one tokenization with the largest one.

Why this works. SentencePiece BPE encodes a word by repeatedly merging the adjacent pair whose
concatenation is the highest-scoring piece (ties: leftmost), and a trained model's piece score is
its merge rank. A candidate truncated to the first K merges of the largest model L therefore runs
exactly the same merges as L until L would apply a merge of rank > K; at that point no pair of rank
<= K is left, so the truncated candidate stops there. Its segmentation is the state of L's merge
sequence just before the first merge whose rank exceeds K.

Two more facts make it cheap:
- a symbol never spans two of L's final tokens, and the merges inside one final token P run in the
  same order as when P is encoded on its own. So the truncated segmentation of a word is the
  concatenation of the truncated segmentations of L's tokens, and each distinct token P of L is
  replayed once (over its few characters), however often it occurs;
- as K grows, P's segmentation only changes where the running maximum of its merge ranks grows.
  Sorting those change points lets one sweep produce the count vector of every K.

A single character that a smaller candidate lacks becomes its UTF-8 byte pieces (byte fallback), or
`<unk>`; this is applied per candidate after the sweep. Candidates that are not a prefix of L's
merges (or differ in normalizer, byte fallback, special pieces) are reported by `check_nested` and
scored by tokenizing with them directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from common.tokenizer_files import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED


@dataclass
class ModelInfo:
    """What the fast path needs from one SentencePiece BPE ModelProto."""

    pieces: list[str]
    types: list[int]
    scores: list[float]
    merges: list[str]  # multi-character NORMAL pieces, highest score (earliest merge) first
    chars: frozenset[str]  # single-character NORMAL pieces
    user_defined: frozenset[str]
    byte_fallback: bool
    unk_piece: str
    spec_key: bytes  # normalizer + denormalizer + special pieces: must match for nesting
    merge_scores: list[float]
    has_unused: bool
    piece_to_id: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, proto: Any) -> "ModelInfo":
        triples = [(p.piece, p.type, p.score) for p in proto.pieces]  # one pass: protobuf access is slow
        pieces = [t[0] for t in triples]
        types = [t[1] for t in triples]
        scores = [t[2] for t in triples]
        merge_ids = [i for i, (s, t) in enumerate(zip(pieces, types)) if t == NORMAL and len(s) > 1]
        # Stable sort by descending score: SentencePiece prefers the higher score.
        merge_ids.sort(key=lambda i: -scores[i])
        merge_scores = [scores[i] for i in merge_ids]
        specials = tuple((s, t) for s, t in zip(pieces, types) if t in (CONTROL, UNKNOWN, BYTE))
        spec = proto.trainer_spec
        key = b"|".join([proto.normalizer_spec.SerializeToString(deterministic=True),
                         proto.denormalizer_spec.SerializeToString(deterministic=True),
                         repr(specials).encode(), repr((spec.byte_fallback, spec.model_type)).encode()])
        return cls(
            pieces=pieces, types=types, scores=scores, merges=[pieces[i] for i in merge_ids],
            chars=frozenset(s for s, t in zip(pieces, types) if t == NORMAL and len(s) == 1),
            user_defined=frozenset(s for s, t in zip(pieces, types) if t == USER_DEFINED),
            byte_fallback=bool(spec.byte_fallback), unk_piece=spec.unk_piece or "<unk>", spec_key=key,
            merge_scores=merge_scores,
            has_unused=UNUSED in types,
            piece_to_id={s: i for i, s in enumerate(pieces)})


def check_nested(small: ModelInfo, large: ModelInfo) -> str | None:
    """None when `small` is `large` truncated to its first K merges; otherwise the reason it is not."""
    if small.spec_key != large.spec_key:
        return "normalizer, byte fallback or special pieces differ"
    if small.has_unused or large.has_unused:
        return "has UNUSED pieces (SentencePiece re-segments them)"
    if small.user_defined != large.user_defined:
        return "user-defined pieces differ"
    k = len(small.merges)
    if small.merges != large.merges[:k]:
        return "its merges are not the first merges of the largest candidate"
    # Merges with equal scores are applied leftmost-first, not by rank: a truncation may not split
    # such a tie group (Mixtral's whitespace runs all score -1e9), and ties must be the same.
    ls, ss = large.merge_scores, small.merge_scores
    if 0 < k < len(ls) and ls[k - 1] == ls[k]:
        return "it keeps only part of a group of merges that share one score"
    if any((ss[i] == ss[i + 1]) != (ls[i] == ls[i + 1]) for i in range(k - 1)):
        return "its merge scores tie differently from the largest candidate's"
    if not small.chars <= large.chars:
        return "it has characters the largest candidate lacks"
    if not large.byte_fallback and small.chars != large.chars:
        return "characters differ and there is no byte fallback"
    return None


def _byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"


class NestedCounter:
    """Count vectors for every candidate nested in `large`, from `large`'s own token counts.

    `large_counts[i]` is how often `large` produced piece id i on the sample (from SentencePiece).
    Symbols are indexed in a universe that starts with `large`'s piece ids.
    """

    def __init__(self, large: ModelInfo, large_counts: np.ndarray):
        self.large = large
        self.rank = {p: r + 1 for r, p in enumerate(large.merges)}  # 1-based merge rank
        # Every piece SentencePiece may form by concatenation (normal, user-defined, unused).
        self._mergeable = {s: sc for s, t, sc in zip(large.pieces, large.types, large.scores)
                           if t in (NORMAL, USER_DEFINED, UNUSED) and len(s) > 1}
        self.symbols: list[str] = list(large.pieces)
        self._index = dict(large.piece_to_id)
        base: dict[int, int] = {}  # counts for K = 0 (before any merge), by symbol id
        events: list[tuple[int, int, tuple[int, ...], tuple[int, ...], int]] = []
        for pid in np.flatnonzero(large_counts):
            c = int(large_counts[pid])
            piece, ptype = large.pieces[pid], large.types[pid]
            if ptype != NORMAL or len(piece) == 1 or piece in large.user_defined:
                # bytes, <unk>, user-defined pieces and single characters never split further
                # (a character a candidate lacks is turned into bytes later, in candidate_vector)
                base[int(pid)] = base.get(int(pid), 0) + c
                continue
            states = self._truncation_states(piece)
            for sym in states[0][1]:
                base[sym] = base.get(sym, 0) + c
            for (threshold, new), (_, old) in zip(states[1:], states[:-1]):
                events.append((threshold, int(pid), old, new, c))
        events.sort(key=lambda e: (e[0], e[1]))
        vec = np.zeros(len(self.symbols), dtype=np.int64)
        for sym, c in base.items():
            vec[sym] = c
        self._base = vec
        self._events = events
        # self.symbols is complete now (only _truncation_states adds to it): per-symbol tables for candidate_vector
        self._rank_arr = np.array([self.rank.get(s, 0) if len(s) > 1 else 0 for s in self.symbols], dtype=np.int64)
        self._char_ids = [i for i, s in enumerate(self.symbols) if len(s) == 1]

    def _sym(self, s: str) -> int:
        i = self._index.get(s)
        if i is None:
            i = self._index[s] = len(self.symbols)
            self.symbols.append(s)
        return i

    def _truncation_states(self, piece: str) -> list[tuple[int, tuple[int, ...]]]:
        """[(K threshold, symbol ids)]: the segmentation of `piece` for K >= threshold (until the next).

        Replays SentencePiece's BPE on the characters of `piece`: merge the adjacent pair whose
        concatenation scores highest, leftmost on ties. A truncated vocabulary keeps the state before
        the first merge whose rank exceeds K, so a new state starts where the running maximum of the
        ranks grows.
        """
        syms = list(piece)
        states = [(0, tuple(self._sym(s) for s in syms))]
        running_max = 0
        while len(syms) > 1:
            best, best_score = -1, None
            for i in range(len(syms) - 1):
                sc = self._mergeable.get(syms[i] + syms[i + 1])
                if sc is not None and (best_score is None or sc > best_score):
                    best, best_score = i, sc
            if best < 0:
                break
            merged = syms[best] + syms[best + 1]
            syms[best:best + 2] = [merged]
            r = self.rank.get(merged, 0)
            state = tuple(self._sym(s) for s in syms)
            if r > running_max:
                running_max = r
                states.append((r, state))
            else:  # no new maximum: same K range as the previous state, which it replaces
                states[-1] = (states[-1][0], state)
        return states

    def counts_for(self, ks: Iterable[int]) -> dict[int, np.ndarray]:
        """{K: counts over `self.symbols`} for each merge count K, before per-candidate byte fallback."""
        out: dict[int, np.ndarray] = {}
        cur = self._base.copy()
        j = 0
        for k in sorted(set(ks)):
            while j < len(self._events) and self._events[j][0] <= k:
                _, _, old, new, c = self._events[j]
                for s in old:
                    cur[s] -= c
                for s in new:
                    cur[s] += c
                j += 1
            out[k] = cur.copy()
        return out

    def candidate_vector(self, small: ModelInfo, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(counts, vocab mask) over `self.symbols` for `small`.

        Single characters that `small` lacks fall back to their UTF-8 byte pieces (or `<unk>`), as
        SentencePiece does for a symbol that is not in the vocabulary. The mask marks `small`'s own
        learned pieces (merges, characters, user-defined), for the "never produced" count.
        """
        counts = counts.copy()
        in_small = np.zeros(len(self.symbols), dtype=bool)
        k = len(small.merges)
        in_small[(self._rank_arr > 0) & (self._rank_arr <= k)] = True
        for i in self._char_ids:
            s = self.symbols[i]
            if s in small.chars or s in small.user_defined:
                in_small[i] = True
            elif counts[i]:
                c = counts[i]
                counts[i] = 0
                if small.byte_fallback:
                    for b in s.encode("utf-8"):
                        counts[self._index[_byte_piece(b)]] += c
                else:
                    counts[self._index[small.unk_piece]] += c
        for s in small.user_defined:
            in_small[self._index[s]] = True
        return counts, in_small


def truncate_merges(proto: Any, k: int, drop_chars: Iterable[str] = ()) -> Any:
    """A copy of a BPE ModelProto keeping only its first `k` merges (and not the `drop_chars`).

    This is how nested candidates relate to the largest one; tests and benchmarks use it to build
    grids, and `check_nested` recognises its output.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    info = ModelInfo.from_proto(proto)
    drop = set(info.merges[k:]) | set(drop_chars)
    out = pb.ModelProto()
    out.CopyFrom(proto)
    del out.pieces[:]
    for p in proto.pieces:
        if p.type == NORMAL and p.piece in drop:
            continue
        out.pieces.add().CopyFrom(p)
    out.trainer_spec.vocab_size = len(out.pieces)
    return out
