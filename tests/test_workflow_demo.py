"""End to end: the shipped demo workflow (workflows/demo.toml) with reduced sizes, run as `graft run`
in a subprocess: killed in the middle of QLoRA training, resumed, then re-run with everything skipped.
Also: the shipped full-scale recipe parses and validates, and its training stage emits a Slurm script.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from common.errors import GraftError
from common.io import read_manifest
from continual.state import checkpoint_dirs
from workflows.commands import status_rows
from workflows.spec import build_config, load_workflow

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "workflows" / "demo.toml"

# Smaller everything; the wiring, the stage kinds and the references stay those of demo.toml.
REDUCE = {
    "base_model": {"steps": 3, "batch_size": 2, "seq_len": 64, "eval_every": 0, "eval_docs": 4,
                   "inputs": ["@corpora/zh_news_dev.jsonl", "@corpora/en_pydoc_dev.jsonl"],
                   "dev": ["@corpora/zh_news_dev.jsonl"]},
    "vocab_train": {"inputs": ["@corpora/zh_reviews.jsonl"], "chars": [1500], "sizes": ["2000:3000:1000"],
                    "max_sentences": 4000},
    "vocab_score": {"samples": 200},
    "prep_zh": {"files": ["@corpora/zh_news_dev.jsonl"], "block_size": 64, "split": "9:1"},
    "prep_en": {"files": ["@corpora/en_pydoc_dev.jsonl"], "block_size": 64, "split": "9:1"},
    "mix": {"spec": "1:{@prep_zh}, 0.5:{@prep_en}"},
    "train": {"max_steps": 6, "micro_batch_size": 2, "lora_r": 4, "lora_alpha": 8, "eval_every": 3,
              "eval_blocks": 2, "save_every": 1, "gradient_checkpointing": False},
    "train_mean": {"max_steps": 3, "micro_batch_size": 2, "lora_r": 4, "lora_alpha": 8, "eval_every": 0,
                   "eval_blocks": 2, "save_every": 0, "gradient_checkpointing": False},
    "eval": {"max_docs": 3, "max_len": 64, "dev": ["@corpora/zh_news_dev.jsonl"]},
    "report": {"max_new_tokens": 4},
}


def _reduced_demo(tmp_path: Path) -> Path:
    raw = tomllib.loads(DEMO.read_text(encoding="utf-8"))
    for stage, values in REDUCE.items():
        raw[stage].update(values)
    raw["workflow"]["runs"] = str(tmp_path / "runs")
    path = tmp_path / "demo-small.toml"
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path


def _graft(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "workflows.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(p: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_reduced_demo_kill_resume_skip(tmp_path):
    wf_path = _reduced_demo(tmp_path)
    wf = load_workflow(wf_path)
    train_out = wf.stage("train").out

    # 1. Run, and kill the process (SIGKILL: no chance to clean up) once training has a checkpoint.
    p = _graft("run", str(wf_path), cwd=tmp_path)
    deadline = time.time() + 300
    while not checkpoint_dirs(train_out):
        assert p.poll() is None, p.stdout.read()[-4000:]
        assert time.time() < deadline, "training never wrote a checkpoint"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    states = {r["stage"]: r for r in status_rows(wf_path)}
    before = [s.name for s in wf.stages[:wf.stages.index(wf.stage("train"))]]
    assert all(states[s]["state"] == "done" for s in before), states
    assert states["train"]["state"] == "failed" and "interrupted" in states["train"]["why"]
    assert states["report"]["state"] == "pending"
    ids = {s: read_manifest(wf.stage(s).out)["workflow"]["output_id"] for s in before}

    # 2. Change how often training evaluates and logs (cadence, not what it learns), then re-run:
    # finished stages are skipped, training resumes from its checkpoint, the rest runs.
    raw = tomllib.loads(wf_path.read_text(encoding="utf-8"))
    raw["train"].update(eval_every=2, eval_blocks=3, log_every=2)
    wf_path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    assert {r["stage"]: r["state"] for r in status_rows(wf_path)}["train"] == "failed"
    out = _finish(_graft("run", str(wf_path), cwd=tmp_path))
    for s in before:
        assert f"{s}: skipped, unchanged" in out
    assert "train: resuming" in out and "resuming from" in out
    assert {s: read_manifest(wf.stage(s).out)["workflow"]["output_id"] for s in before} == ids
    steps = [int(line.split(",")[0]) for line in (train_out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # the resumed log has no repeated steps
    report = wf.stage("report").out
    assert f"Report: {(report / 'report.md').resolve()}" in out
    assert all(r["state"] == "done" for r in status_rows(wf_path))

    # The report has every section, filled from the runs.
    md = (report / "report.md").read_text(encoding="utf-8")
    for heading in ("ALP curves", "Audit", "Token budget", "Training and dev loss", "Dev bits per byte",
                    "Merged checkpoint"):
        assert heading in md, heading
    assert str(wf.stage("merge").out.resolve()) in md
    html = (report / "report.html").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert {"alp.png", "audit.png", "bpb.png", "train_loss.png", "base_loss.png"} <= set(pngs)
    assert all(f"src='{name}'" in html for name in pngs) and all(f"({name})" in md for name in pngs)
    bpb = json.loads((wf.stage("eval").out / "bpb.json").read_text())
    assert len(bpb) == 5 and all(0 < v["zh_news_dev"]["bpb"] < 20 for v in bpb.values())
    assert list(bpb) == ["before extension", "calibrated init (default)", "calibrated init, after training",
                         "mean init", "mean init, after training"]
    # both inits are trained (the mean run from its own init) and the report shows each row
    assert bpb["mean init, after training"] != bpb["mean init"]
    assert read_manifest(wf.stage("merge_mean").out)["inputs"]["base"] == str(wf.stage("embed_init_mean").out.resolve())
    for label in bpb:
        assert label in md, label
    assert read_manifest(wf.stage("embed_init").out)["output_method"] == "calibrated"
    assert read_manifest(wf.stage("embed_init_mean").out)["output_method"] == "mean"
    audit = json.loads((wf.stage("audit").out / "audit.json").read_text())
    zh = [r for r in audit if r["corpus"].endswith("zh_news_dev.jsonl")]
    en = [r for r in audit if r["corpus"].endswith("en_pydoc_dev.jsonl")]
    assert zh[1]["tokens"] < zh[0]["tokens"] and en[1]["tokens"] == en[0]["tokens"]
    sample = read_manifest(report)["merged"]["samples"][0]
    assert sample["text"].startswith(sample["prompt"]) and sample["new_tokens"] > 0

    print({r["stage"]: r["duration"] for r in status_rows(wf_path)})

    # 3. Nothing changed: everything is skipped.
    out = _finish(_graft("run", str(wf_path), cwd=tmp_path), timeout=60)
    assert out.count("skipped, unchanged") == len(wf.stages) and ": running " not in out
    assert f"Report: {(report / 'report.md').resolve()}" in out


def test_full_recipe_parses_and_validates(tmp_path):
    """The shipped full-scale recipe: every stage builds a valid config object (references resolved to
    stand-in folders), its stages come after the stages they read, and what one stage writes fits what the
    next expects (block length, the picked size within the trained grid)."""
    wf = load_workflow(REPO / "workflows" / "chinese-mixtral.toml", runs=tmp_path)
    order = {s.name: i for i, s in enumerate(wf.stages)}
    outputs = {s.name: tmp_path / s.name for s in wf.stages}
    stand_in = {"vocab_pick": {"pick": {"path": str(tmp_path / "vocab_pick" / "chosen.model")}}}
    for s in wf.stages:
        assert all(order[d] < order[s.name] for d in s.deps), s.name
        cfg = build_config(s, outputs, lambda name: stand_in.get(name, {}))
        if hasattr(cfg, "validate"):
            cfg.validate()
    # every corpus feeding the training stage is cut into blocks of its seq_len (else it fails at train time)
    train = wf.stage("train")
    feeding = [s for s in wf.stages if s.kind.name == "corpus.prepare" and "train" in wf.downstream(s.name)]
    assert feeding and {s.values["block_size"] for s in feeding} == {train.values["seq_len"]}
    # the size to pick is among the candidate sizes vocab_train writes
    lo, hi, step = (int(x) for x in wf.stage("vocab_train").values["sizes"][0].split(":"))
    assert wf.stage("vocab_pick").values["size"] in range(lo, hi + 1, step)
    assert train.launch.mode == "slurm"
    with pytest.raises(GraftError, match=r"\[train\] key 'lora_r'"):
        bad = dict(train.values, lora_r="@mix#counts")
        build_config(dataclasses.replace(train, values=bad), outputs, lambda name: {"counts": {"a": 1}})


def test_slurm_stage_writes_sbatch_and_waits(tmp_path, monkeypatch):
    """Where `sbatch` is not on PATH, a `launch.mode = "slurm"` training stage writes its TOML + sbatch
    script and stops the run; once its output is finished (here: written by hand, as the job would),
    the next run adopts it. (With sbatch, tests/test_workflow_slurm.py submits it for real.)"""
    from common.io import write_manifest
    from workflows.engine import run_workflow

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no Slurm commands

    (tmp_path / "model").mkdir()
    wf_path = tmp_path / "w.toml"
    wf_path.write_text(f"""
