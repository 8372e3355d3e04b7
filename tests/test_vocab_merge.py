"""graft vocab merge / check on the real Mixtral tokenizer and real People's Daily text."""
from __future__ import annotations

import json

import pytest

from common.tokenizer_files import load_fast_tokenizer, load_model_proto, load_sentencepiece
from demo.sources import write_jsonl
from vocab.check import PROBES, CheckConfig, check_tokenizer, run_check
from vocab.merge import VocabMergeConfig, merge_into_base, reachability_failures
from common.scripts import ScriptFilter
from vocab.train import train_bpe
from workflows.cli import main

SPECIAL = ["<|im_start|>", "<|im_end|>"]


def _mixed(news, english, n=300):
    out = []
    for i in range(n):
        zh, en = news[(i * 7) % len(news)], english[(i * 13) % len(english)]
        out.append(f"{zh[:60]} {en[:80]} {zh[60:90]}")
    return out


@pytest.fixture(scope="module")
def split(news_lines):
    train = [t for i, t in enumerate(news_lines) if i % 20]
    dev = [t for i, t in enumerate(news_lines) if not i % 20]
    return train, dev


@pytest.fixture(scope="module")
def candidate(tmp_path_factory, split):
    path = tmp_path_factory.mktemp("cand") / "cand.model"
    path.write_bytes(train_bpe(split[0][:6000], 3500, 12000).SerializeToString())
    return path


@pytest.fixture(scope="module")
def merged(tmp_path_factory, base_model_path, candidate):
    out = tmp_path_factory.mktemp("merged") / "tok"
    return merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(candidate), out=str(out), special=SPECIAL))


def test_base_pieces_keep_id_score_type_and_no_duplicates(merged, base_model_path):
    base, m = load_model_proto(base_model_path), load_model_proto(merged)
    assert len(m.pieces) > len(base.pieces) + 5000
    for i, p in enumerate(base.pieces):
        q = m.pieces[i]
        assert (q.piece, q.score, q.type) == (p.piece, p.score, p.type)
    pieces = [p.piece for p in m.pieces]
    assert len(pieces) == len(set(pieces))
    han = ScriptFilter("Han")
    added = [p.piece for p in m.pieces[len(base.pieces):] if p.type == 1]
    assert added and all(han.has(p) for p in added)
    # specials once each, as user-defined pieces at the end
    assert [p.piece for p in m.pieces if p.type == 4] == SPECIAL


def test_every_added_piece_is_reachable_and_naive_append_is_not(merged, base_model_path, candidate):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = load_model_proto(merged)
    n_base = len(load_model_proto(base_model_path).pieces)
    added = [p.piece for p in m.pieces[n_base:] if p.type == 1]
    probe = pb.ModelProto()
    probe.CopyFrom(m)
    probe.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(probe.SerializeToString())
    fast = load_fast_tokenizer(merged)
    for piece in added:
        assert sp.encode(piece.replace("▁", " "), out_type=str) == [piece]
        assert [t.value for t in fast.model.tokenize(piece)] == [piece]
    # The usual recipe (append new pieces with score 0) leaves dead pieces on the same data: the check can fail.
    naive = pb.ModelProto()
    naive.CopyFrom(load_model_proto(base_model_path))
    have = {p.piece for p in naive.pieces}
    for p in load_model_proto(candidate).pieces:
        if p.type == 1 and p.piece not in have:
            q = naive.pieces.add()
            q.piece, q.score = p.piece, 0.0
    naive_added = [p.piece for p in naive.pieces[n_base:]]
    failures = reachability_failures(naive, load_fast_tokenizer_from_proto(naive), naive_added)
    assert len(failures["sentencepiece"]) > 0  # e.g. ▁新华社: ▁新华 + 社 never meets


def load_fast_tokenizer_from_proto(proto):
    from common.tokenizer_files import sentencepiece_to_fast

    return sentencepiece_to_fast(proto)


def test_non_han_text_encodes_exactly_as_base(merged, base_model_path, english_paragraphs):
    base, sp = load_sentencepiece(base_model_path), load_sentencepiece(merged)
    texts = list(english_paragraphs[:3000]) + ["Ça coûte 12,50 € — naïve café", "Привет, мир", "こんにちは",
                                               "tabs\t\tspaces   end", "😀👍🏽"]
    assert sp.encode(texts) == base.encode(texts)


