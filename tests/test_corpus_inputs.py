"""corpus: the registry, every input format, and bad input (counted, written aside, never fatal)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from common.errors import GraftError
from demo import sources
from corpus.blocks import load_blocks
from corpus.count import CountConfig, count
from corpus.prepare import PrepareConfig, prepare
from corpus.registry import add_dataset, get_dataset, load_registry
import workflows.cli


def main(argv: list[str]) -> int:
    """`graft ...` through the real entry point, with only this package's commands registered
    (so these tests do not depend on other stages' work in progress)."""
    saved = workflows.cli._COMMAND_MODULES
    workflows.cli._COMMAND_MODULES = ("corpus.cli",)
    try:
        return workflows.cli.main(argv)
    finally:
        workflows.cli._COMMAND_MODULES = saved


@pytest.fixture(scope="module")
def docs(news_lines, english_paragraphs) -> list[str]:
    return list(news_lines[:300]) + list(english_paragraphs[:150])


def tok(base_model_path) -> str:
    return str(base_model_path)  # a SentencePiece .model works as --tokenizer too


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_registry_roundtrip_relative_paths_and_errors(tmp_path, docs, monkeypatch):
    data = tmp_path / "data"
    sources.write_jsonl(data / "a.jsonl", docs[:10])
    sources.write_jsonl(data / "b.jsonl", docs[10:20])
    reg = tmp_path / "conf" / "datasets.toml"
    monkeypatch.chdir(tmp_path)
    assert main(["corpus", "add", "zh", "--files", "data/*.jsonl", "--registry", str(reg), "--split", "99:1"]) == 0
    text = reg.read_text()
    assert '"../data/*.jsonl"' in text and 'split = "99:1"' in text
    monkeypatch.chdir(data)  # resolved against the registry's folder, not the working directory
    entry = get_dataset("zh", reg)
    assert [p.name for p in entry.paths()] == ["a.jsonl", "b.jsonl"]
    assert main(["corpus", "list", "--registry", str(reg)]) == 0
    with pytest.raises(GraftError, match="already in"):
        add_dataset(reg, "zh", [str(data / "a.jsonl")])
    add_dataset(reg, "zh", [str(data / "a.jsonl")], force=True)
    assert len(load_registry(reg)["zh"].paths()) == 1
    with pytest.raises(GraftError, match="no file matches"):
        add_dataset(reg, "x", [str(tmp_path / "nothing-*.jsonl")])
    with pytest.raises(GraftError, match="unknown dataset 'nope'.*registered: zh"):
        get_dataset("nope", reg)
    assert main(["corpus", "count", "nope", "--registry", str(reg)]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[x\nfiles=1")
    with pytest.raises(GraftError, match="not valid TOML"):
        load_registry(bad)
    with pytest.raises(GraftError, match="registry not found"):
        load_registry(tmp_path / "missing.toml")


def test_all_formats_give_the_same_blocks(tmp_path, docs, base_model_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"text": d, "meta": {"src": "x"}}, ensure_ascii=False) + "\n" for d in docs)
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(d / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    # SlimPajama layout: text + meta columns, read directly.
    pq.write_table(pa.table({"text": docs, "meta": [{"redpajama_set_name": "RedPajamaC4"}] * len(docs)}),
                   d / "a.parquet", row_group_size=100)
    one_line = [x.replace("\n", " ") for x in docs]
    (d / "a.txt").write_text("".join(x + "\n" for x in one_line), encoding="utf-8")
    results = {}
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet", "a.txt"):
        out = prepare(PrepareConfig(name=name, tokenizer=tok(base_model_path), files=[str(d / name)],
                                    out=str(tmp_path / name), block_size=128, split="9:1", progress=False))
        results[name] = [np.asarray(load_blocks(out, s).with_format("numpy")["input_ids"]) for s in ("train", "dev")]
        assert manifest(out)["counts"]["train"]["documents"] + manifest(out)["counts"]["dev"]["documents"] == len(docs)
    ref = results["a.jsonl"]
    for name in ("a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        for got, want in zip(results[name], ref):
            np.testing.assert_array_equal(got, want)
    assert results["a.txt"][0].size > 0  # txt differs only where newlines were replaced


def test_bad_records_are_counted_logged_and_never_fatal(tmp_path, docs, base_model_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = docs[:40]
    d = tmp_path / "in"
    d.mkdir()
    huge = b'{"text": "' + "长".encode() * 17_500_000 + b'"}'  # one 52.5 MB line
    body = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in good[:10]]
    body += [b'{"text": "unterminated', b'{"content": "no text field"}', b'{"text": 42}', b'[1, 2]',
             b'{"text": "\xff\xfe bad utf8"}', b'{"text": ""}', b'{"text": "   \\n "}', b"", huge]
    body += [json.dumps({"text": t}, ensure_ascii=False).encode() for t in good[10:]]
    (d / "bad.jsonl").write_bytes(b"\n".join(body) + b"\n")
    pq.write_table(pa.table({"content": ["x"] * 7, "meta": [{"src": "c4"}] * 7}), d / "no_text_col.parquet")
    pq.write_table(pa.table({"text": [good[0], None, "", good[1]]}), d / "nulls.parquet")
    out = prepare(PrepareConfig(name="bad", tokenizer=tok(base_model_path), files=[str(d / "*")],
                                out=str(tmp_path / "p"), block_size=64, progress=False))
    m = manifest(out)
    assert m["rejects"] == {"bad_json": 1, "missing_text": 3, "non_string_text": 1, "invalid_utf8": 1,
                            "empty": 4, "too_long": 1, "missing_column": 7}
    docs_done = m["counts"]["train"]["documents"] + m["counts"]["dev"]["documents"]
    assert docs_done == len(good) + 2  # every good line, including the ones after the bad ones
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r["reason"], []).append((Path(r["file"]).name, r["line"]))
    assert by_reason["bad_json"] == [("bad.jsonl", 11)]
    assert ("bad.jsonl", 12) in by_reason["missing_text"] and ("bad.jsonl", 14) in by_reason["missing_text"]
    assert ("nulls.parquet", 2) in by_reason["missing_text"]
    assert by_reason["non_string_text"] == [("bad.jsonl", 13)]
    assert by_reason["invalid_utf8"] == [("bad.jsonl", 15)]
    assert by_reason["too_long"] == [("bad.jsonl", 19)]
    assert by_reason["missing_column"] == [("no_text_col.parquet", None)]
    assert sorted(by_reason["empty"]) == [("bad.jsonl", 16), ("bad.jsonl", 17), ("bad.jsonl", 18), ("nulls.parquet", 3)]
    said = capsys.readouterr().out
    assert "rejected 18 records" in said and "rejects.jsonl" in said


def test_missing_file_unknown_name_and_bad_tokenizer_are_clear_errors(tmp_path, docs, base_model_path):
    with pytest.raises(GraftError, match="file not found"):
        prepare(PrepareConfig(name="x", tokenizer=tok(base_model_path), files=[str(tmp_path / "missing.jsonl")],
                              out=str(tmp_path / "o"), progress=False))
    reg = tmp_path / "datasets.toml"
    add_dataset(reg, "zh", [str(sources.write_jsonl(tmp_path / "a.jsonl", docs[:5]))])
    with pytest.raises(GraftError, match="unknown dataset 'zh2'"):
        prepare(PrepareConfig(name="zh2", tokenizer=tok(base_model_path), registry=str(reg), out=str(tmp_path / "o"),
                              progress=False))
    with pytest.raises(GraftError, match="file not found"):
        prepare(PrepareConfig(name="zh", tokenizer=str(tmp_path / "no-tokenizer"), registry=str(reg),
                              out=str(tmp_path / "o"), progress=False))
    with pytest.raises(GraftError, match="no output folder"):
        prepare(PrepareConfig(name="zh", tokenizer=tok(base_model_path), registry=str(reg), progress=False))
    assert main(["corpus", "prepare", "zh", "--tokenizer", tok(base_model_path), "--registry", str(reg),
                 "--out", str(tmp_path / "o"), "--last-block", "keep"]) == 2


def test_truncated_gzip_fails_only_that_file(tmp_path, docs, base_model_path):
    d = tmp_path / "in"
    d.mkdir()
    sources.write_jsonl(d / "a.jsonl", docs[:50])
    data = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in docs).encode())
    (d / "b.jsonl.gz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "p"
    with pytest.raises(GraftError, match="1 of 2 files failed.*b.jsonl.gz.*truncated"):
        prepare(PrepareConfig(name="x", tokenizer=tok(base_model_path), files=[str(d / "*")], out=str(out),
                              block_size=64, progress=False))
    assert [p.name for p in (out / "completions").iterdir()] == ["00000-a.jsonl"]
    assert not (out / "manifest.json").exists()


def test_count_matches_prepare(tmp_path, docs, base_model_path):
    reg = tmp_path / "datasets.toml"
    sources.write_jsonl(tmp_path / "a.jsonl", docs[:200])
    sources.write_jsonl(tmp_path / "b.jsonl", docs[200:])
    add_dataset(reg, "both", [str(tmp_path / "*.jsonl")], split="9:1")
    add_dataset(reg, "one", [str(tmp_path / "a.jsonl")])
    counted = count(CountConfig(name=None, registry=str(reg), tokenizer=tok(base_model_path), block_size=100,
                                bos=True, progress=False))
    assert set(counted) == {"both", "one"}
    out = prepare(PrepareConfig(name="both", tokenizer=tok(base_model_path), registry=str(reg),
                                out=str(tmp_path / "p"), block_size=100, bos=True, progress=False))
    prepared = manifest(out)["counts"]
    for s in ("train", "dev"):
        for k in ("documents", "characters", "tokens", "blocks"):
            assert counted["both"]["counts"][s][k] == prepared[s][k], (s, k)
    assert counted["both"]["counts"]["dev"]["documents"] > 0
    assert load_registry(reg)["both"].encoded_path().resolve() == out.resolve()  # prepare recorded it
    fast = count(CountConfig(name="one", registry=str(reg), progress=False))
    assert fast["one"]["counts"]["train"]["documents"] == 200 and fast["one"]["counts"]["train"]["tokens"] == 0
