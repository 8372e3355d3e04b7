"""graft embed init / check on tiny checkpoints (sharded untied Mixtral, tied Llama, single file).

Every new row is recomputed here independently: the old ids of each new piece's surface come from the
Hugging Face `tokenizers` BPE (a different implementation than the SentencePiece encoder the stage uses),
and the mean is taken directly over the original checkpoint's rows.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.checkpoint import INDEX_FILE, open_checkpoint, read_shard_header
from common.errors import GraftError
from common.io import file_sha256, read_manifest
from demo.tiny import save_tiny_llama_tied, save_tiny_mixtral
from common.tokenizer_files import load_model_proto, sentencepiece_to_fast
from embed_init import grow as grow_mod
from embed_init.check import check_grown
from embed_init.config import EmbedCheckConfig, EmbedInitConfig
from embed_init.grow import NEW_SHARD, grow_embeddings
from workflows.cli import main as graft_main

N_ZH = 120
CONTROL_PIECE = "<|zh|>"


def _extend_model(base: Path, out: Path, lines, n: int = N_ZH, swap: tuple[int, int] | None = None) -> Path:
    """Append Chinese pieces (mid-word and ▁-initial) and one control piece to the base SentencePiece model."""
    from collections import Counter

    proto = load_model_proto(base)
    have = {p.piece for p in proto.pieces}
    counts = Counter(l[i:i + 2] for l in lines[:1500] for i in range(len(l) - 1))
    words = [w for w, _ in counts.most_common() if all("\u4e00" <= c <= "\u9fff" for c in w) and w not in have]
    new = words[:n - 10] + ["▁" + w for w in words[:10]]
    score = min(p.score for p in proto.pieces)
    for i, w in enumerate(new):
        p = proto.pieces.add()
        p.piece, p.score, p.type = w, score - 1 - i, 1
    p = proto.pieces.add()
    p.piece, p.score, p.type = CONTROL_PIECE, 0.0, 3
    if swap:
        a, b = swap
        pa, pb = proto.pieces[a].piece, proto.pieces[b].piece
        proto.pieces[a].piece, proto.pieces[b].piece = pb, pa
    out.write_bytes(proto.SerializeToString())
    return out


def expected_sources(base: Path, new_pieces: list[str], n_old: int) -> list[list[int]]:
    """Old ids for each new piece, via HF tokenizers BPE with no dummy prefix (independent encoder)."""
    proto = load_model_proto(base)
    proto.normalizer_spec.add_dummy_prefix = False
    fast = sentencepiece_to_fast(proto)
    out = []
    for piece in new_pieces[n_old:]:
        if piece == CONTROL_PIECE:
            out.append([])
        else:
            out.append(fast.encode(piece.replace("▁", " "), add_special_tokens=False).ids)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory, base_model_path, news_lines):
    d = tmp_path_factory.mktemp("embed")
    new_model = _extend_model(base_model_path, d / "new.model", news_lines)
    proto = load_model_proto(new_model)
    pieces = [p.piece for p in proto.pieces]
    return {
        "dir": d,
        "new_model": new_model,
        "pieces": pieces,
        "sources": expected_sources(base_model_path, pieces, 32000),
        "mixtral": save_tiny_mixtral(d / "mixtral", max_shard_size="4MB"),
        "llama": save_tiny_llama_tied(d / "llama", dtype="bfloat16"),
    }


def _rows(path: Path, name: str) -> torch.Tensor:
    ckpt = open_checkpoint(path)
    return ckpt.read_tensor(name)


def _check_mean_rows(old: torch.Tensor, new: torch.Tensor, sources, n_new: int, pad_scale: float = 1.0) -> None:
    n_old = old.shape[0]
    assert torch.equal(new[:n_old].view(torch.int16 if old.element_size() == 2 else torch.int32),
                       old.view(torch.int16 if old.element_size() == 2 else torch.int32))
    mean_all = old.double().mean(0).float()
    for k, ids in enumerate(sources):
        want = (old[ids].float().mean(0) if ids else mean_all).to(old.dtype)
        torch.testing.assert_close(new[n_old + k], want, rtol=1e-6, atol=1e-7 if old.dtype == torch.float32 else 1e-2)
    # padding rows: the mean of the old rows (embed_tokens), PAD_SCALE times it in an output matrix
    for r in range(n_new, new.shape[0]):
        torch.testing.assert_close(new[r], (mean_all * pad_scale).to(old.dtype))


def test_mean_untied_sharded_mixtral(work, base_model_path):
    src = work["mixtral"]
    assert len(open_checkpoint(src).shards) >= 2
    out = grow_embeddings(EmbedInitConfig(model=str(src), old_tokenizer=str(base_model_path),
                                          new_tokenizer=str(work["new_model"]), out=str(work["dir"] / "g_mix"),
                                          output_method="mean", progress=False))
    n_new = len(work["pieces"])
    old_e, old_h = _rows(src, "model.embed_tokens.weight"), _rows(src, "lm_head.weight")
    new_e, new_h = _rows(out, "model.embed_tokens.weight"), _rows(out, "lm_head.weight")
    assert new_e.shape == new_h.shape == (n_new, old_e.shape[1])
    _check_mean_rows(old_e, new_e, work["sources"], n_new)
    _check_mean_rows(old_h, new_h, work["sources"], n_new)
    assert not torch.equal(new_e[32000:], new_h[32000:])  # untied: lm_head averaged from its own rows

    # Mid-word pieces exclude ▁; ▁-initial ones include it (or a ▁X piece). Counts are in the manifest.
    base = work["pieces"]
    zh = work["sources"][0]
    assert all(not base[i].startswith("▁") for i in zh)
    lead = work["sources"][N_ZH - 10]
    assert base[lead[0]].startswith("▁")
    m = read_manifest(out)
    assert m["status"] == "done" and m["method"] == "mean" and m["output_method"] == "mean"
    assert m["new_ids"]["pieces_per_new_id"] == [len(s) for s in work["sources"]]
    assert m["counts"]["added"] == n_new - 32000 and m["counts"]["special_added"] == 1
    assert m["counts"]["shards_linked"] >= 1  # untouched shards are hard links
    # The grown matrices live in a new shard of their own; the shards that held them lost only them.
    idx = json.loads((out / INDEX_FILE).read_text())
    assert m["shards"]["new"] == [NEW_SHARD]
    assert {n for n, f in idx["weight_map"].items() if f == NEW_SHARD} == {"model.embed_tokens.weight",
                                                                           "lm_head.weight"}
    src_idx = json.loads((src / INDEX_FILE).read_text())
    assert set(idx["weight_map"]) == set(src_idx["weight_map"])
    for f in m["shards"]["rewritten"]:
        left = {n for n, g in src_idx["weight_map"].items() if g == f} - {"model.embed_tokens.weight", "lm_head.weight"}
        assert set(read_shard_header(out / f).tensors) == left
    # Index and config are consistent with the shards.
    assert idx["metadata"]["total_size"] == sum(
        (out / f).stat().st_size - 8 - int.from_bytes((out / f).read_bytes()[:8], "little")
        for f in set(idx["weight_map"].values()))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n_new

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == n_new == len(tok)
    text = "".join(base[32000:32005])
    ids = tok.encode(text, add_special_tokens=False)
    assert max(ids) >= 32000 and tok.decode(ids) == text  # the grown tokenizer emits new ids
    result = check_grown(EmbedCheckConfig(out=str(out), model=str(src)))
    assert result["ok"] and result["checks"]["forward_old_ids"]["max_abs_diff"] == 0.0
    assert (out / "check.json").is_file()


def test_tied_llama_bf16_padded_hf_folder_cli(work, base_model_path, capsys):
    """Tied model: one matrix; bf16 storage; padding rows; new tokenizer as a HF folder with an added special."""
    from transformers import AutoTokenizer

    tok_dir = work["dir"] / "tok_hf"
    grow_mod.write_tokenizer(work["new_model"], tok_dir.mkdir() or tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tok.save_pretrained(tok_dir)
    n_new = len(work["pieces"]) + 1
    out = work["dir"] / "g_llama"
    rc = graft_main(["embed", "init", "--model", str(work["llama"]), "--old-tokenizer", str(base_model_path),
                     "--new-tokenizer", str(tok_dir), "--out", str(out), "--pad-to-multiple-of", "64",
                     "--no-progress"])
    assert rc == 0
    rows = -(-n_new // 64) * 64
    assert rows > n_new
    assert "lm_head.weight" not in open_checkpoint(out).weight_map
    old = _rows(work["llama"], "model.embed_tokens.weight")
    new = _rows(out, "model.embed_tokens.weight")
    assert new.dtype == torch.bfloat16 and new.shape[0] == rows
    _check_mean_rows(old, new, work["sources"] + [[]], n_new, pad_scale=grow_mod.PAD_SCALE)  # tied: an output matrix
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    assert read_manifest(out)["tied"] is True
    assert graft_main(["embed", "check", str(out), "--model", str(work["llama"])]) == 0
    assert "all checks passed" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(AutoTokenizer.from_pretrained(out)) == n_new


def test_single_file_checkpoint_and_determinism(work, base_model_path, tmp_path):
    src = save_tiny_llama_tied(tmp_path / "single", max_shard_size="200MB")
    assert (src / "model.safetensors").is_file() and not (src / INDEX_FILE).exists()
    # a chat model's template travels with the grown model; the old vocabulary's files do not
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    (src / "vocab.json").write_text("{}", encoding="utf-8")
    outs = []
    for name in ("a", "b"):
        outs.append(grow_embeddings(EmbedInitConfig(model=str(src), old_tokenizer=str(base_model_path),
                                                    new_tokenizer=str(work["new_model"]),
                                                    out=str(tmp_path / name), progress=False)))
    a, b = outs
    assert sorted(p.name for p in a.glob("*.safetensors")) == ["model.safetensors"]
    assert not (a / INDEX_FILE).exists()
    assert (a / "chat_template.jinja").read_text(encoding="utf-8") == "{{ messages[0]['content'] }}"
    assert not (a / "vocab.json").exists()
    assert file_sha256(a / "model.safetensors") == file_sha256(b / "model.safetensors")
    _check_mean_rows(load_file(src / "model.safetensors")["model.embed_tokens.weight"],
                     load_file(a / "model.safetensors")["model.embed_tokens.weight"], work["sources"],
                     len(work["pieces"]))
    assert check_grown(EmbedCheckConfig(out=str(a), model=str(src), forward=False))["ok"]


def test_hf_mean_matches_transformers_and_random_std(work, base_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    src, n_new = work["mixtral"], len(work["pieces"])
    cfg = dict(model=str(src), old_tokenizer=str(base_model_path), new_tokenizer=str(work["new_model"]),
               progress=False)
    hf1 = grow_embeddings(EmbedInitConfig(out=str(tmp_path / "hf1"), method="hf-mean", output_method="hf-mean", seed=1,
                                          **cfg))
    hf2 = grow_embeddings(EmbedInitConfig(out=str(tmp_path / "hf2"), method="hf-mean", output_method="hf-mean", seed=2,
                                          **cfg))
    rnd = grow_embeddings(EmbedInitConfig(out=str(tmp_path / "rnd"), method="random", output_method="random", seed=1,
                                          **cfg))
    model = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(0)
    model.resize_token_embeddings(n_new, mean_resizing=True)
    for name, ref in (("model.embed_tokens.weight", model.model.embed_tokens.weight),
                      ("lm_head.weight", model.lm_head.weight)):
        ours = _rows(hf1, name)
        assert torch.equal(ours[:32000], _rows(src, name))
        # transformers samples from N(mean, 1e-9 cov): rows equal the old mean up to ~1e-6 noise.
        torch.testing.assert_close(ours[32000:], ref.detach()[32000:], atol=1e-5, rtol=0)
        assert (ours[32000:] - ours[32000]).abs().max() > 0  # sampled, not a constant
        assert not torch.equal(ours[32000:], _rows(hf2, name)[32000:])  # seed matters
        r = _rows(rnd, name)[32000:].float()
        assert abs(r.std().item() - 0.02) < 0.002 and abs(r.mean().item()) < 0.002


def test_interrupted_run_leaves_nothing_and_rerun_works(work, base_model_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-999999999"  # left by a killed run (that pid does not exist)
    stale.mkdir()
    (stale / "model-00001-of-00003.safetensors").write_bytes(b"partial")
    cfg = EmbedInitConfig(model=str(work["mixtral"]), old_tokenizer=str(base_model_path),
                          new_tokenizer=str(work["new_model"]), out=str(out), progress=False)
    real = grow_mod.fill_new_rows
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # after the first matrix was written
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(grow_mod, "fill_new_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        grow_embeddings(cfg)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp folder left, stale one removed
    monkeypatch.setattr(grow_mod, "fill_new_rows", real)
    grow_embeddings(cfg)
    assert read_manifest(out)["status"] == "done"


def test_check_detects_changed_old_row(work, base_model_path, tmp_path):
    from safetensors.torch import save_file

    out = grow_embeddings(EmbedInitConfig(model=str(work["mixtral"]), old_tokenizer=str(base_model_path),
                                          new_tokenizer=str(work["new_model"]), out=str(tmp_path / "g"),
                                          progress=False))
    ckpt = open_checkpoint(out)
    shard = out / ckpt.weight_map["model.embed_tokens.weight"]
    tensors = load_file(shard)
    tensors["model.embed_tokens.weight"][5] += 1.0
    with safe_open(shard, framework="pt") as f:
        meta = f.metadata()
    shard.unlink()  # never write through a hard link
    save_file(tensors, shard, metadata=meta)
    with pytest.raises(GraftError, match=r"old_rows:model.embed_tokens.weight: first 32000 rows DIFFER"):
        check_grown(EmbedCheckConfig(out=str(out), model=str(work["mixtral"]), forward=False))
    assert json.loads((out / "check.json").read_text())["ok"] is False


# ---------------------------------------------------------------- bad input


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _init(work, base_model_path, out, model=None, new=None, **kw):
    return grow_embeddings(EmbedInitConfig(model=str(model or work["mixtral"]), old_tokenizer=str(base_model_path),
                                           new_tokenizer=str(new or work["new_model"]), out=str(out),
                                           progress=False, **kw))


def test_error_new_tokenizer_does_not_extend(work, base_model_path, news_lines, tmp_path):
    bad = _extend_model(base_model_path, tmp_path / "bad.model", news_lines, swap=(500, 501))
    with pytest.raises(GraftError, match=r"bad.model: the new tokenizer does not extend the old one .*"
                                         r"2 of the first 32000 pieces differ, first at id 500"):
        _init(work, base_model_path, tmp_path / "o", new=bad)
    proto = load_model_proto(base_model_path)
    del proto.pieces[-5:]
    small = tmp_path / "small.model"
    small.write_bytes(proto.SerializeToString())
    with pytest.raises(GraftError, match="small.model: the new tokenizer has 31995 pieces, fewer than the old one's 32000"):
        _init(work, base_model_path, tmp_path / "o", new=small)
    with pytest.raises(GraftError, match=r"the new tokenizer adds no pieces to the old one \(32000 pieces each\)"):
        _init(work, base_model_path, tmp_path / "o", new=base_model_path)
    assert not (tmp_path / "o").exists()


def test_error_config_vocab_size(work, base_model_path, tmp_path):
    m = _copy_model(work["mixtral"], tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["vocab_size"] = 32001
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GraftError, match=r"config.json: vocab_size is 32001 but the old tokenizer .* has 32000 pieces"):
        _init(work, base_model_path, tmp_path / "o", model=m)


def test_error_missing_and_corrupt_shard(work, base_model_path, tmp_path):
    m = _copy_model(work["mixtral"], tmp_path / "m")
    shards = sorted(m.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(GraftError, match=rf"index.json: the index names shard '{shards[-1].name}' .* does not exist"):
        _init(work, base_model_path, tmp_path / "o", model=m)
    m2 = _copy_model(work["mixtral"], tmp_path / "m2")
    s = sorted(m2.glob("model-*.safetensors"))[0]
    data = s.read_bytes()
    s.write_bytes(data[: len(data) - 100])  # truncated download
    with pytest.raises(GraftError, match=rf"{s.name}: corrupt shard: the header describes {len(data)} bytes but "
                                         rf"the file has {len(data) - 100}"):
        _init(work, base_model_path, tmp_path / "o", model=m2)
    s.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    with pytest.raises(GraftError, match=rf"{s.name}: corrupt shard: the safetensors header is not valid JSON"):
        _init(work, base_model_path, tmp_path / "o", model=m2)
    assert not (tmp_path / "o").exists()


def test_error_index_names_missing_file(work, base_model_path, tmp_path):
    m = _copy_model(work["mixtral"], tmp_path / "m")
    idx = json.loads((m / INDEX_FILE).read_text())
    idx["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (m / INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(GraftError, match=r"the index names shard 'model-00009-of-00009.safetensors' \(for 1 "
                                         r"tensors, e.g. 'model.norm.weight'\) but .* does not exist"):
        _init(work, base_model_path, tmp_path / "o", model=m)


def test_error_existing_output_and_overwrite(work, base_model_path, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(GraftError, match=r"o: is a folder that is not a finished output .*Fix: choose another "
                                         r"--out, or pass --overwrite to replace it"):
        _init(work, base_model_path, out)
    argv = ["embed", "init", "--model", str(work["mixtral"]), "--old-tokenizer", str(base_model_path),
            "--new-tokenizer", str(work["new_model"]), "--out", str(out), "--no-progress"]
    assert graft_main(argv) == 2
    assert "graft: error:" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert graft_main(argv + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and read_manifest(out)["status"] == "done"
    # The re-run rule (common/rerun.py): same settings and inputs skip, others are refused.
    mtime = (out / "manifest.json").stat().st_mtime_ns
    _init(work, base_model_path, out)
    assert "already complete with the same settings and inputs" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(GraftError, match=r"o: holds a finished embed_init output made with different settings "
                                         r"method. Fix: choose another --out, or pass --overwrite"):
        _init(work, base_model_path, out, method="random")
    with pytest.raises(GraftError, match=r"\(--method\) = 'avg' is not one of mean, hf-mean, random"):
        _init(work, base_model_path, tmp_path / "o2", method="avg")


def test_hard_links_share_bytes_with_source(work, base_model_path, tmp_path):
    out = _init(work, base_model_path, tmp_path / "o")
    m = read_manifest(out)
    for name in m["shards"]["linked"]:
        assert os.path.samefile(out / name, work["mixtral"] / name)
    for name in m["shards"]["rewritten"]:
        assert not os.path.samefile(out / name, work["mixtral"] / name)
    out2 = _init(work, base_model_path, tmp_path / "o2", link=False)
    assert read_manifest(out2)["counts"]["shards_linked"] == 0
