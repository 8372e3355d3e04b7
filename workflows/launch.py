"""Run a workflow stage as a Slurm job instead of in the `graft run` process.

A stage table may hold a `launch` sub-table:

    [train.launch]
    mode = "slurm"                 # "local" (default): run in this process
    config = "deepspeed-zero2"     # ddp | deepspeed-zero2 | deepspeed-zero3 | fsdp | an accelerate YAML
    nodes = 4
    gpus_per_node = 8
    partition = "gpu"
    time = "72:00:00"

With mode = "slurm", `graft run` writes the stage's config as TOML and an sbatch script (what
`graft train --config TOML --emit-slurm FILE` writes) under {runs}/{name}/launch/, prints the
`sbatch` command and stops: the stages after it need its output. Once the job has written the
stage's manifest.json, the next `graft run` records the stage as done and carries on. Only stage
kinds with a launcher (continual.train) accept mode = "slurm".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GraftError

MODES = ("local", "slurm")


@dataclass
class LaunchSpec:
    mode: str = field(default="local", metadata={"help": "local (in this process) or slurm (write an sbatch script)"})
    config: str = field(default="ddp", metadata={"help": "accelerate config: ddp, deepspeed-zero2, deepspeed-zero3, "
                                                         "fsdp, or a YAML file"})
    nodes: int = field(default=1, metadata={"help": "nodes"})
    gpus_per_node: int = field(default=8, metadata={"help": "GPUs per node"})
    cpus_per_task: int = field(default=32, metadata={"help": "CPUs per node task"})
    partition: str = field(default="", metadata={"help": "Slurm partition"})
    time: str = field(default="72:00:00", metadata={"help": "Slurm time limit"})


def emit_train_slurm(cfg: Any, spec: LaunchSpec, home: Path, stage: str) -> tuple[Path, Path]:
    """Write {home}/launch/{stage}.toml and {stage}.sbatch for a continual TrainConfig; return both paths."""
    import tomli_w

    from common.io import atomic_write_text, to_jsonable
    from continual import launcher

    cfg.validate()
    folder = home / "launch"
    toml_path = folder / f"{stage}.toml"
    values = {k: v for k, v in to_jsonable(dataclasses.asdict(cfg)).items() if v is not None}
    # Each process of the job reads this file; absolute paths keep it independent of the job's cwd.
    for key in ("model", "train_data", "out", "dev_data", "tokenizer"):
        if isinstance(values.get(key), str) and values[key]:
            values[key] = str(Path(values[key]).resolve())
    launch_cfg = launcher.read_launch_config(launcher.config_path(spec.config))
    launcher.check_train_config_for(launch_cfg, cfg, toml_path)
    atomic_write_text(toml_path, "# Written by `graft run` for stage " + stage + "\n" + tomli_w.dumps(values))
    script = launcher.slurm_script(spec.config, toml_path, nodes=spec.nodes, gpus_per_node=spec.gpus_per_node,
                                   cpus_per_task=spec.cpus_per_task, time=spec.time,
                                   partition=spec.partition or None, job_name=f"graft-{stage}",
                                   log_dir=folder, grad_accum=cfg.grad_accum)
    sbatch = folder / f"{stage}.sbatch"
    atomic_write_text(sbatch, script)
    return toml_path, sbatch


LAUNCHERS = {"continual.train": emit_train_slurm}


def check_launch(kind: str, spec: LaunchSpec) -> None:
    if spec.mode not in MODES:
        raise GraftError(f"mode = {spec.mode!r}. Fix: use one of {', '.join(MODES)}")
    if spec.mode == "slurm" and kind not in LAUNCHERS:
        raise GraftError(f"kind {kind!r} cannot run as a Slurm job. Fix: remove the launch table, or use "
                         f"mode = \"local\" (Slurm launch exists for: {', '.join(LAUNCHERS)})")
