"""Commands of this stage for `graft` (see common/cli.py): `graft train` and `graft merge`."""
from __future__ import annotations

import argparse
import dataclasses

from common.cli import Groups, command, config_from_args
from continual.config import MergeConfig, TrainConfig, load_train_config


def _train_extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="TOML", help="TOML file whose keys are the option names above "
                                                    "(flags given here override it)")
    g = p.add_argument_group("scale-out (writes/prints a command instead of training)")
    g.add_argument("--emit-slurm", metavar="FILE", help="write an sbatch script that runs this config on "
                                                        "--nodes x --gpus-per-node GPUs, then exit")
    g.add_argument("--print-launch", action="store_true", help="print the `accelerate launch` command, then exit")
    g.add_argument("--launch-config", default="ddp", metavar="NAME|YAML",
                   help="ddp, deepspeed-zero2, deepspeed-zero3, fsdp (continual/launch/*.yaml) or an accelerate "
                        "YAML file (default: ddp)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--time", default="72:00:00", help="Slurm time limit (default: 72:00:00)")


def _make_train(ns: argparse.Namespace):
    overrides = config_from_args(TrainConfig, ns)
    set_by_flag = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(TrainConfig)
                   if getattr(ns, f.name, None) is not None}
    cfg = load_train_config(ns.config, **set_by_flag) if ns.config else TrainConfig(**set_by_flag)
    return cfg, ns


def _run_train(arg) -> None:
    cfg, ns = arg
    if ns.emit_slurm or ns.print_launch:
        from pathlib import Path

        from common.errors import GraftError
        from common.io import atomic_write_text
        from continual import launcher

        if not ns.config:
            raise GraftError("--emit-slurm/--print-launch need --config TOML (each process reads it). "
                             "Fix: put the settings in a TOML file")
        cfg.validate()
        path = launcher.config_path(ns.launch_config)
        launcher.check_train_config_for(launcher.read_launch_config(path), cfg, ns.config)
        if ns.print_launch:
            cmd = launcher.accelerate_command(ns.launch_config, Path(ns.config).resolve(), nodes=ns.nodes,
                                              gpus_per_node=ns.gpus_per_node, main_ip="$MAIN_ADDR" if ns.nodes > 1
                                              else None, grad_accum=cfg.grad_accum)
            print(" ".join(cmd))
        if ns.emit_slurm:
            script = launcher.slurm_script(ns.launch_config, ns.config, nodes=ns.nodes,
                                           gpus_per_node=ns.gpus_per_node, partition=ns.partition, time=ns.time,
                                           log_dir=Path(ns.emit_slurm).resolve().parent, grad_accum=cfg.grad_accum)
            atomic_write_text(ns.emit_slurm, script)
            print(f"wrote {ns.emit_slurm}; submit it with: sbatch {ns.emit_slurm}")
        return
    from continual.train import train

    import os

    if cfg.out:  # the re-run rule (common/rerun.py), on every process; settings only
        from common.rerun import check_finished_settings
        from continual.config import TRAIN_VOLATILE

        check_finished_settings(cfg.out, cfg, stage="continual.train", volatile=TRAIN_VOLATILE)
    out = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # one message per job, not per process
        return
    print(f"done: adapter in {out}/adapter, logs in {out}/metrics.csv and {out}/tb; merge it with:\n"
          f"  graft merge --base {cfg.model} --adapter {out}/adapter --out MERGED")


def _run_merge(cfg: MergeConfig) -> None:
    from continual.merge import merge_adapter

    out = merge_adapter(cfg)
    print(f"wrote {out} (a full checkpoint; load it with AutoModelForCausalLM.from_pretrained)")


def register(groups: Groups) -> None:
    p = command(groups, "train", TrainConfig, _run_train, extra_args=_train_extra, make_config=_make_train)
    # Booleans left unset on the command line must not override the TOML file.
    p.set_defaults(**{f.name: None for f in dataclasses.fields(TrainConfig) if f.type in ("bool", bool)})
    command(groups, "merge", MergeConfig, _run_merge)
