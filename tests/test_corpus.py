"""corpus prepare / load_blocks on real Chinese and English text with Mixtral's real tokenizer.

The expected blocks are built independently with SentencePiece (the base tokenizer itself), so a
packing bug and a tokenizer-conversion bug would both show.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from common.errors import GraftError
from demo import sources
from corpus.blocks import load_blocks
from corpus.prepare import PrepareConfig, prepare
from corpus.shard import split_key, split_of

BS = 256


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory, base_model_path) -> Path:
    """Mixtral's tokenizer as a Hugging Face folder (transformers 4.57.6 conversion)."""
    from transformers import LlamaTokenizerFast

    out = tmp_path_factory.mktemp("tok") / "mixtral"
    LlamaTokenizerFast(vocab_file=str(base_model_path), add_prefix_space=True).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sp(base_model_path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(base_model_path))


@pytest.fixture(scope="session")
def zh_docs(news_lines) -> list[str]:
    return list(news_lines[:1500])


@pytest.fixture(scope="session")
def en_docs(english_paragraphs) -> list[str]:
    return list(english_paragraphs[:600])


@pytest.fixture()
def two_files(tmp_path, zh_docs, en_docs) -> list[Path]:
    return [sources.write_jsonl(tmp_path / "a_zh.jsonl", zh_docs), sources.write_jsonl(tmp_path / "b_en.jsonl", en_docs)]


def expected_stream(sp, docs: list[str], bos: bool = False) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += ([1] if bos else []) + sp.encode(d) + [2]
    return out


def cut(stream: list[int], bs: int = BS) -> np.ndarray:
    n = len(stream) // bs
    return np.asarray(stream[: n * bs], dtype=np.int64).reshape(n, bs)


def rows(ds) -> np.ndarray:
    return np.asarray(ds.with_format("numpy")["input_ids"], dtype=np.int64).reshape(len(ds), -1)


def cfg(files, out, tok, **kw) -> PrepareConfig:
    kw.setdefault("progress", False)
    kw.setdefault("block_size", BS)
    return PrepareConfig(name="t", tokenizer=str(tok), files=[str(f) for f in files], out=str(out), **kw)


def test_hf_tokenizer_matches_sentencepiece(hf_tokenizer, sp, zh_docs, en_docs, base_model_path):
    from common.tokenizer_files import load_fast_tokenizer

    fast = load_fast_tokenizer(hf_tokenizer)
    from_model = load_fast_tokenizer(base_model_path)
    docs = zh_docs[:300] + en_docs[:300]
    for d in docs:
        assert fast.encode(d, add_special_tokens=False).ids == sp.encode(d)
    assert fast.to_str() and from_model.encode(docs[0], add_special_tokens=False).ids == sp.encode(docs[0])


