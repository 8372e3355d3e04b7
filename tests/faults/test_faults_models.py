"""Checkpoints and adapters: plain peft adapters for another base, flipped bytes in a shard, corrupt and
truncated models, missing shards, and kill -9 in the middle of a stage (issue 19, items 5 and 6)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import flip_byte, jsonl, make_adapter, tree_bytes

from common.errors import GraftError
from common.io import file_sha256
from continual.config import MergeConfig
from continual.merge import merge_adapter

ROOT = Path(__file__).resolve().parents[2]
FIX_BASE = ("Fix: pass the base it was trained on (for a grown vocabulary, the output of `graft embed init`)")


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "a", name_or_path=str(tiny_model))


def _merge(base, adapter, out, **kw):
    return merge_adapter(MergeConfig(base=str(base), adapter=str(adapter), out=str(out), **kw))


def _refused(base, adapter, out, **kw) -> str:
    """The error of a merge that must be refused; nothing may be left at `out`."""
    with pytest.raises(GraftError) as e:
        _merge(base, adapter, out, **kw)
    assert not Path(out).exists()
    return str(e.value)


@pytest.mark.fault("plain peft adapter, other base", "error")
def test_plain_adapter_trained_on_another_base_of_the_same_shapes_is_refused(tmp_path, tiny_model, adapter):
    from demo.tiny import save_tiny_mixtral

    other = save_tiny_mixtral(tmp_path / "other", seed=1, hidden=16, intermediate=32, max_shard_size="600KB")
    assert _refused(other, adapter, tmp_path / "m") == (
        f"{adapter / 'adapter_config.json'}: base_model_name_or_path is {tiny_model}, whose weights differ from "
        f"--base {other}: the adapter was trained on another base. Fix: pass --base {tiny_model}, or "
        "--allow-other-base if you know the weights are equivalent")


@pytest.mark.fault("plain peft adapter, other base", "warned")
def test_plain_adapter_naming_a_hub_model_merges_with_a_warning(tmp_path, tiny_model, adapter, capsys):
    named = tmp_path / "named"
    shutil.copytree(adapter, named)
    cfg = json.loads((named / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "mistralai/Mixtral-8x7B-v0.1"
    (named / "adapter_config.json").write_text(json.dumps(cfg))
    out = _merge(tiny_model, named, tmp_path / "m")
    assert (f"graft merge: warning: {named / 'adapter_config.json'}: base_model_name_or_path is "
            f"'mistralai/Mixtral-8x7B-v0.1', which is not a folder here, so its weights cannot be compared with "
            f"{tiny_model}; shapes and vocabulary size were checked. Make sure it is the same model") in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["base_check"] == "named 'mistralai/Mixtral-8x7B-v0.1', not a local folder; shapes checked"


@pytest.mark.fault("plain peft adapter, other base", "error")
def test_plain_adapter_whose_tokenizer_outgrows_the_base_vocabulary_is_refused(tmp_path, tiny_model, adapter,
                                                                             base_model_path):
    from common.tokenizer_files import load_model_proto

    grown = tmp_path / "grown"
    shutil.copytree(adapter, grown)
    proto = load_model_proto(base_model_path)
    p = proto.pieces.add()
    p.piece, p.score, p.type = "新词", -1e9, 1
    (grown / "tokenizer.model").write_bytes(proto.SerializeToString())
    assert _refused(tiny_model, grown, tmp_path / "m") == (f"{grown / 'tokenizer.model'}: the adapter's tokenizer has 32001 pieces but the base "
                            f"{tiny_model} has a vocabulary of 32000 rows: it was trained for a grown vocabulary. "
                            + FIX_BASE)


@pytest.mark.fault("shard with flipped bytes", "error")
def test_flipped_bytes_in_a_shard_a_stage_wrote_are_noticed(tmp_path, tiny_model, adapter):
    merged = _merge(tiny_model, adapter, tmp_path / "merged")
    manifest = json.loads((merged / "manifest.json").read_text())
    recorded = manifest["shard_files"]
    # what was read: sizes (the tiny base has no record to check sha256 against)
    assert manifest["source_shards"] == {p.name: {"bytes": p.stat().st_size} for p in tiny_model.glob("*.safetensors")}
    assert set(recorded) == {p.name for p in merged.glob("*.safetensors")}
    shard = merged / "model-00001-of-00003.safetensors"
    assert recorded[shard.name] == {"bytes": shard.stat().st_size, "sha256": file_sha256(shard)}
    good = recorded[shard.name]["sha256"]
    flip_byte(shard)
    assert _refused(merged, adapter, tmp_path / "again", allow_other_base=True) == (
        f"{shard}: corrupt shard: it has sha256 {file_sha256(shard)[:16]}... but {merged / 'manifest.json'} "
        f"(shard_files) records {good[:16]}...: its bytes changed after it was written (a disk or copy error, or an "
        "edit). Fix: restore or re-download the shard, or re-run the stage that wrote the checkpoint")


@pytest.mark.fault("shard with flipped bytes", "error")
def test_flipped_bytes_in_a_hugging_face_cache_blob_are_noticed(tmp_path, tiny_model, adapter):
    """A hub download's snapshot links each shard to blobs/<sha256>: the name is the checksum."""
    snap, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_model.iterdir():
        blob = blobs / file_sha256(f)
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(blob)
    shard = snap / "model-00003-of-00003.safetensors"
    flip_byte(shard.resolve())
    with pytest.raises(GraftError, match=r"model-00003-of-00003.safetensors: corrupt shard: it has sha256 [0-9a-f]{16}"
                                         r"\.\.\. but the Hugging Face cache blob name [0-9a-f]{64} records "):
        _merge(snap, adapter, tmp_path / "m", allow_other_base=True)
    assert not (tmp_path / "m").exists()


