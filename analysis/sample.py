"""A generated sample from a merged checkpoint (the report's last section), loaded the way the eval stage loads
models (continual.load.plan_load / load_model)."""
from __future__ import annotations

from typing import Any


def generate_samples(plan, prompts: list[str], max_new_tokens: int, seed: int) -> list[dict[str, Any]]:
    """One sampled continuation per prompt: {"prompt", "text", "new_tokens"}. Sampling: top-k 50, top-p 0.9,
    temperature 0.8, repetition penalty 1.2, the torch seed reset to `seed` before each prompt."""
    import torch
    from transformers import AutoTokenizer

    from continual.load import load_model

    model = load_model(plan)
    tok = AutoTokenizer.from_pretrained(plan.folder)
    model.eval()
    samples = []
    for prompt in prompts:
        torch.manual_seed(seed)
        enc = tok(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, top_k=50, top_p=0.9,
                                 temperature=0.8, repetition_penalty=1.2, pad_token_id=tok.eos_token_id)
        text = tok.decode(gen[0], skip_special_tokens=True)
        samples.append({"prompt": prompt, "text": text, "new_tokens": int(gen.shape[1] - enc["input_ids"].shape[1])})
    return samples
