"""graft vocab train: grid from one training per --chars, exact character counts, sampling, determinism."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from common.tokenizer_files import load_model_proto, load_sentencepiece
from demo.sources import write_jsonl
from vocab.sample import sample_lines
from vocab.train import RESERVED, VocabTrainConfig, count_chars, top_chars, train_bpe, train_candidates
from workflows.cli import main

CHARS = [1500, 1800]
SIZES = "2400:3600:400"


@pytest.fixture(scope="module")
def zh_file(tmp_path_factory, news_lines):
    return write_jsonl(tmp_path_factory.mktemp("zh") / "news.jsonl", news_lines[:1500])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, zh_file):
    out = tmp_path_factory.mktemp("train") / "cands"
    cfg = VocabTrainConfig(inputs=[str(zh_file)], out=str(out), chars=CHARS, sizes=[SIZES], max_sentences=1200,
                           seed=7, progress=False)
    return cfg, train_candidates(cfg)


def _single_chars(proto):
    return [p.piece for p in proto.pieces if p.type == 1 and len(p.piece) == 1]


def test_grid_is_complete_and_sized_exactly(trained):
    cfg, out = trained
    manifest = json.loads((out / "manifest.json").read_text())
    grid = {(c["chars"], c["size"]) for c in manifest["candidates"]}
    assert grid == {(c, n) for c in CHARS for n in (2400, 2800, 3200, 3600)}
    assert manifest["counts"]["trainings"] == 2 and manifest["counts"]["lines_sampled"] == 1200
    for cand in manifest["candidates"]:
        proto = load_model_proto(out / cand["path"])
        assert cand["path"] == f"candidates/chars{cand['chars']}_size{cand['size']}.model"
        assert len(proto.pieces) == cand["size"] == proto.trainer_spec.vocab_size
        assert len(_single_chars(proto)) == cand["chars"]  # exact character count
        assert sum(p.type == 6 for p in proto.pieces) == 256
        load_sentencepiece(out / cand["path"])  # loads as a lossless .model


def test_settings_match_the_base(trained, base_model_path):
    _, out = trained
    base = load_model_proto(base_model_path)
    cand = load_model_proto(out / "candidates/chars1500_size2400.model")
    for name in ("model_type", "byte_fallback", "split_digits", "split_by_unicode_script", "split_by_whitespace",
                 "split_by_number", "max_sentencepiece_length", "allow_whitespace_only_pieces", "unk_id",
                 "bos_id", "eos_id", "pad_id", "treat_whitespace_as_suffix"):
        assert getattr(cand.trainer_spec, name) == getattr(base.trainer_spec, name), name
    for name in ("name", "add_dummy_prefix", "remove_extra_whitespaces"):
        assert getattr(cand.normalizer_spec, name) == getattr(base.normalizer_spec, name), name
    text = "第一季度  增长\t12.5%，  Beijing   2024年"
    assert load_sentencepiece(out / "candidates/chars1500_size2400.model").decode(
        load_sentencepiece(out / "candidates/chars1500_size2400.model").encode(text)) == text


def test_derived_candidate_equals_independent_training(trained, zh_file):
    cfg, out = trained
    lines = sample_lines([str(zh_file)], cfg.max_sentences, cfg.seed, progress=False).lines
    independent = train_bpe(lines, 1800, 2800)
    derived = load_model_proto(out / "candidates/chars1800_size2800.model")
    assert {p.piece for p in derived.pieces} == {p.piece for p in independent.pieces}
    # Stronger: same ids and scores, i.e. the same file SentencePiece would write.
    assert derived.SerializeToString() == independent.SerializeToString()
    # And the smaller candidate is a prefix of the larger one's merges (the nesting the cut relies on).
    big = load_model_proto(out / "candidates/chars1800_size3600.model")
    assert [p.piece for p in derived.pieces[:-1800]] == [p.piece for p in big.pieces[:len(derived.pieces) - 1800]]


def test_characters_are_the_most_frequent(trained, zh_file):
    cfg, out = trained
    lines = sample_lines([str(zh_file)], cfg.max_sentences, cfg.seed, progress=False).lines
    counts = count_chars(lines)
    proto = load_model_proto(out / "candidates/chars1500_size3200.model")
    assert set(_single_chars(proto)) == set(top_chars(counts, 1500))
    # every kept character is more frequent than (or as frequent as) every dropped one
    kept = set(_single_chars(proto))
    assert min(counts[c] for c in kept) >= max(counts[c] for c in counts if c not in kept)


def test_same_seed_same_files_and_resume(tmp_path, trained, zh_file, capsys):
    cfg, out = trained
    again = train_candidates(VocabTrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "again")}))
    for f in (out / "candidates").iterdir():
        assert (again / "candidates" / f.name).read_bytes() == f.read_bytes()
    before = (again / "manifest.json").read_bytes()
    train_candidates(VocabTrainConfig(**{**cfg.__dict__, "out": str(again)}))
    assert "already complete" in capsys.readouterr().out
    assert (again / "manifest.json").read_bytes() == before
    other = train_candidates(VocabTrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "other"), "seed": 8,
                                            "chars": [1500], "sizes": ["2400"]}))
    assert (other / "candidates/chars1500_size2400.model").read_bytes() != \
        (out / "candidates/chars1500_size2400.model").read_bytes()


def test_reservoir_sample_is_reproducible_and_uniformish(tmp_path):
    f = write_jsonl(tmp_path / "n.jsonl", [f"行{i}\n第二行{i}" for i in range(2000)])
    a = sample_lines([str(f)], 500, seed=3, progress=False)
    b = sample_lines([str(f)], 500, seed=3, progress=False)
    c = sample_lines([str(f)], 500, seed=4, progress=False)
    assert a.lines == b.lines and a.lines != c.lines
    assert len(a.lines) == 500 and a.seen_lines == 4000 and a.seen_docs == 2000
    idx = [int(t.lstrip("第二行")) for t in a.lines]
    assert idx == sorted(idx)  # corpus order
    # both halves of the stream are represented (reservoir, not head)
    halves = Counter(i < 1000 for i in idx)
    assert 150 < halves[True] < 350
    assert sample_lines([str(f)], 10_000, seed=3, progress=False).lines.__len__() == 4000


def test_cli_train(tmp_path, zh_file, capsys):
    rc = main(["vocab", "train", str(zh_file), "--out", str(tmp_path / "c"), "--chars", "1500",
               "--sizes", "2000,2600", "--max-sentences", "800", "--no-progress"])
    assert rc == 0
    assert "wrote 2 candidates from 1 trainings" in capsys.readouterr().out
    m = json.loads((tmp_path / "c/manifest.json").read_text())
    assert [c["size"] for c in m["candidates"]] == [2000, 2600]
    assert m["candidates"][0]["path"] == "candidates/chars1500_size2000.model"
    assert RESERVED == 259
    # --corpus, the flag vocab score / check and audit use, gives the same inputs as the positional form
    rc = main(["vocab", "train", "--corpus", str(zh_file), "--out", str(tmp_path / "f"), "--chars", "1500",
               "--sizes", "2000,2600", "--max-sentences", "800", "--no-progress"])
    assert rc == 0
    for c in m["candidates"]:
        assert (tmp_path / "f" / c["path"]).read_bytes() == (tmp_path / "c" / c["path"]).read_bytes()
    assert json.loads((tmp_path / "f/manifest.json").read_text())["config"]["inputs"] == [str(zh_file)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["vocab", "train", "--out", str(tmp_path / "g")])
    assert exit_.value.code == 2
    assert "no inputs given. Fix: pass them as INPUTS... or with --corpus INPUTS..." in capsys.readouterr().err


def test_interrupted_run_resumes_from_trained_models(tmp_path, zh_file, monkeypatch):
    import vocab.train as vt

    calls = []
    real = vt.train_bpe

    def flaky(lines, chars, size, **kw):
        calls.append(chars)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(lines, chars, size, **kw)

    monkeypatch.setattr(vt, "train_bpe", flaky)
    cfg = VocabTrainConfig(inputs=[str(zh_file)], out=str(tmp_path / "c"), chars=[1500, 1800], sizes=["2400,2800"],
                           max_sentences=1000, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_candidates(cfg)
    assert not (tmp_path / "c").exists()  # nothing that looks complete
    assert len(list((tmp_path / ".c.partial").glob("chars1500_*.model"))) == 1
    calls.clear()
    out = train_candidates(cfg)
    assert calls == [1800]  # chars 1500 came from the interrupted run
    assert len(list((out / "candidates").glob("*.model"))) == 4 and not (tmp_path / ".c.partial").exists()


def test_exact_chars_path_equals_native_sentencepiece(news_lines):
    """Where character_coverage can select exactly C characters, SentencePiece's own path (dummy prefix,
    coverage, rare characters replaced by its placeholder) gives the very same pieces as ours."""
    import io

    import numpy as np
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    from vocab.train import _trainer_args

    lines, chars = list(news_lines[:3000]), 1900
    counts = count_chars(lines)
    acc = np.cumsum([counts[c] for c in top_chars(counts, len(counts))]) / sum(counts.values())
    coverage = np.float32(acc[chars - 1])
    assert np.float32(acc[chars - 2]) < coverage and coverage >= 0.98  # coverage selects exactly 1900 here
    args = _trainer_args(6000, 2, 16, 1 << 16)
    args.update(add_dummy_prefix=True, character_coverage=float(coverage))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **args)
    native = pb.ModelProto()
    native.ParseFromString(buf.getvalue())
    ours = train_bpe(lines, chars, 6000)
    assert [(p.piece, p.score) for p in ours.pieces] == [(p.piece, p.score) for p in native.pieces]


def test_txt_parquet_and_gz_inputs_give_the_same_candidates(tmp_path, news_lines):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = list(news_lines[:400])
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": lines}), tmp_path / "b.parquet")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines)
    outs = []
    for name in ("a.txt", "b.parquet", "c.jsonl.gz"):
        out = train_candidates(VocabTrainConfig(inputs=[str(tmp_path / name)], out=str(tmp_path / f"o_{name}"),
                                                chars=[800], sizes=["1500"], progress=False))
        outs.append((out / "candidates/chars800_size1500.model").read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_too_long_lines_are_counted_and_written_aside(tmp_path):
    from corpus.readers import RejectLog

    f = write_jsonl(tmp_path / "x.jsonl", ["短句。\n" + "长" * 30000, "又一句。"])
    log = RejectLog(tmp_path / "rejects.jsonl")
    s = sample_lines([str(f)], 100, 1, max_line_bytes=1000, rejects=log, progress=False)
    log.close()
    assert s.lines == ["短句。", "又一句。"] and s.too_long == 1
    entry = json.loads((tmp_path / "rejects.jsonl").read_text().splitlines()[0])
    assert (entry["reason"], entry["line"]) == ("line_too_long", 1)
