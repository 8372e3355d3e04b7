"""Tiny models built from config, for tests, benchmarks and the demo (no downloads).

`save_tiny_mixtral` writes a real Hugging Face checkpoint folder (safetensors, sharded when
`max_shard_size` is small) with the same module names as Mixtral-8x7B, so every stage runs on
it exactly as on the real model.
"""
from __future__ import annotations

from pathlib import Path


def tiny_mixtral_config(vocab_size: int = 32000, hidden: int = 64, layers: int = 2, experts: int = 4,
                        intermediate: int = 128, heads: int = 4, kv_heads: int = 2, **kw):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **kw)


def save_tiny_mixtral(out: str | Path, *, seed: int = 0, max_shard_size: str | int = "1MB",
                      dtype: str = "float32", **config_kw) -> Path:
    """Build a randomly initialised tiny Mixtral and save it as safetensors shards."""
    import torch
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_mixtral_config(**config_kw)).to(getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    return Path(out)


def save_tiny_llama_tied(out: str | Path, *, vocab_size: int = 32000, seed: int = 0,
                         max_shard_size: str | int = "1MB", dtype: str = "float32") -> Path:
    """A tiny Llama with `tie_word_embeddings=True` (one matrix for embed_tokens and lm_head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    return Path(out)