@pytest.mark.fault("corrupt model config", "error")
def test_corrupt_model_config(tmp_path, tiny_model, adapter):
    bad = tmp_path / "c1"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text("{oops")
    assert _refused(bad, adapter, tmp_path / "m") == (f"{bad / 'config.json'}:1: not valid JSON (Expecting property name enclosed in double "
                            "quotes). Fix: re-run the stage that wrote it")


@pytest.mark.fault("truncated safetensors shard", "error")
def test_truncated_shard(tmp_path, tiny_model, adapter):
    cut = tmp_path / "c2"
    shutil.copytree(tiny_model, cut)
    shard = cut / "model-00002-of-00003.safetensors"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-100])
    assert _refused(cut, adapter, tmp_path / "m") == (f"{shard}: corrupt shard: the header describes {size} bytes but the file has "
                            f"{size - 100} (truncated or partly written). Fix: re-download or re-create this shard "
                            "(compare its size with the source)")


@pytest.mark.fault("missing shard", "error")
def test_missing_shard(tmp_path, tiny_model, adapter):
    missing = tmp_path / "c3"
    shutil.copytree(tiny_model, missing)
    (missing / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(GraftError, match=r"model.safetensors.index.json: the index names shard "
                                         r"'model-00003-of-00003.safetensors' \(for \d+ tensors, e.g. '[^']+'\) but "
                                         r".*c3/model-00003-of-00003.safetensors does not exist. Fix: copy the "
                                         r"missing shard into the folder, or fix the index"):
        _merge(missing, adapter, tmp_path / "m")
    assert not (tmp_path / "m").exists()


_KILL_MERGE = """
import os, signal, sys
import common.checkpoint as ck
orig = ck.write_shard
def write_shard(*a, **k):
    result = orig(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # after the first rewritten shard: die like `kill -9`
    return result
ck.write_shard = write_shard
from continual.config import MergeConfig
from continual.merge import merge_adapter
merge_adapter(MergeConfig(base=sys.argv[1], adapter=sys.argv[2], out=sys.argv[3]))
"""


@pytest.mark.fault("kill -9 mid-stage", "resumed")
def test_merge_killed_mid_write_leaves_nothing_that_looks_complete_and_reruns_equal(tmp_path, tiny_model, adapter):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-c", _KILL_MERGE, str(tiny_model), str(adapter), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.tmp-")]
    _merge(tiny_model, adapter, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]  # the killed run's temp is gone
    ref = _merge(tiny_model, adapter, tmp_path / "ref")
    assert tree_bytes(out) == tree_bytes(ref)


@pytest.mark.fault("kill -9 mid-stage", "resumed")
def test_prepare_killed_mid_file_resumes_to_the_uninterrupted_output(tmp_path, news_lines, base_model_path):
    files = [str(jsonl(tmp_path / f"{c}.jsonl", news_lines[i * 300:(i + 1) * 300])) for i, c in enumerate("ab")]
    args = dict(name="t", tokenizer=str(base_model_path), files=files, out=str(tmp_path / "p"), block_size=64,
                batch_chars=3000, progress=False)
    from test_corpus import _KILLER  # the SIGKILL script of tests/test_corpus.py (third block of the second file)

    proc = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in (tmp_path / "p" / "completions").iterdir()] == ["00000-a.jsonl"]
    assert not (tmp_path / "p" / "manifest.json").exists()
    from corpus.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(**args))
    prepare(PrepareConfig(**{**args, "out": str(tmp_path / "ref")}))
    skip = ("manifest.json", "completions")
    assert tree_bytes(tmp_path / "p", skip) == tree_bytes(tmp_path / "ref", skip)
    m, ref = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("p", "ref"))
    assert m["counts"] == ref["counts"] and m["rejects"] == ref["rejects"] == {}


@pytest.mark.fault("shard with flipped bytes", "error")
def test_embed_init_refuses_to_link_a_shard_with_flipped_bytes(tmp_path, tiny_model, base_model_path, news_lines):
    """The issue's case: a base whose manifest records its shards (as the demo.base stage writes it)."""
    from common.checkpoint import shard_digest
    from common.io import write_manifest
    from embed_init.config import EmbedInitConfig
    from embed_init.grow import grow_embeddings
    from faultkit import candidate_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    write_manifest(base, stage="demo.base", config={},
                   shard_files={p.name: shard_digest(p) for p in sorted(base.glob("*.safetensors"))})
    shard = base / "model-00003-of-00003.safetensors"  # holds neither embedding: it would be hard-linked
    good = file_sha256(shard)
    flip_byte(shard)
    new_tok = candidate_model(base_model_path, tmp_path / "new.model", news_lines)
    with pytest.raises(GraftError) as e:
        grow_embeddings(EmbedInitConfig(model=str(base), old_tokenizer=str(base_model_path),
                                        new_tokenizer=str(new_tok), out=str(tmp_path / "grown"), progress=False))
    assert str(e.value) == (
        f"{shard}: corrupt shard: it has sha256 {file_sha256(shard)[:16]}... but {base / 'manifest.json'} "
        f"(shard_files) records {good[:16]}...: its bytes changed after it was written (a disk or copy error, or an "
        "edit). Fix: restore or re-download the shard, or re-run the stage that wrote the checkpoint")
    assert not (tmp_path / "grown").exists()
