"""The issue's quality bar on the real byte-level base: ~25,000 Chinese tokens grafted onto tekken
(Mistral-Nemo) cut held-out People's Daily token counts by >= 30%, and English (pydoc) ids stay identical."""
from __future__ import annotations

import json

from common.bytelevel import load_bytelevel
from vocab.merge import VocabMergeConfig, merge_into_base
from vocab.train import VocabTrainConfig, train_candidates


def test_quality_bar_on_tekken(tmp_path, demo_corpora, tekken_path, news_lines, review_lines, english_paragraphs):
    # demo_corpora holds out every 20th paragraph (zh_news_dev) from the training file (zh_news).
    cands = train_candidates(VocabTrainConfig(inputs=[str(demo_corpora["zh_news"])], out=str(tmp_path / "c"),
                                              base=str(tekken_path), sizes=["25000"], progress=False))
    out = merge_into_base(VocabMergeConfig(base=str(tekken_path), add=str(cands / "candidates/added25000.json"),
                                           out=str(tmp_path / "tok")))
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["added_total"] == 25000 and counts["vocab_size"] == 131072 + 25000
    base, merged = load_bytelevel(tekken_path).tokenizer(), load_bytelevel(out).tokenizer()

    def n(tok, lines):
        return sum(len(e.ids) for e in tok.encode_batch(list(lines), add_special_tokens=False))

    dev = [t for i, t in enumerate(news_lines) if not i % 20]
    assert 1 - n(merged, dev) / n(base, dev) >= 0.30
    assert 1 - n(merged, review_lines) / n(base, review_lines) >= 0.20  # out of domain, never trained on
    english = list(english_paragraphs)
    assert [e.ids for e in merged.encode_batch(english, add_special_tokens=False)] == \
        [e.ids for e in base.encode_batch(english, add_special_tokens=False)]
