"""graft export gguf on a byte-level graft: Chinese grafted onto the real Llama-3 and Qwen2 vocabularies (llama.cpp's
vocab files, converted by `graft vocab convert`), a tiny dense Llama with that many rows, exported by llama.cpp's own
converter told the base's pre-tokenizer name, then tokenized by llama.cpp itself (llama-cpp-python, same pin).

Skipped when the sdist, the converter or the wheel is not cached; `make test-export` provides them and runs this
file too, where a missing piece fails."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.errors import GraftError
from demo.sources import write_jsonl
from export import llama_cpp
from export.config import GgufConfig
from export.gguf import export_gguf
from test_export_gguf import _missing  # skips, or fails under `make test-export` (GRAFT_REQUIRE_LLAMA_CPP=1)
from vocab.bytelevel_stages import ConvertConfig, convert_base
from vocab.merge import VocabMergeConfig, merge_into_base
from vocab.train import VocabTrainConfig, train_candidates


@pytest.fixture(scope="module", params=["llama-bpe", "qwen2"])
def graft(request, tmp_path_factory, news_lines):
    pre = request.param
    vocab = llama_cpp.vocab_file(pre)
    if vocab is None or llama_cpp.extract_source(download=False) is None:
        _missing(f"{llama_cpp.SDIST} is not cached")
    if llama_cpp.installed() != llama_cpp.VERSION:
        _missing(f"llama-cpp-python {llama_cpp.VERSION} is not installed")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp(f"export_{pre}")
    base = convert_base(ConvertConfig(source=str(vocab), out=str(d / "base_tok")))
    zh = write_jsonl(d / "zh.jsonl", [t for i, t in enumerate(news_lines[:3000]) if i % 20])
    cands = train_candidates(VocabTrainConfig(inputs=[str(zh)], out=str(d / "c"), base=str(base), sizes=["500"],
                                         progress=False))
    tok = merge_into_base(VocabMergeConfig(base=str(base), add=str(cands / "candidates/added500.json"), out=str(d / "tok")))
    hf = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
    n = len(hf)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, bos_token_id=hf.bos_token_id,
                      eos_token_id=hf.eos_token_id)
    model = d / "model"
    LlamaForCausalLM(cfg).save_pretrained(model, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok / f, model / f)
    return pre, model, tok, n, len(AutoTokenizer.from_pretrained(str(base), local_files_only=True))


def test_byte_level_graft_exports_and_llama_cpp_tokenizes_as_hf(graft, news_lines, english_paragraphs, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    pre, model, tok, n, n_base = graft
    with pytest.raises(GraftError, match="pass --pre-tokenizer"):
        export_gguf(GgufConfig(model=str(model), out=str(tmp_path / "x.gguf"), outtype="f32", progress=False))
    path = export_gguf(GgufConfig(model=str(model), out=str(tmp_path / "m.gguf"), outtype="f32", progress=False,
                                  pre_tokenizer=pre))
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.n_vocab() == n
    hf = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
    lines = list(news_lines[::97][:150]) + list(english_paragraphs[::40][:60])  # news mostly held out of training
    differ = [t for t in lines if llm.tokenize(t.encode(), add_bos=False, special=False)
              != hf(t, add_special_tokens=False)["input_ids"]]
    assert differ == []
    new = list(range(n_base, n))
    texts = hf.convert_ids_to_tokens(new)
    from common.bytelevel import from_bytelevel

    whole = [(i, from_bytelevel(t).decode()) for i, t in zip(new, texts) if _utf8(from_bytelevel(t))]
    assert len(whole) > 400
    assert [i for i, t in whole if llm.tokenize(t.encode(), add_bos=False, special=False) != [i]] == []


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False
