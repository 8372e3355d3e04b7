"""Growing a byte-level BPE (tekken, Llama-3, Qwen2, GPT-2): continued BPE training and appended merges.

Why appended merges, and why continued training (Purason et al. 2025, "Teaching Old Tokenizers New Words",
arXiv 2512.03989). A byte-level BPE applies its merges in list order. New merges appended *after* the
base's fire only when no base merge applies any more, so the base's segmentation is reached first and then
refined. A new token whose two parts never meet after the base's merges would be dead; training the new
merges *from* the base's segmentation of the new text (each word encoded by the base, then ordinary BPE
pair counting on those tokens) only ever joins parts that do meet, so every new token is reachable by
construction, and every part of a new merge is a base token or an earlier new token (no missing
intermediates). HF `add_tokens` is not used: added tokens are matched before BPE and are not merges.

What may be added (`--script`): a new token's bytes must be *target-safe*: any valid UTF-8 text holding them
holds a character of the target script. That is so when the bytes contain a whole target character, or end
with the start of a character all of whose completions are target characters (e.g. the first two bytes of
U+4E00..U+4E3F, all Han): such partial tokens are what makes a Han character the base lacks joinable.
A token whose own text the base's pre-tokenizer cuts in
several pieces (its regex depends on context) is not added either, so every new token's own text encodes to
it. Text without a target character then cannot contain a new token's bytes, so no new merge can fire on it and
it encodes to exactly the base ids (also with `ignore_merges`, which looks up a whole pre-token: a new token
cannot equal a pre-token without the script). A pair whose product is already a token (of the base, or an
earlier new one reached by another split) is never merged: one new merge = one new token, and base tokens
keep the merges that make them.

The trainer is greedy: at each step it merges the most frequent allowed pair (ties: the pair of smaller ids),
so the first k merges of a run to N > k are exactly the merges of a run to k. `vocab train` therefore trains
once at the largest size and cuts the smaller candidates (tests/test_bytelevel.py checks a cut candidate
against an independent training).
"""
from __future__ import annotations

import heapq
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from common.bytelevel import ByteLevelTokenizer, bytes_or_none, from_bytelevel, to_bytelevel
from common.scripts import _RANGES, ScriptFilter


# ---------------------------------------------------------------------------------------------
# target safety

