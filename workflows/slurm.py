"""Slurm for `graft run --executor slurm`: per-stage resources, job scripts, and the Slurm commands.

Why plain `sbatch` rather than submitit (as datatrove's executor does): a stage job must run shell
(the train stage is `srun` + `accelerate launch` on every node), jobs are chained with
`--dependency=afterok` before their upstream has run, and `graft status` must work from any later
process, on clusters with or without accounting. submitit pickles one Python callable per job, and
reads job state through `sacct`, which reports nothing where accounting storage is off (as on the
one-node test cluster). So this module calls sbatch/squeue/sacct/scancel itself; each stage job
runs `graft run-stage`, which writes per-task completion markers (datatrove style).

The `[slurm]` table of a workflow:

    [slurm]                     # defaults for every stage
    partition = "cpu"
    account = "myproject"
    time = "24:00:00"
    cpus_per_task = 8
    sbatch_lines = ["--qos=normal"]          # extra sbatch options, one per entry
    setup = ["source /shared/venv/bin/activate"]   # shell lines run before the stage

    [slurm.prep_skypile]        # a stage's own settings (any key above, plus tasks)
    tasks = 32                  # corpus.prepare: array tasks (0: one per input file)

    [slurm.train]               # the train stage takes nodes/GPUs from [train.launch] unless set here
    partition = "gpu"
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GraftError

MAX_AUTO_TASKS = 256
SLURM_DIR = "slurm"  # under the workflow's home: scripts, logs/, markers/

# Slurm job states -> what `graft status` shows.
_STATE_WORDS = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "RESV_DEL_HOLD": "pending",
    "SUSPENDED": "running", "RUNNING": "running", "CONFIGURING": "running", "COMPLETING": "running",
    "RESIZING": "running", "STAGE_OUT": "running", "SIGNALING": "running",
    "COMPLETED": "completed",
    "FAILED": "failed", "NODE_FAIL": "failed", "BOOT_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "DEADLINE": "failed", "PREEMPTED": "failed", "REVOKED": "cancelled", "SPECIAL_EXIT": "failed",
    "CANCELLED": "cancelled", "TIMEOUT": "timeout",
}
LIVE = ("pending", "running")


@dataclass
class SlurmResources:
    """What one stage asks Slurm for."""

    partition: str = field(default="", metadata={"help": "partition (default: the cluster's default)"})
    account: str = field(default="", metadata={"help": "account to charge"})
    time: str = field(default="24:00:00", metadata={"help": "time limit (train: from [train.launch])"})
    cpus_per_task: int = field(default=4, metadata={"help": "CPUs per task"})
    mem: str = field(default="", metadata={"help": "memory per node, e.g. 64G (default: the partition's)"})
    nodes: int = field(default=1, metadata={"help": "nodes (train only; from [train.launch])"})
    gpus_per_node: int = field(default=0, metadata={"help": "GPUs per node (train: from [train.launch])"})
    tasks: int = field(default=0, metadata={"help": "corpus.prepare: array tasks, 0 = one per input file"})
    sbatch_lines: list[str] = field(default_factory=list, metadata={"help": "extra sbatch options"})
    setup: list[str] = field(default_factory=list, metadata={"help": "shell lines run before the stage"})


@dataclass
class SlurmSpec:
    """The workflow's [slurm] table: defaults plus per-stage overrides (only the keys written)."""

    defaults: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_slurm_table(table: Any, stage_names: list[str], errors: list[str]) -> SlurmSpec:
    """Validate `[slurm]`: scalar keys are defaults, sub-tables are per-stage settings."""
    from workflows.spec import _describe, _suggest, coerce_table

    spec = SlurmSpec()
    if not isinstance(table, dict):
        errors.append(f"[slurm] must be a table, got {_describe(table)}")
        return spec
    spec.defaults = coerce_table(SlurmResources, {k: v for k, v in table.items() if not isinstance(v, dict)},
                                 "[slurm]", errors)
    for name, sub in table.items():
        if not isinstance(sub, dict):
            continue
        if name not in stage_names:
            errors.append(f"[slurm.{name}] names no stage{_suggest(name, stage_names)}. Fix: use a stage name "
                          f"({', '.join(stage_names)})")
            continue
        spec.stages[name] = coerce_table(SlurmResources, sub, f"[slurm.{name}]", errors)
    return spec


