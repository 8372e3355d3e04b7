"""One re-run rule for every stage (common/rerun.py): the same settings and inputs skip, different ones are
refused with the fix, --overwrite replaces; an edit that keeps the size and mtime is noticed (issue 19, item 3)."""
from __future__ import annotations

import json
import os

import pytest
from faultkit import candidate_model, jsonl, make_adapter

from common.errors import GraftError
from continual.config import MergeConfig as AdapterMergeConfig
from continual.merge import merge_adapter
from corpus.prepare import PrepareConfig, prepare
from vocab.merge import VocabMergeConfig, merge_into_base


@pytest.fixture(scope="module")
def cand(tmp_path_factory, base_model_path, news_lines):
    return candidate_model(base_model_path, tmp_path_factory.mktemp("cand") / "cand.model", news_lines)


@pytest.mark.fault("re-run onto a finished output", "error")
def test_vocab_merge_onto_an_output_made_with_other_settings_is_refused(tmp_path, base_model_path, cand):
    out = tmp_path / "tok"
    merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(cand), out=str(out)))
    before = (out / "manifest.json").read_bytes()
    other = VocabMergeConfig(base=str(base_model_path), add=str(cand), out=str(out), special=["<|im_end|>"])
    with pytest.raises(GraftError) as e:
        merge_into_base(other)
    assert str(e.value) == (f"{out}: holds a finished vocab.merge output made with different settings special. "
                            "Fix: choose another --out, or pass --overwrite to replace it")
    assert (out / "manifest.json").read_bytes() == before  # not replaced (it used to be, silently)
    other.overwrite = True
    merge_into_base(other)
    assert json.loads((out / "manifest.json").read_text())["special_tokens"] == ["<|im_end|>"]


@pytest.mark.fault("re-run onto a finished output", "resumed")
def test_vocab_merge_again_with_the_same_settings_is_skipped(tmp_path, base_model_path, cand, capsys):
    cfg = VocabMergeConfig(base=str(base_model_path), add=str(cand), out=str(tmp_path / "tok"))
    merge_into_base(cfg)
    before = (tmp_path / "tok" / "manifest.json").read_bytes()
    capsys.readouterr()
    merge_into_base(cfg)
    assert capsys.readouterr().out == (f"{tmp_path / 'tok'}: already complete with the same settings and inputs; "
                                       "nothing to do (--overwrite to run it again)\n")
    assert (tmp_path / "tok" / "manifest.json").read_bytes() == before


@pytest.mark.fault("re-run onto a finished output", "error")
def test_an_input_edit_keeping_size_and_mtime_is_noticed(tmp_path, base_model_path, cand, news_lines):
    """Contents are hashed (files up to 64 MiB): restoring size and mtime does not hide an edit."""
    src = jsonl(tmp_path / "a.jsonl", news_lines[:50])
    cfg = PrepareConfig(name="t", tokenizer=str(base_model_path), files=[str(src)], out=str(tmp_path / "p"),
                        block_size=64, progress=False)
    prepare(cfg)
    st = src.stat()
    text = src.read_text(encoding="utf-8")
    i = next(k for k, ch in enumerate(text) if "\u4e00" <= ch <= "\u9fff" and ch != "中")
    src.write_text(text[:i] + "中" + text[i + 1:], encoding="utf-8")  # same UTF-8 length
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_size == st.st_size and src.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(GraftError) as e:
        prepare(cfg)
    assert str(e.value) == (f"{tmp_path / 'p'} was prepared with different settings or inputs (files changed). "
                            "Fix: use a new --out folder, or pass --overwrite to start this one over")
    # the same rule in a stage that writes atomically: vocab merge's candidate edited in place, same size
    out = tmp_path / "tok"
    merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(cand), out=str(out)))
    edited = tmp_path / "cand2.model"
    edited.write_bytes(cand.read_bytes())
    merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(edited), out=str(tmp_path / "tok2")))
    data = bytearray(edited.read_bytes())
    data[-3] ^= 0x01  # a byte of the last piece's score: size unchanged
    edited.write_bytes(bytes(data))
    with pytest.raises(GraftError, match=r"tok2: holds a finished vocab.merge output made with different inputs add "
                                         r"\(contents\). Fix: choose another --out, or pass --overwrite"):
        merge_into_base(VocabMergeConfig(base=str(base_model_path), add=str(edited), out=str(tmp_path / "tok2")))


