"""Bad input to vocab train / merge / check: one clear error naming the file and the fix (exact messages)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from common.errors import GraftError
from common.tokenizer_files import load_fast_tokenizer, load_model_proto, load_sentencepiece
from demo.sources import write_jsonl
from vocab.grid import parse_chars, parse_sizes
from vocab.merge import VocabMergeConfig, merge_into_base
from vocab.train import VocabTrainConfig, train_bpe, train_candidates
from workflows.cli import main


def _train(tmp_path, inputs, **kw):
    cfg = dict(inputs=[str(i) for i in inputs], out=str(tmp_path / "out"), chars=[50], sizes=["400"],
               max_sentences=1000, progress=False)
    cfg.update(kw)
    return train_candidates(VocabTrainConfig(**cfg))


def test_empty_corpus(tmp_path):
    f = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(GraftError) as e:
        _train(tmp_path, [f])
    rejects = tmp_path / ".out.partial" / "rejects.jsonl"
    assert rejects.read_text().count('"reason": "empty"') == 2  # nothing dropped silently
    assert str(e.value) == (f"{f}: no text found (2 records rejected (empty: 2) (written to {rejects})). "
                            "Fix: pass files with text "
                            "(jsonl field 'text', parquet column 'text', or .txt lines)")
    assert not (tmp_path / "out").exists()


def test_corpus_without_target_script(tmp_path, english_paragraphs):
    f = write_jsonl(tmp_path / "en.jsonl", english_paragraphs[:30])
    with pytest.raises(GraftError) as e:
        _train(tmp_path, [f])
    n = sum(len([l for l in t.split("\n") if l.strip()]) for t in english_paragraphs[:30])
    assert str(e.value) == (f"{f}: no Han text found in {n} sampled lines. "
                            "Fix: pass Han-script text, or --script any to train on any text")


def test_size_smaller_than_required_chars(tmp_path, news_lines):
    f = write_jsonl(tmp_path / "zh.jsonl", news_lines[:50])
    msg = ("size 2000 is smaller than required: --chars 1800 needs 1800 character pieces plus 259 reserved "
           "pieces (<unk>, <s>, </s> and 256 byte pieces), i.e. SentencePiece's 'Vocabulary size is smaller "
           "than required_chars'. Fix: use --sizes of at least 2060 for --chars 1800, or lower --chars")
    with pytest.raises(GraftError) as e:
        _train(tmp_path, [f], chars=[1800], sizes=["2000:4000:1000"])
    assert str(e.value) == msg
    with pytest.raises(GraftError) as e:  # the same from the Python training function
        train_bpe(list(news_lines[:2000]), 1800, 2000)
    assert str(e.value) == msg


def test_more_chars_than_the_corpus_has(tmp_path, news_lines):
    f = write_jsonl(tmp_path / "zh.jsonl", news_lines[:3])
    with pytest.raises(GraftError, match=r"zh.jsonl: the sampled text has only \d+ distinct characters, so "
                                         r"--chars 5000 cannot be met. Fix: lower --chars to at most \d+"):
        _train(tmp_path, [f], chars=[5000], sizes=["6000"])


def test_sizes_beyond_what_the_corpus_supports(tmp_path, news_lines):
    f = write_jsonl(tmp_path / "zh.jsonl", news_lines[:3])
    with pytest.raises(GraftError, match=r"the sampled text supports at most \d+ pieces with --chars 30 "
                                         r"\(no pair of symbols left to merge\), but --sizes asks for up to 90000"):
        _train(tmp_path, [f], chars=[30], sizes=["400,90000"])


@pytest.mark.parametrize("spec,msg", [
    ("5000:4000:1000", "bad sizes '5000:4000:1000': STOP 4000 is below START 5000. Fix: use START:STOP:STEP "
                       "(inclusive, e.g. 5000:40000:1000) or a list like 8000,16000,32000"),
    ("5000:6000", "bad sizes '5000:6000': a range needs three parts. Fix: use START:STOP:STEP (inclusive, "
                  "e.g. 5000:40000:1000) or a list like 8000,16000,32000"),
    ("8k", "bad sizes '8k': '8k' is not a whole number. Fix: use START:STOP:STEP (inclusive, "
           "e.g. 5000:40000:1000) or a list like 8000,16000,32000"),
    ("0:100:10", "bad sizes '0:100:10': 0 is not positive. Fix: use START:STOP:STEP (inclusive, "
                 "e.g. 5000:40000:1000) or a list like 8000,16000,32000"),
])
def test_bad_grid_spec(spec, msg):
    with pytest.raises(GraftError) as e:
        parse_sizes(spec)
    assert str(e.value) == msg


def test_bad_chars_and_cli_exit_code(tmp_path, capsys):
    with pytest.raises(GraftError) as e:
        parse_chars(["4451,abc"])
    assert str(e.value) == ("bad chars '4451,abc': 'abc' is not a whole number. Fix: use a list of "
                            "single-character counts, e.g. 4451,5435,6414,7434")
    rc = main(["vocab", "train", "x.jsonl", "--out", str(tmp_path / "o"), "--sizes", "9:1:1"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("graft: error: bad sizes '9:1:1': STOP 1 is below START 9.")


def test_unreadable_corpus_file(tmp_path, monkeypatch, news_lines):
    f = write_jsonl(tmp_path / "zh.jsonl", news_lines[:5])
    os.chmod(f, 0)
    if os.geteuid() == 0:  # root reads anything: make open() fail as it would for a user
        import builtins

        real_open = builtins.open

        def deny(path, *a, **k):
            if str(path) == str(f):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **k)
        monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(GraftError) as e:
        _train(tmp_path, [f])
    assert str(e.value) == f"{f}: permission denied. Fix: make the file readable (chmod +r) or copy it"


def test_missing_corpus_file(tmp_path):
    with pytest.raises(GraftError) as e:
        _train(tmp_path, [tmp_path / "nope.jsonl"])
    assert str(e.value) == f"{tmp_path / 'nope.jsonl'}: file not found. Fix: check the path"


def test_unreadable_model_file(tmp_path, monkeypatch, base_model_path):
    f = tmp_path / "t.model"
    f.write_bytes(base_model_path.read_bytes())
    real = Path.read_bytes

    def deny(self):
        if self == f:
            raise PermissionError(13, "Permission denied")
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(GraftError) as e:
        load_sentencepiece(f)
    assert str(e.value) == f"{f}: permission denied. Fix: make the file readable (chmod +r) or copy it"


CORRUPT = ("not a SentencePiece model (the file is corrupt, empty, or another format). Fix: pass a .model file "
           "written by SentencePiece (spm_train / `graft vocab train`); re-download or re-train it if it was truncated")


@pytest.mark.parametrize("data", [b"", b"\x00\xff garbage \x12\x34", b'{"version": "1.0"}'], ids=["empty", "bytes", "json"])
def test_corrupt_candidate(tmp_path, base_model_path, data):
    f = tmp_path / "cand.model"
    f.write_bytes(data)
    with pytest.raises(GraftError) as e:
        merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(f), out=str(tmp_path / "m")))
    assert str(e.value) == f"{f}: {CORRUPT}"
    assert not (tmp_path / "m").exists()


def test_truncated_candidate(tmp_path, base_model_path):
    f = tmp_path / "cut.model"
    f.write_bytes(base_model_path.read_bytes()[:-1000])
    with pytest.raises(GraftError) as e:
        load_model_proto(f)
    assert str(e.value) == f"{f}: {CORRUPT}"


def test_non_bpe_candidate(tmp_path, base_model_path, news_lines):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(news_lines[:300]), model_writer=buf, vocab_size=2500,
                                   model_type="unigram", minloglevel=2, num_threads=1)
    f = tmp_path / "uni.model"
    f.write_bytes(buf.getvalue())
    with pytest.raises(GraftError) as e:
        merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(f), out=str(tmp_path / "m")))
    assert str(e.value) == (f"{f}: is a SentencePiece UNIGRAM model, not BPE. Fix: train the vocabulary with "
                            "model_type=bpe (what `graft vocab train` does)")
    with pytest.raises(GraftError, match="is a SentencePiece UNIGRAM model, not BPE"):
        load_fast_tokenizer(f)
    with pytest.raises(GraftError) as e:  # as the base
        merge_into_base(VocabMergeConfig(base=str(f), add=str(base_model_path), out=str(tmp_path / "m")))
    assert str(e.value) == (f"{f}: is a SentencePiece UNIGRAM model, not BPE. Fix: vocab merge grows SentencePiece "
                            "BPE tokenizers (Llama, Mistral, Mixtral); a Unigram base (T5, XLM-R, ...) is not supported")


def test_base_not_sentencepiece(tmp_path, base_model_path):
    hf = tmp_path / "hf_bpe"
    hf.mkdir()
    (hf / "tokenizer.json").write_text("{}")
    fix = ("is neither a Hugging Face tokenizer.json nor a tekken file. Fix: pass one of: SentencePiece BPE (a "
           "tokenizer.model, or a folder holding one: Llama-2, Mistral-7B, Mixtral) or byte-level BPE (a "
           "tokenizer.json with a ByteLevel pre-tokenizer: GPT-2, Llama-3, Qwen2/2.5/3, Mistral-Nemo; or "
           "Mistral's tekken JSON)")
    for base in (hf, hf / "tokenizer.json"):  # byte-level bases are grown too: this one is neither kind
        with pytest.raises(GraftError) as e:
            merge_into_base(VocabMergeConfig(base=str(base), add=str(base_model_path), out=str(tmp_path / "m")))
        assert str(e.value) == f"{hf / 'tokenizer.json'}: {fix}"
    bogus = tmp_path / "base.model"
    bogus.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(GraftError) as e:
        merge_into_base(VocabMergeConfig(base=str(bogus), add=str(base_model_path), out=str(tmp_path / "m")))
    assert str(e.value) == f"{bogus}: {CORRUPT}"


def test_tokenizer_file_helpers(tmp_path, base_model_path):
    sp = load_sentencepiece(base_model_path)
    fast = load_fast_tokenizer(base_model_path)
    assert sp.get_piece_size() == fast.get_vocab_size() == 32000
    text = "Hello  world 你好，世界 😀"
    assert fast.encode(text, add_special_tokens=False).ids == sp.encode(text)
    assert fast.encode(text).ids[0] == 1  # BOS like the Llama/Mixtral HF tokenizer
    with pytest.raises(GraftError) as e:
        load_sentencepiece(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}: folder has no tokenizer.model (not a SentencePiece tokenizer). Fix:")
    with pytest.raises(GraftError) as e:
        load_fast_tokenizer(tmp_path)
    assert str(e.value) == (f"{tmp_path}: folder has neither tokenizer.json nor tokenizer.model. Fix: pass a Hugging "
                            "Face tokenizer folder, a tokenizer.json, or a SentencePiece .model")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GraftError, match=r"tokenizer.json: not a Hugging Face tokenizer.json"):
        load_fast_tokenizer(tmp_path)


def test_unknown_script(tmp_path, base_model_path):
    with pytest.raises(GraftError) as e:
        merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(base_model_path), out=str(tmp_path / "m"),
                                         script="Klingon"))
    assert str(e.value) == ("unknown script 'Klingon'. Fix: use one of Han, Hangul, Cyrillic, any ('any' adds "
                            "every piece whatever its script)")


def test_candidate_with_nothing_to_add(tmp_path, base_model_path, english_paragraphs):
    f = tmp_path / "en.model"
    f.write_bytes(train_bpe(list(english_paragraphs[:800]), 90, 700).SerializeToString())
    with pytest.raises(GraftError) as e:
        merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(f), out=str(tmp_path / "m")))
    assert re.fullmatch(re.escape(f"{f}: has no piece to add with a Han character (") + r"\d+ pieces: \d+ already in "
                        r"the base, \d+ without the script\)\. Fix: pass a candidate trained on Han text \(graft "
                        r"vocab train\), or --script any to add pieces of any script", str(e.value))