def test_exact_blocks_single_file(tmp_path, hf_tokenizer, sp, zh_docs, en_docs):
    docs = zh_docs[:400] + en_docs[:200]  # zh and en interleaved in one file
    f = sources.write_jsonl(tmp_path / "mixed.jsonl", docs)
    # Small batches: many batch boundaries, where the seed pipeline lost tokens.
    out = prepare(cfg([f], tmp_path / "p", hf_tokenizer, split="1:0", batch_chars=3000, bos=False))
    stream = expected_stream(sp, docs)
    got = rows(load_blocks(out, "train"))
    assert got.shape == (len(stream) // BS, BS)
    np.testing.assert_array_equal(got, cut(stream))
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["train"]["tokens"] == len(stream)
    assert m["counts"]["train"]["documents"] == len(docs)
    assert m["counts"]["train"]["dropped_tokens"] == len(stream) % BS
    assert len(load_blocks(out, "dev")) == 0


def test_exact_blocks_two_files_bos_pad_and_split(tmp_path, hf_tokenizer, sp, two_files, zh_docs, en_docs):
    out = prepare(cfg(two_files, tmp_path / "p", hf_tokenizer, split="9:1", bos=True, last_block="pad",
                      batch_chars=20000))
    key = split_key(0)
    pad_id = 2
    for split in ("train", "dev"):
        per_file = [[d for d in docs if split_of(d, 9, 1, key) == split] for docs in (zh_docs, en_docs)]
        streams = [expected_stream(sp, docs, bos=True) for docs in per_file]
        # Each file's full blocks in order; then the leftovers of all files packed together.
        full = [cut(s) for s in streams]
        tail = sum((s[len(s) // BS * BS:] for s in streams), [])
        tail_blocks = cut(tail)
        rest = tail[len(tail) // BS * BS:]
        last = [np.asarray(rest + [pad_id] * (BS - len(rest)))[None]] if rest else []
        expected = np.concatenate(full + [tail_blocks] + last)
        got = rows(load_blocks(out, split))
        np.testing.assert_array_equal(got, expected)
        assert len(per_file[0]) + len(per_file[1]) == json.loads((out / "manifest.json").read_text())["counts"][split]["documents"]
    dev_docs = sum(split_of(d, 9, 1, key) == "dev" for d in zh_docs + en_docs)
    assert 0.05 < dev_docs / (len(zh_docs) + len(en_docs)) < 0.15
    # Each per-file split folder is a plain `datasets` folder.
    shard = next((out / "shards").iterdir())
    ds = datasets.load_from_disk(str(shard / "train"))
    assert ds.column_names == ["input_ids"] and ds.features["input_ids"].length == BS


def test_deterministic_and_independent_of_batching_and_workers(tmp_path, hf_tokenizer, two_files):
    a = prepare(cfg(two_files, tmp_path / "a", hf_tokenizer, split="20:1"))
    b = prepare(cfg(two_files, tmp_path / "b", hf_tokenizer, split="20:1", batch_chars=777, workers=2))
    for split in ("train", "dev"):
        np.testing.assert_array_equal(rows(load_blocks(a, split)), rows(load_blocks(b, split)))
    arrows = lambda d: {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                        for p in sorted(d.rglob("*.arrow"))}
    assert arrows(a) == arrows(b) and len(arrows(a)) == 2 * 2 + 2
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["counts"] == mb["counts"] and ma["tokenizer"]["sha256"] == mb["tokenizer"]["sha256"]


_KILLER = r"""
import json, os, signal, sys
import corpus.pack as pack
orig = pack.BlockWriter.write
n = {"calls": 0}
def write(self, blocks):
    if "00001-" in str(self.folder) and len(blocks):
        n["calls"] += 1
        if n["calls"] == 3:  # mid-way through the second file: die like `kill -9`
            os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, blocks)
pack.BlockWriter.write = write
from corpus.prepare import PrepareConfig, prepare
prepare(PrepareConfig(**json.loads(sys.argv[1])))
"""


def test_resume_after_killed_run(tmp_path, hf_tokenizer, two_files):
    out = tmp_path / "killed"
    args = dict(name="t", tokenizer=str(hf_tokenizer), files=[str(f) for f in two_files], out=str(out),
                block_size=BS, split="20:1", batch_chars=2000, progress=False)
    proc = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(args)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr
    # The first file finished; the second was cut off: no marker, no manifest, only a temp folder.
    done = sorted(p.name for p in (out / "completions").iterdir())
    assert len(done) == 1 and done[0].startswith("00000-")
    assert not (out / "manifest.json").exists()
    assert any(p.name.startswith(".00001-") and ".tmp-" in p.name for p in (out / "shards").iterdir())
    with pytest.raises(GraftError, match="re-run"):
        load_blocks(out)
    first_stats = out / "shards" / done[0] / "stats.json"
    mtime = first_stats.stat().st_mtime_ns

    prepare(PrepareConfig(**args))
    assert first_stats.stat().st_mtime_ns == mtime  # the finished file was skipped, not redone
    assert not any(".tmp-" in p.name for p in (out / "shards").iterdir())
    ref = prepare(cfg(two_files, tmp_path / "ref", hf_tokenizer, split="20:1"))
    for split in ("train", "dev"):
        np.testing.assert_array_equal(rows(load_blocks(out, split)), rows(load_blocks(ref, split)))
    assert (json.loads((out / "manifest.json").read_text())["counts"]
            == json.loads((ref / "manifest.json").read_text())["counts"])


def test_interrupted_by_exception_then_resumed(tmp_path, hf_tokenizer, two_files, monkeypatch):
    import corpus.pack as pack

    orig = pack.BlockWriter.write
    calls = {"n": 0}

    def failing(self, blocks):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C inside the first file
        return orig(self, blocks)

    monkeypatch.setattr(pack.BlockWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(two_files, tmp_path / "p", hf_tokenizer, batch_chars=2000))
    assert not (tmp_path / "p" / "completions").exists() or not any((tmp_path / "p" / "completions").iterdir())
    monkeypatch.setattr(pack.BlockWriter, "write", orig)
    out = prepare(cfg(two_files, tmp_path / "p", hf_tokenizer, batch_chars=2000))
    ref = prepare(cfg(two_files, tmp_path / "ref", hf_tokenizer))
    np.testing.assert_array_equal(rows(load_blocks(out)), rows(load_blocks(ref)))


def test_slurm_style_shards_then_rerun_is_noop(tmp_path, hf_tokenizer, two_files, capsys):
    out = tmp_path / "p"
    prepare(cfg(two_files, out, hf_tokenizer, shard_index=1, num_shards=2))
    assert not (out / "manifest.json").exists()
    assert "not done yet" in capsys.readouterr().out
    prepare(cfg(two_files, out, hf_tokenizer, shard_index=0, num_shards=2))  # the last task finalizes
    ref = prepare(cfg(two_files, tmp_path / "ref", hf_tokenizer))
    np.testing.assert_array_equal(rows(load_blocks(out)), rows(load_blocks(ref)))
    prepare(cfg(two_files, out, hf_tokenizer))
    assert "already complete" in capsys.readouterr().out


def test_changed_settings_into_same_folder_is_an_error(tmp_path, hf_tokenizer, two_files):
    prepare(cfg(two_files, tmp_path / "p", hf_tokenizer))
    with pytest.raises(GraftError, match="block_size"):
        prepare(cfg(two_files, tmp_path / "p", hf_tokenizer, block_size=BS * 2))


def test_load_blocks_errors(tmp_path):
    with pytest.raises(GraftError, match="not found"):
        load_blocks(tmp_path / "nope")
    with pytest.raises(GraftError, match="unknown split"):
        load_blocks(tmp_path, "validation")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text(json.dumps({"stage": "vocab.train", "status": "done"}))
    with pytest.raises(GraftError, match="not a corpus"):
        load_blocks(tmp_path / "x")
