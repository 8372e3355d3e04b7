"""Training checkpoints: everything a resumed run needs to continue the same loss curve.

OUT/checkpoints/step-000050/
    trainable.safetensors   the trainable parameters only (LoRA, embedding copies/rows), by name
    optimizer.pt            AdamW state
    scheduler.pt            LR scheduler state
    rng-rank{r}.pt          python/numpy/torch(/cuda) RNG states of each process (dropout)
    (DeepSpeed/FSDP: trainable-rank{r}.safetensors + optimizer-rank{r}.pt per process instead)
    state.json              step, micro-batch position, tokens seen
    checksums.json          sha256 of every file above (written last; checked on resume)
A checkpoint folder is written under a temporary name and renamed when whole, so a crash while
saving leaves the previous checkpoint as the newest.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

from common.errors import input_error
from common.io import atomic_path, atomic_write_json, file_sha256

CKPT_DIR = "checkpoints"
CHECKSUMS = "checksums.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Finished checkpoints (those with checksums.json), oldest first."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / CHECKSUMS).is_file()]


def rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def trainable_state(model) -> dict[str, Any]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: str | Path, step: int, model, optimizer, scheduler, state: dict[str, Any],
                    keep: int, rank: int = 0, world: int = 1, barrier=lambda: None, sharded: bool = False) -> Path:
    """Write OUT/checkpoints/step-N atomically; every process calls it.

    Every rank writes its RNG state. With `sharded` (DeepSpeed ZeRO / FSDP, where each process holds only
    its shard of the optimizer state and, for ZeRO-3/FSDP, of the parameters) every rank also writes its own
    trainable-rank{r}.safetensors and optimizer-rank{r}.pt; such a checkpoint resumes on the same number of
    processes. Rank 0 then moves the files into place and seals the folder with checksums.
    """
    import torch
    from safetensors.torch import save_file

    target = Path(out) / CKPT_DIR / f"step-{step:06d}"
    staging = Path(out) / CKPT_DIR / f".staging-step-{step:06d}"
    staging.mkdir(parents=True, exist_ok=True)
    torch.save(rng_states(), staging / f"rng-rank{rank}.pt")
    if sharded:
        save_file(trainable_state(model), str(staging / f"trainable-rank{rank}.safetensors"))
        torch.save(optimizer.state_dict(), staging / f"optimizer-rank{rank}.pt")
    barrier()
    if rank != 0:
        barrier()
        return target
    with atomic_path(target) as tmp:
        tmp.mkdir()
        if not sharded:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for f in sorted(staging.iterdir()):
            shutil.copyfile(f, tmp / f.name)
        (tmp / "state.json").write_text(json.dumps({"step": step, "processes": world, "sharded": sharded, **state},
                                                   indent=2))
        sums = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        atomic_write_json(tmp / CHECKSUMS, sums)
    shutil.rmtree(staging, ignore_errors=True)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


def verify_checkpoint(ckpt: Path) -> None:
    """Raise a GraftError if a file of the checkpoint is missing or differs from its recorded checksum."""
    try:
        sums = json.loads((ckpt / CHECKSUMS).read_text())
    except (OSError, json.JSONDecodeError):
        raise input_error(ckpt, f"{CHECKSUMS} is unreadable: the checkpoint is corrupt",
                          f"delete {ckpt} to resume from the previous checkpoint") from None
    for name, digest in sums.items():
        f = ckpt / name
        if not f.is_file():
            raise input_error(ckpt, f"{name} is missing: the checkpoint is corrupt",
                              f"delete {ckpt} to resume from the previous checkpoint")
        if file_sha256(f) != digest:
            raise input_error(f, "checksum mismatch: the checkpoint is corrupt (truncated or modified)",
                              f"delete {ckpt} to resume from the previous checkpoint")


def check_processes(ckpt: Path, world: int, engine: str | None = None) -> dict[str, Any]:
    """state.json of a checkpoint; an error when it was written under another engine (ddp/single and
    deepspeed-zero2/-zero3/fsdp lay out the optimizer state differently), or is sharded and was written by
    another number of processes."""
    state = json.loads((ckpt / "state.json").read_text())
    saved = state.get("engine")
    if engine is not None and saved is not None and saved != engine and {saved, engine} != {"ddp", "single"}:
        raise input_error(ckpt / "state.json", f"this checkpoint was written under {saved}, this run uses {engine}",
                          f"resume under the same engine (graft train --launch-config {saved}, or accelerate "
                          "launch with that config), or start a new run in another `out`")
    if state.get("sharded") and state.get("processes", 1) != world:
        n = state.get("processes")
        raise input_error(ckpt / "state.json", f"this sharded (DeepSpeed/FSDP) checkpoint was written by {n} "
                                               f"processes, this run has {world}; each process holds its own shard "
                                               "of the optimizer state",
                          f"resume with {n} processes (accelerate launch --num_processes {n}, or --nodes x "
                          f"--gpus-per-node = {n}), or start a new run in another `out`")
    return state


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Restore trainable weights, optimizer, scheduler and this rank's RNG; return state.json."""
    import torch
    from safetensors.torch import load_file

    verify_checkpoint(ckpt)
    state = check_processes(ckpt, world)
    sharded = bool(state.get("sharded"))
    suffix = f"-rank{rank}" if sharded else ""
    saved = load_file(str(ckpt / f"trainable{suffix}.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        extra, missing = sorted(set(saved) - expected)[:3], sorted(expected - set(saved))[:3]
        raise input_error(ckpt, f"its trainable weights do not match this run's model (unexpected: {extra}, "
                                f"missing: {missing})", "resume with the config the run started with, or use a "
                                                       "new `out` folder")
    with torch.no_grad():
        for n, t in saved.items():
            if hasattr(params[n], "ds_id") and params[n].shape != t.shape:
                continue  # a ZeRO-3 partition (empty here or when saved): the optimizer's fp32 partition restores it
            if params[n].shape != t.shape:
                raise input_error(ckpt, f"{n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}",
                                  "resume with the config the run started with, or use a new `out` folder")
            params[n].copy_(t)
    _load_optimizer_state(optimizer, torch.load(ckpt / f"optimizer{suffix}.pt", weights_only=False), world)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng = ckpt / f"rng-rank{rank}.pt"
    if rng.is_file():
        set_rng_states(torch.load(rng, weights_only=False))
    return state


def _load_optimizer_state(optimizer, state: dict, world: int) -> None:
    """A torch optimizer's state, or a DeepSpeed ZeRO optimizer's partition (it takes a list indexed by rank and
    restores its fp32 master partition from the saved one, so a resumed run continues bit for bit)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if type(inner).__module__.startswith("deepspeed."):
        inner.load_state_dict([state] * world, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(state)
