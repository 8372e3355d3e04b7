"""`graft merge`: fold a LoRA adapter (+ trained embeddings) into its base checkpoint, shard by shard.

For each LoRA target, W' = W + s·B@A with s = alpha/r (alpha/sqrt(r) for rsLoRA), computed in float32 and
cast to the output dtype. Trained `embed_tokens`/`lm_head`:
- full mode (`modules_to_save`): the trained matrix replaces the base matrix;
- new-rows mode (`trainable_token_indices`): only the trained rows are written into the base matrix.
Every other tensor is copied (whole untouched shards are hard-linked). The work goes through
common.checkpoint.rewrite_checkpoint, which holds one changed tensor at a time: peak memory is about the
largest changed tensor in float32 plus the adapter tensors it needs, never the model.

The merge goes onto the base's *original* full-precision weights. A QLoRA adapter was trained against
dequant(NF4(W)), so the merged model computes with W + ΔW where training saw dequant(NF4(W)) + ΔW; the
difference W - dequant(NF4(W)) is the 4-bit rounding error the adapter never saw. See docs/continual.md.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from common.checkpoint import (CONFIG_FILE, Checkpoint, TensorPlan, copy_side_files, open_checkpoint,
                               read_shard_header, rewrite_checkpoint, safetensors_dtype, torch_dtype)
from common.errors import GraftError, input_error
from common.io import atomic_path, atomic_write_json, read_json, remove_stale_temps, write_manifest
from common.rerun import guard
from common.tokenizer_files import TOKENIZER_FILES
from continual.config import MergeConfig
from continual.fingerprint import base_fingerprint
from continual.train import ADAPTER_INFO

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_FLOAT = {"F64", "F32", "F16", "BF16"}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # peft matches rank/alpha patterns as a regex against the end of the module name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], Any, dict[str, Any] | None]:
    """(adapter_config, validated safetensors header, graft_adapter.json or None) with clear errors."""
    d = Path(adapter_dir)
    cfg_path, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise input_error(d, f"no {ADAPTER_CONFIG} here (not a peft adapter folder)",
                          "pass OUT/adapter of `graft train`")
    try:
        acfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise input_error(cfg_path, f"not valid JSON ({e.msg})", "re-run `graft train` or restore the file",
                          line=e.lineno) from None
    if acfg.get("peft_type") != "LORA":
        raise input_error(cfg_path, f"peft_type is {acfg.get('peft_type')!r}, only LORA adapters can be merged",
                          "pass a LoRA adapter")
    if acfg.get("use_dora"):
        raise input_error(cfg_path, "DoRA adapters are not supported by the shard-wise merge",
                          "merge it with peft's merge_and_unload")
    if acfg.get("fan_in_fan_out"):
        raise input_error(cfg_path, "fan_in_fan_out adapters (Conv1D models) are not supported",
                          "merge it with peft's merge_and_unload")
    header = read_shard_header(weights)  # raises on a missing/truncated/corrupt file
    info_path = d / ADAPTER_INFO
    info = read_json(info_path) if info_path.is_file() else None
    return acfg, header, info


def _token_rows(acfg: dict[str, Any], module: str) -> list[int]:
    tti = acfg.get("trainable_token_indices")
    if isinstance(tti, dict):
        for key, rows in tti.items():
            if module == key or module.endswith("." + key):
                return list(rows)
    elif isinstance(tti, list) and module.endswith("embed_tokens"):
        return list(tti)
    raise GraftError(f"the adapter trains token rows of {module!r} but adapter_config.json lists no "
                     "trainable_token_indices for it. Fix: re-save the adapter with peft")


def plan_merge(base: Checkpoint, adapter_dir: Path, acfg: dict[str, Any], header, out_dtype) -> tuple[
        dict[str, TensorPlan], dict[str, int]]:
    """Map every adapter tensor onto a base tensor and plan the rewritten tensors (no weights read yet)."""
    from safetensors import safe_open

    weights = str(adapter_dir / ADAPTER_WEIGHTS)
    fix_base = ("pass the base the adapter was trained on (the `model` of its `graft train` run; for a grown "
                "vocabulary, the output of `graft embed init`)")
    loras: dict[str, dict[str, str]] = {}
    replace: dict[str, str] = {}
    rows: dict[str, tuple[str, list[int]]] = {}
    for key in header.tensors:
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if m := re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name):
            loras.setdefault(m.group(1), {})[m.group(2)] = key
        elif m := re.fullmatch(r"(.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?", name):
            rows[m.group(1) + ".weight"] = (key, _token_rows(acfg, m.group(1)))
        elif re.search(r"\.lora_(embedding_)?[AB]|lora_magnitude", name):
            raise input_error(adapter_dir / ADAPTER_WEIGHTS, f"unsupported adapter tensor {key!r}",
                              "only LoRA on Linear layers, modules_to_save and trainable tokens can be merged")
        else:
            replace[re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)] = key

    plan: dict[str, TensorPlan] = {}
    counts = {"lora_merged": 0, "replaced": 0, "rows_patched": 0, "cast": 0}

    def st_dtype(info) -> str:
        return safetensors_dtype(out_dtype) if (out_dtype is not None and info.dtype in _FLOAT) else info.dtype

    def get_adapter(key: str):
        with safe_open(weights, "pt") as f:
            return f.get_tensor(key)

    r_default, alpha_default = int(acfg.get("r", 8)), acfg.get("lora_alpha", 8)
    for module, pair in sorted(loras.items()):
        target = module + ".weight"
        if set(pair) != {"A", "B"}:
            raise input_error(adapter_dir / ADAPTER_WEIGHTS, f"{module} has lora_{''.join(pair)} but not both A and B",
                              "re-save the adapter")
        if not base.has(target):
            raise input_error(adapter_dir, f"the adapter adapts {module!r}, which the base {base.dir} does not have: "
                                           "it was trained for another base", fix_base)
        info = base.info(target)
        a, b = header.tensors[pair["A"]], header.tensors[pair["B"]]
        r = a.shape[0]
        if len(info.shape) != 2 or a.shape[1] != info.shape[1] or b.shape != (info.shape[0], r):
            raise input_error(adapter_dir, f"LoRA of {module} is B{list(b.shape)}@A{list(a.shape)} but the base "
                                           f"weight is {list(info.shape)}: the adapter was trained for another base",
                              fix_base)
        r_cfg = int(_pattern_value(acfg.get("rank_pattern"), module, r_default))
        alpha = float(_pattern_value(acfg.get("alpha_pattern"), module, alpha_default))
        if r_cfg != r:
            raise input_error(adapter_dir / ADAPTER_CONFIG, f"{module} has rank {r} in the weights but {r_cfg} in "
                                                            "the config", "re-save the adapter with peft")
        scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r

        def produce(target=target, pair=pair, scale=scale, dtype=st_dtype(info)):
            w = base.read_tensor(target).float()
            w.addmm_(get_adapter(pair["B"]).float(), get_adapter(pair["A"]).float(), alpha=scale)
            return w.to(torch_dtype(dtype)).contiguous()

        plan[target] = TensorPlan(info.shape, st_dtype(info), produce)
        counts["lora_merged"] += 1

    for target, key in sorted(replace.items()):
        if not base.has(target):
            raise input_error(adapter_dir, f"the adapter holds a trained {target!r}, which the base {base.dir} "
                                           "does not have (tied embeddings, or another base)", fix_base)
        info, got = base.info(target), header.tensors[key].shape
        if got != info.shape:
            raise input_error(adapter_dir, f"the adapter's {target} is {list(got)} but the base's is "
                                           f"{list(info.shape)}: it was trained for a vocabulary of {got[0]} rows "
                                           f"and the base has {info.shape[0]}", fix_base)

        def produce(key=key, dtype=st_dtype(info)):
            return get_adapter(key).to(torch_dtype(dtype)).contiguous()

        plan[target] = TensorPlan(info.shape, st_dtype(info), produce)
        counts["replaced"] += 1

    for target, (key, idx) in sorted(rows.items()):
        if not base.has(target):
            raise input_error(adapter_dir, f"the adapter trains rows of {target!r}, which the base does not have",
                              fix_base)
        info, got = base.info(target), header.tensors[key].shape
        if got != (len(idx), info.shape[1]) or (idx and max(idx) >= info.shape[0]):
            raise input_error(adapter_dir, f"the adapter trains {len(idx)} rows up to id {max(idx) if idx else '-'} "
                                           f"of {target} (width {got[1]}) but the base's is {list(info.shape)}: it "
                                           "was trained for another vocabulary size", fix_base)

        def produce(target=target, key=key, idx=idx, dtype=st_dtype(info)):
            import torch

            w = base.read_tensor(target).to(torch_dtype(dtype))
            w[torch.tensor(idx)] = get_adapter(key).to(w.dtype)
            return w.contiguous()

        plan[target] = TensorPlan(info.shape, st_dtype(info), produce)
        counts["rows_patched"] += len(idx)

    if out_dtype is not None:  # every other floating tensor is cast too
        for name in base.weight_map:
            info = base.info(name)
            if name not in plan and info.dtype in _FLOAT and info.dtype != st_dtype(info):
                def produce(name=name, dtype=st_dtype(info)):
                    return base.read_tensor(name).to(torch_dtype(dtype)).contiguous()

                plan[name] = TensorPlan(info.shape, st_dtype(info), produce)
                counts["cast"] += 1
    return plan, counts


def check_adapter_base(base: Checkpoint, info: dict[str, Any] | None, adapter_dir: Path, allow_other: bool) -> None:
    """An adapter written by `graft train` records its base's vocabulary and fingerprint: compare them."""
    if not info:
        return
    vocab = base.config.get("vocab_size")
    if info.get("vocab_size") is not None and info["vocab_size"] != vocab:
        raise input_error(adapter_dir, f"the adapter was trained for a vocabulary of {info['vocab_size']} rows, the "
                                       f"base {base.dir} has {vocab}",
                          f"pass the base it was trained on ({info.get('base')})")
    want = info.get("base_fingerprint")
    if want and not allow_other:
        have = base_fingerprint(base.dir)
        if have != want:
            what = "configuration" if have["config"] != want["config"] else "weights"
            raise input_error(adapter_dir, f"the adapter was trained on another base ({what} differ from "
                                           f"{info.get('base')})",
                              "pass that base as --base, or --allow-other-base if you know the weights are "
                              "equivalent")


