"""Real Llama-3 and Qwen2 vocabularies, offline: llama.cpp's vocab-only GGUF files (in the llama-cpp-python sdist
pinned by export/llama_cpp.py) converted to tokenizer.json, checked against the ids the Hugging Face tokenizers
wrote for llama.cpp (`.inp`/`.out`), then Chinese grafted onto each with every `vocab check` invariant.

Skipped only when the sdist is not cached (`make llama-cpp` caches it)."""
from __future__ import annotations

import json
import struct

import pytest

from common.bytelevel import load_bytelevel, tokenizer_family
from common.errors import GraftError
from common.gguf_vocab import gguf_to_tokenizer, read_vocab_tests
from demo.sources import write_jsonl
from export import llama_cpp
from vocab.bytelevel_stages import ConvertConfig, convert_base
from vocab.check import CheckConfig, check_tokenizer
from vocab.merge import VocabMergeConfig, merge_into_base
from vocab.train import VocabTrainConfig, train_candidates
from workflows.cli import main

# name in llama.cpp's models/ -> (ids, BOS id added by the tokenizer or None, EOS id)
BASES = {"llama-bpe": (128256, 128000, 128001), "qwen2": (151646, None, 151643)}


def _vocab(name: str):
    path = llama_cpp.vocab_file(name)
    if path is None:
        pytest.skip(f"{llama_cpp.SDIST} is not cached (run `make llama-cpp`)")
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_bases")
    return {name: convert_base(ConvertConfig(source=str(_vocab(name)), out=str(d / name))) for name in BASES}


@pytest.mark.parametrize("name", list(BASES))
def test_gguf_vocab_reproduces_the_hf_reference_ids(name):
    path = _vocab(name)
    tok, info = gguf_to_tokenizer(path)
    cases = read_vocab_tests(path)
    assert len(cases) == 46
    wrong = [(t, tok.encode(t, add_special_tokens=False).ids, ids) for t, ids in cases
             if tok.encode(t, add_special_tokens=False).ids != ids]
    assert wrong == []
    assert [tok.decode(ids) for _, ids in cases] == [t for t, _ in cases]
    assert tok.get_vocab_size() == BASES[name][0] == info.n_vocab
    if name == "llama-bpe":
        # the cases tell ignore_merges apart: with it off, one reference line ("Cửa Việt") differs
        tok.model.ignore_merges = False
        off = [t for t, ids in cases if tok.encode(t, add_special_tokens=False).ids != ids]
        assert off == ["Cửa Việt"]
    else:
        assert info.n_padding == 290  # [PAD151646].. up to config.json's 151,936, dropped (HF has no such ids)


def test_convert_command_on_gguf_writes_a_folder_autotokenizer_loads(tmp_path, capsys):
    from transformers import AutoTokenizer

    for name, (n, bos, eos) in BASES.items():
        out = tmp_path / name
        assert main(["vocab", "convert", str(_vocab(name)), "--out", str(out)]) in (0, None)
        assert f"wrote {out}: {n} ids" in capsys.readouterr().out
        m = json.loads((out / "manifest.json").read_text())
        assert m["status"] == "done" and m["source_kind"] == "gguf" and m["counts"]["vocab_size"] == n
        hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        assert len(hf) == n and hf.eos_token_id == eos
        ref = dict(read_vocab_tests(_vocab(name)))
        text = " Hello world"
        assert hf(text)["input_ids"] == ([bos] if bos is not None else []) + ref[text]
        assert hf.decode(hf("人民日报：2024年 🦙", add_special_tokens=False)["input_ids"]) == "人民日报：2024年 🦙"


def test_gguf_errors(tmp_path):
    path = _vocab("qwen2")
    with pytest.raises(GraftError) as e:
        tokenizer_family(path)
    assert str(e.value).startswith(f"{path}: is a GGUF file") and "graft vocab convert" in str(e.value)

    def gguf(kv: dict[str, str]) -> bytes:
        out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv))
        for k, v in kv.items():
            out += struct.pack("<Q", len(k)) + k.encode() + struct.pack("<IQ", 8, len(v)) + v.encode()
        return out

    other = tmp_path / "falcon.gguf"
    other.write_bytes(gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "falcon"}))
    with pytest.raises(GraftError) as e:
        convert_base(ConvertConfig(source=str(other), out=str(tmp_path / "o")))
    assert str(e.value).startswith(f"{other}: its pre-tokenizer is 'falcon'; vocab-graft knows llama-bpe")
    spm = tmp_path / "spm.gguf"
    spm.write_bytes(gguf({"tokenizer.ggml.model": "llama"}))
    with pytest.raises(GraftError, match="not 'gpt2'"):
        convert_base(ConvertConfig(source=str(spm), out=str(tmp_path / "o")))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(GraftError, match="truncated or corrupt"):
        convert_base(ConvertConfig(source=str(cut), out=str(tmp_path / "o")))


@pytest.mark.parametrize("name", list(BASES))
def test_chinese_graft_on_real_llama3_and_qwen2(tmp_path, converted, name, news_lines, english_paragraphs):
    """Chinese grafted onto the real vocabularies: every `vocab check` invariant holds, English ids unchanged."""
    n, bos, _ = BASES[name]
    base = converted[name]
    zh = write_jsonl(tmp_path / "zh.jsonl", [t for i, t in enumerate(news_lines[:6000]) if i % 20])
    dev = write_jsonl(tmp_path / "zh_dev.jsonl", news_lines[:6000:20])
    en = write_jsonl(tmp_path / "en.jsonl", english_paragraphs[1500:2500])
    cands = train_candidates(VocabTrainConfig(inputs=[str(zh)], out=str(tmp_path / "c"), base=str(base),
                                         sizes=["2000"], progress=False))
    tok = merge_into_base(VocabMergeConfig(base=str(base), add=str(cands / "candidates/added2000.json"),
                                      out=str(tmp_path / "tok"), special=["<|im_start|>", "<tool>"]))
    r = check_tokenizer(CheckConfig(tokenizer=str(tok), base=str(base), corpus=[str(dev), str(en)]))
    assert r["ok"], (r["invariants"], r["examples"], r["problems"])
    assert r["added_pieces"] == 2000 and r["tokens_per_char"]["non_target"]["token_reduction"] == 0
    assert r["tokens_per_char"]["target"]["token_reduction"] > 0.05  # Qwen2 already knows much Chinese: 8.7%
    b, m = load_bytelevel(base), load_bytelevel(tok)
    english = list(english_paragraphs)
    assert [e.ids for e in m.tokenizer().encode_batch(english)] == [e.ids for e in b.tokenizer().encode_batch(english)]
    new_ids = sorted(i for t, i in m.vocab.items() if t not in b.vocab and i >= n)
    assert new_ids[0] == n and len(new_ids) == 2000  # after every base id, the base's specials included
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
    plain = hf("中文", add_special_tokens=False)["input_ids"]
    assert hf("中文")["input_ids"] == ([bos] if bos is not None else []) + plain
