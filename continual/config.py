"""Config dataclasses of `graft train` and `graft merge`, and the TOML loader.

No heavy imports here: `graft --help` imports this module.
TOML keys are exactly the dataclass field names; an unknown key is an error that names it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from common.errors import GraftError, input_error

EMBEDDING_MODES = ("full", "new-rows", "frozen")
# "auto": LoRA targets from the architecture table in continual/arch.py (attention + every expert, shared-expert
# and dense MLP Linear of the model type), checked against the checkpoint's tensors before the model loads.
AUTO_TARGETS = "auto"


def _h(text: str, **kw: Any) -> dict:
    return {"help": text, **kw}


# Cadence of evaluation, logging and checkpoints: changing one must never clear (and so delete the checkpoints
# of) an interrupted multi-day run; `graft train` and the workflow's continual.train stage both leave them out
# of the settings a finished or interrupted output is compared on (common/rerun.py).
TRAIN_VOLATILE = ("save_every", "keep_checkpoints", "resume", "eval_every", "eval_blocks", "log_every")

# Allowed words of TrainConfig's and MergeConfig's choice fields (common/validate.py words the error).
TRAIN_CHOICES = {
    "embeddings": EMBEDDING_MODES, "compute_dtype": ("auto", "bfloat16", "float32"),
    # uint8 is bitsandbytes' default; FSDP needs every parameter of a unit in one float dtype (bfloat16)
    "quant_storage": ("uint8", "bfloat16", "float16", "float32"),
}
MERGE_DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")

# Allowed ranges of TrainConfig's numbers (rules: common/validate.py); None (optional, unset) passes.
TRAIN_RANGES = {
    "learning_rate": ">0", "embedding_lr": ">0", "weight_decay": ">=0", "warmup_ratio": "[0,1]",
    "min_lr_ratio": "[0,1]", "max_grad_norm": ">=0", "lora_r": ">=1", "lora_alpha": ">=1", "lora_dropout": "[0,1)",
    "micro_batch_size": ">=1", "grad_accum": ">=1", "max_steps": ">=0", "epochs": ">=1", "seq_len": ">=2",
    "new_rows_start": ">=1", "router_aux_loss_coef": ">=0", "eval_every": ">=0", "eval_blocks": ">=0",
    "save_every": ">=0", "keep_checkpoints": ">=1", "log_every": ">=1",
}


@dataclass
class TrainConfig:
    """QLoRA continued pretraining (NF4 4-bit base, double quantization, LoRA on attention and every
    MoE expert, trainable embeddings). Plain training loop on `accelerate` (one CPU/GPU, or several GPUs
    and nodes under `accelerate launch` / `torchrun`). Writes checkpoints every `save_every` steps and
    resumes from the last one when re-run with the same `out`. Output: OUT/adapter (peft adapter +
    tokenizer, input of `graft merge`), OUT/metrics.csv, OUT/tb (TensorBoard), OUT/manifest.json.
    Settings come from `--config train.toml` (keys = the option names below with underscores);
    flags given on the command line override the file."""

    model: Optional[str] = field(default=None, metadata=_h("base model folder (HF checkpoint, e.g. the output of `graft embed init`)"))
    train_data: Optional[str] = field(default=None, metadata=_h("training blocks: a `graft corpus prepare` or `graft corpus mix` "
                                                    "folder (its train split), or a `datasets` folder with input_ids"))
    out: Optional[str] = field(default=None, metadata=_h("output folder (checkpoints, logs, final adapter)"))
    dev_data: Optional[str] = field(default=None, metadata=_h(
        "dev blocks for evaluation (default: the dev split of train_data)"))
    tokenizer: Optional[str] = field(default=None, metadata=_h("tokenizer folder (default: the model folder)"))

    embeddings: str = field(default="full", metadata=_h(
        "which embedding rows train: full (embed_tokens + lm_head fully trainable), new-rows (only rows "
        ">= new_rows_start of both, via peft trainable_token_indices; saves memory), frozen"))
    new_rows_start: Optional[int] = field(default=None, metadata=_h(
        "first id of the added vocabulary for new-rows (default: old_vocab_size from the model's manifest.json)"))
    embedding_lr: Optional[float] = field(default=None, metadata=_h(
        "learning rate of embed_tokens/lm_head (default: learning_rate / 2; unsloth advises 2-10x smaller)"))

    lora_r: int = field(default=64, metadata=_h("LoRA rank"))
    lora_alpha: int = field(default=128, metadata=_h("LoRA alpha (scale = alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_h("LoRA dropout"))
    target_modules: list[str] = field(default_factory=lambda: [AUTO_TARGETS], metadata=_h(
        "module names that get LoRA, or auto: attention + every expert, shared-expert and MLP Linear of the "
        "model's architecture (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, Llama, Mistral; routers never); "
        "another architecture needs an explicit list"))

    learning_rate: float = field(default=1e-5, metadata=_h("peak learning rate of the LoRA weights"))
    weight_decay: float = field(default=0.0, metadata=_h("AdamW weight decay"))
    warmup_ratio: float = field(default=0.05, metadata=_h("fraction of steps with linear warmup"))
    min_lr_ratio: float = field(default=0.0, metadata=_h("cosine decays to learning_rate * min_lr_ratio"))
    max_grad_norm: float = field(default=1.0, metadata=_h("gradient clipping (0 = off)"))
    micro_batch_size: int = field(default=1, metadata=_h("blocks per forward pass per process"))
    grad_accum: int = field(default=1, metadata=_h("micro-batches per optimizer step"))
    max_steps: int = field(default=0, metadata=_h("optimizer steps (0 = `epochs` passes over train_data)"))
    epochs: int = field(default=1, metadata=_h("passes over train_data when max_steps is 0"))
    seq_len: Optional[int] = field(default=None, metadata=_h(
        "expected block length; an error if the data has another (default: the data's)"))

    router_aux_loss: bool = field(default=True, metadata=_h(
        "add the MoE load-balancing loss where the architecture has one (Mixtral, Qwen2/3-MoE: sets "
        "output_router_logits, off by default in transformers; DeepSeek and dense models have none)"))
    router_aux_loss_coef: Optional[float] = field(default=None, metadata=_h(
        "its weight (default: the model config's router_aux_loss_coef)"))
    gradient_checkpointing: bool = field(default=True, metadata=_h("recompute activations in backward"))
    compute_dtype: str = field(default="auto", metadata=_h(
        "bfloat16 | float32 | auto (bfloat16 on GPU, float32 on CPU)"))
    quant_storage: str = field(default="uint8", metadata=_h(
        "bnb_4bit_quant_storage: uint8, or bfloat16 for FSDP (all params of a FSDP unit must share a dtype)"))

    eval_every: int = field(default=100, metadata=_h("evaluate on dev every N steps (0 = only at the end)"))
    eval_blocks: int = field(default=0, metadata=_h("dev blocks per evaluation (0 = all)"))
    save_every: int = field(default=100, metadata=_h("checkpoint every N steps (0 = only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=_h("newest checkpoints kept"))
    log_every: int = field(default=1, metadata=_h("write a metrics row every N steps"))
    seed: int = field(default=0, metadata=_h("seed of LoRA init, data order and dropout"))
    resume: bool = field(default=True, metadata=_h("resume from the newest checkpoint in `out`"))
    progress: bool = field(default=True, metadata=_h("show a progress bar with tokens/s"))

    def __post_init__(self) -> None:  # bad values fail when the config is built (CLI, TOML, workflow)
        from common.validate import check_ranges

        check_ranges(self, TRAIN_RANGES, choices=TRAIN_CHOICES)
        if not self.target_modules:
            raise GraftError("target_modules is empty. Fix: name at least one module, e.g. q_proj, or use auto")
        if AUTO_TARGETS in self.target_modules and len(self.target_modules) > 1:
            raise GraftError(f"target_modules = {self.target_modules}: auto stands alone. Fix: use [\"auto\"] or "
                             "list module names only")

    def validate(self) -> "TrainConfig":
        """Ready to run: the paths are set, and fields set after the config was built are checked again."""
        from common.validate import check_required

        self.__post_init__()
        check_required(self, ("model", "train_data", "out"),
                       how="put `{key} = \"...\"` in the TOML file or pass --{flag}")
        return self


@dataclass
class MergeConfig:
    """Merge a `graft train` adapter into its base, shard by shard, into a full HF checkpoint.
    For each LoRA target W += (alpha/r)·B@A in float32, then cast to the output dtype; trained
    embed_tokens/lm_head replace the base matrices (full mode) or only the trained rows (new-rows mode);
    every other tensor is copied. Never holds more than one shard (plus the adapter) in memory.
    The merge goes onto the base's full-precision weights, not the 4-bit ones the adapter was trained
    against (see docs/continual.md)."""

    base: Optional[str] = field(default=None, metadata=_h("base model folder the adapter was trained on"))
    adapter: Optional[str] = field(default=None, metadata=_h("adapter folder: OUT/adapter of `graft train` (or any peft "
                                                 "LoRA folder for this base)"))
    out: Optional[str] = field(default=None, metadata=_h("output folder for the merged checkpoint"))
    dtype: str = field(default="auto", metadata=_h("output dtype: auto (the base's), bf16, fp16, fp32"))
    allow_other_base: bool = field(default=False, metadata=_h(
        "merge even if the base's fingerprint differs from the one the adapter was trained on"))

    def __post_init__(self) -> None:  # a bad dtype fails when the config is built (CLI, workflow file)
        from common.validate import check_ranges

        check_ranges(self, {}, choices={"dtype": MERGE_DTYPES})

    def validate(self) -> "MergeConfig":
        """Ready to run: the three folders are set."""
        from common.validate import check_required

        self.__post_init__()
        check_required(self, ("base", "adapter", "out"), how="pass --{flag} DIR")
        return self


def _check_type(path: Path, key: str, value: Any, tp: Any) -> Any:
    from common.config import Mismatch, coerce, type_name

    is_list = typing.get_origin(_unoptional(tp)) is list
    if isinstance(value, str) and is_list:  # target_modules = "q_proj,v_proj"
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return coerce(value, tp)
    except Mismatch:
        fix = f'write {key} = ["a", "b"]' if is_list and not isinstance(value, list) else f"fix the value of {key}"
        raise input_error(path, f"`{key}` must be {type_name(tp)} (got {value!r})", fix) from None


def _unoptional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def config_from_dict(cls: type, values: dict[str, Any], path: str | Path = "<config>") -> Any:
    """Build `cls` from a dict whose keys must be field names (unknown keys are an error naming them)."""
    path = Path(path)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"valid keys: {', '.join(names)}"
            raise input_error(path, f"unknown key `{key}`", f"remove it ({hint})")
        kwargs[key] = _check_type(path, key, value, hints[key])
    try:
        return cls(**kwargs)
    except GraftError as e:  # an out-of-range value (the config's __post_init__): name the file too
        raise GraftError(f"{path}: {e}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    import tomllib

    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise input_error(path, "file not found", "check the --config path") from None
    except tomllib.TOMLDecodeError as e:
        raise input_error(path, f"not valid TOML ({e})", "fix the syntax") from None
    # A [train] table is accepted too, so one file can hold several stages' settings.
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return data


def load_train_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """TrainConfig from a TOML file; `overrides` (e.g. from the command line) win over the file."""
    values = load_toml(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(TrainConfig, values, path)
