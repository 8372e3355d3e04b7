"""vocab train / merge / check on byte-level BPE bases: the real tekken (Mistral-Nemo) base and tiny
Qwen2-shaped and GPT-2-shaped bases trained here, with real Chinese (People's Daily) and English (pydoc)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.bytelevel import from_bytelevel, load_bytelevel, to_bytelevel
from common.errors import GraftError
from common.scripts import ScriptFilter
from demo.sources import write_jsonl
from vocab.bytelevel import TargetSafety
from vocab.check import CheckConfig, check_tokenizer
from vocab.merge import VocabMergeConfig, merge_into_base
from vocab.train import VocabTrainConfig, train_candidates


def _train(tmp_path: Path, base, inputs, sizes, name="c", **kw) -> Path:
    return train_candidates(VocabTrainConfig(inputs=[str(i) for i in inputs], out=str(tmp_path / name), base=str(base),
                                             sizes=[sizes], progress=False, **kw))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, news_lines, english_paragraphs):
    d = tmp_path_factory.mktemp("bl_corpora")
    return {"zh": write_jsonl(d / "zh.jsonl", [t for i, t in enumerate(news_lines[:6000]) if i % 20]),
            "zh_dev": write_jsonl(d / "zh_dev.jsonl", news_lines[:6000:20]),
            "en": write_jsonl(d / "en.jsonl", english_paragraphs[1500:2500])}


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory, english_paragraphs):
    from demo.tiny import save_tiny_bytelevel_tokenizer

    d = tmp_path_factory.mktemp("bl_bases")
    return {style: save_tiny_bytelevel_tokenizer(d / style, english_paragraphs[:2000], vocab_size=1500, style=style)
            for style in ("qwen", "gpt2", "llama3")}


@pytest.fixture(scope="module")
def tekken_graft(tmp_path_factory, tekken_path, corpora):
    d = tmp_path_factory.mktemp("tekken_graft")
    cands = _train(d, tekken_path, [corpora["zh"]], "1000:3000:1000")
    tok = merge_into_base(VocabMergeConfig(base=str(tekken_path), add=str(cands / "candidates/added3000.json"),
                                           out=str(d / "tok"), special=["<|im_start|>", "<|im_end|>", "<s>"]))
    return cands, tok


def test_target_safety():
    han = TargetSafety(ScriptFilter("Han"))
    zhong = "中".encode()  # e4 b8 ad
    assert han.safe(zhong) and han.safe(b" " + zhong) and han.safe("，中国".encode())
    assert han.safe(zhong[:2])          # e4 b8 -> U+4E00..U+4E3F: all Han
    assert not han.safe(zhong[:1])      # e4 -> U+4000..U+4FFF includes the Yijing hexagrams U+4DC0..
    assert not han.safe(zhong[1:])      # the end of a character: any lead byte could precede it
    assert not han.safe("。".encode()) and not han.safe(b"abc") and not han.safe("한".encode())
    assert not han.safe("あ".encode()[:2])  # e3 81 -> kana
    assert TargetSafety(ScriptFilter("any")).safe(b"abc")


def test_train_writes_candidates_and_a_cut_equals_an_independent_training(tmp_path, tekken_path, tekken_graft, corpora):
    cands, _ = tekken_graft
    m = json.loads((cands / "manifest.json").read_text())
    assert m["kind"] == "bytelevel" and m["counts"]["trainings"] == 1
    assert m["candidates"] == [{"size": n, "path": f"candidates/added{n}.json", "vocab_size": 131072 + n}
                               for n in (1000, 2000, 3000)]
    single = _train(tmp_path, tekken_path, [corpora["zh"]], "2000", name="single")
    cut = json.loads((cands / "candidates/added2000.json").read_text())
    alone = json.loads((single / "candidates/added2000.json").read_text())
    assert cut["merges"] == alone["merges"] and cut["pair_counts"] == alone["pair_counts"]
    assert (cands / "candidates/added2000.json").read_bytes() == (single / "candidates/added2000.json").read_bytes()
    big = json.loads((cands / "candidates/added3000.json").read_text())
    assert big["merges"][:1000] == json.loads((cands / "candidates/added1000.json").read_text())["merges"]


def test_merge_on_tekken_keeps_the_base_and_every_new_token_is_reachable(tekken_path, tekken_graft, corpora,
                                                                        english_paragraphs, news_lines):
    _, tok = tekken_graft
    base, merged = load_bytelevel(tekken_path), load_bytelevel(tok)
    m = json.loads((tok / "manifest.json").read_text())
    assert m["counts"]["added_total"] == 3000 and m["first_added_id"] == 131072
    assert m["special_tokens"] == ["<|im_start|>", "<|im_end|>"] and m["special_skipped_existing"] == ["<s>"]
    assert merged.merges[:len(base.merges)] == base.merges and len(merged.merges) == len(base.merges) + 3000
    assert all(merged.vocab[t] == i for t, i in base.vocab.items())
    new = sorted((i, t) for t, i in merged.vocab.items() if t not in base.vocab)
    assert [i for i, _ in new] == list(range(131072, 134072))
    assert [t for _, t in new] == [a + b for a, b in merged.merges[len(base.merges):]]
    safety = TargetSafety(ScriptFilter("Han"))
    assert all(safety.safe(from_bytelevel(t)) for _, t in new)
    bt, mt = base.tokenizer(), merged.tokenizer()
    english = list(english_paragraphs)
    assert [e.ids for e in mt.encode_batch(english, add_special_tokens=False)] == \
        [e.ids for e in bt.encode_batch(english, add_special_tokens=False)]
    dev = list(news_lines[:6000:20])
    n_base = sum(len(e.ids) for e in bt.encode_batch(dev, add_special_tokens=False))
    n_new = sum(len(e.ids) for e in mt.encode_batch(dev, add_special_tokens=False))
    assert n_new < 0.8 * n_base
    assert [mt.decode(e.ids) for e in mt.encode_batch(dev[:100], add_special_tokens=False)] == dev[:100]
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.convert_tokens_to_ids("<|im_end|>")) == (1, 2, 134073)
    assert len(hf) == 134074


def test_check_passes_on_tekken_graft(tekken_path, tekken_graft, corpora):
    _, tok = tekken_graft
    r = check_tokenizer(CheckConfig(tokenizer=str(tok), base=str(tekken_path),
                                    corpus=[str(corpora["zh_dev"]), str(corpora["en"])]))
    assert r["ok"], r["invariants"]
    assert r["kind"] == "bytelevel" and r["added_pieces"] == 3000
    assert r["tokens_per_char"]["non_target"]["token_reduction"] == 0
    assert r["tokens_per_char"]["target"]["token_reduction"] > 0.2


@pytest.mark.parametrize("style", ["qwen", "gpt2", "llama3"])
def test_graft_on_tiny_qwen_gpt2_and_llama3_shaped_bases(tmp_path, tiny_bases, corpora, style):
    """These bases know no Chinese at all (trained on English): every Han character is 3 byte tokens, so the new
    merges must build characters from partial-character tokens. Qwen2 and GPT-2 shapes have ignore_merges off
    (reachability by merges only); the Llama-3 shape has it on, special tokens after the BPE ids and a BOS
    post-processor."""
    base = tiny_bases[style]
    cands = _train(tmp_path, base, [corpora["zh"]], "1500")
    tok = merge_into_base(VocabMergeConfig(base=str(base), add=str(cands / "candidates/added1500.json"),
                                           out=str(tmp_path / "tok"), special=["<|im_start|>", "<tool>"]))
    m = json.loads((tok / "manifest.json").read_text())
    assert m["counts"]["partial_character_tokens"] > 100
    r = check_tokenizer(CheckConfig(tokenizer=str(tok), base=str(base),
                                    corpus=[str(corpora["zh_dev"]), str(corpora["en"])]))
    assert r["ok"], (r["invariants"], r["examples"], r["problems"])
    assert r["tokens_per_char"]["target"]["token_reduction"] > 0.5
    merged = load_bytelevel(tok).tokenizer()
    base_tok = load_bytelevel(base).tokenizer()
    eot = base_tok.token_to_id("<|endoftext|>" if style != "llama3" else "<|end_of_text|>")
    assert merged.token_to_id("<|endoftext|>" if style != "llama3" else "<|end_of_text|>") == eot  # specials keep ids
    assert eot == (1500 if style != "llama3" else 1501)
    first = 1500 + len(load_bytelevel(base).added_tokens)  # the new BPE tokens, then --special ones not in the base
    assert merged.token_to_id("<tool>") == first + 1500 + (0 if style == "qwen" else 1)
    if style == "llama3":
        bos = base_tok.token_to_id("<|begin_of_text|>")
        assert merged.encode("中文 text").ids[0] == bos == 1500 and merged.token_to_id("<|reserved_special_token_5|>") == 1507
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
        assert hf.bos_token_id == 1500 and hf("中文")["input_ids"][0] == 1500


def _tamper(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    edit(data)
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return dst


def test_check_catches_broken_grafts(tmp_path, tiny_bases, corpora, english_paragraphs):
    """The invariants can fail: grafts made the usual wrong ways are reported."""
    base = tiny_bases["qwen"]
    cands = _train(tmp_path, base, [corpora["zh"]], "300")
    good = merge_into_base(VocabMergeConfig(base=str(base), add=str(cands / "candidates/added300.json"),
                                            out=str(tmp_path / "good")))
    n_base_merges = len(load_bytelevel(base).merges)
    corpus = [str(corpora["zh_dev"]), str(corpora["en"])]

    def prepend_new_merges(d):  # new merges before the base's
        m = d["model"]["merges"]
        d["model"]["merges"] = m[n_base_merges:] + m[:n_base_merges]

    # an English word the base splits in two tokens
    enc = load_bytelevel(base).tokenizer().encode("\n".join(english_paragraphs[1500:1600]), add_special_tokens=False)
    words: dict[int, list[str]] = {}
    for t, w in zip(enc.tokens, enc.word_ids):
        words.setdefault(w, []).append(t)
    a, b = next(w for w in words.values() if len(w) == 2 and w[0].startswith("Ġ") and w[1].isalpha())

    def english_merge(d):  # a new merge without the target script: English text changes
        v = d["model"]["vocab"]
        assert a in v and b in v and a + b not in v
        v[a + b] = max(v.values()) + 1
        d["model"]["merges"].append([a, b])

    def as_added_token(d):  # HF add_tokens: an added token, not a merge
        d["added_tokens"].append({"id": max(d["model"]["vocab"].values()) + 1, "content": "中国人民",
                                  "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
                                  "special": False})

    def dead_token(d):  # a token whose parts never meet: no merge builds it
        v = d["model"]["vocab"]
        v[to_bytelevel("鬱鬱".encode())] = max(v.values()) + 1

    expected = {prepend_new_merges: "base_merges_changed", english_merge: "non_target_lines_changed",
                as_added_token: "added_as_added_tokens", dead_token: "unreachable_merges"}
    for edit, invariant in expected.items():
        bad = _tamper(good, tmp_path / edit.__name__, edit)
        r = check_tokenizer(CheckConfig(tokenizer=str(bad), base=str(base), corpus=corpus))
        assert not r["ok"] and r["invariants"][invariant] > 0, (edit.__name__, r["invariants"])
    r = check_tokenizer(CheckConfig(tokenizer=str(tmp_path / "english_merge"), base=str(base), corpus=corpus))
    assert r["invariants"]["added_without_target_script"] == 1


def test_byte_level_errors(tmp_path, tekken_path, tiny_bases, corpora, base_model_path, tekken_graft):
    with pytest.raises(GraftError) as e:
        VocabTrainConfig(inputs=[str(corpora["zh"])], out=str(tmp_path / "x"), base=str(tekken_path), chars=[4451])
    assert str(e.value) == (f"--chars 4451: --chars has no meaning for a byte-level BPE base ({tekken_path}): its "
                            "alphabet is the 256 bytes, and characters come from merges like any other token. Fix: "
                            "leave --chars out (--sizes counts the tokens added to the base)")
    # a SentencePiece candidate onto a byte-level base
    sp_cand = tmp_path / "cand.model"
    sp_cand.write_bytes(base_model_path.read_bytes())
    with pytest.raises(GraftError) as e:
        merge_into_base(VocabMergeConfig(base=str(tekken_path), add=str(sp_cand), out=str(tmp_path / "o1")))
    assert str(e.value).startswith(f"{sp_cand}: is not a byte-level candidate, and {tekken_path} is a byte-level BPE "
                                   "base (a SentencePiece candidate cannot be grafted onto it). Fix: train candidates "
                                   f"for this base: graft vocab train INPUTS --base {tekken_path} --out DIR")
    # a candidate trained on another base
    cands, _ = tekken_graft
    with pytest.raises(GraftError) as e:
        merge_into_base(VocabMergeConfig(base=str(tiny_bases["qwen"]), add=str(cands / "candidates/added1000.json"),
                                         out=str(tmp_path / "o2")))
    assert "was trained on another base" in str(e.value) and "Fix: train candidates on this base" in str(e.value)
    # more tokens than the text supports
    small = write_jsonl(tmp_path / "small.jsonl", ["中国人民中国人民", "人民日报人民日报"])
    with pytest.raises(GraftError) as e:
        _train(tmp_path, tekken_path, [small], "5000", name="small")
    assert "supports only" in str(e.value) and "Fix: keep --sizes at or below" in str(e.value)
    assert not (tmp_path / "small").exists()


def test_special_token_outside_the_byte_alphabet(tmp_path, tiny_bases, corpora):
    """DeepSeek-style specials ("<｜begin▁of▁sentence｜>") kept in the BPE vocabulary are not byte strings: they are
    never merged, never counted as new tokens, and keep their id."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_bases["gpt2"], base)
    data = json.loads((base / "tokenizer.json").read_text())
    special = "<｜begin▁of▁sentence｜>"
    for t in data["added_tokens"]:  # all added tokens in the vocabulary too (as tekken's), so ids stay consistent
        data["model"]["vocab"][t["content"]] = t["id"]
    new_id = max(t["id"] for t in data["added_tokens"]) + 1
    data["model"]["vocab"][special] = new_id
    data["added_tokens"].append({"id": new_id, "content": special, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (base / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    cands = _train(tmp_path, base, [corpora["zh"]], "300")
    tok = merge_into_base(VocabMergeConfig(base=str(base), add=str(cands / "candidates/added300.json"),
                                           out=str(tmp_path / "tok")))
    r = check_tokenizer(CheckConfig(tokenizer=str(tok), base=str(base),
                                    corpus=[str(corpora["zh_dev"]), str(corpora["en"])]))
    assert r["ok"], ({k: v for k, v in r["invariants"].items() if v}, r["problems"], r["examples"])
    assert r["added_pieces"] == 300 and load_bytelevel(tok).tokenizer().token_to_id(special) == new_id
