"""`eval.bpb` stage: dev bits per byte of several checkpoints on the same held-out documents.

Per-token loss cannot compare models with different vocabularies (a longer token carries more
text), so every model is scored on the *same* documents in bits per UTF-8 byte of text:
    bpb = (sum over the document's tokens of -ln p(token | previous)) / ln 2 / bytes(document)
Each document is encoded by the model's own tokenizer as [BOS] + tokens; all its tokens are
predicted exactly once, in windows of `max_len` inputs where each window begins with the last
token of the previous one. float32 by default (bfloat16 for large models); never 4-bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GraftError, input_error
from common.io import atomic_path, atomic_write_json, write_manifest


def bits_per_byte(model, tok, texts: list[str], *, bos: int, max_len: int = 256, batch_size: int = 8) -> dict[str, float]:
    """Summed nats, tokens, bytes, mean loss per token and bits per byte of `texts` under `model`.

    `tok` is a `tokenizers.Tokenizer` (common.tokenizer_files.load_fast_tokenizer).
    """
    import torch
    import torch.nn.functional as F

    if max_len < 2:
        raise GraftError("max_len must be >= 2")
    windows: list[list[int]] = []
    n_bytes = n_tokens = 0
    for enc, text in zip(tok.encode_batch(list(texts), add_special_tokens=False), texts):
        ids = [bos] + enc.ids
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(enc.ids)
        start = 0
        while start < len(ids) - 1:
            windows.append(ids[start:start + max_len])
            start += max_len - 1
    windows.sort(key=len)
    nats = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(windows), batch_size):
            group = windows[lo:lo + batch_size]
            width = max(len(w) for w in group)
            x = torch.zeros((len(group), width), dtype=torch.long)
            y = torch.full((len(group), width), -100, dtype=torch.long)
            for i, w in enumerate(group):
                x[i, :len(w)] = torch.tensor(w)
                y[i, :len(w) - 1] = torch.tensor(w[1:])
            logits = model(input_ids=x.to(model.device), use_cache=False).logits.float()
            nats += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(logits.device).reshape(-1),
                                          ignore_index=-100, reduction="sum"))
    model.train(was_training)
    return {"nats": nats, "tokens": n_tokens, "bytes": n_bytes, "loss": nats / max(1, n_tokens),
            "bpb": nats / math.log(2) / max(1, n_bytes), "tokens_per_byte": n_tokens / max(1, n_bytes)}


@dataclass
class EvalConfig:
    """Dev bits per byte of several checkpoints (each with its own tokenizer) on the same documents."""

    models: list[str] = field(metadata={"help": "HF checkpoint folders, each holding its tokenizer files"})
    labels: list[str] = field(metadata={"help": "a name per model, e.g. base, embed-init, trained"})
    dev: list[str] = field(metadata={"help": "held-out .jsonl files (field text)"})
    out: str = field(metadata={"help": "output folder: bpb.json + manifest.json"})
    max_len: int = field(default=256, metadata={"help": "tokens per evaluation window"})
    max_docs: int = field(default=0, metadata={"help": "documents per dev file (0 = all)"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16 (bfloat16 for large models "
                                                            "on GPU)"})
    device_map: str = field(default="", metadata={"help": "transformers device_map, e.g. auto to spread a large "
                                                         "model over GPUs ('' = CPU, or one GPU when present)"})


def evaluate_models(cfg: EvalConfig) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from common.tokenizer_files import load_fast_tokenizer
    from workflows.demo_base import read_jsonl_texts

    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise GraftError(f"dtype = {cfg.dtype!r}. Fix: use float32, bfloat16 or float16")
    if len(cfg.models) != len(cfg.labels):
        raise GraftError(f"{len(cfg.models)} models but {len(cfg.labels)} labels. Fix: give one label per model")
    started = time.time()
    dev = {Path(p).name.split(".")[0]: read_jsonl_texts([p]) for p in cfg.dev}
    if cfg.max_docs:
        dev = {k: v[:cfg.max_docs] for k, v in dev.items()}
    results: dict[str, Any] = {}
    for label, folder in zip(cfg.labels, cfg.models):
        if not (Path(folder) / "config.json").is_file():
            raise input_error(folder, "has no config.json (not a HF checkpoint)", "point models at checkpoint folders")
        kw = {"device_map": cfg.device_map} if cfg.device_map else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, cfg.dtype), **kw)
        if not cfg.device_map and torch.cuda.is_available():
            model.to("cuda")
        tok = load_fast_tokenizer(folder)
        bos = model.config.bos_token_id if model.config.bos_token_id is not None else tok.token_to_id("<s>")
        results[label] = {"model": str(folder), "vocab_size": int(model.config.vocab_size)}
        for name, texts in dev.items():
            r = bits_per_byte(model, tok, texts, bos=bos, max_len=cfg.max_len, batch_size=cfg.batch_size)
            results[label][name] = r
            print(f"  {label:12s} {name:14s} bpb {r['bpb']:.4f}  loss/token {r['loss']:.4f}  "
                  f"tokens/byte {r['tokens_per_byte']:.4f}")
        del model
    out = Path(cfg.out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        atomic_write_json(tmp / "bpb.json", results)
        write_manifest(tmp, stage="eval.bpb", config=cfg, started=started,
                       inputs={"models": cfg.models, "dev": cfg.dev},
                       counts={f"{lab}/{name}_bpb": round(results[lab][name]["bpb"], 4)
                               for lab in cfg.labels for name in dev},
                       results=results)
    return out
