"""Scale-out configs: each shipped accelerate config parses and builds its launcher command (no GPUs here)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

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
    cfg.embeddings = "new-rows"  # FSDP only: one unit would hold float32 row deltas and the bf16 matrix
    with pytest.raises(GraftError, match=r't\.toml: FSDP cannot train embeddings = "new-rows".*Fix: use '
                                         r'--launch-config deepspeed-zero3'):
        launcher.check_train_config_for(launcher.read_launch_config(launcher.config_path("fsdp")), cfg, "t.toml")


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


# ---- launch settings and train config from one source: disagreements are errors before any model loads ----

def _launch_yaml(tmp_path, name: str, edit) -> dict:
    """A shipped launch YAML with `edit` applied (as a user would change it), written and read back."""
    import yaml

    data = yaml.safe_load(launcher.config_path(name).read_text())
    edit(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return launcher.read_launch_config(path)


def test_launch_yaml_that_disagrees_with_the_train_config_is_refused(tmp_path):
    cfg = TrainConfig(model="m", train_data="d", out="o", quant_storage="bfloat16", compute_dtype="float32",
                      micro_batch_size=2, grad_accum=4, max_grad_norm=0.5)
    where = tmp_path / "x.yaml"

    def bf16(d):
        d["mixed_precision"] = "bf16"
    for name in launcher.LAUNCH_CONFIGS:
        if name != "fsdp":  # FSDP has its own compute_dtype rule
            with pytest.raises(GraftError, match=r"mixed_precision = 'bf16', but compute_dtype is float32.*"
                                                 r"Fix: set mixed_precision: 'no'"):
                launcher.check_train_config_for(_launch_yaml(tmp_path, name, bf16), cfg, where)

    def clip(d):
        d["deepspeed_config"]["gradient_clipping"] = 1.0
    with pytest.raises(GraftError, match=r"x\.yaml: deepspeed_config\.gradient_clipping = 1\.0, but the train config "
                                         r"has max_grad_norm = 0\.5.*Fix: set deepspeed_config\.gradient_clipping "
                                         r"to 0\.5"):
        launcher.check_train_config_for(_launch_yaml(tmp_path, "deepspeed-zero2", clip), cfg, where)

    def accum(d):
        d["deepspeed_config"]["gradient_accumulation_steps"] = 2
    with pytest.raises(GraftError, match=r"gradient_accumulation_steps = 2, but the train config has grad_accum = 4"):
        launcher.check_train_config_for(_launch_yaml(tmp_path, "deepspeed-zero3", accum), cfg, where)

    def use_cpu(d):
        d["use_cpu"] = True
    with pytest.raises(GraftError, match=r"use_cpu: true makes accelerate drop DEEPSPEED and run plain DDP on CPU\. "
                                         r"Fix: set use_cpu: false"):
        launcher.check_train_config_for(_launch_yaml(tmp_path, "deepspeed-zero2", use_cpu), cfg, where)

    # a DeepSpeed JSON named by the YAML: its values must be "auto" or agree
    ds_json = tmp_path / "ds.json"

    def use_json(d):
        d["deepspeed_config"] = {"deepspeed_config_file": str(ds_json), "zero3_init_flag": False}
    ds_json.write_text('{\n  "train_micro_batch_size_per_gpu": 4,\n  "zero_optimization": {"stage": 2}\n}\n')
    with pytest.raises(GraftError, match=r"ds\.json: train_micro_batch_size_per_gpu = 4, but the train config has "
                                         r"micro_batch_size = 2.*Fix: set train_micro_batch_size_per_gpu to 2"):
        launcher.check_train_config_for(_launch_yaml(tmp_path, "deepspeed-zero2", use_json), cfg, where)
    ds_json.write_text('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(GraftError, match=r"ds\.json: bf16\.enabled = True, but the train config has compute_dtype"):
        launcher.check_train_config_for(_launch_yaml(tmp_path, "deepspeed-zero2", use_json), cfg, where)
    ds_json.write_text('{"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(GraftError, match=r"ds\.json: has a `optimizer` section.*Fix: remove `optimizer`"):
        launcher.check_train_config_for(_launch_yaml(tmp_path, "deepspeed-zero2", use_json), cfg, where)
    ds_json.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(GraftError, match=r"ds\.json:3: not valid JSON"):
        launcher.check_train_config_for(_launch_yaml(tmp_path, "deepspeed-zero2", use_json), cfg, where)
    ds_json.write_text('{"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.5, '
                       '"zero_optimization": {"stage": 2}}')
    launcher.check_train_config_for(_launch_yaml(tmp_path, "deepspeed-zero2", use_json), cfg, where)
    # the shipped YAMLs take every such setting from the train config, so they agree with it
    for name in ("ddp", "deepspeed-zero2", "deepspeed-zero3"):
        launcher.check_train_config_for(launcher.read_launch_config(launcher.config_path(name)), cfg, where)


# ---- every shipped launcher runs for real: `graft train` under `accelerate launch` with 2 CPU processes (gloo) ----
#
# The model: a tiny Mixtral with 8 experts (top-2) and 1 layer, 4-bit, LoRA, new-rows embeddings, on 8-token
# blocks, one block per process and step: most steps leave experts without a routed token, and many batches hold
# no new id (test_tiny_batches_leave_experts_unrouted shows it), so parameters without a gradient are the rule.
# 5 dev blocks over 2 processes: the ranks' shares of the dev set differ (3 and 2 forward passes).

ENGINES = ["ddp", "deepspeed-zero2", "deepspeed-zero3"]
# The 2-process runs must match one process with grad_accum 2: each step sees the same blocks, the gradients
# are averaged alike, and every engine gives a parameter without a gradient a zero one (AdamW steps it alike).
# Only the order of float32 sums differs (all-reduce vs. local accumulation, ~6e-8 relative per rounding);
# measured gaps are <= 3.4e-7 relative (DDP: 0). REL is 6x that. It still catches a semantic difference:
# before AdamW stepped unused parameters alike in 1 and 2 processes, the gap was 1e-5 after 4 steps.
REL = 2e-6


@pytest.fixture(scope="module")
def moe_ws(tmp_path_factory):
    from tiny_continual import make_blocks, make_tiny_base, make_tokenizer

    root = tmp_path_factory.mktemp("moe_ws")
    make_tokenizer(root / "tok", n_added=64)
    make_tiny_base(root / "base", root / "tok", old_vocab_size=32000, experts=8, layers=1)
    make_blocks(root / "data", root / "tok", block_len=8, n_train=64, n_dev=5)
    return {"tok": root / "tok", "base": root / "base", "data": root / "data"}


def _moe_cfg(ws, out, **kw) -> TrainConfig:
    from tiny_continual import tiny_train_config

    base = dict(embeddings="new-rows", micro_batch_size=1, max_steps=4, save_every=2, eval_every=2,
                lora_dropout=0.0, max_grad_norm=0.5, quant_storage="bfloat16", keep_checkpoints=3)
    base.update(kw)
    return tiny_train_config(ws, out, **base)


def _write_toml(cfg: TrainConfig, path) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps({k: v for k, v in cfg.__dict__.items() if v is not None}))
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run by each process instead of `-m workflows.cli` for the killed run: the process dies hard (os._exit, no
# cleanup, like a kill) when it is about to start micro-batch DIE_AT, i.e. after the step-2 checkpoint.
_DIES = """import os, sys
from continual import data as D
real = D.micro_batches
def dies(*a, **kw):
    for k, item in enumerate(real(*a, **kw)):
        if k == int(os.environ["DIE_AT"]):
            os._exit(17)
        yield item
