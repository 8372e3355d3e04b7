"""analysis: `graft audit` on Mixtral's real tokenizer (SentencePiece and tokenizer.json) and real text."""
from __future__ import annotations

import csv
import io
import json

import pytest
import sentencepiece as spm

from analysis.audit import AuditConfig, audit_tables
from common.errors import GraftError
from common.tokenizer_files import load_fast_tokenizer
from demo.sources import write_jsonl
from workflows.cli import main as graft_main


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, news_lines, english_paragraphs):
    d = tmp_path_factory.mktemp("audit_corpora")
    zh = write_jsonl(d / "zh.jsonl", news_lines[:400])
    en = d / "en.txt"  # .txt: one document per line
    en.write_text("\n".join(p.replace("\n", " ") for p in english_paragraphs[:400]) + "\n", encoding="utf-8")
    return {"zh": zh, "en": en}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, base_model_path):
    """Mixtral's tokenizer as a Hugging Face folder holding only tokenizer.json."""
    d = tmp_path_factory.mktemp("hf") / "mixtral-fast"
    d.mkdir()
    load_fast_tokenizer(base_model_path).save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, news_lines):
    """A second, Chinese-trained SentencePiece BPE model (the 'extended' side of the comparison)."""
    path = tmp_path_factory.mktemp("sm") / "zh_bpe.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(news_lines[1000:4000]), model_prefix=str(path)[:-6],
                                   model_type="bpe", vocab_size=6000, byte_fallback=True, minloglevel=2,
                                   character_coverage=0.9995, num_threads=2)
    return path


def _sp_tokens(model, lines):
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return sum(map(len, sp.encode(list(lines))))


def test_audit_counts_match_direct_encoding(corpora, base_model_path, hf_folder, small_model, news_lines,
                                           english_paragraphs):
    cfg = AuditConfig(tokenizers=[str(base_model_path), str(hf_folder), str(small_model)],
                      corpus=[str(corpora["zh"]), str(corpora["en"])], progress=False, batch_mb=0.05)
    rows = audit_tables(cfg)
    assert [(r["corpus"], r["tokenizer"]) for r in rows] == [
        (str(corpora[c]), t) for c in ("zh", "en") for t in ("tokenizer.model.v1", "mixtral-fast", "zh_bpe.model")]
    zh_lines = list(news_lines[:400])
    en_lines = [p.replace("\n", " ") for p in english_paragraphs[:400]]
    for lines, corpus in ((zh_lines, "zh"), (en_lines, "en")):
        rs = {r["tokenizer"]: r for r in rows if r["corpus"] == str(corpora[corpus])}
        base = rs["tokenizer.model.v1"]
        assert base["tokens"] == _sp_tokens(base_model_path, lines)
        assert rs["zh_bpe.model"]["tokens"] == _sp_tokens(small_model, lines)
        # tokenizer.json of the same model (no BOS added): same counts as SentencePiece on this text.
        assert rs["mixtral-fast"]["tokens"] == base["tokens"]
        assert base["chars"] == sum(map(len, lines)) and base["documents"] == len(lines)
        assert base["bytes"] == sum(len(s.encode("utf-8")) for s in lines)
        assert base["relative_tokens"] == 1.0 and base["vocab_size"] == 32000
        for r in rs.values():
            assert r["tokens_per_char"] == r["tokens"] / r["chars"]
            assert r["bytes_per_token"] == r["bytes"] / r["tokens"]
            assert r["relative_tokens"] == r["tokens"] / base["tokens"]
    zh = {r["tokenizer"]: r for r in rows if r["corpus"] == str(corpora["zh"])}
    # A Chinese-trained vocabulary needs fewer tokens per Chinese character than Mixtral's.
    assert zh["zh_bpe.model"]["tokens_per_char"] < zh["tokenizer.model.v1"]["tokens_per_char"]


def test_audit_workers_give_the_same_table(corpora, base_model_path, hf_folder):
    kw = dict(tokenizers=[str(hf_folder), str(base_model_path)], corpus=[str(corpora["zh"])],
              progress=False, batch_mb=0.02)
    one = audit_tables(AuditConfig(**kw, workers=1))
    two = audit_tables(AuditConfig(**kw, workers=2))
    assert one == two


