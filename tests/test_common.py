import json

import pytest

from common.errors import GraftError
from common.io import atomic_path, atomic_write_json, is_complete, read_manifest, write_manifest
from corpus.readers import RejectLog, iter_texts
from demo import sources


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_manifest_marks_completion(tmp_path):
    assert not is_complete(tmp_path)
    write_manifest(tmp_path, stage="x", config={"k": 1}, counts={"n": 2})
    assert is_complete(tmp_path)
    m = read_manifest(tmp_path)
    assert m["config"] == {"k": 1} and m["counts"] == {"n": 2} and "python" in m["versions"]


def test_reader_counts_and_writes_rejects(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_bytes(b'{"text": "ok"}\nnot json\n{"txt": 1}\n{"text": 5}\n\xff\xfe\n{"text": "  "}\n{"text": "fine"}\n')
    rejects = RejectLog(tmp_path / "rejects.jsonl")
    got = [(r.text, r.line) for r in iter_texts([src], rejects=rejects)]
    rejects.close()
    assert got == [("ok", 1), ("fine", 7)]
    assert dict(rejects.counts) == {"bad_json": 1, "missing_text": 1, "non_string_text": 1,
                                    "invalid_utf8": 1, "empty": 1}
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(x["line"], x["reason"]) for x in lines] == [(2, "bad_json"), (3, "missing_text"),
                                                         (4, "non_string_text"), (5, "invalid_utf8"), (6, "empty")]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(GraftError, match=r"nope\.jsonl: file not found"):
        list(iter_texts([tmp_path / "nope.jsonl"]))
    with pytest.raises(GraftError, match="no file matches"):
        list(iter_texts([str(tmp_path / "*.parquet")]))


def test_sources_are_real_text():
    news = sources.people_daily_lines()
    assert len(news) > 19000 and "/" not in news[0] and news[0].startswith("迈向充满希望的新世纪")
    assert len(sources.review_lines()) > 30000
    assert any("for" in t for t in sources.pydoc_topic_texts())
    assert sources.base_tokenizer_model().stat().st_size > 400_000