def _tokenizer_size(folder: Path) -> tuple[int, Path] | None:
    """Pieces (with added tokens) of the tokenizer files in `folder`, or None when it has none."""
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True), \
                folder / "tokenizer.json"
        except Exception as e:  # the tokenizers library raises its own exception types
            raise input_error(folder / "tokenizer.json", f"not a readable tokenizer ({e})",
                              "re-save the adapter's tokenizer, or remove it to use the base's") from None
    if (folder / "tokenizer.model").is_file():
        from common.tokenizer_files import load_model_proto

        return len(load_model_proto(folder / "tokenizer.model").pieces), folder / "tokenizer.model"
    return None


def check_plain_adapter(base: Checkpoint, acfg: dict[str, Any], adapter_dir: Path, allow_other: bool,
                        warn=print) -> str:
    """A plain peft adapter (no graft_adapter.json) names its base only in `base_model_name_or_path`.
    A local folder there is compared with --base (same folder, or the same fingerprint: configuration and
    weight probes); a name that is not a folder here cannot be compared and gives a warning. The adapter's
    own tokenizer, which the merged folder takes, must fit the base's vocabulary. Shapes are checked tensor by
    tensor in plan_merge. Returns what was concluded (recorded in the manifest)."""
    vocab = base.config.get("vocab_size")
    tok = _tokenizer_size(adapter_dir)
    if tok is not None and vocab is not None and tok[0] > vocab:
        raise input_error(tok[1], f"the adapter's tokenizer has {tok[0]} pieces but the base {base.dir} has a "
                                  f"vocabulary of {vocab} rows: it was trained for a grown vocabulary",
                          "pass the base it was trained on (for a grown vocabulary, the output of `graft embed init`)")
    named = acfg.get("base_model_name_or_path")
    where = adapter_dir / ADAPTER_CONFIG
    if not named:
        warn(f"graft merge: warning: {where} does not name its base (base_model_name_or_path is empty); merging "
             f"onto {base.dir} with only the tensor shapes checked")
        return "unnamed; shapes checked"
    p = Path(named)
    if not p.is_dir():
        warn(f"graft merge: warning: {where}: base_model_name_or_path is {named!r}, which is not a folder here, so "
             f"its weights cannot be compared with {base.dir}; shapes and vocabulary size were checked. Make sure "
             "it is the same model")
        return f"named {named!r}, not a local folder; shapes checked"
    if p.resolve() == Path(base.dir).resolve():
        return "same folder"
    have, want = base_fingerprint(base.dir), base_fingerprint(p)
    if have == want:
        return f"named {named!r}: same configuration and weight probes"
    what = "configuration" if have["config"] != want["config"] else "weights"
    if allow_other:
        warn(f"graft merge: warning: the adapter was trained on {named} ({what} differ from {base.dir}); merging "
             "anyway (--allow-other-base)")
        return f"named {named!r}: {what} differ; --allow-other-base"
    raise input_error(where, f"base_model_name_or_path is {named}, whose {what} differ from --base {base.dir}: "
                             "the adapter was trained on another base",
                      f"pass --base {named}, or --allow-other-base if you know the weights are equivalent")


