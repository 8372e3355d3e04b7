"""The issue's quality bar on real text: ~25,000 added Chinese pieces cut held-out People's Daily
token counts by >= 40% against the real Mixtral tokenizer, and English (pydoc) counts stay identical."""
from __future__ import annotations

import json

from common.tokenizer_files import load_fast_tokenizer, load_sentencepiece
from vocab.merge import VocabMergeConfig, merge_into_base
from vocab.train import VocabTrainConfig, train_candidates


def test_quality_bar_on_held_out_news(tmp_path, demo_corpora, base_model_path, news_lines, english_paragraphs):
    # demo_corpora holds out every 20th paragraph (zh_news_dev) from the training file (zh_news).
    cands = train_candidates(VocabTrainConfig(inputs=[str(demo_corpora["zh_news"])], out=str(tmp_path / "c"),
                                              chars=[4451], sizes=["26750"], progress=False))
    out = merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(cands / "candidates/chars4451_size26750.model"),
                                           out=str(tmp_path / "tok")))
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert 24_500 <= counts["added_total"] <= 25_500
    dev = [t for i, t in enumerate(news_lines) if not i % 20]
    base, sp = load_sentencepiece(base_model_path), load_sentencepiece(out)
    n_base = sum(map(len, base.encode(dev)))
    n_new = sum(map(len, sp.encode(dev)))
    assert 1 - n_new / n_base >= 0.40, (n_base, n_new)
    english = list(english_paragraphs)
    assert sp.encode(english) == base.encode(english)
    fast = load_fast_tokenizer(out)
    assert [e.ids for e in fast.encode_batch(dev[:300], add_special_tokens=False)] == sp.encode(dev[:300])
