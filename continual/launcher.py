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


# accelerate launch passes a YAML's settings to each process as these environment variables.
_ENV_DS = {"zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE", "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
           "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
           "deepspeed_config_file": "ACCELERATE_DEEPSPEED_CONFIG_FILE",
           "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
           "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
           "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"}
ENV_WHERE = "the launch config (as `accelerate launch` passed it in ACCELERATE_* variables)"


def launch_from_env(env=None) -> dict | None:
    """The settings `accelerate launch` handed this process, in the layout of a launch YAML; None when it was not
    started by `accelerate launch` (one process, or torchrun)."""
    import os

    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        ds = {k: env[v] for k, v in _ENV_DS.items() if env.get(v) not in (None, "", "none", "auto")}
        return {"distributed_type": "DEEPSPEED", "mixed_precision": env.get("ACCELERATE_MIXED_PRECISION", "no"),
                "deepspeed_config": ds}
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return {"distributed_type": "FSDP", "mixed_precision": env.get("ACCELERATE_MIXED_PRECISION", "no")}
    if "ACCELERATE_MIXED_PRECISION" in env:  # DDP (or one process) under accelerate launch
        return {"distributed_type": "MULTI_GPU", "mixed_precision": env["ACCELERATE_MIXED_PRECISION"]}
    return None


def _compute_dtype(cfg, cuda: bool) -> str:
    if cfg.compute_dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return cfg.compute_dtype


def read_deepspeed_json(path: str | Path) -> dict:
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise input_error(path, "file not found (named by deepspeed_config_file)",
                          "fix the path, or drop deepspeed_config_file: graft train writes the DeepSpeed "
                          "config from the train config") from None
    except json.JSONDecodeError as e:
        raise input_error(path, f"not valid JSON ({e.msg})", "fix the syntax", line=e.lineno) from None
    if not isinstance(data, dict):
        raise input_error(path, "not a DeepSpeed config (not a JSON object)", "write a JSON object")
    return data


def _disagree(where, key: str, value, ours, train_key: str, wanted) -> GraftError:
    return input_error(where, f"{key} = {value!r}, but the train config has {train_key} = {ours!r}",
                       f"set {key} to {wanted!r} (or \"auto\"), or remove it: graft train takes it from "
                       f"`{train_key}` in the train config")


def check_train_config_for(launch: dict, cfg, where: str | Path, cuda: bool = True) -> None:
    """A launch config (a YAML, or what `accelerate launch` passed in the environment) must agree with the
    train config and suit QLoRA; checked before a job is queued and again before any model loads.

    `cuda`: whether the processes compute on GPUs (decides compute_dtype = "auto"); a job is queued for GPUs.
    """
    kind = launch["distributed_type"]
    if launch.get("use_cpu") is True and kind in ("DEEPSPEED", "FSDP"):
        raise input_error(where, f"use_cpu: true makes accelerate drop {kind} and run plain DDP on CPU",
                          "set use_cpu: false: graft train runs DeepSpeed on CPU (gloo) by itself when the machine "
                          "has no GPU")
    ds = launch.get("deepspeed_config") or {}
    zero3 = kind == "DEEPSPEED" and int(ds.get("zero_stage", 0)) == 3
    if (kind == "FSDP" or zero3) and cfg.quant_storage != "bfloat16":
        raise input_error(where, f"{'FSDP' if kind == 'FSDP' else 'DeepSpeed ZeRO-3'} shards only float tensors, "
                                 f"but quant_storage = {cfg.quant_storage!r}",
                          'set quant_storage = "bfloat16" in the train config')
    if kind == "FSDP" and cfg.embeddings == "new-rows":
        # peft keeps the new rows' float32 deltas inside the embedding module, next to its frozen bf16 matrix: one
        # FSDP unit of two dtypes, which FSDP cannot flatten (and in bf16 AdamW's small updates would round away).
        raise input_error(where, "FSDP cannot train embeddings = \"new-rows\": peft keeps the float32 row deltas "
                                 "in the same module as the frozen bf16 embedding matrix, and FSDP flattens each "
                                 "unit into one dtype",
                          'use --launch-config deepspeed-zero3 (shards parameters too) or deepspeed-zero2, or '
                          'embeddings = "full"')
    if kind == "FSDP" and cfg.compute_dtype == "float32":
        raise input_error(where, "FSDP flattens each unit into one dtype; compute_dtype float32 with bfloat16 "
                                 "storage mixes dtypes", 'set compute_dtype = "bfloat16" (or "auto")')
    compute = _compute_dtype(cfg, cuda)
    mp = str(launch.get("mixed_precision", "no")).lower()
    if mp not in ("no", {"bfloat16": "bf16", "float32": "no"}[compute]):
        raise input_error(where, f"mixed_precision = {mp!r}, but compute_dtype is {compute} "
                                 f"(train config compute_dtype = {cfg.compute_dtype!r})",
                          "set mixed_precision: 'no' in the launch YAML: graft train takes the precision from "
                          "compute_dtype (bf16 autocast, or DeepSpeed's bf16 section)")
    if kind != "DEEPSPEED":
        return
    checks = [("gradient_accumulation_steps", cfg.grad_accum, "grad_accum"),
              ("gradient_clipping", float(cfg.max_grad_norm), "max_grad_norm")]
    for key, ours, train_key in checks:
        if key in ds and str(ds[key]).lower() != "auto" and float(ds[key]) != float(ours):
            raise _disagree(where, f"deepspeed_config.{key}", ds[key], ours, train_key, ours)
    if ds.get("deepspeed_config_file"):
        deepspeed_config(cfg, launch, world=None, cuda=cuda)  # reads and checks the JSON


