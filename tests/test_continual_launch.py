"""Scale-out configs: each shipped accelerate config parses and builds its launcher command (no GPUs here)."""
from __future__ import annotations

import subprocess

import pytest

from common.errors import GraftError
from continual import launcher
from continual.config import TrainConfig, load_train_config


def _accelerate_args(cmd: list[str]):
    """Parse a command with accelerate's own launch parser and fill it from the config file, as
    `accelerate launch` does before starting processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert cmd[:2] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args(cmd[2:])
    args, defaults, mp = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before deepspeed_launcher
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return args, defaults


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("deepspeed-zero2", "DEEPSPEED"),
                                       ("deepspeed-zero3", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_shipped_config_builds_its_launch(name, kind, tmp_path):
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    toml = tmp_path / "train.toml"
    toml.write_text('model = "m"\ntrain_data = "d"\nout = "o"\n')
    path = launcher.config_path(name)
    assert launcher.read_launch_config(path)["distributed_type"] == kind
    cmd = launcher.accelerate_command(name, toml, nodes=2, gpus_per_node=4, machine_rank="1", main_ip="10.0.0.1",
                                      grad_accum=4)
    args, defaults = _accelerate_args(cmd)
    assert defaults.distributed_type.value == kind
    assert (args.num_processes, args.num_machines, args.machine_rank) == (8, 2, 1)
    assert args.module and args.training_script == "workflows.cli"
    assert args.training_script_args == ["train", "--config", str(toml)]
    if kind == "DEEPSPEED":
        assert args.use_deepspeed and args.gradient_accumulation_steps == 4
        assert args.zero_stage == (3 if name.endswith("3") else 2)
        args.deepspeed_multinode_launcher = "standard"  # torchrun-style, one launcher per node (our sbatch)
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(args.zero_stage)
    else:
        env = prepare_multi_gpu_env(args)
        # accelerate turns these into torchrun's arguments
        assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "4", 1)
        assert (getattr(args, "rdzv_endpoint", None) == "10.0.0.1:29500"
                or (getattr(args, "master_addr", None), getattr(args, "master_port", None)) == ("10.0.0.1", "29500"))
        if kind == "FSDP":
            assert env["ACCELERATE_USE_FSDP"] == "true"
            assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
            assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "MixtralDecoderLayer"


def test_engines_that_shard_params_need_float_quant_storage(tmp_path):
    cfg = TrainConfig(model="m", train_data="d", out="o")
    for name in ("fsdp", "deepspeed-zero3"):
        with pytest.raises(GraftError, match='set quant_storage = "bfloat16"'):
            launcher.check_train_config_for(launcher.read_launch_config(launcher.config_path(name)), cfg, "t.toml")
    cfg.quant_storage = "bfloat16"
    for name in launcher.LAUNCH_CONFIGS:
        launcher.check_train_config_for(launcher.read_launch_config(launcher.config_path(name)), cfg, "t.toml")


def test_torchrun_command_parses():
    from torch.distributed.run import get_args_parser

    cmd = launcher.torchrun_command("t.toml", nodes=2, gpus_per_node=8, rdzv_endpoint="host:29400")
    args = get_args_parser().parse_args(cmd[1:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.module) == ("2", "8", "host:29400", True)
    assert args.training_script == "workflows.cli" and args.training_script_args == ["train", "--config", "t.toml"]


def test_emit_slurm_writes_a_valid_sbatch_script(tmp_path):
    from workflows.cli import main

    toml = tmp_path / "train.toml"
    toml.write_text('model = "m"\ntrain_data = "d"\nout = "o"\nquant_storage = "bfloat16"\ngrad_accum = 2\n')
    job = tmp_path / "job.sbatch"
    assert main(["train", "--config", str(toml), "--emit-slurm", str(job), "--launch-config", "fsdp",
                 "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu"]) == 0
    text = job.read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --gres=gpu:8", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu"):
        assert line in text
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0  # shell syntax
    srun = next(x for x in text.splitlines() if x.startswith("srun "))
    inner = srun.split("bash -c ", 1)[1].strip("'")
    # the per-node command, with the variables Slurm sets on each node filled in, parses for accelerate
    cmd = inner.replace("$SLURM_NODEID", "3").replace("$MAIN_ADDR", "node1").replace("$MAIN_PORT", "29500").split()
    args, _ = _accelerate_args(cmd)
    assert (args.num_processes, args.num_machines, args.machine_rank, args.main_process_ip) == (32, 4, 3, "node1")
    assert args.training_script_args == ["train", "--config", str(toml.resolve())]
    # an FSDP job with a config that cannot work is refused before it is queued
    toml.write_text('model = "m"\ntrain_data = "d"\nout = "o"\n')
    assert main(["train", "--config", str(toml), "--emit-slurm", str(job), "--launch-config", "fsdp"]) == 2
    assert load_train_config(toml).quant_storage == "uint8"


def test_corrupt_model_config_and_manifest_name_file_and_line(tmp_path):
    from continual.model import find_new_rows_start, read_model_config

    (tmp_path / "config.json").write_text('{\n  "vocab_size": 38000,\n  oops\n}')
    with pytest.raises(GraftError, match=r"config.json:3: not valid JSON .*Fix: re-run the stage that wrote it"):
        read_model_config(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(GraftError, match=r"manifest.json:1: not valid JSON"):
        find_new_rows_start(tmp_path, 38000, None)
