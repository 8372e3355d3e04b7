"""Corrupt and truncated input files: zstd, gzip, parquet. Never a silent loss (issue 19, item 1)."""
from __future__ import annotations

import gzip
import json
import re

import pytest
from faultkit import jsonl

from common.errors import GraftError
from corpus.count import CountConfig, count
from corpus.prepare import PrepareConfig, prepare
from corpus.registry import add_dataset

FIX = ("Fix: re-download or re-compress it, or pass --on-corrupt skip to keep the records read before the break "
       "(the loss is logged in rejects.jsonl and counted in the manifest as corrupt_file)")


@pytest.fixture(scope="module")
def texts(news_lines):
    return [t for t in news_lines[:160] if t.strip()][:150]


def _lines(texts) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()


def _zst_cut(path, texts, keep: int = 100):
    """Two zstd frames: the first `keep` documents whole, the second frame cut after 20 bytes."""
    import zstandard

    c = zstandard.ZstdCompressor()
    path.write_bytes(c.compress(_lines(texts[:keep])) + c.compress(_lines(texts[keep:]))[:20])
    return path


def _gz_members(texts, keep: int = 100) -> tuple[bytes, bytes]:
    return gzip.compress(_lines(texts[:keep]), mtime=0), gzip.compress(_lines(texts[keep:]), mtime=0)


def _prep(tmp_path, files, base_model_path, **kw):
    return PrepareConfig(name="t", tokenizer=str(base_model_path), files=[str(f) for f in files],
                         out=str(tmp_path / "out"), block_size=64, progress=False, **kw)


@pytest.mark.fault("truncated zstd input", "error")
def test_truncated_zstd_stops_prepare_naming_records_and_offset(tmp_path, texts, base_model_path):
    _truncated_zstd_stops(tmp_path, texts, base_model_path, workers=1)


@pytest.mark.fault("truncated zstd input", "error")
def test_truncated_zstd_in_a_worker_process_gives_the_same_error(tmp_path, texts, base_model_path):
    """The error crosses the process boundary whole (it is pickled back from a spawned worker)."""
    _truncated_zstd_stops(tmp_path, texts, base_model_path, workers=2)


def _truncated_zstd_stops(tmp_path, texts, base_model_path, workers: int):
    good = jsonl(tmp_path / "a.jsonl", texts[:20])
    bad = _zst_cut(tmp_path / "b.jsonl.zst", texts)
    size = bad.stat().st_size
    with pytest.raises(GraftError) as e:
        prepare(_prep(tmp_path, [good, bad], base_model_path, workers=workers))
    assert str(e.value) == (
        f"1 of 2 files failed (00001-b.jsonl.zst: {bad}: zstd stream ends before its end marker (truncated) at byte "
        f"{size:,} of {size:,}; 100 records read before the break (lines 1-100). {FIX}). The other files are done; "
        "fix or remove the failed files and re-run the same command to resume")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.fault("truncated zstd input", "counted")
def test_truncated_zstd_skip_keeps_what_was_read_and_counts_it(tmp_path, texts, base_model_path, capsys):
    good = jsonl(tmp_path / "a.jsonl", texts[:20])
    bad = _zst_cut(tmp_path / "b.jsonl.zst", texts)
    size = bad.stat().st_size
    out = prepare(_prep(tmp_path, [good, bad], base_model_path, on_corrupt="skip"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["train"]["documents"] + m["counts"]["dev"]["documents"] == 20 + 100
    assert m["rejects"] == {"corrupt_file": 1}
    entry = {"file": str(bad), "problem": "zstd stream ends before its end marker (truncated)", "records_read": 100,
             "first_unread_line": 101, "byte_offset": size, "file_bytes": size}
    assert m["corrupt_files"] == [entry]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"file": str(bad), "line": 101, "reason": "corrupt_file", "count": 1, "preview": None,
                        **{k: v for k, v in entry.items() if k != "file"}}]
    said = capsys.readouterr().out
    assert "rejected 1 records (corrupt_file: 1)" in said
    assert (f"corrupt file skipped (--on-corrupt skip): {bad}: zstd stream ends before its end marker (truncated) "
            f"at byte {size:,} of {size:,}; kept the 100 records read before it") in said
    # count reads exactly what prepare read
    reg = tmp_path / "datasets.toml"
    add_dataset(reg, "t", [str(good), str(bad)])
    with pytest.raises(GraftError, match=re.escape(f"{bad}: zstd stream ends before its end marker (truncated)")):
        count(CountConfig(name="t", registry=str(reg), progress=False))
    c = count(CountConfig(name="t", registry=str(reg), progress=False, on_corrupt="skip"))["t"]
    assert c["counts"]["train"]["documents"] + c["counts"]["dev"]["documents"] == 120
    assert c["rejects"] == {"corrupt_file": 1}


