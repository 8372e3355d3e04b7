"""graft embed init / embed check with a byte-level tokenizer grafted onto the real tekken base (a tiny dense
Mistral with tekken's 131,072 ids stands in for Mistral-Nemo)."""
from __future__ import annotations

import json

import pytest
import torch

from common.bytelevel import from_bytelevel, load_bytelevel, to_bytelevel
from common.checkpoint import open_checkpoint
from common.io import read_manifest
from demo.tiny import save_tiny_mistral
from demo.sources import write_jsonl
from embed_init.check import check_grown
from embed_init.config import EmbedCheckConfig, EmbedInitConfig
from embed_init.grow import grow_embeddings
from embed_init.tokens import load_pieces


@pytest.fixture(scope="module")
def grafted(tmp_path_factory, tekken_path, news_lines):
    from vocab.merge import VocabMergeConfig, merge_into_base
    from vocab.train import VocabTrainConfig, train_candidates

    d = tmp_path_factory.mktemp("embed_bl")
    corpus = write_jsonl(d / "zh.jsonl", news_lines[:3000])
    cands = train_candidates(VocabTrainConfig(inputs=[str(corpus)], out=str(d / "cands"), base=str(tekken_path),
                                              sizes=["1500"], progress=False))
    tok = merge_into_base(VocabMergeConfig(base=str(tekken_path), add=str(cands / "candidates/added1500.json"),
                                           out=str(d / "tok"), special=["<|im_start|>"]))
    model = save_tiny_mistral(d / "m")
    return d, tok, model


def _expected_sources(tekken_path, new_tokens: list[str]) -> list[list[int]]:
    """Recomputed independently: a token's text through the old tokenizer (no specials); a token that is part of
    a character through the old BPE model on its bytes."""
    old = load_bytelevel(tekken_path).tokenizer()
    out = []
    for t in new_tokens:
        try:
            text = from_bytelevel(t).decode("utf-8")
        except UnicodeDecodeError:
            out.append([old.token_to_id(x.value) for x in old.model.tokenize(t)])
            continue
        out.append(old.encode(text, add_special_tokens=False).ids)
    return out


def test_embed_init_on_a_tekken_graft_rows_recomputed(tmp_path, tekken_path, grafted):
    d, tok, model = grafted
    out = grow_embeddings(EmbedInitConfig(model=str(model), old_tokenizer=str(tekken_path), new_tokenizer=str(tok),
                                          out=str(tmp_path / "g"), progress=False, pad_to_multiple_of=64))
    old_pieces, new = load_pieces(tekken_path), load_pieces(tok)
    assert len(old_pieces) == 131072 and len(new) == 131072 + 1500 + 1
    new_tokens = new.pieces[131072:131072 + 1500]
    assert new_tokens == [a + b for a, b in load_bytelevel(tok).merges[-1500:]]
    expected = _expected_sources(tekken_path, new_tokens)
    partial = [t for t in new_tokens if not _is_text(t)]
    m = read_manifest(out)
    assert m["counts"]["added"] == 1501 and m["counts"]["rows"] == 131072 + 1536
    assert m["new_ids"]["pieces_per_new_id"][:1500] == [len(e) for e in expected]
    assert m["new_ids"]["pieces_per_new_id"][1500] == 0  # <|im_start|>: special, mean of all old rows
    assert all(len(e) >= 2 for e in expected)  # a new token is never a single old token
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        src = open_checkpoint(model).read_tensor(name)
        grown = open_checkpoint(out).read_tensor(name)
        assert torch.equal(grown[:131072], src)
        want = torch.stack([src[ids].mean(0) for ids in expected])
        torch.testing.assert_close(grown[131072:131072 + 1500], want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grown[131072 + 1500], src.double().mean(0).float(), rtol=1e-6, atol=1e-7)
    assert partial, "this graft has tokens that hold part of a character"  # their rows were checked above too
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 131072 + 1536 and cfg["architectures"] == ["MistralForCausalLM"]
    report = check_grown(EmbedCheckConfig(out=str(out), model=str(model)))
    assert report["ok"], report
    assert report["checks"]["forward_old_ids"]["max_abs_diff"] == 0.0
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert hf.convert_tokens_to_ids("<|im_start|>") == 131072 + 1500 and hf.bos_token_id == 1


def _is_text(t: str) -> bool:
    try:
        from_bytelevel(t).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_surface_of_a_partial_character_token(tekken_path):
    from embed_init.tokens import surface_encoder

    old = load_pieces(tekken_path)
    enc = surface_encoder(old)
    zhong = "中".encode()
    tekken = load_bytelevel(tekken_path).tokenizer()
    assert enc.encode(zhong[:2]) == [tekken.token_to_id(t.value) for t in tekken.model.tokenize(to_bytelevel(zhong[:2]))]
    assert enc.encode("中国人民".encode()) == tekken.encode("中国人民", add_special_tokens=False).ids
    assert enc.encode(None) == []