def _merged_ranges(script: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(_RANGES[script]):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _utf8_len(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0  # a continuation byte or a byte that never starts a character


class TargetSafety:
    """`safe(b)`: does every valid UTF-8 text that contains the bytes `b` contain a target-script character?"""

    def __init__(self, script: ScriptFilter):
        self.script = script
        self.ranges = [] if script.name == "any" else _merged_ranges(script.name)

    def _covers(self, lo: int, hi: int) -> bool:
        return any(a <= lo and hi <= b for a, b in self.ranges)

    def safe(self, b: bytes) -> bool:
        if self.script.name == "any":
            return True
        i, n = 0, len(b)
        while i < n and 0x80 <= b[i] <= 0xBF:  # the end of a character that began before: unknown
            i += 1
        while i < n:
            k = _utf8_len(b[i])
            if k == 0:
                i += 1
                continue
            if i + k <= n:
                try:
                    ch = b[i:i + k].decode("utf-8")
                except UnicodeDecodeError:
                    i += 1
                    continue
                if self.script.is_char(ch):
                    return True
                i += k
                continue
            # b ends with the first n - i bytes of a k-byte character: which code points can it become?
            head = b[i:]
            if any(not 0x80 <= c <= 0xBF for c in head[1:]):
                return False
            lo = bytes(head) + b"\x80" * (k - len(head))
            hi = bytes(head) + b"\xbf" * (k - len(head))
            return self._covers(_code_point(lo), _code_point(hi))
        return False


def _code_point(b: bytes) -> int:
    k = len(b)
    cp = b[0] & (0x7F, 0x1F, 0x0F, 0x07)[k - 1]
    for c in b[1:]:
        cp = (cp << 6) | (c & 0x3F)
    return cp


# ---------------------------------------------------------------------------------------------
# words: the base's segmentation of the new text

@dataclass
class Words:
    """Distinct pre-tokens of the text that hold a target character, as base ids, with their counts."""
    seqs: list[list[int]]
    freqs: list[int]
    lines: int = 0
    lines_with_target: int = 0
    pre_tokens: int = 0


def collect_words(base: ByteLevelTokenizer, lines: Iterable[str], script: ScriptFilter,
                  batch: int = 2000, progress: bool = False) -> Words:
    """Encode the lines with the base (its normalizer, pre-tokenizer, added tokens and BPE, no specials) and
    count each pre-token's id sequence. Pre-tokens without a target character cannot hold a new token and
    are left out, as are added tokens (matched before BPE)."""
    from tqdm import tqdm

    tok = base.tokenizer()
    added_ids = {int(t["id"]) for t in base.added_tokens}
    counts: Counter = Counter()
    stats = {"lines": 0, "target": 0, "pre_tokens": 0}
    buf: list[str] = []

    def flush() -> None:
        for enc in tok.encode_batch(buf, add_special_tokens=False):
            ids, wids = enc.ids, enc.word_ids
            start = 0
            for j in range(1, len(ids) + 1):
                if j == len(ids) or wids[j] != wids[start] or wids[j] is None:
                    word = ids[start:j]
                    start = j
                    stats["pre_tokens"] += 1
                    if len(word) > 1 and not added_ids.intersection(word):
                        counts[tuple(word)] += 1
        buf.clear()

    for line in tqdm(lines, desc="encoding with the base", disable=not progress, mininterval=1.0):
        stats["lines"] += 1
        if not script.has(line):
            continue
        stats["target"] += 1
        buf.append(line)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    # Words whose bytes hold no target-safe span cannot gain a new token; the trainer skips their pairs anyway.
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return Words([list(k) for k, _ in items], [v for _, v in items], stats["lines"], stats["target"],
                 stats["pre_tokens"])


# ---------------------------------------------------------------------------------------------
# continued BPE training

@dataclass
class Extension:
    """New merges (byte-level strings) in order; `counts[i]` = pair frequency when merge i was chosen."""
    merges: list[tuple[str, str]]
    counts: list[int]
    stats: dict[str, Any] = field(default_factory=dict)

    def tokens(self) -> list[str]:
        return [a + b for a, b in self.merges]


def _splitter(base: ByteLevelTokenizer):
    """`split(b)`: is `b` whole UTF-8 text that the base's normalizer + pre-tokenizer cut into several
    pre-tokens on its own? Such a token occurs inside longer pre-tokens (the pre-tokenizer's regex depends on
    context: tekken keeps "甲Ａ" whole in "甲Ａ联赛" but cuts it alone), yet its own text could never encode to
    it, so it is not added."""
    tok = base.tokenizer()
    norm, pre = tok.normalizer, tok.pre_tokenizer

    def split(b: bytes) -> bool:
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            return False
        if norm is not None:
            text = norm.normalize_str(text)
        return pre is not None and len(pre.pre_tokenize_str(text)) != 1

    return split


def continue_bpe(base: ByteLevelTokenizer, words: Words, n_merges: int, script: ScriptFilter,
                 min_count: int = 2, progress: bool = False) -> Extension:
    """Up to `n_merges` new merges learned from the base's segmentation of `words` (module docstring).

    Stops earlier when no allowed pair occurs `min_count` times or more."""
    from tqdm import tqdm

    started = time.time()
    vocab = base.vocab
    tb: list[bytes] = [b""] * base.size()
    for t, i in vocab.items():
        try:
            tb[i] = from_bytelevel(t)
        except KeyError:  # a special token kept in the vocabulary, outside the byte alphabet: never merged
            pass
    known = set(tb) - {b""}
    safety = TargetSafety(script)
    seqs, freqs = [list(s) for s in words.seqs], words.freqs
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (s, f) in enumerate(zip(seqs, freqs)):
        for p in zip(s, s[1:]):
            pair_count[p] += f
            where[p].add(w)
    heap = [(-c, p[0], p[1]) for p, c in pair_count.items()]
    heapq.heapify(heap)
    blocked: set[tuple[int, int]] = set()
    stats = {"blocked_existing_token": 0, "blocked_not_target_safe": 0, "blocked_split_by_pre_tokenizer": 0}
    splits = _splitter(base)
    merges: list[tuple[str, str]] = []
    counts: list[int] = []
    bar = tqdm(total=n_merges, desc="continued BPE", disable=not progress, mininterval=1.0)
    while len(merges) < n_merges and heap:
        neg, a, b = heapq.heappop(heap)
        pair = (a, b)
        current = pair_count.get(pair, 0)
        if pair in blocked or current <= 0:
            continue
        if current != -neg:  # stale entry (the count fell): queue the current count
            heapq.heappush(heap, (-current, a, b))
            continue
        if current < min_count:
            break
        product = tb[a] + tb[b]
        if product in known:
            blocked.add(pair)
            stats["blocked_existing_token"] += 1
            continue
        if not safety.safe(product):
            blocked.add(pair)
            stats["blocked_not_target_safe"] += 1
            continue
        if splits(product):
            blocked.add(pair)
            stats["blocked_split_by_pre_tokenizer"] += 1
            continue
        new_id = len(tb)
        tb.append(product)
        known.add(product)
        merges.append((to_bytelevel(tb[a]), to_bytelevel(tb[b])))
        counts.append(current)
        bar.update(1)
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for w in where.pop(pair):
            s, f = seqs[w], freqs[w]
            old = Counter(zip(s, s[1:]))
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
            new = Counter(zip(out, out[1:]))
            for p, c in old.items():
                delta[p] -= c * f
                if p not in new and p != pair:
                    where[p].discard(w)
            for p, c in new.items():
                delta[p] += c * f
                where[p].add(w)
        pair_count.pop(pair, None)
        delta.pop(pair, None)
        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_count.get(p, 0) + d
            if c > 0:
                pair_count[p] = c
                if d > 0:
                    heapq.heappush(heap, (-c, p[0], p[1]))
            else:
                pair_count.pop(p, None)
                where.pop(p, None)
    bar.close()
    stats.update(merges=len(merges), seconds=round(time.time() - started, 3),
                 stopped="size reached" if len(merges) >= n_merges else f"no allowed pair seen {min_count}+ times")
    return Extension(merges, counts, stats)


# ---------------------------------------------------------------------------------------------
# the extended tokenizer

@dataclass
class Plan:
    """Merges to append (in order) and what was left out, for `vocab merge`."""
    merges: list[tuple[str, str]]
    counts: dict[str, int]


def plan_extension(base: ByteLevelTokenizer, merges: Iterable[tuple[str, str]], script: ScriptFilter) -> Plan:
    """Keep the candidate's merges that may be appended to `base`, in order: both parts already tokens (of the
    base or kept earlier), a product that is target-safe and not already a token."""
    vocab = base.vocab
    have = set(vocab) | {t["content"] for t in base.added_tokens}
    safety = TargetSafety(script)
    kept: list[tuple[str, str]] = []
    counts = {"candidate_merges": 0, "duplicates": 0, "not_target_script": 0, "missing_part": 0, "added_merges": 0}
    for a, b in merges:
        counts["candidate_merges"] += 1
        t = a + b
        if t in have:
            counts["duplicates"] += 1
        elif a not in have or b not in have:
            counts["missing_part"] += 1  # its part was left out above, so it could never fire
        elif bytes_or_none(t) is None or not safety.safe(from_bytelevel(t)):
            counts["not_target_script"] += 1
        else:
            kept.append((a, b))
            have.add(t)
            counts["added_merges"] += 1
    return Plan(kept, counts)


def extended_json(base: ByteLevelTokenizer, merges: list[tuple[str, str]], special: list[str]) -> tuple[dict, int]:
    """The base's tokenizer.json with `merges` appended (and their tokens at ids after every base id), then the
    `special` tokens as special added tokens. Returns (data, first new id)."""
    import copy

    data = copy.deepcopy(base.data)
    model = data["model"]
    first = base.size()
    vocab = model["vocab"]
    # `tokenizers` gives an added token that the BPE vocabulary lacks the next id after that vocabulary when it
    # loads a tokenizer.json (the stored id is not used). Llama-3 and Qwen2 keep their special tokens at ids after
    # the BPE vocabulary, so new BPE ids after them would move them: they go into the vocabulary at their own
    # ids (as tekken's specials are). Added tokens are matched before BPE runs, so this changes no encoding.
    used = set(vocab.values())
    for t in data.get("added_tokens") or []:
        if t["content"] not in vocab and int(t["id"]) not in used:
            vocab[t["content"]] = int(t["id"])
            used.add(int(t["id"]))
    old_merges = model.get("merges") or []
    as_string = bool(old_merges) and isinstance(old_merges[0], str)
    new_merges = list(old_merges)
    for k, (a, b) in enumerate(merges):
        vocab[a + b] = first + k
        new_merges.append(f"{a} {b}" if as_string else [a, b])
    model["merges"] = new_merges
    added = data.setdefault("added_tokens", []) or []
    data["added_tokens"] = added
    for k, s in enumerate(special):
        added.append({"id": first + len(merges) + k, "content": s, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    return data, first


def merges_only_tokenizer(data: dict):
    """A `tokenizers.Tokenizer` of the BPE model alone with `ignore_merges` off: `tokenize(t)` then shows
    whether merges (not a whole-word lookup) build token `t`."""
    import json

    from tokenizers import Tokenizer

    model = dict(data["model"], ignore_merges=False, dropout=None)
    bare = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": None, "model": model}
    return Tokenizer.from_str(json.dumps(bare))


def unreachable(data: dict, tokens: list[str], first_id: int) -> dict[str, list[str]]:
    """Added tokens that do not come out as themselves:
    - `merges`: the BPE model with ignore_merges off, on the token's bytes, does not build it;
    - `text`: the full tokenizer (normalizer, pre-tokenizer, added tokens), on the token's text (tokens that
      are whole UTF-8 text), does not give its single id; a token of partial characters has no text of its own;
    - `added_tokens`: the token is an added token (matched before BPE, not a merge)."""
    import json

    from tokenizers import Tokenizer

    bare = merges_only_tokenizer(data)
    full = Tokenizer.from_str(json.dumps(data))
    added = {t["content"] for t in data.get("added_tokens") or []}
    vocab = data["model"]["vocab"]
    bad: dict[str, list[str]] = {"merges": [], "text": [], "added_tokens": []}
    texts, which = [], []
    for t in tokens:
        if [x.value for x in bare.model.tokenize(t)] != [t]:
            bad["merges"].append(t)
        if t in added:
            bad["added_tokens"].append(t)
        try:
            texts.append(from_bytelevel(t).decode("utf-8"))
            which.append(t)
        except (UnicodeDecodeError, KeyError):
            pass
    for t, enc in zip(which, full.encode_batch(texts, add_special_tokens=False)):
        if enc.ids != [vocab[t]]:
            bad["text"].append(t)
    return bad


__all__ = ["TargetSafety", "Words", "collect_words", "Extension", "continue_bpe", "Plan", "plan_extension",
           "extended_json", "unreachable", "merges_only_tokenizer"]
