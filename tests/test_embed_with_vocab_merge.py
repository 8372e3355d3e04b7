"""graft embed init on the tokenizer folder that `graft vocab train` + `graft vocab merge` really write."""
from __future__ import annotations

import torch

from common.checkpoint import open_checkpoint
from common.io import read_manifest
from demo.tiny import save_tiny_mixtral
from demo.sources import write_jsonl
from embed_init.check import check_grown
from embed_init.config import EmbedCheckConfig, EmbedInitConfig
from embed_init.grow import grow_embeddings
from embed_init.tokens import load_pieces


def test_grow_with_vocab_merge_output(tmp_path, base_model_path, news_lines):
    from vocab.merge import VocabMergeConfig, merge_into_base
    from vocab.train import VocabTrainConfig, train_candidates

    corpus = write_jsonl(tmp_path / "zh.jsonl", news_lines[:3000])
    cands = train_candidates(VocabTrainConfig(inputs=[str(corpus)], out=str(tmp_path / "cands"), chars=[1200],
                                              sizes=["2500"], progress=False))
    cand = cands / read_manifest(cands)["candidates"][0]["path"]
    tok = merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(cand), out=str(tmp_path / "tok"),
                                           special=["<|im_start|>"]))
    new = load_pieces(tok)
    special_id = new.pieces.index("<|im_start|>")
    assert special_id >= 32000

    model = save_tiny_mixtral(tmp_path / "m", max_shard_size="4MB", dtype="bfloat16")
    out = grow_embeddings(EmbedInitConfig(model=str(model), old_tokenizer=str(base_model_path),
                                          new_tokenizer=str(tok), out=str(tmp_path / "g"), progress=False))
    counts = read_manifest(out)["new_ids"]["pieces_per_new_id"]
    assert len(counts) == len(new) - 32000
    assert counts[special_id - 32000] == 0  # special token: mean of all old rows, not of "<", "|", ...
    assert all(c >= 1 for i, c in enumerate(counts) if i != special_id - 32000)
    old = open_checkpoint(model).read_tensor("lm_head.weight")
    grown = open_checkpoint(out).read_tensor("lm_head.weight")
    torch.testing.assert_close(grown[special_id], old.double().mean(0).float().to(torch.bfloat16))
    assert check_grown(EmbedCheckConfig(out=str(out), model=str(model)))["ok"]
