"""Byte-level bases: the tekken -> tokenizer.json conversion against mistral-common's Tekkenizer, base
detection, and the errors for tokenizers vocab-graft cannot grow."""
from __future__ import annotations

import json

import pytest

from common.bytelevel import (from_bytelevel, load_bytelevel, tekken_to_tokenizer, to_bytelevel, tokenizer_family)
from common.errors import GraftError
from vocab.bytelevel_stages import ConvertConfig, convert_base
from workflows.cli import main

ADVERSARIAL = [
    "", " ", "  ", "\n", "\n\n\n", "\t\t", " \n ", "a" * 300, "中" * 200, "的的的的的的", "1234567890" * 5,
    "hello   world\n\n  indented\tcode()", "ÀÉÎõü ñ ß Ω Ж", "😀😀😀 👍🏽 🇨🇳🇨🇳", "𠀀𠁁𪚥𠮷", "ＡＢＣ１２３　全角",
    "مرحبا بالعالم", "नमस्ते दुनिया", "こんにちは世界、カタカナ", "한국어 텍스트", "x\u200by\u200dz", "e\u0301 vs é",
    "I'm can't WE'LL they'd", "URL: https://example.com/a?b=c&d=e#f", "<html><body>x</body></html>",
    "   leading", "trailing   ", "\r\nwindows\r\n", "mixed中文English混合123数字",
]


@pytest.fixture(scope="module")
def tekken(tekken_path):
    tok, info = tekken_to_tokenizer(tekken_path)
    return tok, info


@pytest.fixture(scope="module")
def tekkenizer(tekken_path):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return Tekkenizer.from_file(tekken_path)


def _held_out(news_lines, review_lines, english_paragraphs):
    return list(news_lines[::20]) + list(review_lines[::25]) + list(english_paragraphs[::3])


def test_tekken_conversion_equals_tekkenizer(tekken, tekkenizer, news_lines, review_lines, english_paragraphs):
    tok, info = tekken
    assert (info.n_special, info.n_vocab) == (1000, 130072)
    assert tok.get_vocab_size() == 131072 == tekkenizer.n_words
    lines = _held_out(news_lines, review_lines, english_paragraphs) + ADVERSARIAL
    specials = set(info.specials)
    with_special_text = [line for line in lines if any(s in line for s in specials)]
    plain = [line for line in lines if line not in with_special_text]
    got = [e.ids for e in tok.encode_batch(plain, add_special_tokens=False)]
    want = [tekkenizer.encode(line, bos=False, eos=False) for line in plain]
    mismatched = [line for line, a, b in zip(plain, got, want) if a != b]
    assert len(plain) > 3000 and mismatched == []
    # Literal special-token text: Tekkenizer reads it as text, the HF tokenizer as the special token (as every HF
    # tokenizer does with added tokens); none of the real corpus lines holds such text.
    assert with_special_text == []
    assert tok.encode("a<s>b", add_special_tokens=False).ids[1] == 1
    # BOS as Tekkenizer adds it; decoding as Tekkenizer decodes
    assert tok.encode("中文 text").ids == tekkenizer.encode("中文 text", bos=True, eos=False)
    for line in plain[:500] + ADVERSARIAL:
        ids = tekkenizer.encode(line, bos=False, eos=False)
        assert tok.decode(ids) == tekkenizer.decode(ids) == line