def stage_resources(stage: Any, spec: SlurmSpec | None) -> SlurmResources:
    """Defaults < [slurm] < the stage's launch table (train) < [slurm.STAGE]."""
    values: dict[str, Any] = dict(spec.defaults) if spec else {}
    launch = getattr(stage, "launch", None)
    if needs_gpus(stage.kind.name) and launch is not None:
        values.update(nodes=launch.nodes, gpus_per_node=launch.gpus_per_node, cpus_per_task=launch.cpus_per_task,
                      time=launch.time)
        if launch.partition:
            values["partition"] = launch.partition
    if spec:
        values.update(spec.stages.get(stage.name, {}))
    return SlurmResources(**values)


def needs_gpus(kind: str) -> bool:
    from workflows.launch import LAUNCHERS

    return kind in LAUNCHERS


def check_resources(stage: Any, res: SlurmResources) -> list[str]:
    """Problems with a stage's resources, found before anything is submitted."""
    where = f"[slurm.{stage.name}]"
    problems = []
    if needs_gpus(stage.kind.name) and res.gpus_per_node < 1:
        problems.append(f"{where} stage {stage.name!r} ({stage.kind.name}) needs GPUs, but gpus_per_node = "
                        f"{res.gpus_per_node}. Fix: set gpus_per_node in [{stage.name}.launch] or [slurm.{stage.name}]")
    if not needs_gpus(stage.kind.name) and res.nodes != 1:
        problems.append(f"{where} nodes = {res.nodes}: stage kind {stage.kind.name!r} runs in one process. "
                        "Fix: remove nodes (only the train stage spans nodes)")
    if res.tasks and not stage.kind.array:
        problems.append(f"{where} tasks = {res.tasks}: stage kind {stage.kind.name!r} does not run as a job array "
                        "(corpus.prepare does). Fix: remove tasks")
    if res.tasks < 0 or res.cpus_per_task < 1 or res.nodes < 1 or res.gpus_per_node < 0:
        problems.append(f"{where} tasks, cpus_per_task, nodes and gpus_per_node must not be negative "
                        "(cpus_per_task and nodes at least 1)")
    if res.time and not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", res.time):
        problems.append(f"{where} time = {res.time!r} is not a Slurm time. Fix: e.g. \"72:00:00\" or \"3-00:00:00\"")
    return problems


# ---------------------------------------------------------------- job scripts

def _header(job_name: str, log: Path, res: SlurmResources, *, gpu_job: bool) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --output={log}",
             f"#SBATCH --cpus-per-task={res.cpus_per_task}"]
    if gpu_job:
        lines += [f"#SBATCH --nodes={res.nodes}", "#SBATCH --ntasks-per-node=1",
                  f"#SBATCH --gres=gpu:{res.gpus_per_node}"]
    else:
        lines += ["#SBATCH --nodes=1", "#SBATCH --ntasks=1"]
    for key, value in (("time", res.time), ("partition", res.partition), ("account", res.account),
                       ("mem", res.mem)):
        if value:
            lines.append(f"#SBATCH --{key}={value}")
    lines += [f"#SBATCH {opt}" if opt.startswith("-") else f"#SBATCH --{opt}" for opt in res.sbatch_lines]
    return lines


def _prologue(res: SlurmResources) -> list[str]:
    # The job runs where `graft run` ran, with the same Python, so relative paths in the workflow hold.
    return ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
            f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",
            "export PYTHONUNBUFFERED=1", *res.setup]


def run_stage_command(wf: Any, stage: str, *extra: str) -> str:
    args = [sys.executable, "-m", "workflows.cli", "run-stage", str(wf.path), "--runs", str(wf.runs),
            "--stage", stage, *extra]
    return " ".join(a if a.startswith("$") else shlex.quote(a) for a in args)


def stage_script(wf: Any, stage: Any, res: SlurmResources, log: Path, *, array: bool, tasks: int = 1,
                 finalize: bool = False) -> str:
    """A CPU stage (or one array task, or an array's finalize step) running `graft run-stage`."""
    name = f"graft-{wf.name}-{stage.name}" + ("-finalize" if finalize else "")
    if array:
        extra = ["--task", "$SLURM_ARRAY_TASK_ID", "--tasks", str(tasks)]
    elif finalize:
        extra = ["--finalize"]
    else:
        extra = []
    cmd = run_stage_command(wf, stage.name, *extra)
    return "\n".join(_header(name, log, res, gpu_job=False) + _prologue(res) + [cmd, ""])


