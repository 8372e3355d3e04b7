"""BOS is one setting: `corpus prepare` writes it (default on) into its manifest; mix, training and eval read it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import GraftError
from demo import sources
from corpus.blocks import corpus_bos, load_blocks
from corpus.prepare import PrepareConfig, prepare


@pytest.fixture(scope="module")
def docs(news_lines, english_paragraphs) -> list[str]:
    return list(news_lines[:60]) + list(english_paragraphs[:20])


def _prep(root, name, docs, tok, **kw):
    f = sources.write_jsonl(root / f"{name}.jsonl", docs)
    return prepare(PrepareConfig(name=name, tokenizer=str(tok), files=[str(f)], out=str(root / name), block_size=64,
                                 split="9:1", progress=False, **kw))


@pytest.fixture(scope="module")
def both(tmp_path_factory, docs, base_model_path):
    root = tmp_path_factory.mktemp("bos")
    return {"on": _prep(root, "on", docs, base_model_path), "off": _prep(root, "off", docs, base_model_path, bos=False),
            "root": root}


def _stream(folder) -> np.ndarray:
    return np.asarray(load_blocks(folder, "train")["input_ids"]).reshape(-1)


def test_prepare_puts_bos_before_every_document_by_default(both, docs, base_model_path):
    on, off = _stream(both["on"]), _stream(both["off"])
    m_on = json.loads((both["on"] / "manifest.json").read_text())
    m_off = json.loads((both["off"] / "manifest.json").read_text())
    assert m_on["bos"] is True and m_off["bos"] is False
    assert corpus_bos(both["on"]) is True and corpus_bos(both["off"]) is False
    # Default: every document (EOS-terminated) is followed by a BOS; --no-bos: none at all.
    eos_pos = np.flatnonzero(on[:-1] == 2)
    assert on[0] == 1 and (on[eos_pos + 1] == 1).all() and len(eos_pos) > 10
    assert not (off == 1).any()
    n_docs = m_on["counts"]["train"]["documents"]
    assert m_on["counts"]["train"]["tokens"] - m_off["counts"]["train"]["tokens"] == n_docs  # one BOS per document


def test_count_defaults_to_what_prepare_writes(both, base_model_path):
    from corpus.count import CountConfig, count
    from corpus.registry import add_dataset

    reg = both["root"] / "datasets.toml"
    add_dataset(reg, "on", [str(both["root"] / "on.jsonl")], split="9:1")
    counted = count(CountConfig(name="on", registry=str(reg), tokenizer=str(base_model_path), block_size=64,
                                progress=False))["on"]["counts"]
    prepared = json.loads((both["on"] / "manifest.json").read_text())["counts"]
    assert counted["train"]["tokens"] == prepared["train"]["tokens"]


def test_old_prepare_manifest_without_top_level_bos_is_read_from_config(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"stage": "corpus.prepare", "status": "done",
                                                      "config": {"bos": False}}))
    assert corpus_bos(folder) is False
    (folder / "manifest.json").write_text(json.dumps({"stage": "corpus.prepare", "status": "done", "config": {}}))
    with pytest.raises(GraftError, match=r"old/manifest.json: records no `bos`.*Fix: re-run `graft corpus prepare`"):
        corpus_bos(folder)


def test_mix_records_bos_and_refuses_sources_that_disagree(both, tmp_path):
    from corpus.mix import MixConfig, mix

    out = mix(MixConfig(spec=f"1:{both['on']}", out=str(tmp_path / "m")))
    assert json.loads((out / "manifest.json").read_text())["bos"] is True and corpus_bos(out) is True
    with pytest.raises(GraftError, match=r"different BOS settings \(.*on=True.*off=False.*bos\)\. Fix: .*--bos/--no-bos"):
        mix(MixConfig(spec=f"1:{both['on']}, 1:{both['off']}", out=str(tmp_path / "bad")))


def test_training_refuses_train_and_dev_corpora_with_different_bos(both, tmp_path):
    from continual import data as D
    from tiny_continual import make_blocks, make_tokenizer

    assert D.same_bos(both["on"], both["on"]) is True
    assert D.same_bos(both["off"], both["off"]) is False
    plain = make_blocks(tmp_path / "plain", make_tokenizer(tmp_path / "tok"), n_train=4, n_dev=2)
    assert D.corpus_bos(plain) is None and D.same_bos(plain, both["off"]) is False  # no manifest: unknown
    with pytest.raises(GraftError, match=rf"{both['off']}: was prepared with bos = false but the training data "
                                         rf".*bos = true \(manifest.json key `bos`\).*Fix: prepare both"):
        D.same_bos(both["on"], both["off"])
