"""Identify a base model cheaply, so `graft merge` can refuse an adapter trained on another base.

The fingerprint is the architecture-defining config values plus a sha256 over a few small slices of
weights the trainer never changes (final norm, first rows of embed_tokens and of layer 0's q_proj),
read lazily from the safetensors shards: two checkpoints of the same shape but different weights differ.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "num_local_experts", "vocab_size", "tie_word_embeddings")
_PROBES = ("model.norm.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight")


def base_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    from common.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)  # validates the index and shard headers
    h = hashlib.sha256()
    for name in _PROBES:
        if not ckpt.has(name):
            continue
        with safe_open(str(ckpt.info(name).file), "pt") as f:
            sl = f.get_slice(name)
            t = sl[:16] if len(sl.get_shape()) > 1 else sl[:]
        h.update(name.encode())
        h.update(t.float().numpy().tobytes())
    return {"config": {k: ckpt.config.get(k) for k in CONFIG_KEYS}, "weights_sha256": h.hexdigest()}