[workflow]
runs = "{tmp_path / 'runs'}"
[train]
kind = "continual.train"
model = "{tmp_path / 'model'}"
train_data = "{tmp_path / 'data'}"
[train.launch]
mode = "slurm"
config = "ddp"
nodes = 2
gpus_per_node = 4
""")
    lines: list[str] = []
    run_workflow(load_workflow(wf_path), echo=lines.append)
    script = tmp_path / "runs/w/launch/train.sbatch"
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "--config" in text and "train.toml" in text
    cfg = tomllib.loads((tmp_path / "runs/w/launch/train.toml").read_text())
    assert cfg["model"] == str(tmp_path / "model") and cfg["out"] == str(tmp_path / "runs/w/train")
    assert any(f"sbatch {script}" in ln for ln in lines)
    assert [r["state"] for r in status_rows(wf_path)] == ["submitted"]

    lines.clear()
    run_workflow(load_workflow(wf_path), echo=lines.append)
    assert any("waiting for its Slurm job" in ln for ln in lines)

    write_manifest(tmp_path / "runs/w/train", stage="continual.train", config={})
    lines.clear()
    run_workflow(load_workflow(wf_path), echo=lines.append)
    assert any("its Slurm job has finished" in ln for ln in lines)
    assert [r["state"] for r in status_rows(wf_path)] == ["done"]


def test_slurm_launch_rejected_for_other_kinds(tmp_path):
    wf_path = tmp_path / "w.toml"
    wf_path.write_text('[corpora]\nkind = "demo.corpora"\n[corpora.launch]\nmode = "slurm"\nnodez = 1\n')
    with pytest.raises(GraftError) as e:
        load_workflow(wf_path)
    assert "[corpora] launch: unknown key 'nodez' (did you mean 'nodes'?)" in str(e.value)
    assert "[corpora] launch: kind 'demo.corpora' cannot run as a Slurm job" in str(e.value)