def merge_adapter(cfg: MergeConfig) -> Path:
    """Write cfg.out: the base with the adapter merged in, as a full HF checkpoint. Returns cfg.out."""
    cfg.validate()
    started = time.time()
    out, adapter_dir = Path(cfg.out), Path(cfg.adapter)
    skip, rerun = guard(cfg, out, stage="continual.merge", inputs={"base": cfg.base, "adapter": adapter_dir})
    if skip:
        return out
    out_dtype = None if cfg.dtype == "auto" else torch_dtype(cfg.dtype)
    acfg, header, info = read_adapter(adapter_dir)
    base = open_checkpoint(cfg.base)
    check_adapter_base(base, info, adapter_dir, cfg.allow_other_base)
    plan, counts = plan_merge(base, adapter_dir, acfg, header, out_dtype)  # shapes, tensor by tensor
    remove_stale_temps(out)  # a killed earlier run's partial checkpoint
    base_check = ADAPTER_INFO if info else check_plain_adapter(base, acfg, adapter_dir, cfg.allow_other_base)
    tok_src = adapter_dir if any((adapter_dir / f).is_file() for f in TOKENIZER_FILES) else Path(cfg.base)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        report = rewrite_checkpoint(base, tmp, plan)
        copy_side_files(cfg.base, tmp, skip=lambda p: p.name in TOKENIZER_FILES or p.name == CONFIG_FILE)
        tok_files = [f for f in TOKENIZER_FILES if (tok_src / f).is_file()]
        for f in tok_files:
            (tmp / f).write_bytes((tok_src / f).read_bytes())
        config = dict(base.config)
        config.pop("quantization_config", None)
        if out_dtype is not None:
            name = str(out_dtype).removeprefix("torch.")
            config["torch_dtype"] = name
            if "dtype" in config:
                config["dtype"] = name
        atomic_write_json(tmp / CONFIG_FILE, config)
        write_manifest(tmp, stage="continual.merge", config=cfg, started=started,
                       inputs={"base": str(Path(cfg.base).resolve()), "adapter": str(adapter_dir.resolve()),
                               "tokenizer": str(tok_src.resolve())},
                       counts={**counts, "shards_linked": len(report["linked"]),
                               "shards_copied": len(report["copied"]), "shards_rewritten": len(report["rewritten"]),
                               "total_size": report["total_size"]},
                       lora={"r": acfg.get("r"), "lora_alpha": acfg.get("lora_alpha"),
                             "use_rslora": bool(acfg.get("use_rslora"))},
                       merged_onto="the base's full-precision weights (not the NF4 weights seen in training)",
                       tokenizer_files=tok_files, base_check=base_check, rerun=rerun,
                       shard_files=report["shard_files"], source_shards=report["source_shards"])
    return out
