"""corpus mix: the mixture arithmetic, seeded random samples and repeats, and the mixed dataset."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import GraftError
from demo import sources
from corpus.blocks import load_blocks
from corpus.mix import MixConfig, mix, mixture_indices, parse_spec, source_draws
from corpus.prepare import PrepareConfig, prepare
from corpus.registry import add_dataset


def test_parse_spec():
    assert parse_spec("1:SkyPile-2022, 0.1:SkyPile-2023, 2:SlimPajama") == [
        (1.0, "SkyPile-2022"), (0.1, "SkyPile-2023"), (2.0, "SlimPajama")]
    for bad in ("", "SkyPile", "0:A", "-1:A", "x:A", "1:", "nan:A", "1:A, 2:A"):
        with pytest.raises(GraftError):
            parse_spec(bad)


def test_mixture_arithmetic():
    n = [1000, 500, 40]
    idx, info = mixture_indices(n, [1, 0.1, 2.5], seed=7)
    assert [i["selected"] for i in info] == [1000, 50, 100]
    assert [(i["repeats"], i["sampled"]) for i in info] == [(1, 0), (0, 50), (2, 20)]
    assert len(idx) == 1150 and idx.dtype == np.int64
    src0, src1, src2 = idx[idx < 1000], idx[(idx >= 1000) & (idx < 1500)], idx[idx >= 1500]
    assert sorted(src0.tolist()) == list(range(1000))  # weight 1: every block exactly once
    assert len(set(src1.tolist())) == 50  # fraction: a sample without replacement...
    assert sorted(src1.tolist()) != list(range(1000, 1050))  # ...that is random, not the first 10%
    counts = np.bincount(src2 - 1500, minlength=40)
    assert sorted(np.unique(counts).tolist()) == [2, 3] and (counts == 3).sum() == 20
    assert (np.diff(idx[:200]) == 1).mean() < 0.05  # globally shuffled, not source by source


def test_repeats_are_shuffled_differently_and_seeded():
    draws = source_draws(100, 3.0, seed=1, i=0)
    assert len(draws) == 3
    for d in draws:
        assert sorted(d.tolist()) == list(range(100))
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])
    a, _ = mixture_indices([100, 30], [1.5, 2], seed=3)
    b, _ = mixture_indices([100, 30], [1.5, 2], seed=3)
    c, _ = mixture_indices([100, 30], [1.5, 2], seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, news_lines, english_paragraphs, base_model_path):
    root = tmp_path_factory.mktemp("mix")
    reg = root / "datasets.toml"
    add_dataset(reg, "zh", [str(sources.write_jsonl(root / "zh.jsonl", news_lines[:800]))], split="19:1")
    add_dataset(reg, "en", [str(sources.write_jsonl(root / "en.jsonl", english_paragraphs[:500]))], split="19:1")
    for name in ("zh", "en"):
        prepare(PrepareConfig(name=name, tokenizer=str(base_model_path), registry=str(reg), out=str(root / name),
                              block_size=64, progress=False))
    return root, reg


def test_mix_end_to_end(prepared, tmp_path, capsys):
    root, reg = prepared
    # One dataset by registered name, one by folder path.
    out = mix(MixConfig(spec=f"0.5:zh, 2:{root / 'en'}", out=str(tmp_path / "m"), registry=str(reg), seed=5))
    said = capsys.readouterr().out
    zh, en = load_blocks(root / "zh"), load_blocks(root / "en")
    n_zh, n_en = len(zh), len(en)
    want = round(0.5 * n_zh) + 2 * n_en
    train = load_blocks(out, "train")
    assert len(train) == want
    assert f"{want * 64:,}" in said and "total" in said  # prints the token budget
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["train"]["tokens"] == want * 64
    assert [s["tokens"] for s in m["sources"]] == [round(0.5 * n_zh) * 64, 2 * n_en * 64]
    # Every mixed row is the source row its index points to.
    idx = np.load(out / "train_indices.npy")
    zh_rows = np.asarray(zh.with_format("numpy")["input_ids"])
    en_rows = np.asarray(en.with_format("numpy")["input_ids"])
    both = np.concatenate([zh_rows, en_rows])
    got = np.asarray(train.with_format("numpy")["input_ids"])
    np.testing.assert_array_equal(got, both[idx])
    dev = load_blocks(out, "dev")
    assert len(dev) == len(load_blocks(root / "zh", "dev")) + len(load_blocks(root / "en", "dev")) > 0
    again = mix(MixConfig(spec=f"0.5:zh, 2:{root / 'en'}", out=str(tmp_path / "m2"), registry=str(reg), seed=5))
    assert np.array_equal(np.load(again / "train_indices.npy"), idx)


def test_mix_errors(prepared, tmp_path, base_model_path):
    root, reg = prepared
    with pytest.raises(GraftError, match="unknown dataset 'fr'.*registered: en, zh"):
        mix(MixConfig(spec="1:zh, 1:fr", out=str(tmp_path / "m"), registry=str(reg)))
    add_dataset(reg, "raw", [str(root / "zh.jsonl")])
    with pytest.raises(GraftError, match="not prepared"):
        mix(MixConfig(spec="1:raw", out=str(tmp_path / "m"), registry=str(reg)))
    prepare(PrepareConfig(name="raw", tokenizer=str(base_model_path), registry=str(reg), out=str(root / "raw128"),
                          block_size=128, progress=False))
    with pytest.raises(GraftError, match="different block sizes"):
        mix(MixConfig(spec="1:zh, 1:raw", out=str(tmp_path / "m"), registry=str(reg)))