@pytest.mark.fault("re-run onto a finished output", "error")
def test_adapter_merge_follows_the_same_rule(tmp_path, tiny_model, capsys):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", name_or_path=str(tiny_model))
    out = tmp_path / "m"
    merge_adapter(AdapterMergeConfig(base=str(tiny_model), adapter=str(adapter), out=str(out)))
    before = (out / "manifest.json").read_bytes()
    merge_adapter(AdapterMergeConfig(base=str(tiny_model), adapter=str(adapter), out=str(out)))
    assert "already complete with the same settings and inputs" in capsys.readouterr().out
    with pytest.raises(GraftError) as e:
        merge_adapter(AdapterMergeConfig(base=str(tiny_model), adapter=str(adapter), out=str(out), dtype="bf16"))
    assert str(e.value) == (f"{out}: holds a finished continual.merge output made with different settings dtype. "
                            "Fix: choose another --out, or pass --overwrite to replace it")
    assert (out / "manifest.json").read_bytes() == before


@pytest.mark.fault("re-run onto a finished output", "resumed")
def test_an_interrupted_in_place_stage_runs_again_plainly_but_a_foreign_folder_is_refused(tmp_path, base_model_path,
                                                                                         news_lines, monkeypatch):
    """Stages that write in place (audit, score, mix) recognise their own unfinished folder."""
    import analysis.audit as audit_mod

    corpus = jsonl(tmp_path / "zh.jsonl", news_lines[:30])
    cfg = audit_mod.AuditConfig(tokenizers=[str(base_model_path)], corpus=[str(corpus)], out=str(tmp_path / "a"),
                                progress=False)
    import analysis.plots

    # interrupted after the tables, before the chart and the manifest
    monkeypatch.setattr(analysis.plots, "bar_chart", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        audit_mod.audit(cfg)
    assert (tmp_path / "a" / "audit.csv").exists() and not (tmp_path / "a" / "manifest.json").exists()
    monkeypatch.undo()
    audit_mod.audit(cfg)  # the same command again: runs, no --overwrite needed
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["status"] == "done"
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(GraftError) as e:
        audit_mod.audit(audit_mod.AuditConfig(tokenizers=[str(base_model_path)], corpus=[str(corpus)],
                                              out=str(foreign), progress=False))
    assert str(e.value) == (f"{foreign}: is a folder that is not a finished output (no finished manifest.json: "
                            "another program's files, or a run stopped before the end). Fix: choose another --out, "
                            "or pass --overwrite to replace it")
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.fault("re-run onto a finished output", "error")
def test_train_onto_a_finished_run_with_other_settings_is_refused(tmp_path, capsys):
    from common.io import write_manifest
    from continual.config import TrainConfig

    out = tmp_path / "run"
    done = TrainConfig(model=str(tmp_path / "m"), train_data=str(tmp_path / "d"), out=str(out), learning_rate=1e-3)
    write_manifest(out, stage="continual.train", config=done)
    toml = tmp_path / "train.toml"
    toml.write_text(f'model = "{tmp_path / "m"}"\ntrain_data = "{tmp_path / "d"}"\nout = "{out}"\n'
                    "learning_rate = 2e-3\neval_every = 7\n")  # eval_every only changes how it runs
    import workflows.cli

    assert workflows.cli.main(["train", "--config", str(toml)]) == 2
    assert capsys.readouterr().err == (f"graft: error: {out}: holds a finished continual.train run made with "
                                       "different settings learning_rate. Fix: choose another out, or delete that "
                                       "folder to train again\n")
