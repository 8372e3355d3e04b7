"""Build the QLoRA model: NF4 4-bit base (experts included), LoRA adapters, trainable embeddings.

Checks that fail early with a clear message: a tokenizer whose size differs from the embeddings,
a LoRA target the model lacks, a new-rows start outside the vocabulary.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from common.checkpoint import torch_dtype
from common.errors import GraftError, input_error
from common.io import read_json
from continual import arch as A

# Kept out of 4-bit: routers and shared-expert gates (a 4-bit router crashes CPU eval and is tiny anyway) and
# lm_head, the output layer (trainable in most runs, and precision-critical); per architecture: continual/arch.py.
EMBED_NAMES = ("embed_tokens", "lm_head")


def resolve_compute_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch_dtype(name)


def quantization_config(compute_dtype, quant_storage: str = "uint8", skip: list[str] | None = None):
    """NF4 + double quantization; every Linear is 4-bit except `skip` (default: every router/gate name of
    continual/arch.py's table, and lm_head)."""
    from transformers import BitsAndBytesConfig

    skip = list(skip) if skip is not None else [*A.ALL_SKIPS, A.OUTPUT]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch_dtype(quant_storage),
                              llm_int8_skip_modules=skip)


def disable_cpu_repack(model) -> int:
    """Switch off bitsandbytes' AVX512-BF16 CPU repacking on every Linear4bit; returns how many.

    A no-grad eval forward otherwise repacks the 4-bit weights in place (bnb 0.50 on CPU), and later
    training/merging silently computes with wrong weights (see docs/continual.md, tested in
    tests/test_continual_train.py::test_eval_then_train_gradients_match_fresh_model).
    """
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise input_error(model_dir, "has no config.json (not a Hugging Face model folder)",
                          "pass the folder written by `graft embed init` or a downloaded HF checkpoint")
    return read_json(path)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a folder without tokenizer files
        raise input_error(path, f"cannot load a tokenizer ({type(e).__name__}: {e})",
                          "pass --tokenizer with a folder holding tokenizer.json/tokenizer.model "
                          "(e.g. the output of `graft vocab merge`)") from None


def check_tokenizer_matches(tokenizer, vocab_size: int, tok_path: str | Path, model_path: str | Path) -> None:
    """len(tokenizer) must equal the embedding rows, or the unpadded vocabulary `graft embed init` recorded
    (it may pad the matrices to a multiple of 64 rows)."""
    padded_to = None
    manifest = Path(model_path) / "manifest.json"
    if manifest.is_file():
        counts = read_json(manifest).get("counts", {})
        if counts.get("rows") == vocab_size and isinstance(counts.get("new_vocab"), int):
            padded_to = counts["new_vocab"]
    if len(tokenizer) not in (vocab_size, padded_to):
        raise input_error(tok_path, f"the tokenizer has {len(tokenizer)} tokens but the model {model_path} has "
                                    f"{vocab_size} embedding rows",
                          "pass the tokenizer the model was grown for (run `graft embed init` with this "
                          "tokenizer to resize the model)")


def find_new_rows_start(model_dir: str | Path, vocab_size: int, explicit: int | None) -> int:
    """First id of the added vocabulary: explicit, else `old_vocab_size` from the model's manifest."""
    start = explicit
    if start is None:
        manifest = Path(model_dir) / "manifest.json"
        if manifest.is_file():
            start = _find_key(read_json(manifest), ("old_vocab_size", "old_vocab", "base_vocab_size"))
    if start is None:
        raise input_error(model_dir, "embeddings = new-rows needs the first id of the added rows, and the model's "
                                     "manifest.json does not record old_vocab_size",
                          "set new_rows_start (e.g. 32000 for Mixtral's base vocabulary)")
    if not 0 < int(start) < vocab_size:
        raise GraftError(f"new_rows_start = {start} but the vocabulary has {vocab_size} rows. Fix: set it to the "
                         f"base vocabulary size (the model has no added rows if it equals {vocab_size})")
    return int(start)