@pytest.mark.fault("truncated gzip input", "error")
def test_truncated_gzip_stops_count_naming_records_and_offset(tmp_path, texts):
    first, second = _gz_members(texts)
    bad = tmp_path / "c.jsonl.gz"
    bad.write_bytes(first + second[:10])  # the second member's header, then nothing
    size = bad.stat().st_size
    reg = tmp_path / "datasets.toml"
    add_dataset(reg, "t", [str(bad)])
    with pytest.raises(GraftError) as e:
        count(CountConfig(name="t", registry=str(reg), progress=False))
    assert str(e.value) == (f"{bad}: gzip stream ends before its end marker (truncated) at byte {size:,} of {size:,}; "
                            f"100 records read before the break (lines 1-100). {FIX}")


@pytest.mark.fault("corrupt gzip input", "counted")
def test_corrupt_gzip_checksum_skip_counts_from_the_break(tmp_path, texts, base_model_path):
    first, second = _gz_members(texts)
    second = bytearray(second)
    second[-6] ^= 0xFF  # the CRC32 of the second member
    bad = tmp_path / "d.jsonl.gz"
    bad.write_bytes(first + bytes(second))
    out = prepare(_prep(tmp_path, [bad], base_model_path, on_corrupt="skip"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["train"]["documents"] + m["counts"]["dev"]["documents"] == 100
    assert m["corrupt_files"] == [{
        "file": str(bad), "problem": "corrupt gzip data (Error -3 while decompressing data: incorrect data check)",
        "records_read": 100, "first_unread_line": 101, "byte_offset": len(first), "file_bytes": bad.stat().st_size}]


@pytest.mark.fault("truncated parquet input", "error")
def test_truncated_parquet_is_an_error_naming_the_file(tmp_path, texts, base_model_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": texts}), p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    size = p.stat().st_size
    with pytest.raises(GraftError) as e:
        prepare(_prep(tmp_path, [p], base_model_path))
    assert re.fullmatch(re.escape(f"1 of 1 files failed (00000-e.parquet: {p}: not a readable parquet file (")
                        + r".+" + re.escape(f") at or after byte 0 of {size:,}; no record read before the break. "
                                            f"{FIX}). The other files are done; fix or remove the failed files and "
                                            "re-run the same command to resume"), str(e.value), re.S), str(e.value)


@pytest.mark.fault("corrupt parquet input", "counted")
def test_corrupt_parquet_row_group_skip_keeps_the_groups_before_it(tmp_path, texts, base_model_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "f.parquet"
    pq.write_table(pa.table({"text": texts}), p, row_group_size=60, compression="zstd")
    col = pq.ParquetFile(p).metadata.row_group(1).column(0)
    offset = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(p.read_bytes())
    data[offset:offset + 32] = b"\xff" * 32  # the second row group's first page header
    p.write_bytes(bytes(data))
    out = prepare(_prep(tmp_path, [p], base_model_path, on_corrupt="skip"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["train"]["documents"] + m["counts"]["dev"]["documents"] == 60
    [c] = m["corrupt_files"]
    assert (c["records_read"], c["first_unread_row"], c["row_group"], c["byte_offset"]) == (60, 61, 1, offset)
    assert c["problem"].startswith("row group 1 of 3 does not read (")


@pytest.mark.fault("truncated gzip input", "counted")
def test_audit_skips_a_truncated_gzip_and_records_it(tmp_path, texts, base_model_path):
    from analysis.audit import AuditConfig, audit

    first, second = _gz_members(texts)
    bad = tmp_path / "g.jsonl.gz"
    bad.write_bytes(first + second[:10])
    with pytest.raises(GraftError, match=re.escape(f"{bad}: gzip stream ends before its end marker (truncated)")):
        audit(AuditConfig(tokenizers=[str(base_model_path)], corpus=[str(bad)], out=str(tmp_path / "a"),
                          progress=False))
    out = audit(AuditConfig(tokenizers=[str(base_model_path)], corpus=[str(bad)], out=str(tmp_path / "a"),
                            progress=False, on_corrupt="skip"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["rejected_by_reason"] == {"corrupt_file": 1}
    assert [(c["records_read"], c["first_unread_line"]) for c in m["corrupt_files"]] == [(100, 101)]
    rows = json.loads((out / "audit.json").read_text())
    assert [r["chars"] for r in rows] == [sum(len(t) for t in texts[:100])]