def deepspeed_config(cfg, launch: dict, world: int | None, cuda: bool) -> dict:
    """The DeepSpeed JSON config of a run, from the train config: micro batch, gradient accumulation, clipping
    (max_grad_norm) and bf16 (compute_dtype); ZeRO stage and offload from the launch config.

    A `deepspeed_config_file` named by the launch config is the starting point; its values must be "auto" or
    agree with the train config. Optimizer and scheduler stay in graft train's hands. `world`: the number of
    processes (None: not known yet, train_batch_size is then neither checked nor set).
    """
    ds = launch.get("deepspeed_config") or {}
    path = ds.get("deepspeed_config_file")
    conf = read_deepspeed_json(path) if path else {}
    where = path or ENV_WHERE
    for section in ("optimizer", "scheduler"):
        if section in conf:
            raise input_error(where, f"has a `{section}` section, but graft train builds its own (AdamW, warmup + "
                                     "cosine from the train config)", f"remove `{section}`")
    bf16 = _compute_dtype(cfg, cuda) == "bfloat16"
    ours = {"train_micro_batch_size_per_gpu": (cfg.micro_batch_size, "micro_batch_size"),
            "gradient_accumulation_steps": (cfg.grad_accum, "grad_accum"),
            "gradient_clipping": (float(cfg.max_grad_norm), "max_grad_norm")}
    if world is not None:
        ours["train_batch_size"] = (cfg.micro_batch_size * cfg.grad_accum * world,
                                    f"micro_batch_size x grad_accum x {world} processes")
    for key, (value, train_key) in ours.items():
        have = conf.get(key, "auto")
        if have != "auto" and float(have) != float(value):
            raise _disagree(where, key, have, value, train_key, value)
        conf[key] = value
    for section, on in (("bf16", bf16), ("fp16", False)):
        have = (conf.get(section) or {}).get("enabled", "auto")
        if have != "auto" and bool(have) != on:
            raise _disagree(where, f"{section}.enabled", have, cfg.compute_dtype, "compute_dtype", on)
        conf[section] = {**(conf.get(section) or {}), "enabled": on}
    zero = conf.setdefault("zero_optimization", {})
    stage = int(ds.get("zero_stage", zero.get("stage", 2)))
    zero["stage"] = stage
    for key, node in (("offload_optimizer_device", "offload_optimizer"), ("offload_param_device", "offload_param")):
        if ds.get(key) and ds[key] != "none":
            zero.setdefault(node, {})["device"] = ds[key]
    if stage == 3:
        # the final adapter is gathered from the shards (accelerator.get_state_dict needs this)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    conf["steps_per_print"] = 10**9
    return conf


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
