"""`graft vocab check` for a tokenizer grown from a byte-level BPE base (tokenizer.json / tekken).

Each invariant is a count of violations; all must be 0 (the report has the same shape as the
SentencePiece check's, so `format_report` prints both):
- base_tokens_changed: base vocabulary entries (token -> id) missing or moved;
- base_merges_changed: the merged list does not start with the base's merges, in order;
- base_added_tokens_changed: the base's added/special tokens (id, content, flags) differ;
- ids_moved_on_load: `tokenizers` loads a token (vocabulary or added) at another id than the file states;
- pipeline_changed: normalizer, pre-tokenizer, post-processor, decoder or BPE options (ignore_merges,
  byte_fallback, ...) differ from the base's;
- new_ids_not_after_base: a new token's id is not above every base id;
- duplicate_tokens / duplicate_merges;
- new_merges_malformed: a new merge whose parts are not tokens by then, or whose token is not their join;
- added_without_target_script: a new token whose bytes are not target-safe (vocab/bytelevel.py);
- unreachable_merges: the BPE model with ignore_merges off does not build the token from its bytes;
- unreachable_text: the full tokenizer does not encode the token's own text to its id (whole-text tokens);
- added_as_added_tokens: a new (non-special) token stored as an added token instead of a merge;
- non_target_lines_changed: lines without the target script whose ids differ from the base's;
- special_tokens_changed: a base added token's text, or a line with one, encodes differently;
- lossy_lines: decode(encode(x)) != x, base or merged, on the corpus lines and the probes;
- special_tokens_not_single_id: a token of --special that does not encode to its one id;
- autotokenizer_problems: AutoTokenizer.from_pretrained(DIR) fails offline, or BOS/EOS/UNK/PAD differ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.bytelevel import ByteLevelTokenizer, bytes_or_none, from_bytelevel, load_bytelevel, token_text
from common.errors import GraftError
from common.io import read_json

_PIPELINE = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
_MODEL_OPTIONS = ("type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk",
                  "byte_fallback", "ignore_merges")


def _autotokenizer_problems(folder: Path, base: ByteLevelTokenizer) -> list[str]:
    from vocab.check import load_offline

    tok, problems = load_offline(folder)
    if tok is None:
        return problems
    base_ids = {**base.vocab, **{t["content"]: int(t["id"]) for t in base.added_tokens}}
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        want = base.config.get(attr, base.special_map.get(attr))
        if isinstance(want, dict):
            want = want.get("content")
        got = getattr(tok, attr)
        if want is None:
            continue
        if got != want or tok.convert_tokens_to_ids(want) != base_ids.get(want):
            problems.append(f"{attr} is {got!r} (id {tok.convert_tokens_to_ids(got) if got else None}), base has "
                            f"{want!r} (id {base_ids.get(want)})")
    return problems


def check_bytelevel(cfg: Any) -> dict[str, Any]:
    """The report of `graft vocab check` (cfg: vocab.check.CheckConfig) for a byte-level folder."""
    from tqdm import tqdm

    from common.scripts import ScriptFilter
    from vocab.bytelevel import TargetSafety, unreachable
    from vocab.check import PROBES, _lines, make_report, tally

    folder = Path(cfg.tokenizer)
    manifest = read_json(folder / "manifest.json") if (folder / "manifest.json").is_file() else {}
    script = ScriptFilter(cfg.script or manifest.get("config", {}).get("script") or "Han")
    merged = load_bytelevel(folder)
    base = load_bytelevel(cfg.base)
    lines, rejects = _lines(cfg.corpus, cfg.max_lines)
    if not lines:
        raise GraftError(f"{', '.join(cfg.corpus)}: no text lines found. Fix: pass files with text")

    bv, mv = base.vocab, merged.vocab
    base_size = base.size()
    changed = sum(1 for t, i in bv.items() if mv.get(t) != i)
    bm, mm = base.merges, merged.merges
    merges_changed = sum(1 for k, m in enumerate(bm) if k >= len(mm) or mm[k] != m)
    key = lambda t: {k: t.get(k) for k in ("id", "content", "single_word", "lstrip", "rstrip", "normalized",  # noqa: E731
                                          "special")}
    madded = {int(t["id"]): t for t in merged.added_tokens}
    added_changed = sum(1 for t in base.added_tokens if key(madded.get(int(t["id"]), {})) != key(t))
    # ids as `tokenizers` assigns them on load (it does not use an added token's stored id, see extended_json)
    mtok = merged.tokenizer()
    loaded_ids_differ = sum(1 for t, i in mv.items() if mtok.token_to_id(t) != i)
    loaded_ids_differ += sum(1 for i, t in madded.items() if mtok.token_to_id(t["content"]) != i)
    pipeline = sum(1 for k in _PIPELINE if base.data.get(k) != merged.data.get(k))
    pipeline += sum(1 for k in _MODEL_OPTIONS if base.data["model"].get(k) != merged.data["model"].get(k))

    base_added = {t["content"]: int(t["id"]) for t in base.added_tokens}
    new_tokens = sorted(((i, t) for t, i in mv.items() if t not in bv and base_added.get(t) != i), key=lambda x: x[0])
    new_ids = [i for i, _ in new_tokens]
    not_after = sum(1 for i in new_ids if i < base_size)
    # tokenizers keeps an added token that is also in the vocabulary (tekken's specials) under the same id
    id_to_token = {i: t for t, i in mv.items()}
    duplicate_ids = len(mv) - len(id_to_token)
    duplicate_ids += sum(1 for i, t in madded.items() if i in id_to_token and id_to_token[i] != t["content"])
    duplicate_ids += len(madded) - len({t["content"] for t in madded.values()})
    duplicate_merges = len(mm) - len(set(mm))
    new_merges = mm[len(bm):]
    have = set(bv) | {t["content"] for t in base.added_tokens}
    malformed = 0
    merge_tokens = []
    for a, b in new_merges:
        if a not in have or b not in have or (a + b) not in mv:
            malformed += 1
        have.add(a + b)
        merge_tokens.append(a + b)
    malformed += len(set(t for _, t in new_tokens) ^ set(merge_tokens))  # a new token without its merge, or back
    safety = TargetSafety(script)
    no_script = [t for _, t in new_tokens if bytes_or_none(t) is None or not safety.safe(from_bytelevel(t))]
    bad = unreachable(merged.data, [t for _, t in new_tokens], base_size)
    specials = list(manifest.get("special_tokens", []))
    base_added_contents = {t["content"] for t in base.added_tokens}
    added_new_nonspecial = [t for i, t in madded.items() if t["content"] not in base_added_contents
                            and t["content"] not in specials]

    btok, mtok = base.tokenizer(), merged.tokenizer()
    stats = {k: [0, 0, 0, 0] for k in ("target", "non_target")}
    non_target_changed = lossy = 0
    examples: dict[str, list[str]] = {"non_target_changed": [], "lossy": [], "special_tokens_changed": []}
    all_lines = list(PROBES) + lines
    batch = 1000
    for s in tqdm(range(0, len(all_lines), batch), desc="checking lines", disable=len(lines) < 20000, mininterval=1.0):
        chunk = all_lines[s:s + batch]
        b_ids = [e.ids for e in btok.encode_batch(chunk, add_special_tokens=False)]
        m_ids = [e.ids for e in mtok.encode_batch(chunk, add_special_tokens=False)]
        b_text = btok.decode_batch(b_ids, skip_special_tokens=False)
        m_text = mtok.decode_batch(m_ids, skip_special_tokens=False)
        for line, bi, mi, bt, mt in zip(chunk, b_ids, m_ids, b_text, m_text):
            if tally(stats, script, line, bi, mi):
                non_target_changed += 1
                examples["non_target_changed"].append(line[:80])
            if bt != line or mt != line:
                lossy += 1
                examples["lossy"].append(line[:80])
    special_changed = 0
    for t in base.added_tokens:
        for text in (t["content"], f"before{t['content']}after text", f"a {t['content']} b\n"):  # no target script
            if btok.encode(text, add_special_tokens=False).ids != mtok.encode(text, add_special_tokens=False).ids:
                special_changed += 1
                examples["special_tokens_changed"].append(text[:80])
                break
    if btok.encode("text", add_special_tokens=True).ids != mtok.encode("text", add_special_tokens=True).ids:
        special_changed += 1  # the post-processor's BOS
    special_bad = [t for t in specials if mtok.encode(t, add_special_tokens=False).ids != [mtok.token_to_id(t)]]
    invariants = {
        "base_tokens_changed": changed,
        "base_merges_changed": merges_changed,
        "base_added_tokens_changed": added_changed,
        "ids_moved_on_load": loaded_ids_differ,
        "pipeline_changed": pipeline,
        "new_ids_not_after_base": not_after,
        "duplicate_tokens": duplicate_ids,
        "duplicate_merges": duplicate_merges,
        "new_merges_malformed": malformed,
        "added_without_target_script": len(no_script) if script.name != "any" else 0,
        "unreachable_merges": len(bad["merges"]),
        "unreachable_text": len(bad["text"]),
        "added_as_added_tokens": len(bad["added_tokens"]) + len(added_new_nonspecial),
        "non_target_lines_changed": non_target_changed,
        "special_tokens_changed": special_changed,
        "lossy_lines": lossy,
        "special_tokens_not_single_id": len(special_bad),
        "autotokenizer_problems": len(problems := _autotokenizer_problems(folder, base)),
    }
    return make_report(folder, cfg, script, lines, rejects, invariants, stats, problems, examples, kind="bytelevel",
                  vocab_size=merged.size(), base_vocab_size=base_size, added_pieces=len(new_tokens),
                  partial_character_tokens=sum(1 for _, t in new_tokens if _partial(t)),
                  unreachable_examples={k: [token_text(t) for t in v[:10]] for k, v in bad.items() if v},
                  without_script_examples=[token_text(t) for t in no_script[:10]])


def _partial(token: str) -> bool:
    try:
        from_bytelevel(token).decode("utf-8")
        return False
    except (UnicodeDecodeError, KeyError):
        return True


__all__ = ["check_bytelevel"]