D.micro_batches = dies
from workflows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _launch(engine: str, toml: Path, processes: int = 2, script: Path | None = None, env: dict | None = None):
    import os
    import subprocess
    import sys

    cmd = launcher.accelerate_command(engine, toml, nodes=1, gpus_per_node=processes)
    cmd[0] = str(Path(sys.executable).parent / "accelerate")
    at = cmd.index("-m")
    cmd[at:at + 2] = [str(script)] if script else cmd[at:at + 2]
    cmd[at:at] = ["--main_process_port", str(_free_port())]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _curve(out):
    from continual.metrics import read_metrics

    return [{k: r[k] for k in ("step", "tokens", "lr", "loss", "aux_loss", "grad_norm", "dev_loss", "dev_bpb")}
            for r in read_metrics(out)]


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_process(moe_ws, tmp_path_factory):
    """The reference: one process, grad_accum 2 (the same 2 blocks per step as 2 processes x 1)."""
    from continual.train import train

    return train(_moe_cfg(moe_ws, tmp_path_factory.mktemp("ref") / "one", grad_accum=2))


def test_tiny_batches_leave_experts_unrouted(moe_ws):
    """The premise of the run tests: their first steps' batches leave experts unrouted, some hold no new id."""
    from continual import data as D
    from continual import model as M

    model = M.load_base_4bit(moe_ws["base"], torch.float32)
    ds = D.load_split(moe_ws["data"], "train")
    batches = D.micro_batches(len(ds), 1, 0, 0, 0, 1)
    unrouted = no_new = 0
    for _ in range(8):  # the blocks of steps 1-4 on both ranks
        _, idx = next(batches)
        ids = torch.tensor(ds[[int(i) for i in idx]]["input_ids"])
        logits = model(input_ids=ids, output_router_logits=True).router_logits[0]
        unrouted += len(set(logits.topk(2, dim=-1).indices.flatten().tolist())) < 8
        no_new += bool((ids < 32000).all())
    assert unrouted >= 4 and no_new >= 1, (unrouted, no_new)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_match_one_and_resume_after_a_kill(engine, moe_ws, one_process, tmp_path):
    import json

    # 1. uninterrupted 2-process run: same curve and dev bits per byte as one process with grad_accum 2
    whole = _moe_cfg(moe_ws, tmp_path / "whole")
    res = _launch(engine, _write_toml(whole, tmp_path / "whole.toml"))
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = _curve(one_process), _curve(whole.out)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4] and [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("lr", "loss", "aux_loss", "grad_norm", "dev_loss", "dev_bpb"):
            assert (ra[k] is None and rb[k] is None) or rb[k] == pytest.approx(ra[k], rel=REL), (k, ra, rb)
    manifest = json.loads((Path(whole.out) / "manifest.json").read_text())
    assert manifest["counts"]["processes"] == 2 and manifest["counts"]["dev_blocks"] == 5
    ck = Path(whole.out) / "checkpoints" / "step-000002"
    state = json.loads((ck / "state.json").read_text())
    assert (state["engine"], state["processes"], state["sharded"]) == (engine, 2, engine != "ddp")
    wa, wb = _adapter(one_process), _adapter(whole.out)
    assert wa.keys() == wb.keys()
    # every tensor, experts that some steps left unrouted included, within 1e-3 of its norm (measured <= 5e-5)
    assert all(float((wa[k] - wb[k]).norm()) <= 1e-3 * float(wa[k].norm()) for k in wa)

    # 2. killed during step 4 (after the step-2 checkpoint), resumed under the same engine: ends equal
    killed = _moe_cfg(moe_ws, tmp_path / "killed")
    toml = _write_toml(killed, tmp_path / "killed.toml")
    script = tmp_path / "dies.py"
    script.write_text(_DIES)
    res = _launch(engine, toml, script=script, env={"DIE_AT": "3"})
    assert res.returncode != 0 and not (Path(killed.out) / "manifest.json").exists()
    assert [p.name for p in (Path(killed.out) / "checkpoints").iterdir() if p.name.startswith("step-")] == \
        ["step-000002"]
    res = _launch(engine, toml)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resuming from" in res.stdout
    assert _curve(killed.out)[-3:] == _curve(whole.out)[-3:]  # steps 3, 4 and the final eval, bit for bit
    wk = _adapter(killed.out)
    assert all(torch.equal(wk[k], wb[k]) for k in wb)
    if engine != "ddp":
        # 3. a sharded checkpoint needs the processes that wrote it: refused before the model loads
        (Path(killed.out) / "manifest.json").unlink()
        res = _launch(engine, toml, processes=1)
        assert res.returncode != 0 and "Loading checkpoint shards" not in res.stderr
        assert ("state.json: this sharded (DeepSpeed/FSDP) checkpoint was written by 2 processes, this run has 1"
                in res.stderr and "Fix: resume with 2 processes" in res.stderr), res.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_on_cpu_is_refused_before_the_model_loads(moe_ws, tmp_path):
    """accelerate 1.15 turns FSDP on only for GPU-type devices; on CPU it would silently run DDP instead."""
    res = _launch("fsdp", _write_toml(_moe_cfg(moe_ws, tmp_path / "o", embeddings="full"), tmp_path / "t.toml"))
    assert res.returncode != 0
    assert "the launch config asks for FSDP, but this machine has no GPU" in res.stderr
    assert "Loading checkpoint shards" not in res.stderr and not (tmp_path / "o").exists()


# FSDP itself runs on CPU (gloo, one process) when wrapped by hand; only accelerate refuses it there. Enough to
# check what the GPU run showed: peft's save_pretrained under FSDP's per-layer units.
_FSDP_SAVE = """import sys, torch, torch.distributed as dist
from safetensors.torch import save_file
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
from transformers import MixtralConfig, MixtralForCausalLM
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from continual.train import _fsdp_trained_weights, save_adapter_weights
torch.manual_seed(0)
cfg = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4)
model = get_peft_model(MixtralForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "w1", "w2", "w3"],
                                                           modules_to_save=["embed_tokens", "lm_head"]))
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.normal_()  # LoRA B starts at zero: make every trained weight distinct
plain = get_peft_model_state_dict(model, save_embedding_layers=False)
save_file({k: v.contiguous() for k, v in plain.items()}, sys.argv[1] + "/plain.safetensors")
wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True, device_id=torch.device("cpu"))
save_adapter_weights(model, sys.argv[1] + "/fsdp", _fsdp_trained_weights(wrapped, model))
"""


def test_fsdp_adapter_holds_every_trained_weight(tmp_path):
    """On the H200 the FSDP run's adapter held only the two embedding copies: peft 0.21.2 strips FSDP's module-name
    prefix only at the start of a name, so every LoRA weight under a decoder-layer unit was left out, silently."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "fsdp_save.py"
    script.write_text(_FSDP_SAVE)
    res = subprocess.run([sys.executable, str(script), str(tmp_path), str(_free_port())], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    plain = load_file(str(tmp_path / "plain.safetensors"))
    saved = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    assert len(plain) == 2 * (2 * (2 + 3 * 4)) + 2  # A and B of q/v and 4 experts' w1-w3, 2 layers; 2 embeddings
    assert saved.keys() == plain.keys()
    assert all(torch.equal(saved[k], plain[k]) for k in plain)
