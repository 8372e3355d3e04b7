"""Several GPUs and nodes on existing engines: `accelerate launch` (DDP, DeepSpeed ZeRO-2/3, FSDP) or
`torchrun` (DDP), with the configs shipped in continual/launch/, and a Slurm sbatch script.

Nothing here starts processes: it builds commands and scripts (tested without GPUs), the user runs them.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from common.errors import GraftError, input_error

LAUNCH_DIR = Path(__file__).parent / "launch"
LAUNCH_CONFIGS = {"ddp": "ddp.yaml", "deepspeed-zero2": "deepspeed_zero2.yaml",
                  "deepspeed-zero3": "deepspeed_zero3.yaml", "fsdp": "fsdp.yaml"}
# The entry point each process runs: the `graft` CLI as a module, so no console-script path is needed.
ENTRY = ["-m", "workflows.cli", "train"]


def config_path(name_or_path: str) -> Path:
    """A shipped config by name (ddp, deepspeed-zero2, deepspeed-zero3, fsdp) or a YAML file path."""
    if name_or_path in LAUNCH_CONFIGS:
        return LAUNCH_DIR / LAUNCH_CONFIGS[name_or_path]
    p = Path(name_or_path)
    if not p.is_file():
        raise GraftError(f"launch config {name_or_path!r} is neither a shipped one ({', '.join(LAUNCH_CONFIGS)}) "
                         "nor a file. Fix: pass one of those names or an accelerate YAML file")
    return p


def read_launch_config(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise input_error(path, f"not valid YAML ({e})", "fix the syntax (see continual/launch/*.yaml)") from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise input_error(path, "not an accelerate config (no distributed_type)",
                          "start from one of continual/launch/*.yaml")
    return data


def check_train_config_for(launch: dict, cfg, where: str | Path) -> None:
    """QLoRA constraints of each engine, checked before a job is queued."""
    kind = launch["distributed_type"]
    zero3 = kind == "DEEPSPEED" and int((launch.get("deepspeed_config") or {}).get("zero_stage", 0)) == 3
    if (kind == "FSDP" or zero3) and cfg.quant_storage != "bfloat16":
        raise input_error(where, f"{'FSDP' if kind == 'FSDP' else 'DeepSpeed ZeRO-3'} shards only float tensors, "
                                 f"but quant_storage = {cfg.quant_storage!r}",
                          'set quant_storage = "bfloat16" in the train config')
    if kind == "FSDP" and cfg.compute_dtype == "float32":
        raise input_error(where, "FSDP flattens each unit into one dtype; compute_dtype float32 with bfloat16 "
                                 "storage mixes dtypes", 'set compute_dtype = "bfloat16" (or "auto")')


def accelerate_command(launch_config: str, train_toml: str | Path, *, nodes: int = 1, gpus_per_node: int = 8,
                       machine_rank: str = "0", main_ip: str | None = None, main_port: int | str = 29500,
                       grad_accum: int | None = None, extra: list[str] | None = None) -> list[str]:
    """`accelerate launch ... -m workflows.cli train --config TOML` for `nodes` x `gpus_per_node` processes."""
    path = config_path(launch_config)
    launch = read_launch_config(path)
    cmd = ["accelerate", "launch", "--config_file", str(path), "--num_machines", str(nodes),
           "--num_processes", str(nodes * gpus_per_node), "--machine_rank", str(machine_rank)]
    if nodes > 1:
        if not main_ip:
            raise GraftError("several nodes need the main node's address. Fix: pass main_ip (the sbatch script "
                             "sets it from $SLURM_JOB_NODELIST)")
        cmd += ["--main_process_ip", main_ip, "--main_process_port", str(main_port)]
    if launch["distributed_type"] == "DEEPSPEED" and grad_accum:
        cmd += ["--gradient_accumulation_steps", str(grad_accum)]
    return cmd + ENTRY + ["--config", str(train_toml)] + list(extra or [])


def torchrun_command(train_toml: str | Path, *, nodes: int = 1, gpus_per_node: int = 8,
                     rdzv_endpoint: str | None = None, extra: list[str] | None = None) -> list[str]:
    """`torchrun` (DDP through accelerate's environment detection) for one or several nodes."""
    cmd = ["torchrun", "--nnodes", str(nodes), "--nproc_per_node", str(gpus_per_node)]
    if nodes > 1:
        if not rdzv_endpoint:
            raise GraftError("several nodes need a rendezvous endpoint HOST:PORT. Fix: pass rdzv_endpoint")
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint]
    return cmd + ENTRY + ["--config", str(train_toml)] + list(extra or [])


def slurm_script(launch_config: str, train_toml: str | Path, *, nodes: int = 1, gpus_per_node: int = 8,
                 cpus_per_task: int = 32, time: str = "72:00:00", partition: str | None = None,
                 job_name: str = "graft-train", log_dir: str | Path = ".", grad_accum: int | None = None) -> str:
    """An sbatch script: one task per node, each running `accelerate launch` for that node's GPUs.

    Re-submitting the same script resumes from the newest checkpoint (train's `resume` is on by default).
    """
    cmd = accelerate_command(launch_config, Path(train_toml).resolve(), nodes=nodes, gpus_per_node=gpus_per_node,
                             machine_rank="$SLURM_NODEID", main_ip="$MAIN_ADDR" if nodes > 1 else None,
                             main_port="$MAIN_PORT", grad_accum=grad_accum)
    # $-variables must expand on each node inside srun, so they stay unquoted there.
    inner = " ".join(c if c.startswith("$") else shlex.quote(c) for c in cmd)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gres=gpu:{gpus_per_node}",
             f"#SBATCH --cpus-per-task={cpus_per_task}", f"#SBATCH --time={time}",
             f"#SBATCH --output={Path(log_dir).resolve()}/%x-%j.out"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["# Written by `graft train --emit-slurm`. Submit with: sbatch THIS_FILE",
              "# Re-submitting resumes from the newest checkpoint in the run's `out` folder.",
              "set -euo pipefail",
              f"cd {shlex.quote(str(Path.cwd()))}",
              f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
              'export MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              "export MAIN_PORT=${MAIN_PORT:-29500}",
              "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}",
              f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}", ""]
    return "\n".join(lines)
