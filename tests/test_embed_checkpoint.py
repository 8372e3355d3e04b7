"""common/checkpoint.py: shard headers, streaming shard writer, rewrite with links, index bookkeeping."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import (INDEX_FILE, TensorPlan, copy_side_files, open_checkpoint, read_shard_header,
                               rewrite_checkpoint, tensor_writer, tensors_equal_bytes, write_shard)
from common.errors import GraftError
from demo.tiny import save_tiny_mixtral


def test_write_shard_roundtrip_all_dtypes(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2, 2, dtype=torch.float16), "d": torch.tensor([True, False])}
    entries = [(n, {torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16", torch.bool: "BOOL"}[t.dtype],
                tuple(t.shape), tensor_writer(lambda t=t: t, n, {torch.bfloat16: "BF16", torch.int64: "I64",
                                                               torch.float16: "F16", torch.bool: "BOOL"}[t.dtype],
                                              tuple(t.shape))) for n, t in tensors.items()]
    write_shard(tmp_path / "x.safetensors", entries, {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")  # the reference reader accepts our files
    for n, t in tensors.items():
        assert torch.equal(back[n], t)
    assert set(read_shard_header(tmp_path / "x.safetensors").tensors) == set(tensors)


def test_tensor_writer_rejects_wrong_shape(tmp_path):
    w = tensor_writer(lambda: torch.zeros(2, 3), "w", "F32", (3, 2))
    with pytest.raises(RuntimeError, match=r"planned tensor 'w' is \(2, 3\)"):
        write_shard(tmp_path / "y.safetensors", [("w", "F32", (3, 2), w)])


def test_rewrite_links_unchanged_and_adds_tensor(tmp_path):
    src = save_tiny_mixtral(tmp_path / "src", vocab_size=1000, max_shard_size="200KB")
    ckpt = open_checkpoint(src)
    assert ckpt.sharded and len(ckpt.shards) >= 3
    norm = ckpt.read_tensor("model.norm.weight")
    plan = {"model.norm.weight": TensorPlan(tuple(norm.shape), "F32", lambda: norm * 2),
            "extra.bias": TensorPlan((4,), "F32", lambda: torch.ones(4))}
    out = tmp_path / "out"
    out.mkdir()
    report = rewrite_checkpoint(ckpt, out, plan, progress=False)
    copy_side_files(src, out)
    assert report["rewritten"] == [ckpt.weight_map["model.norm.weight"]]
    assert report["new"] == ["model-extra.safetensors"] and report["dropped"] == []
    assert len(report["linked"]) == len(ckpt.shards) - 1
    for s in report["linked"]:
        assert os.path.samefile(src / s, out / s)
    new = open_checkpoint(out)
    assert torch.equal(new.read_tensor("model.norm.weight"), norm * 2)
    assert torch.equal(new.read_tensor("extra.bias"), torch.ones(4))
    idx = json.loads((out / INDEX_FILE).read_text())
    assert idx["metadata"]["total_size"] == ckpt.total_size + 16 == new.total_size
    assert idx["metadata"]["total_parameters"] == sum(t.numel() for s in new.shards for _, t in new.iter_tensors(s))
    # Every other tensor is byte-identical, read from its (rewritten or linked) shard.
    for n in ckpt.weight_map:
        if n != "model.norm.weight":
            assert tensors_equal_bytes(ckpt.info(n), new.info(n))
    assert not tensors_equal_bytes(ckpt.info("model.norm.weight"), new.info("model.norm.weight"))
    out2 = tmp_path / "copy"
    out2.mkdir()
    assert rewrite_checkpoint(ckpt, out2, {}, link=False, progress=False)["copied"] == ckpt.shards


def test_rewrite_moves_planned_tensors_to_their_own_shard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a, b, c = torch.arange(6.0).reshape(2, 3), torch.ones(5), torch.full((2, 2), 7.0)
    save_file({"a": a, "b": b}, str(src / "s1.safetensors"))
    save_file({"c": c}, str(src / "s2.safetensors"))  # holds only a moved tensor: dropped
    save_file({"d": torch.zeros(3)}, str(src / "s3.safetensors"))
    (src / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": {
        "a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors", "d": "s3.safetensors"}}))
    (src / "config.json").write_text("{}")
    ckpt = open_checkpoint(src)
    plan = {"a": TensorPlan((3, 3), "F32", lambda: torch.cat([a, torch.full((1, 3), -1.0)])),
            "c": TensorPlan((2, 2), "F32", lambda: c + 1)}
    out = tmp_path / "out"
    out.mkdir()
    report = rewrite_checkpoint(ckpt, out, plan, progress=False, move_to_new_shard=True, new_shard="grown.safetensors")
    assert (report["rewritten"], report["new"], report["dropped"], report["linked"]) == (
        ["s1.safetensors"], ["grown.safetensors"], ["s2.safetensors"], ["s3.safetensors"])
    assert not (out / "s2.safetensors").exists()
    assert set(load_file(str(out / "s1.safetensors"))) == {"b"}
    moved = load_file(str(out / "grown.safetensors"))
    assert list(moved) == ["a", "c"] and torch.equal(moved["c"], c + 1) and torch.equal(moved["a"][:2], a)
    idx = json.loads((out / INDEX_FILE).read_text())
    assert idx["weight_map"] == {"a": "grown.safetensors", "b": "s1.safetensors", "c": "grown.safetensors",
                                 "d": "s3.safetensors"}
    copy_side_files(src, out)
    assert idx["metadata"]["total_size"] == (9 + 5 + 4 + 3) * 4 == open_checkpoint(out).total_size
    with pytest.raises(GraftError, match="already has a shard named 's3.safetensors'"):
        rewrite_checkpoint(ckpt, tmp_path, plan, move_to_new_shard=True, new_shard="s3.safetensors")


def test_header_errors(tmp_path):
    with pytest.raises(GraftError, match=r"nope.safetensors: shard file is missing"):
        read_shard_header(tmp_path / "nope.safetensors")
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(GraftError, match="only 2 bytes, too short"):
        read_shard_header(p)
    save_file({"w": torch.zeros(4)}, tmp_path / "ok.safetensors")
    raw = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "long.safetensors").write_bytes(raw + b"junk")
    with pytest.raises(GraftError, match="header describes .* bytes but the file has"):
        read_shard_header(tmp_path / "long.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")
    with pytest.raises(GraftError, match="header length 1000000 does not fit"):
        read_shard_header(tmp_path / "huge.safetensors")


def test_open_checkpoint_errors(tmp_path):
    with pytest.raises(GraftError, match="model folder not found"):
        open_checkpoint(tmp_path / "none")
    (tmp_path / "m").mkdir()
    with pytest.raises(GraftError, match="config.json is missing"):
        open_checkpoint(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")
    torch.save({}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(GraftError, match="only PyTorch .bin weights found"):
        open_checkpoint(tmp_path / "m")
    save_file({"a": torch.zeros(2)}, tmp_path / "m" / "s1.safetensors")
    (tmp_path / "m" / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                        "b": "s1.safetensors"}}))
    with pytest.raises(GraftError, match="puts tensor 'b' in 's1.safetensors' but that shard does not contain it"):
        open_checkpoint(tmp_path / "m")
