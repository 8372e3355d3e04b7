"""analysis: vocab score (ALP, compression, Rényi, nested fast path), knee, pick, on real text.

Candidates are built here the way `vocab train` builds them (one SentencePiece BPE training, smaller
candidates cut to its first merges), plus truncations of Mixtral's real tokenizer.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from analysis.alp import (alp_by_lines, alp_from_counts, piece_script, renyi_efficiency, sample_lines,
                          script_char_counts)
from analysis.knee import choose, kneedle
from analysis.nested import ModelInfo, NestedCounter, check_nested, truncate_merges
from analysis.pick import PickConfig, pick
from analysis.score import ScoreConfig, read_candidates, score_candidates, score_rows, read_sample
from common.errors import GraftError
from common.tokenizer_files import load_model_proto
from demo.sources import write_jsonl
from workflows.cli import main as graft_main


def _train(lines, vocab_size) -> pb.ModelProto:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=0.9995, split_digits=True, num_threads=2, minloglevel=2,
        max_sentence_length=1 << 16, allow_whitespace_only_pieces=True)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    return proto


def write_candidates(root, groups: dict[int, list[pb.ModelProto]]):
    """A folder in the `vocab train` contract: candidates/chars{C}_size{N}.model + manifest.json."""
    (root / "candidates").mkdir(parents=True)
    entries = []
    for chars, protos in groups.items():
        for proto in protos:
            size = len(proto.pieces)
            rel = f"candidates/chars{chars}_size{size}.model"
            (root / rel).write_bytes(proto.SerializeToString())
            entries.append({"chars": chars, "size": size, "path": rel})
    (root / "manifest.json").write_text(json.dumps({"stage": "vocab train", "status": "done",
                                                    "candidates": entries}))
    return root


@pytest.fixture(scope="module")
def trained(news_lines, english_paragraphs):
    return _train(list(news_lines[:3000]) + list(english_paragraphs[:800]), 6000)


@pytest.fixture(scope="module")
def eval_corpus(tmp_path_factory, news_lines, english_paragraphs):
    """Held-out real Chinese news and English paragraphs, plus one broken line (bad JSON)."""
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    write_jsonl(path, list(news_lines[3000:5000]) + list(english_paragraphs[800:1600]))
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"text": "broken\n')
    return path


@pytest.fixture(scope="module")
def cand_dir(tmp_path_factory, trained):
    """Two chars values x four sizes, nested, plus one independently trained (not nested) candidate."""
    info = ModelInfo.from_proto(trained)
    rare = sorted(info.chars, key=lambda c: trained.pieces[info.piece_to_id[c]].score)[:400]  # least frequent
    n = len(info.merges)
    ks = [n // 8, n // 4, n // 2, n]
    groups = {len(info.chars): [truncate_merges(trained, k) for k in ks],
              len(info.chars) - len(rare): [truncate_merges(trained, k, rare) for k in ks]}
    return write_candidates(tmp_path_factory.mktemp("cands"), groups)


def _cfg(cand_dir, corpus, out, **kw):
    args = {"samples": 2000, "progress": False, **kw}
    return ScoreConfig(candidates_dir=str(cand_dir), corpus=[str(corpus)], out=str(out), **args)


def _by_key(rows):
    return {(r["chars"], r["size"]): r for r in rows}


NUMERIC_EXACT = ("tokens", "never_produced", "tokens_han", "tokens_latin", "tokens_digits", "tokens_other",
                 "byte_tokens")


def _assert_rows_equal(fast, direct):
    assert fast.keys() == direct.keys()
    for key in fast:
        f, d = fast[key], direct[key]
        for col in NUMERIC_EXACT:
            assert f[col] == d[col], (key, col)
        for col in ("alp", "renyi_efficiency", "tokens_per_char", "bytes_per_token"):
            assert abs(f[col] - d[col]) <= 1e-9, (key, col, f[col], d[col])


def test_nested_fast_path_equals_direct_tokenization(cand_dir, eval_corpus, tmp_path):
    cands = read_candidates(cand_dir)
    sample = read_sample([str(eval_corpus)], 2000, 1, None)
    fast, _ = score_rows(_cfg(cand_dir, eval_corpus, tmp_path), sample, cands)
    direct, _ = score_rows(_cfg(cand_dir, eval_corpus, tmp_path, nested=False), sample, cands)
    assert {r["method"] for r in fast} == {"nested"} and {r["method"] for r in direct} == {"direct"}
    _assert_rows_equal(_by_key(fast), _by_key(direct))
    # ALP of the fast path against the reference's own loop (per-line sums of ln p, then the mean).
    for r in fast[:: 3]:
        sp = spm.SentencePieceProcessor(model_file=r["path"])
        assert abs(r["alp"] - alp_by_lines(sp.encode(sample.lines))) <= 1e-9
    # Smaller vocabularies: lower ALP and more tokens, on both curves.
    for chars in {r["chars"] for r in fast}:
        curve = sorted((r for r in fast if r["chars"] == chars), key=lambda r: r["size"])
        assert all(a["alp"] < b["alp"] and a["tokens"] > b["tokens"] for a, b in zip(curve, curve[1:]))


def test_nested_fast_path_on_mixtral_truncations(tmp_path, base_model_path, news_lines, english_paragraphs,
                                                 review_lines):
    """Mixtral's real tokenizer cut to fewer merges (its whitespace merges tie at -1e9: the cut keeps them whole)."""
    base = load_model_proto(base_model_path)
    info = ModelInfo.from_proto(base)
    n = len(info.merges)
    tied = sum(1 for s in info.merge_scores if s == info.merge_scores[-1])
    assert tied == 14  # the 14 whitespace-run pieces
    ks = [0, 300, 5000, n - tied, n]
    cands = write_candidates(tmp_path / "cands", {len(info.chars): [truncate_merges(base, k) for k in ks]})
    corpus = write_jsonl(tmp_path / "mix.jsonl", list(news_lines[:600]) + list(review_lines[:600])
                         + list(english_paragraphs[:600]))
    cfg = _cfg(cands, corpus, tmp_path / "out")
    sample = read_sample([str(corpus)], 2000, 1, None)
    fast, _ = score_rows(cfg, sample, read_candidates(cands))
    direct, _ = score_rows(ScoreConfig(**{**cfg.__dict__, "nested": False}), sample, read_candidates(cands))
    assert {r["method"] for r in fast} == {"nested"}
    _assert_rows_equal(_by_key(fast), _by_key(direct))
    full = max(fast, key=lambda r: r["size"])
    sp = spm.SentencePieceProcessor(model_file=str(base_model_path))
    assert full["tokens"] == sum(map(len, sp.encode(sample.lines)))
    # Cutting inside the tied group is refused (the fast path would not know the order).
    assert "share one score" in check_nested(ModelInfo.from_proto(truncate_merges(base, n - 3)), info)


