"""Bits per byte (workflows/evaluate.py) against direct computations, and the report's Markdown/HTML twins."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(base_model_path):
    from transformers import MixtralForCausalLM

    from common.tiny import tiny_mixtral_config
    from common.tokenizer_files import load_fast_tokenizer

    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(hidden=32, intermediate=64, layers=1)).eval()
    return model, load_fast_tokenizer(base_model_path)


def _direct_nats(model, ids: list[int], context: int | None) -> float:
    """-sum log p(ids[t] | previous) with the whole prefix (context=None) or the last `context` tokens."""
    import torch.nn.functional as F

    total = 0.0
    with torch.no_grad():
        if context is None:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            return float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
        for t in range(1, len(ids)):
            window = ids[max(0, t - context):t]
            logits = model(input_ids=torch.tensor([window])).logits[0, -1]
            total += float(F.cross_entropy(logits[None], torch.tensor([ids[t]])))
    return total


def test_bits_per_byte_matches_direct_computation(tiny, news_lines, english_paragraphs):
    from workflows.evaluate import bits_per_byte

    model, tok = tiny
    texts = [news_lines[3][:16], english_paragraphs[5][:40], "短"]
    encs = [[1] + tok.encode(t, add_special_tokens=False).ids for t in texts]
    r = bits_per_byte(model, tok, texts, bos=1, max_len=512, batch_size=2)
    direct = sum(_direct_nats(model, ids, None) for ids in encs)
    assert r["tokens"] == sum(len(e) - 1 for e in encs)
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert r["nats"] == pytest.approx(direct, rel=1e-5)
    assert r["bpb"] == pytest.approx(direct / math.log(2) / r["bytes"], rel=1e-5)

    # Short windows: every token is still predicted once, with the window's context only.
    r2 = bits_per_byte(model, tok, texts, bos=1, max_len=2, batch_size=3)
    assert r2["tokens"] == r["tokens"]
    assert r2["nats"] == pytest.approx(sum(_direct_nats(model, ids, 1) for ids in encs), rel=1e-5)


def test_report_markdown_and_html_say_the_same():
    from analysis.report import Doc

    d = Doc()
    d.h(2, "Dev bits per byte")
    d.p("Chosen: **chars 2500** -> `a/b.model`")
    d.table(["model", "bpb"], [["base | x", 3.14159], ["trained", 2]])
    d.img("bpb.png", "bpb")
    d.code("中国经济 <b>")
    md, html = d.markdown(), d.html("t")
    assert "## Dev bits per byte" in md and "<h2>Dev bits per byte</h2>" in html
    assert "**chars 2500** -> `a/b.model`" in md and "<b>chars 2500</b> -&gt; <code>a/b.model</code>" in html
    assert "| base \\| x | 3.1416 |" in md and "<td>base | x</td><td>3.1416</td>" in html
    assert "![bpb](bpb.png)" in md and "<img src='bpb.png' alt='bpb'>" in html
    assert "中国经济 &lt;b&gt;" in html
