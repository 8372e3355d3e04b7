"""Helpers shared by the fault-injection cases (imported as `faultkit`: pytest puts this folder on sys.path)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def make_adapter(base: Path, out: Path, *, name_or_path: str | None = None, seed: int = 0) -> Path:
    """A plain peft LoRA adapter for `base` (no graft_adapter.json), with non-zero B so merging changes weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(out))
    if name_or_path is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = name_or_path
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def flip_byte(path: Path, offset_from_end: int = 64) -> None:
    """Flip one byte near the end of a file (inside the tensor data of a safetensors shard); size unchanged."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.unlink()  # a hard-linked shard must not change its other names
    path.write_bytes(bytes(data))


def tree_bytes(folder: Path, skip=("manifest.json",)) -> dict[str, bytes]:
    """Every file's bytes under `folder` (but run-specific ones), for comparing two outputs."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(x in skip or x.startswith(".") for x in p.relative_to(folder).parts)}


def jsonl(path: Path, texts) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def env_without_gpu() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def candidate_model(base: Path, out: Path, lines, n: int = 40) -> Path:
    """A SentencePiece BPE candidate: the base's pieces plus `n` frequent Chinese pairs (no training needed)."""
    from collections import Counter

    from common.tokenizer_files import load_model_proto

    proto = load_model_proto(base)
    have = {p.piece for p in proto.pieces}
    counts = Counter(l[i:i + 2] for l in lines[:1500] for i in range(len(l) - 1))
    words = [w for w, _ in counts.most_common() if all("\u4e00" <= c <= "\u9fff" for c in w) and w not in have][:n]
    score = min(p.score for p in proto.pieces)
    for i, w in enumerate(words):
        p = proto.pieces.add()
        p.piece, p.score, p.type = w, score - 1 - i, 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    return out