def test_fast_equals_sentencepiece_on_mixed_lines(merged, split, english_paragraphs):
    sp, fast = load_sentencepiece(merged), load_fast_tokenizer(merged)
    lines = _mixed(split[1], english_paragraphs) + list(split[1][:300]) + list(PROBES)
    mismatches = [l for l in lines if fast.encode(l, add_special_tokens=False).ids != sp.encode(l)]
    assert mismatches == []


def test_lossless_and_autotokenizer(merged, split, english_paragraphs, base_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged), local_files_only=True)
    sp = load_sentencepiece(merged)
    base = load_model_proto(base_model_path)
    assert tok.is_fast and len(tok) == len(load_model_proto(merged).pieces)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0) == (
        base.trainer_spec.bos_id, base.trainer_spec.eos_id, base.trainer_spec.unk_id)
    lines = list(PROBES) + _mixed(split[1], english_paragraphs, 100) + ["  两个空格开头", "结尾空格  ", "\t制表符\t"]
    for line in lines:
        ids = tok.encode(line)
        assert ids[0] == 1 and ids[1:] == sp.encode(line)
        assert tok.decode(ids, skip_special_tokens=True) == line
        assert sp.decode(sp.encode(line)) == line
    # special tokens: one id each, in both
    for t in SPECIAL:
        tid = tok.convert_tokens_to_ids(t)
        assert tid >= 32000 and tok.encode(t, add_special_tokens=False) == [tid]
        assert sp.encode(t)[-1] == tid
    files = sorted(p.name for p in merged.iterdir())
    assert files == ["added_pieces.tsv", "manifest.json", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer.model", "tokenizer_config.json"]


def test_chinese_gets_shorter_and_check_passes(merged, base_model_path, split, english_paragraphs, tmp_path):
    zh = write_jsonl(tmp_path / "zh_dev.jsonl", split[1][:400])
    en = write_jsonl(tmp_path / "en.jsonl", english_paragraphs[:400])
    report = check_tokenizer(CheckConfig(tokenizer=str(merged), base=str(base_model_path), corpus=[str(zh), str(en)]))
    assert report["ok"], report["invariants"]
    assert all(v == 0 for v in report["invariants"].values())
    tpc = report["tokens_per_char"]
    assert tpc["non_target"]["base_tokens"] == tpc["non_target"]["merged_tokens"]
    assert tpc["target"]["token_reduction"] > 0.35  # 6k training lines, 12k-piece candidate
    assert tpc["target"]["base_tokens_per_char"] > 1.1


def test_check_fails_on_a_broken_tokenizer(merged, base_model_path, tmp_path, capsys, english_paragraphs):
    import shutil

    from sentencepiece import sentencepiece_model_pb2 as pb

    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    m = pb.ModelProto()
    m.ParseFromString((broken / "tokenizer.model").read_bytes())
    m.pieces[300].score = 5.0  # a base piece changes score ...
    p = m.pieces.add()
    p.piece, p.score = "▁the▁", 10.0  # ... and a non-Han piece changes English
    (broken / "tokenizer.model").write_bytes(m.SerializeToString())
    en = write_jsonl(tmp_path / "en.jsonl", english_paragraphs[:200])
    with pytest.raises(SystemExit) as e:
        run_check(CheckConfig(tokenizer=str(broken), base=str(base_model_path), corpus=[str(en)], json=True))
    assert e.value.code == 1
    report = json.loads(capsys.readouterr().out)
    inv = report["invariants"]
    assert inv["base_pieces_changed"] == 1 and inv["added_without_target_script"] == 1
    assert inv["non_target_lines_changed"] > 0 and inv["fast_slow_mismatch_lines"] > 0


def test_repair_adds_intermediates_for_stuck_pieces(tmp_path, base_model_path):
    """数据 is a base merge, so 数据获得 (trained as 数 + 据获得) can only form if 获得 exists: it is added."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    cand = pb.ModelProto()
    cand.CopyFrom(load_model_proto(base_model_path))
    del cand.pieces[3:]
    for i, piece in enumerate(["据获", "据获得", "数据获得"] + list("数据获得")):
        p = cand.pieces.add()
        p.piece, p.score = piece, -float(i)
    (tmp_path / "c.model").write_bytes(cand.SerializeToString())
    out = merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(tmp_path / "c.model"), out=str(tmp_path / "m")))
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["added_intermediates"] == 1
    rows = (out / "added_pieces.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[1] for r in rows if r.split("\t")[3] == "intermediate"] == ["获得"]
    sp = load_sentencepiece(out)
    assert sp.encode("数据获得", out_type=str) == ["▁", "数据获得"]
    assert load_fast_tokenizer(out).encode("数据获得", add_special_tokens=False).tokens == ["▁", "数据获得"]


def test_script_any_and_cli(tmp_path, base_model_path, english_paragraphs, capsys):
    cand = train_bpe(list(english_paragraphs[:1500]), 90, 1200)
    (tmp_path / "en.model").write_bytes(cand.SerializeToString())
    rc = main(["vocab", "merge", "--base", str(base_model_path), "--add", str(tmp_path / "en.model"),
               "--out", str(tmp_path / "han"), "--special", "<|im_start|>,<|im_end|>,<|im_start|>"])
    assert rc == 0 and "all added pieces reachable" in capsys.readouterr().out
    assert json.loads((tmp_path / "han/manifest.json").read_text())["counts"]["added_merges"] == 0
    assert main(["vocab", "merge", "--base", str(base_model_path), "--add", str(tmp_path / "en.model"),
                 "--out", str(tmp_path / "any"), "--script", "any"]) == 0
    counts = json.loads((tmp_path / "any/manifest.json").read_text())["counts"]
    assert counts["added_merges"] > 0
    en = write_jsonl(tmp_path / "en.jsonl", english_paragraphs[1500:1700])
    capsys.readouterr()
    rc = main(["vocab", "check", str(tmp_path / "any"), "--base", str(base_model_path), "--corpus", str(en), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"] and report["script"] == "any"


def test_hf_folder_as_base(merged, tmp_path, split):
    """A merged folder (HF folder with tokenizer.model) can be the base of another merge."""
    from transformers import AutoTokenizer

    cand = train_bpe(list(split[0][6000:9000]), 2500, 6000)
    (tmp_path / "c2.model").write_bytes(cand.SerializeToString())
    out = merge_into_base(VocabMergeConfig(base=str(merged), add=str(tmp_path / "c2.model"), out=str(tmp_path / "t2")))
    first, second = load_model_proto(merged), load_model_proto(out)
    assert len(second.pieces) > len(first.pieces)
    assert all((a.piece, a.score, a.type) == (b.piece, b.score, b.type) for a, b in zip(first.pieces, second.pieces))
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.additional_special_tokens == SPECIAL  # carried over from the base folder's config
    line = split[1][5]
    assert tok.encode(line, add_special_tokens=False) == load_sentencepiece(out).encode(line)


def test_merge_is_deterministic_and_matches_transformers_conversion(merged, base_model_path, candidate, tmp_path):
    from transformers import LlamaTokenizerFast

    again = merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(candidate), out=str(tmp_path / "again"),
                                             special=SPECIAL))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_pieces.tsv"):
        assert (again / name).read_bytes() == (merged / name).read_bytes(), name
    # Same BPE vocabulary and merge list as transformers' own SentencePiece -> fast conversion.
    ours = json.loads((merged / "tokenizer.json").read_text())
    theirs = json.loads(LlamaTokenizerFast(vocab_file=str(merged / "tokenizer.model"), from_slow=True,
                                           legacy=True).backend_tokenizer.to_str())
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours["model"]["merges"] == theirs["model"]["merges"]


def test_fast_equals_sentencepiece_on_adversarial_strings(merged):
    """Runs of one character and concatenations of added pieces: where BPE tie-breaking could differ."""
    import random

    sp, fast = load_sentencepiece(merged), load_fast_tokenizer(merged)
    added = [p.piece.replace("▁", " ") for p in load_model_proto(merged).pieces[32000:] if p.type == 1]
    chars = sorted({c for p in added for c in p})
    rng = random.Random(0)
    texts = []
    for i in range(3000):
        if i % 3 == 0:
            texts.append(rng.choice(chars) * rng.randint(2, 12))
        elif i % 3 == 1:
            texts.append("".join(rng.choice(added) for _ in range(rng.randint(1, 6))))
        else:
            texts.append("".join(rng.choice(added)[:rng.randint(1, 4)] + rng.choice(["", " ", "a", "1", "，", "  "])
                                 for _ in range(rng.randint(1, 6))))
    texts += ["哈" * 9, "哈哈哈 哈哈", "谢谢谢谢", "一一一一一"]
    assert [t for t in texts if fast.encode(t, add_special_tokens=False).ids != sp.encode(t)] == []
