"""A full disk while a stage writes: one clear error naming the output, what became of the partial output and
the fix; nothing half-written looks complete; a re-run after freeing space resumes (issue 19, item 2).
The disk is a real 256 KiB tmpfs (root), or the error is injected into a workflow stage."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultkit import candidate_model, jsonl, make_adapter, tree_bytes

import workflows.cli
from common.io import write_manifest


def _fix(out: Path, mnt: Path) -> str:
    return (f"Fix: free space on the filesystem holding {out} (df -h {mnt}) or write to another one, then re-run "
            "the same command")


def _graft(argv, capsys) -> tuple[int, str]:
    """Exit code and the error line (progress bars on stderr are left out)."""
    rc = workflows.cli.main(argv)
    err = capsys.readouterr().err
    return rc, "".join(line + "\n" for line in err.splitlines() if line.startswith("graft: error:"))


@pytest.mark.fault("full disk (ENOSPC)", "resumed")
def test_prepare_on_a_full_disk_then_resumed_equals_an_uninterrupted_run(small_fs, tmp_path, news_lines,
                                                                          base_model_path, capsys):
    mnt, resize = small_fs
    files = [jsonl(tmp_path / f"{c}.jsonl", news_lines[i * 1500:(i + 1) * 1500]) for i, c in enumerate("ab")]
    out = mnt / "prep"
    argv = ["corpus", "prepare", "t", "--tokenizer", str(base_model_path), "--block-size", "128", "--no-progress",
            "--files", *map(str, files)]
    rc, err = _graft(argv + ["--out", str(out)], capsys)
    assert rc == 2
    assert re.fullmatch(re.escape(f"graft: error: graft corpus prepare: No space left on device (ENOSPC) while "
                                  f"writing {out}") + r"( \(file [^)]+\))?" + re.escape(
        f". The finished parts in {out} are kept and the unfinished one was removed; the same command resumes from "
        f"them. {_fix(out, mnt)}") + "\n", err), err
    assert not (out / "manifest.json").exists()
    assert not [p for p in (out / "shards").iterdir() if ".tmp-" in p.name]
    resize(8192)  # space freed
    assert _graft(argv + ["--out", str(out)], capsys)[0] == 0
    assert _graft(argv + ["--out", str(tmp_path / "ref")], capsys)[0] == 0
    skip = ("manifest.json", "completions")  # run-specific: times
    assert tree_bytes(out, skip) == tree_bytes(tmp_path / "ref", skip)
    m, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "ref"))
    assert m["counts"] == ref["counts"] and m["counts"]["train"]["blocks"] > 0


@pytest.mark.fault("full disk (ENOSPC)", "error")
def test_vocab_merge_on_a_full_disk_leaves_nothing(small_fs, tmp_path, news_lines, base_model_path, capsys):
    mnt, _ = small_fs
    cand = candidate_model(base_model_path, tmp_path / "cand.model", news_lines)
    out = mnt / "tok"
    rc, err = _graft(["vocab", "merge", "--base", str(base_model_path), "--add", str(cand), "--out", str(out)], capsys)
    assert rc == 2
    assert re.fullmatch(re.escape(f"graft: error: graft vocab merge: No space left on device (ENOSPC) while writing "
                                  f"{out}") + r"( \(file [^)]+\))?" + re.escape(
        f". Nothing was left in {out} (the partial output was written under a temporary name, now removed). "
        f"{_fix(out, mnt)}") + "\n", err), err
    assert list(mnt.iterdir()) == []


@pytest.mark.fault("full disk (ENOSPC)", "error")
def test_adapter_merge_on_a_full_disk_leaves_nothing(small_fs, tmp_path, tiny_model, capsys):
    mnt, _ = small_fs
    adapter = make_adapter(tiny_model, tmp_path / "adapter", name_or_path=str(tiny_model))
    out = mnt / "merged"
    rc, err = _graft(["merge", "--base", str(tiny_model), "--adapter", str(adapter), "--out", str(out)], capsys)
    assert rc == 2
    assert re.fullmatch(re.escape(f"graft: error: graft merge: No space left on device (ENOSPC) while writing {out}")
                        + r"( \(file [^)]+\))?" + re.escape(
        f". Nothing was left in {out} (the partial output was written under a temporary name, now removed). "
        f"{_fix(out, mnt)}") + "\n", err), err
    assert list(mnt.iterdir()) == []


@dataclass
class FillConfig:
    out: str


def fill_disk(cfg: FillConfig) -> Path:
    """A stage that writes part of its output, then hits a full disk (unless out/../space exists)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "part.bin").write_bytes(b"x" * 100)
    if not (out.parent / "space").exists():
        raise OSError(28, "No space left on device", str(out / "part.bin"))
    write_manifest(out, stage="fill", config=cfg)
    return out