def test_not_nested_candidate_is_scored_directly(tmp_path, trained, news_lines, english_paragraphs, eval_corpus):
    other = _train(list(news_lines[6000:8000]) + list(english_paragraphs[1600:2000]), 5000)
    info = ModelInfo.from_proto(trained)
    cands = write_candidates(tmp_path / "c", {len(info.chars): [trained, truncate_merges(trained, 500)],
                                              len(ModelInfo.from_proto(other).chars): [other]})
    # `other` is alone in its group (nested with itself); put it in the same group to force "direct".
    manifest = json.loads((cands / "manifest.json").read_text())
    for e in manifest["candidates"]:
        e["chars"] = 1
    (cands / "manifest.json").write_text(json.dumps(manifest))
    rows, _ = score_rows(_cfg(cands, eval_corpus, tmp_path / "o"), read_sample([str(eval_corpus)], 2000, 1, None),
                         read_candidates(cands))
    methods = {r["size"]: r["method"] for r in rows}
    assert methods[len(other.pieces)] == "direct" and methods[len(trained.pieces)] == "nested"
    row = next(r for r in rows if r["method"] == "direct")
    assert "not the first merges" in row["direct_reason"]


def test_score_stage_outputs_pick_and_cli(cand_dir, eval_corpus, tmp_path, base_model_path, capsys):
    out = tmp_path / "scores"
    rc = graft_main(["vocab", "score", str(cand_dir), "--corpus", str(eval_corpus), "--out", str(out),
                     "--samples", "1500", "--base", str(base_model_path), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr()
    assert printed.err.strip() == f"graft: vocab score: 1 records rejected (bad_json: 1) (written to {out / 'rejects.jsonl'})"
    assert f"scored 8 candidates on 1500 lines -> {out}" in printed.out
    manifest = json.loads((out / "manifest.json").read_text())
    scores = json.loads((out / "scores.json").read_text())
    assert manifest["status"] == "done" and manifest["counts"]["candidates"] == 8
    assert manifest["counts"]["tokenizations"] == 2  # one per chars value
    assert manifest["counts"]["rejected"] == 1
    rows = scores["rows"]
    expected = choose(rows)["pick"]
    assert manifest["pick"] == expected == scores["pick"]
    assert manifest["pick"]["path"].endswith(".model") and manifest["pick"]["path"].startswith("/")
    csv_lines = (out / "scores.csv").read_text().splitlines()
    assert len(csv_lines) == 9 and csv_lines[0].startswith("chars,size,vocab_pieces,merges,alp")
    assert (out / "alp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Pick: chars" in report and "alp.png" in report
    # Ratio to the base: same sample tokenized by Mixtral with SentencePiece.
    sample = read_sample([str(eval_corpus)], 1500, 1, None)
    base_tokens = sum(map(len, spm.SentencePieceProcessor(model_file=str(base_model_path)).encode(sample.lines)))
    assert scores["base"]["tokens"] == base_tokens
    for r in rows:
        assert r["ratio_to_base"] == pytest.approx(r["tokens"] / base_tokens, rel=1e-12)
        assert r["tokens_per_char"] == pytest.approx(r["tokens"] / sample.chars, rel=1e-12)
        assert r["tokens_han"] + r["tokens_latin"] + r["tokens_digits"] + r["tokens_other"] == r["tokens"]
    # Same inputs and seed: identical scores.
    out2 = tmp_path / "scores2"
    score_candidates(_cfg(cand_dir, eval_corpus, out2, samples=1500, base=str(base_model_path)))
    assert (out2 / "scores.csv").read_text() == (out / "scores.csv").read_text()

    # pick: default, then overrides; the finished score folder is left as it was.
    finished = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    capsys.readouterr()
    assert graft_main(["vocab", "pick", str(out)]) == 0
    assert capsys.readouterr().out.strip() == expected["path"]
    sizes = sorted({r["size"] for r in rows})
    chars = sorted({r["chars"] for r in rows})
    assert graft_main(["vocab", "pick", str(out), "--size", str(sizes[0]), "--chars", str(chars[0])]) == 0
    want = next(r for r in rows if r["size"] == sizes[0] and r["chars"] == chars[0])["path"]
    assert capsys.readouterr().out.strip() == want
    assert want != expected["path"]
    got = pick(PickConfig(scores_dir=str(out), size=sizes[-1]))
    best = max((r for r in rows if r["size"] == sizes[-1]), key=lambda r: r["alp"])
    assert str(got) == best["path"]
    with pytest.raises(GraftError, match=r"no candidate has size 7\. Fix: use one of"):
        pick(PickConfig(scores_dir=str(out), size=7))
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == finished


def test_candidates_folder_without_manifest(tmp_path, eval_corpus):
    (tmp_path / "cands" / "candidates").mkdir(parents=True)
    with pytest.raises(GraftError) as e:
        score_candidates(_cfg(tmp_path / "cands", eval_corpus, tmp_path / "out"))
    assert str(e.value) == (
        f"{tmp_path / 'cands'}: no manifest.json in the candidates folder (it is not a finished "
        f"`graft vocab train` output). Fix: run `graft vocab train ... --out {tmp_path / 'cands'}` to "
        "completion, or pass the folder it wrote")


def test_empty_corpus(tmp_path, cand_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n\n')
    with pytest.raises(GraftError) as e:
        score_candidates(_cfg(cand_dir, empty, tmp_path / "out"))
    assert str(e.value) == (
        f"{empty}: the corpus has no usable text (2 records rejected (empty: 2) (written to "
        f"{tmp_path / 'out' / 'rejects.jsonl'})). Fix: pass files with non-empty 'text' fields "
        "(.jsonl/.parquet) or non-empty lines (.txt)")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_pick_needs_a_finished_score_folder(tmp_path):
    with pytest.raises(GraftError, match="not a finished `graft vocab score` folder"):
        pick(PickConfig(scores_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# formulas, by hand

def test_alp_formula_by_hand():
    # Two lines: [a, b] and [a]; p(a) = 2/3, p(b) = 1/3.
    lines = [[0, 1], [0]]
    want = (math.log(2 / 3) + math.log(1 / 3) + math.log(2 / 3)) / 2
    assert alp_by_lines(lines) == pytest.approx(want, abs=1e-15)
    assert alp_from_counts(np.array([2, 1, 0]), 2) == pytest.approx(want, abs=1e-15)


def test_sample_matches_reference_shuffle():
    import random

    lines = [f" line {i} " for i in range(50)]
    ref = list(lines)
    random.seed(1)
    random.shuffle(ref)  # what VoCapXLM does before taking lines[:n_sample]
    assert sample_lines(lines, 10, seed=1) == [s.strip() for s in ref[:10]]


def test_renyi_efficiency_matches_tokenization_scorer():
    # tokenization-scorer's own test values (metric="renyi", power=2.5) for
    # "pick @@ed pick @@l @@ed pick @@les" and "pick @@e @@d pick @@l @@e @@d pick @@l @@e @@s".
    assert renyi_efficiency(np.array([3, 2, 1, 1])) == pytest.approx(0.8265064834225245, abs=1e-12)
    assert renyi_efficiency(np.array([3, 3, 2, 2, 1])) == pytest.approx(0.9204840242168808, abs=1e-3)
    p = np.array([3, 2, 1, 1]) / 7
    by_hand = math.log2((p ** 2.5).sum()) / (1 - 2.5) / math.log2(4)
    assert renyi_efficiency(np.array([3, 2, 1, 1])) == pytest.approx(by_hand, abs=1e-15)


def test_scripts():
    assert [piece_script(p) for p in ["▁中国", "经济", "▁the", "Ä", "19", "▁", "<0xE4>", "a1", "，"]] == [
        "han", "han", "latin", "latin", "digits", "other", "other", "other", "other"]
    assert script_char_counts("中国 ab12，") == {"han": 2, "latin": 2, "digits": 2, "other": 2}


def test_kneedle_and_choose():
    sizes = [1000, 2000, 3000, 4000, 5000, 6000]
    alp = [-900, -650, -630, -620, -612, -608]
    # scaled ALP 0, .856, .925, .959, .986, 1 minus scaled size 0, .2, .4, .6, .8, 1:
    # 0, .656, .525, .359, .186, 0 -> the knee is size 2000
    assert kneedle(sizes, alp) == 1
    assert kneedle(sizes, [-900, -700, -640, -620, -612, -608]) == 2  # .485 < .490: 3000
    assert kneedle([1, 2], [0, 1]) == 1
    rows = [{"chars": c, "size": s, "alp": a + d, "path": f"/c{c}_{s}"}
            for c, d in ((10, 0.0), (20, 5.0)) for s, a in zip(sizes, alp)]
    got = choose(rows)
    assert got["knee"]["size"] == 2000 and got["pick"]["chars"] == 20 and got["pick"]["path"] == "/c20_2000"
    assert choose(rows, chars=10)["pick"]["path"] == "/c10_2000"
    assert choose(rows, size=5000)["pick"]["path"] == "/c20_5000"
    with pytest.raises(GraftError, match="no candidate has chars 30. Fix: use one of 10, 20"):
        choose(rows, chars=30)


def test_nested_counter_counts_every_cut(trained, news_lines):
    """Direct check of the sweep on one model: every K equals SentencePiece on the cut model."""
    info = ModelInfo.from_proto(trained)
    lines = sample_lines(news_lines[5000:5600], 600)
    sp = spm.SentencePieceProcessor(model_proto=trained.SerializeToString())
    counts = np.bincount([i for ids in sp.encode(lines) for i in ids], minlength=len(trained.pieces))
    counter = NestedCounter(info, counts)
    ks = [0, 1, 7, 100, 999, len(info.merges)]
    for k, vec in counter.counts_for(ks).items():
        small = truncate_merges(trained, k)
        got, _ = counter.candidate_vector(ModelInfo.from_proto(small), vec)
        sps = spm.SentencePieceProcessor(model_proto=small.SerializeToString())
        want: dict[str, int] = {}
        for ids in sps.encode(lines):
            for i in ids:
                want[sps.id_to_piece(i)] = want.get(sps.id_to_piece(i), 0) + 1
        assert {counter.symbols[i]: int(got[i]) for i in np.flatnonzero(got)} == want, k