def test_tekken_vocabulary_matches_ranks(tekken, tekkenizer):
    tok, info = tekken
    vocab = tok.get_vocab()
    for rank in (0, 255, 256, 1000, 50000, 130071):
        b = tekkenizer._model.decode_single_token_bytes(rank)
        assert vocab[to_bytelevel(b)] == rank + 1000
        assert from_bytelevel(to_bytelevel(b)) == b
    assert [tok.id_to_token(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "[INST]"]
    assert tok.id_to_token(999) == "<SPECIAL_999>"


def test_convert_command_writes_a_folder_autotokenizer_loads(tmp_path, tekken_path, tekkenizer, capsys):
    out = tmp_path / "nemo"
    assert main(["vocab", "convert", str(tekken_path), "--out", str(out)]) in (0, None)
    assert "131072 ids (1000 special + 130072 byte-level BPE tokens" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["counts"]["vocab_size"] == 131072
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, 11)
    text = "人民日报：2024年，Mistral-Nemo 的分词器。"
    assert hf(text)["input_ids"] == tekkenizer.encode(text, bos=True, eos=False)
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
    assert len(hf) == 131072
    # the same tokenizer, whichever form the base takes
    folder, file = load_bytelevel(out), load_bytelevel(tekken_path)
    assert folder.vocab == file.vocab and folder.merges == file.merges and folder.source == "tokenizer.json"
    assert file.source == "tekken" and file.ignore_merges


def test_convert_rejects_a_file_that_is_not_tekken(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(GraftError) as e:
        convert_base(ConvertConfig(source=str(bad), out=str(tmp_path / "o")))
    assert str(e.value).startswith(f"{bad}: is not a tekken tokenizer file")
    broken = tmp_path / "broken.json"
    broken.write_text('{"config": {\n  "pattern": ')
    with pytest.raises(GraftError) as e:
        convert_base(ConvertConfig(source=str(broken), out=str(tmp_path / "o")))
    assert str(e.value).startswith(f"{broken}:2: not valid JSON")


def test_family_detection(tmp_path, tekken_path, base_model_path, english_paragraphs):
    from demo.tiny import save_tiny_bytelevel_tokenizer

    assert tokenizer_family(base_model_path) == "sentencepiece"
    assert tokenizer_family(tekken_path) == "bytelevel"
    qwen = save_tiny_bytelevel_tokenizer(tmp_path / "qwen", english_paragraphs[:300], vocab_size=600)
    assert tokenizer_family(qwen) == "bytelevel"
    assert tokenizer_family(qwen / "tokenizer.json") == "bytelevel"
    # a folder with tokenizer.model and tokenizer.json keeps the SentencePiece path
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.model").write_bytes(base_model_path.read_bytes())
    (both / "tokenizer.json").write_text((qwen / "tokenizer.json").read_text())
    assert tokenizer_family(both) == "sentencepiece"


def _save(tok, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "metaspace_bpe", "no_bytes"])
def test_unsupported_tokenizer_json_is_refused_clearly(tmp_path, kind, english_paragraphs):
    from tokenizers import Tokenizer, pre_tokenizers, decoders
    from tokenizers.models import BPE, Unigram, WordLevel, WordPiece
    from tokenizers.trainers import BpeTrainer

    path = tmp_path / kind / "tokenizer.json"
    if kind == "wordpiece":
        _save(Tokenizer(WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), path)
        why = "its model is WordPiece, not BPE"
    elif kind == "unigram":
        _save(Tokenizer(Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0)), path)
        why = "its model is Unigram, not BPE"
    elif kind == "metaspace_bpe":
        tok = Tokenizer(BPE())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(english_paragraphs[:50], BpeTrainer(vocab_size=300, show_progress=False))
        _save(tok, path)
        why = "it is a BPE without a ByteLevel pre-tokenizer (pre-tokenizer: Metaspace)"
    else:
        tok = Tokenizer(BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(["abc abd"], BpeTrainer(vocab_size=300, show_progress=False))
        _save(tok, path)
        why = "its vocabulary lacks"
    with pytest.raises(GraftError) as e:
        tokenizer_family(path.parent)
    msg = str(e.value)
    assert msg.startswith(f"{path}: is not a tokenizer vocab-graft can grow: {why}"), msg
    assert "Fix: pass one of: SentencePiece BPE" in msg and "byte-level BPE" in msg
    with pytest.raises(GraftError, match="is not a tokenizer vocab-graft can grow"):
        load_bytelevel(path)
    # WordLevel too
    p2 = _save(Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")), tmp_path / "wl" / "tokenizer.json")
    with pytest.raises(GraftError, match="its model is WordLevel, not BPE"):
        load_bytelevel(p2)