@pytest.mark.fault("full disk (ENOSPC)", "error")
def test_workflow_stage_on_a_full_disk_names_the_stage_and_its_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wf = tmp_path / "wf.toml"
    wf.write_text('[workflow]\nname = "w"\nruns = "runs"\n\n[fill]\nkind = "test_faults_disk:fill_disk"\n')
    out = Path("runs/w/fill")
    rc, err = _graft(["run", str(wf)], capsys)
    assert rc == 2
    assert err == (f"graft: error: stage 'fill': No space left on device (ENOSPC) while writing {out} (file "
                   f"{out / 'part.bin'}). The partial output {out} was removed. Fix: free space on the filesystem "
                   f"holding {out} (df -h {out.parent}) or write to another one, then re-run the same command\n")
    assert not out.exists()
    (out.parent / "space").write_text("")
    assert _graft(["run", str(wf)], capsys)[0] == 0 and (out / "manifest.json").is_file()


@pytest.mark.fault("full disk (ENOSPC)", "error")
def test_embed_init_on_a_full_disk_leaves_nothing(small_fs, tmp_path, tiny_model, base_model_path, news_lines, capsys):
    mnt, _ = small_fs
    new_tok = candidate_model(base_model_path, tmp_path / "new.model", news_lines)
    out = mnt / "grown"
    rc, err = _graft(["embed", "init", "--model", str(tiny_model), "--old-tokenizer", str(base_model_path),
                      "--new-tokenizer", str(new_tok), "--out", str(out), "--no-progress"], capsys)
    assert rc == 2
    assert re.fullmatch(re.escape(f"graft: error: graft embed init: No space left on device (ENOSPC) while writing "
                                  f"{out}") + r"( \(file [^)]+\))?" + re.escape(
        f". Nothing was left in {out} (the partial output was written under a temporary name, now removed). "
        f"{_fix(out, mnt)}") + "\n", err), err
    assert list(mnt.iterdir()) == []


@pytest.mark.fault("other I/O errors (EIO, EROFS)", "error")
def test_an_io_error_while_writing_is_one_clear_error(tmp_path, base_model_path, news_lines, capsys, monkeypatch):
    import common.io

    cand = candidate_model(base_model_path, tmp_path / "cand.model", news_lines)
    out = tmp_path / "tok"

    def failing_disk(path, obj):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(common.io, "atomic_write_json", failing_disk)
    rc, err = _graft(["vocab", "merge", "--base", str(base_model_path), "--add", str(cand), "--out", str(out)], capsys)
    assert rc == 2
    tmp = next(iter(re.findall(r"\(file ([^)]+)\)", err)), "")
    assert err == (f"graft: error: graft vocab merge: Input/output error (EIO) while writing {out} (file {tmp}). "
                   f"Nothing was left in {out} (the partial output was written under a temporary name, now removed). "
                   "Fix: check the disk or filesystem (dmesg, df -h), then re-run the same command\n")
    assert tmp.startswith(str(tmp_path / ".tok.tmp-")) and list(tmp_path.glob(".tok*")) == []


@pytest.mark.fault("other I/O errors (EIO, EROFS)", "error")
def test_a_read_only_filesystem_is_one_clear_error(small_fs, tmp_path, base_model_path, news_lines, capsys):
    import subprocess

    mnt, _ = small_fs
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    cand = candidate_model(base_model_path, tmp_path / "cand.model", news_lines)
    out = mnt / "tok"
    rc, err = _graft(["vocab", "merge", "--base", str(base_model_path), "--add", str(cand), "--out", str(out)], capsys)
    assert rc == 2
    assert re.fullmatch(re.escape(f"graft: error: graft vocab merge: Read-only file system (EROFS) while writing {out}")
                        + r"( \(file [^)]+\))?" + re.escape(
        f". Nothing was left in {out} (the partial output was written under a temporary name, now removed). Fix: "
        "write to a writable filesystem (another --out), then re-run") + "\n", err), err