def _find_key(obj: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(obj, dict):
        for k in keys:
            if isinstance(obj.get(k), int):
                return obj[k]
        for v in obj.values():
            found = _find_key(v, keys)
            if found is not None:
                return found
    return None


def lora_targets(model_path: str | Path, targets: list[str]) -> list[str]:
    """The LoRA target names: continual/arch.py's table for ["auto"], else `targets` as given."""
    return A.resolve_targets(model_path, read_model_config(model_path), targets)


def check_target_modules(model, targets: list[str], model_path: str | Path) -> None:
    """Every LoRA target (resolved by lora_targets) must name at least one Linear of the model (peft only errs if
    none match)."""
    import torch
    import bitsandbytes as bnb

    linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                           if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))})
    def matches(t: str, n: str) -> bool:
        try:
            return re.fullmatch(t, n) is not None
        except re.error:
            return False

    missing = [t for t in targets if t not in linear_names and not any(matches(t, n) for n in linear_names)]
    if missing:
        raise input_error(model_path, f"target_modules names {', '.join(repr(m) for m in missing)}, which the model "
                                      f"does not have", f"set target_modules to some of its linear layers: "
                                                        f"{', '.join(linear_names)} (or auto, see continual/arch.py)")


def load_base_4bit(model_dir: str | Path, compute_dtype, quant_storage: str = "uint8", device_map=None):
    """The base model with every large Linear (attention and MoE experts) in NF4."""
    import torch
    from transformers import AutoModelForCausalLM

    # Non-quantized tensors (embeddings, norms, router) in the compute dtype; 4-bit storage per quant_storage.
    kwargs = {"device_map": device_map} if device_map is not None else {}
    skip = A.skip_modules(read_model_config(model_dir), A.checkpoint_shapes(model_dir))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), quantization_config=quantization_config(compute_dtype, quant_storage, skip),
            dtype=compute_dtype if compute_dtype != torch.float16 else torch.float32, low_cpu_mem_usage=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise input_error(model_dir, f"cannot load the model ({type(e).__name__}: {str(e)[:300]})",
                          "check the folder is a complete HF checkpoint (config.json, *.safetensors, index)") from None
    disable_cpu_repack(model)
    return model


def add_adapters(model, cfg, vocab_size: int, new_rows_start: int | None, targets: list[str] | None = None):
    """Wrap the 4-bit model with LoRA (+ trainable embeddings per cfg.embeddings); returns the PeftModel.

    `vocab_size` here is the tokenizer's size: in new-rows mode rows [new_rows_start, vocab_size) train
    (padding rows past the tokenizer never occur in data and stay frozen). `targets`: the LoRA targets as
    lora_targets resolved them (default: resolved here)."""
    import torch
    from peft import LoraConfig, get_peft_model

    kw: dict[str, Any] = {}
    if cfg.embeddings == "full":
        kw["modules_to_save"] = list(EMBED_NAMES)
    elif cfg.embeddings == "new-rows":
        rows = list(range(new_rows_start, vocab_size))
        kw["trainable_token_indices"] = {name: rows for name in EMBED_NAMES}
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets or lora_targets(cfg.model, cfg.target_modules), bias="none",
                      task_type="CAUSAL_LM",
                      **kw)
    torch.manual_seed(cfg.seed)  # LoRA A init
    model = get_peft_model(model, lora)
    # Trainable weights (LoRA, embedding copies/rows) live in float32 for stable AdamW updates, even when the
    # frozen base computes in bf16 (the forward runs under autocast then; under FSDP each trainable leaf is a
    # unit of its own, see continual.train._fsdp_units).
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    disable_cpu_repack(model)
    return model


def embedding_param_names(model) -> set[str]:
    """Trainable parameters that belong to embed_tokens/lm_head (they get embedding_lr)."""
    return {n for n, p in model.named_parameters()
            if p.requires_grad and any(f".{e}." in f".{n}." for e in EMBED_NAMES) and "lora_" not in n}


def count_4bit_params(model) -> dict[str, int]:
    """Logical parameters held in 4-bit (Linear4bit) vs in other dtypes, and bytes of each."""
    import bitsandbytes as bnb

    q_params = q_bytes = o_params = o_bytes = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = m.weight
            seen.add(id(w))
            q_params += m.in_features * m.out_features
            q_bytes += w.numel() * w.element_size()
            qs = getattr(w, "quant_state", None)
            if qs is not None:
                q_bytes += sum(t.numel() * t.element_size() for t in _quant_state_tensors(qs))
    for p in model.parameters():
        if id(p) not in seen:
            o_params += p.numel()
            o_bytes += p.numel() * p.element_size()
    return {"params_4bit": q_params, "bytes_4bit": q_bytes, "params_other": o_params, "bytes_other": o_bytes}


def _quant_state_tensors(qs):
    import torch

    out = [getattr(qs, "absmax", None), getattr(qs, "code", None)]
    if getattr(qs, "state2", None) is not None:
        out += [qs.state2.absmax, qs.state2.code, getattr(qs, "offset", None)]
    return [t for t in out if isinstance(t, torch.Tensor)]
