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


def save_tiny_mistral(out: str | Path, *, vocab_size: int = 131072, seed: int = 0, hidden: int = 32,
                      max_shard_size: str | int = "8MB", dtype: str = "float32", bos_token_id: int = 1,
                      eos_token_id: int = 2) -> Path:
    """A tiny dense Mistral (MistralForCausalLM, the architecture of Mistral-Nemo), untied, 2 layers; its
    vocabulary defaults to tekken's 131,072 ids."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
                        tie_word_embeddings=False, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    model = MistralForCausalLM(cfg).to(getattr(torch, dtype))
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


def save_tiny_bytelevel_tokenizer(out: str | Path, texts, *, vocab_size: int = 1000, style: str = "qwen") -> Path:
    """A small byte-level BPE tokenizer folder trained on `texts`, shaped like a real family's tokenizer.json:
    "qwen" (NFC normalizer, Split regex + ByteLevel(use_regex=False), ignore_merges off, <|endoftext|> and
    <|im_start|>/<|im_end|> added after the BPE ids), "llama3" (Llama-3's regex, ignore_merges on, 8 special
    tokens after the BPE ids, BOS <|begin_of_text|> added by the post-processor) or "gpt2" (ByteLevel(use_regex=True),
    <|endoftext|>)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(BPE())
    if style == "qwen":
        tok.normalizer = normalizers.NFC()
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                   r"\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    elif style == "llama3":
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                   r"\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(6)]
    elif style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = ["<|endoftext|>"]
    else:
        raise ValueError(style)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    tok.add_special_tokens(specials)  # after the BPE ids, like Qwen2's and Llama-3's special tokens
    if style == "llama3":
        tok.model.ignore_merges = True
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
        special_map = {"bos_token": bos, "eos_token": "<|end_of_text|>"}
    else:
        special_map = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "unk_token": None,
              "clean_up_tokenization_spaces": False, "model_max_length": 32768, **special_map}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    return out


def tiny_config(model_type: str, vocab_size: int = 32000, hidden: int = 32, layers: int = 2, **kw):
    """A tiny config of an architecture in continual/arch.py's table (untied, BOS 1 / EOS 2 as Mixtral's
    tokenizer): Mixtral, Qwen2-MoE (4 experts + a shared expert), Qwen3-MoE, DeepSeek-V2 (q_proj) and DeepSeek-V3
    (q_a/q_b, first layer dense, 4 routed + 1 shared expert), Llama, Mistral."""
    from transformers import AutoConfig

    if model_type == "mixtral":
        return tiny_mixtral_config(vocab_size=vocab_size, hidden=hidden, layers=layers,
                                   **{"intermediate": 2 * hidden, **kw})
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    moe = dict(moe_intermediate_size=hidden // 2, num_experts_per_tok=2)
    per_type = {
        "llama": {}, "mistral": {"head_dim": hidden // 4},
        "qwen2_moe": {**moe, "num_experts": 4, "shared_expert_intermediate_size": hidden},
        "qwen3_moe": {**moe, "num_experts": 4, "head_dim": hidden // 4},
        **{t: {**moe, "num_key_value_heads": 4, "n_routed_experts": 4, "n_shared_experts": 1, "n_group": 1,
               "topk_group": 1, "first_k_dense_replace": 1, "kv_lora_rank": hidden // 2, "qk_rope_head_dim": 8,
               "qk_nope_head_dim": 8, "v_head_dim": 8, "q_lora_rank": q}
           for t, q in (("deepseek_v2", None), ("deepseek_v3", hidden // 2))},
    }
    return AutoConfig.for_model(model_type, **{**common, **per_type[model_type], **kw})


def save_tiny_model(out: str | Path, model_type: str, *, seed: int = 0, max_shard_size: str | int = "1MB",
                    dtype: str = "float32", **config_kw) -> Path:
    """A randomly initialised tiny model of `model_type` (see tiny_config), saved as safetensors shards."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **config_kw)).to(getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    return Path(out)