def test_audit_cli_formats_and_outputs(corpora, base_model_path, small_model, tmp_path, capsys):
    out = tmp_path / "audit"
    rc = graft_main(["audit", "--tokenizer", str(base_model_path), "--tokenizer", str(small_model),
                     "--corpus", str(corpora["zh"]), "--out", str(out), "--no-progress"])
    assert rc == 0
    md = capsys.readouterr().out
    assert md.startswith(f"### {corpora['zh']}\n")
    assert "| tokenizer | vocab_size | tokens | tokens_per_char |" in md
    assert "| tokenizer.model.v1 | 32000 |" in md
    rows = json.loads((out / "audit.json").read_text())
    assert [r["tokenizer"] for r in rows] == ["tokenizer.model.v1", "zh_bpe.model"]
    table = list(csv.DictReader(io.StringIO((out / "audit.csv").read_text())))
    assert [int(r["tokens"]) for r in table] == [r["tokens"] for r in rows]
    assert (out / "audit.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "audit" and manifest["status"] == "done" and manifest["counts"]["rejected"] == 0
    for fmt in ("csv", "json"):
        assert graft_main(["audit", "--tokenizer", str(base_model_path), "--corpus", str(corpora["zh"]),
                           "--format", fmt, "--no-progress"]) == 0
        text = capsys.readouterr().out
        if fmt == "csv":
            assert text.splitlines()[0] == ("corpus,tokenizer,vocab_size,documents,chars,bytes,tokens,"
                                            "tokens_per_char,chars_per_token,bytes_per_token,relative_tokens")
        else:
            assert json.loads(text)[0]["tokens"] == rows[0]["tokens"]


def test_unreadable_lines_are_counted_skipped_and_printed(tmp_path, base_model_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes('{"text": "你好，世界"}\n{"text": broken\n'.encode() + b'{"text": "\xff\xfe"}\n'
                    + '{"text": "再见"}\n'.encode())
    rc = graft_main(["audit", "--tokenizer", str(base_model_path), "--corpus", str(bad), "--out",
                     str(tmp_path / "o"), "--format", "json", "--no-progress"])
    assert rc == 0
    cap = capsys.readouterr()
    rows = json.loads(cap.out)
    assert rows[0]["documents"] == 2 and rows[0]["chars"] == len("你好，世界") + len("再见")
    assert cap.err.strip() == (f"graft: audit: 2 records rejected (bad_json: 1, invalid_utf8: 1) "
                               f"(written to {tmp_path / 'o' / 'rejects.jsonl'})")
    rejects = [json.loads(line) for line in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "bad_json"), (3, "invalid_utf8")]
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["counts"]["rejected"] == 2


def test_tokenizer_path_of_unknown_kind(tmp_path, corpora):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n")
    with pytest.raises(GraftError) as e:
        audit_tables(AuditConfig(tokenizers=[str(vocab)], corpus=[str(corpora["zh"])], progress=False))
    assert str(e.value) == (f"{vocab}: is neither a tokenizer folder, a tokenizer.json nor a SentencePiece "
                            ".model. Fix: pass a Hugging Face tokenizer folder, its tokenizer.json, or a .model file")


def test_audit_empty_corpus(tmp_path, base_model_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    rc = graft_main(["audit", "--tokenizer", str(base_model_path), "--corpus", str(empty), "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        f"graft: error: {empty}: the corpus has no usable text (2 records rejected). Fix: pass files with "
        "non-empty 'text' fields (.jsonl/.parquet) or non-empty lines (.txt)")


def test_corrupt_file_error_crosses_the_reader_thread(tmp_path, base_model_path, news_lines):
    import gzip

    good = tmp_path / "zh.jsonl.gz"
    with gzip.open(good, "wt", encoding="utf-8") as f:
        for line in news_lines[:2000]:
            f.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
    data = good.read_bytes()
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(GraftError, match=r"cut\.jsonl\.gz: gzip stream ends before its end marker \(truncated\) at byte [0-9,]+ of [0-9,]+; [0-9,]+ records read"):
        audit_tables(AuditConfig(tokenizers=[str(base_model_path)], corpus=[str(bad)], progress=False,
                                 batch_mb=0.01))