def train_script(wf: Any, stage: Any, res: SlurmResources, log: Path, train_toml: Path) -> str:
    """The train stage: resolve its config, then one `accelerate launch` per node under srun, then record."""
    from continual import launcher

    cmd = launcher.accelerate_command(stage.launch.config, train_toml.resolve(), nodes=res.nodes,
                                      gpus_per_node=res.gpus_per_node, machine_rank="$SLURM_NODEID",
                                      main_ip="$MAIN_ADDR" if res.nodes > 1 else None, main_port="$MAIN_PORT")
    inner = " ".join(c if c.startswith("$") else shlex.quote(c) for c in cmd)
    body = _prologue(res) + [
        run_stage_command(wf, stage.name, "--write-config"),  # writes train_toml
        'export MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MAIN_PORT=${MAIN_PORT:-29500}",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}",
        run_stage_command(wf, stage.name, "--record"), ""]
    return "\n".join(_header(f"graft-{wf.name}-{stage.name}", log, res, gpu_job=True) + body)


# ---------------------------------------------------------------- the Slurm commands

@dataclass
class JobInfo:
    job: str  # "12" or "12_3" (array task)
    state: str  # pending | running | completed | failed | cancelled | timeout
    slurm_state: str  # Slurm's own word
    reason: str = ""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GraftError(f"`{name}` is not on PATH, so Slurm cannot be used from this machine. Fix: run on a "
                         "Slurm login node (or install Slurm's client commands: apt-get install slurm-client), "
                         "or use the local executor (`graft run` without --executor slurm)")
    return path


def available() -> bool:
    return shutil.which("sbatch") is not None


def sbatch(script: Path, *, array: str | None = None, after: list[str] = (), stage: str = "",
           test_only: bool = False) -> str:
    """Submit `script`; returns the job id. Slurm's own error is passed through with the stage's name.

    `test_only`: ask Slurm whether it would accept the job (partition, account, resources) without
    submitting it, so that a bad stage is found before any of the chain is queued.
    """
    cmd = [_tool("sbatch"), "--test-only"] if test_only else [_tool("sbatch"), "--parsable",
                                                               "--kill-on-invalid-dep=yes"]
    if array:
        cmd.append(f"--array={array}")
    if after and not test_only:
        cmd.append("--dependency=afterok:" + ":".join(after))
    proc = subprocess.run(cmd + [str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise GraftError(f"stage {stage!r}: sbatch refused {script}: {msg}. Fix: correct [slurm] / "
                         f"[slurm.{stage}] in the workflow (partition, account, resources) and run again")
    return "" if test_only else proc.stdout.strip().split(";")[0]


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run([_tool("scancel"), *job_ids], capture_output=True, text=True, check=False)


def query(job_ids: list[str]) -> dict[str, JobInfo]:
    """State of each job and array task ('12', '12_3') Slurm still knows: `squeue -t all` (pending,
    running and recently finished jobs, array tasks one per line), then `sacct` for older ones where
    accounting storage exists. Jobs Slurm has forgotten are left out (their markers tell)."""
    wanted = sorted(set(job_ids))
    found: dict[str, JobInfo] = {}
    if not wanted or shutil.which("squeue") is None:
        return found
    proc = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(wanted), "-o", "%i|%T|%r"],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        job, word, reason = (line.split("|") + ["", ""])[:3]
        found[job] = JobInfo(job, _STATE_WORDS.get(word, "failed"), word, "" if reason == "None" else reason)
    missing = set(wanted) - {k.split("_")[0] for k in found}
    if missing and shutil.which("sacct"):
        proc = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,Reason", "-j", ",".join(sorted(missing))],
                              capture_output=True, text=True)
        if proc.returncode == 0 and "disabled" not in proc.stdout + proc.stderr:
            for line in proc.stdout.splitlines():
                job, word, reason = (line.split("|") + ["", ""])[:3]
                word = word.split()[0] if word else "UNKNOWN"  # "CANCELLED by 0"
                found.setdefault(job, JobInfo(job, _STATE_WORDS.get(word, "failed"), word,
                                              "" if reason == "None" else reason))
    return found
