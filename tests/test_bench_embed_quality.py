"""benchmarks/bench_embed_quality.py --demo scores through workflows.evaluate.bits_per_byte (no copy of its loop):
its bits per byte equal the eval stage's, and its new-id / padding masses equal a direct computation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_demo_eval_is_the_eval_stages_bpb_plus_masses(base_model_path, news_lines, english_paragraphs):
    from transformers import MixtralForCausalLM

    from bench_embed_quality import demo_eval
    from demo.tiny import tiny_mixtral_config
    from common.tokenizer_files import load_fast_tokenizer
    from workflows.evaluate import bits_per_byte

    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(hidden=32, intermediate=64, layers=1)).eval()
    tok = load_fast_tokenizer(base_model_path)
    texts = [news_lines[3][:40], english_paragraphs[5][:200], "短"]
    n_old, n_new = 31000, 31900  # pretend: ids 31000.. are new, 31900.. padding
    got = demo_eval(model, tok, texts, bos=1, eos=2, n_old=n_old, n_new=n_new, max_len=16, batch_size=2)
    assert got["bpb"] == bits_per_byte(model, tok, texts, bos=1, eos=2, max_len=16, batch_size=2)["bpb"]
    # Direct: each document whole (the tiny model's context is long enough: the same up to windowing, so the
    # masses are compared on one window per document).
    got1 = demo_eval(model, tok, texts, bos=1, eos=2, n_old=n_old, n_new=n_new, max_len=512)
    mass, n_old_t, pad_max, n_pos = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = [1] + tok.encode(t, add_special_tokens=False).ids + [2]
            p = model(input_ids=torch.tensor([ids])).logits[0, :-1].double().softmax(-1)
            y = torch.tensor(ids[1:])
            mass += float(p[y < n_old, n_old:n_new].sum())
            n_old_t += int((y < n_old).sum())
            pad_max = max(pad_max, float(p[:, n_new:].sum(-1).max()))
            n_pos += len(y)
    assert got1["positions"] == n_pos
    assert got1["new_id_mass"] == pytest.approx(mass / n_old_t, rel=1e-6)
    assert got1["pad_mass_max"] == pytest.approx(pad_max, rel=1e-6)
    assert 0 < got1["new_id_mass"] < 1 and got1["pad_mass_max"] > 0
