"""vocab score / vocab pick / audit with byte-level candidates and tokenizers (the real tekken base)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.audit import AuditConfig, audit_tables
from analysis.nested_bytelevel import _counts, candidate_tokenizer, nested_counts
from analysis.pick import PickConfig, pick
from analysis.score import ScoreConfig, score_candidates
from common.bytelevel import load_bytelevel
from demo.sources import write_jsonl
from vocab.bytelevel_stages import load_candidate


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tekken_path, news_lines, english_paragraphs):
    from vocab.merge import VocabMergeConfig, merge_into_base
    from vocab.train import VocabTrainConfig, train_candidates

    d = tmp_path_factory.mktemp("score_bl")
    zh = write_jsonl(d / "zh.jsonl", [t for i, t in enumerate(news_lines[:4000]) if i % 20])
    dev = write_jsonl(d / "dev.jsonl", news_lines[:4000:20] + news_lines[5000:5300])
    en = write_jsonl(d / "en.jsonl", english_paragraphs[:800])
    cands = train_candidates(VocabTrainConfig(inputs=[str(zh)], out=str(d / "cands"), base=str(tekken_path),
                                              sizes=["500:2000:500"], progress=False))
    tok = merge_into_base(VocabMergeConfig(base=str(tekken_path), add=str(cands / "candidates/added2000.json"),
                                           out=str(d / "tok")))
    return {"dir": d, "cands": cands, "dev": dev, "en": en, "tok": tok}


def test_nested_counts_equal_tokenizing_with_each_candidate(tekken_path, grid, news_lines):
    base = load_bytelevel(tekken_path)
    first = base.size()
    large = load_candidate(grid["cands"] / "candidates/added2000.json", tekken_path).merges
    vocab = dict(base.vocab)
    parts = []
    for j, (a, b) in enumerate(large):
        parts.append((vocab[a], vocab[b]))
        vocab[a + b] = first + j
    lines = list(news_lines[5000:5600]) + ["中国人民", "人民日报社论", " 新华社北京", "中" * 50]
    big = _counts(candidate_tokenizer(base, large), lines, first + len(large))
    derived = nested_counts(big, first, parts, [0, 500, 1000, 1500, 2000])
    for k, vec in derived.items():
        direct = _counts(candidate_tokenizer(base, large[:k]), lines, first + k)
        assert np.array_equal(vec, direct), k
    assert derived[0].sum() > derived[2000].sum() * 1.2  # the grid really differs


def test_score_and_pick_on_byte_level_candidates(tmp_path, tekken_path, grid):
    kw = dict(candidates_dir=str(grid["cands"]), corpus=[str(grid["dev"])], base=str(tekken_path), progress=False)
    nested = score_candidates(ScoreConfig(**kw, out=str(tmp_path / "s1")))
    direct = score_candidates(ScoreConfig(**kw, out=str(tmp_path / "s2"), nested=False))
    a = json.loads((nested / "scores.json").read_text())
    b = json.loads((direct / "scores.json").read_text())
    assert [r["method"] for r in a["rows"]] == ["nested"] * 4 and [r["method"] for r in b["rows"]] == ["direct"] * 4
    for ra, rb in zip(a["rows"], b["rows"]):
        for k in ("size", "tokens", "alp", "renyi_efficiency", "never_produced", "tokens_han", "byte_tokens"):
            assert ra[k] == rb[k], (k, ra, rb)
    rows = a["rows"]
    assert [r["size"] for r in rows] == [500, 1000, 1500, 2000] and all(r["chars"] == 0 for r in rows)
    assert [r["vocab_pieces"] for r in rows] == [131572, 132072, 132572, 133072]
    tokens = [r["tokens"] for r in rows]
    assert tokens == sorted(tokens, reverse=True) and rows[-1]["ratio_to_base"] < 0.85
    assert a["base"]["tokens"] > tokens[0]
    m = json.loads((nested / "manifest.json").read_text())
    assert m["counts"]["tokenizations"] == 1
    chosen = pick(PickConfig(scores_dir=str(nested), size=1500))
    assert chosen == grid["cands"].resolve() / "candidates/added1500.json"


def test_audit_side_by_side(tekken_path, base_model_path, grid):
    from vocab.bytelevel_stages import ConvertConfig, convert_base

    folder = convert_base(ConvertConfig(source=str(tekken_path), out=str(grid["dir"] / "nemo")))
    rows = audit_tables(AuditConfig(tokenizers=[str(base_model_path), str(tekken_path), str(folder), str(grid["tok"])],
                                    corpus=[str(grid["dev"]), str(grid["en"])], progress=False))
    by = {(r["corpus"], r["tokenizer"]): r for r in rows}
    zh, en = str(grid["dev"]), str(grid["en"])
    names = sorted({r["tokenizer"] for r in rows})
    assert len(names) == 4, names
    t = {n: {c: by[(c, n)]["tokens"] for c in (zh, en)} for n in names}
    mixtral, tekken, nemo, graft = (next(n for n in names if key in n) for key in
                                    ("tokenizer.model", "tekken_240718", "nemo", "tok"))
    assert t[tekken] == t[nemo]                  # the tekken file and its converted folder
    assert t[graft][en] == t[tekken][en]          # English untouched
    assert t[graft][zh] < 0.8 * t[tekken][zh] < t[mixtral][zh]
    assert by[(zh, graft)]["vocab_size"] == 133072
