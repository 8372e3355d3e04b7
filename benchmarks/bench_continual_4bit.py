"""How much of a full-width decoder layer our trainer holds in 4-bit, measured on real weights, per architecture.

For each architecture (--arch, default all) writes a ONE-layer model with the real widths, tensor by tensor
(random bf16 weights; the module names and shapes come from transformers' own model class built on the meta
device), then in fresh subprocesses loads it
- with the trainer's loader (continual.model.load_base_4bit: NF4, double quant, the architecture's routers,
  shared-expert gates and lm_head kept out, per continual/arch.py), and
- plainly in bf16 (the baseline),
and reports the share of the decoder layer's parameters held in Linear4bit (embed_tokens and lm_head stay
16-bit by design and are reported apart), the whole-model share extrapolated to the real depth
(depth x layer + embeddings + lm_head + final norm), weight bytes against bf16, and each child's peak RSS.

    mixtral     Mixtral-8x7B        hidden 4096, 8 experts x 14336, 32 layers, 32,000 vocab
    qwen2_moe   Qwen1.5-MoE-A2.7B   hidden 2048, 60 experts x 1408 + shared expert 5632, 24 layers, 151,936 vocab
    llama       Llama-2-7B          hidden 4096, MLP 11008, 32 layers, 32,000 vocab

(tests/test_continual_archs.py checks the same module split on tiny models; this benchmark quantizes real
widths, too heavy for CI.)

    .venv/bin/python benchmarks/bench_continual_4bit.py [--arch qwen2_moe] [--work /tmp/continual/bench_4bit]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _memory import peak_rss_mb  # noqa: E402

# name: (model_type, real depth, vocabulary, hidden, config overrides of demo.tiny.tiny_config)
REAL = {
    "mixtral": ("mixtral", 32, 32000, 4096, dict(intermediate=14336, experts=8, heads=32, kv_heads=8)),
    "qwen2_moe": ("qwen2_moe", 24, 151936, 2048, dict(
        intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
        num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=16)),
    "llama": ("llama", 32, 32000, 4096, dict(intermediate_size=11008, num_attention_heads=32,
                                             num_key_value_heads=32)),
}
LABELS = {"mixtral": "Mixtral-8x7B", "qwen2_moe": "Qwen1.5-MoE-A2.7B", "llama": "Llama-2-7B"}
SHARD_PARAMS = 200_000_000  # ~400 MB of bf16 per shard


def build(arch: str, base: Path) -> None:
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from common.checkpoint import write_index
    from demo.tiny import tiny_config

    model_type, _, vocab, hidden, kw = REAL[arch]
    cfg = tiny_config(model_type, vocab_size=vocab, hidden=hidden, layers=1, **kw)
    cfg.torch_dtype = "bfloat16"
    with init_empty_weights():
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    base.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(base)
    groups, cur, n = [], {}, 0
    for k, shape in shapes.items():
        cur[k] = shape
        n += int(torch.Size(shape).numel())
        if n >= SHARD_PARAMS:
            groups, cur, n = groups + [cur], {}, 0
    groups += [cur] if cur else []
    g = torch.Generator().manual_seed(0)
    wm, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in group.items()}
        save_file(tensors, str(base / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        wm.update({k: name for k in tensors})
        del tensors
    write_index(base, wm, total)


def split_counts(model) -> dict[str, int]:
    """Logical parameters of the decoder layer in Linear4bit / other, embed_tokens + lm_head, the rest."""
    import bitsandbytes as bnb

    out = {"layer_4bit": 0, "layer_other": 0, "embeddings": 0, "rest": 0}
    seen = set()
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            seen.add(id(m.weight))
            out["layer_4bit" if ".layers.0." in f".{name}." else "rest"] += m.in_features * m.out_features
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        key = ("embeddings" if "embed_tokens" in name or name.startswith("lm_head") else
               "layer_other" if ".layers.0." in f".{name}" else "rest")
        out[key] += p.numel()
    return out


def child(mode: str, arch: str, base: Path) -> None:
    import torch

    t0 = time.time()
    if mode == "build":
        build(arch, base)
        counts = {}
    elif mode == "4bit":
        from continual.model import count_4bit_params, load_base_4bit

        model = load_base_4bit(base, torch.bfloat16)
        counts = {**count_4bit_params(model), **split_counts(model)}
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        counts = {"params_4bit": 0, "bytes_4bit": 0, "params_other": n,
                  "bytes_other": sum(p.numel() * p.element_size() for p in model.parameters())}
    rss = peak_rss_mb()
    print(json.dumps({"mode": mode, **counts, "peak_rss_mb": round(rss), "seconds": round(time.time() - t0, 1)}))


def run_child(mode: str, arch: str, base: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, __file__, "--child", mode, "--arch", arch, "--work", str(base.parent)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode:
        sys.exit(f"{arch} {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(arch: str, q: dict, b: dict) -> dict:
    depth = REAL[arch][1]
    layer = q["layer_4bit"] + q["layer_other"]
    whole = depth * layer + q["embeddings"] + q["rest"]
    row = {"arch": arch, "model": LABELS[arch], "layer_params": layer, "layer_4bit_share": q["layer_4bit"] / layer,
           "layer_other": q["layer_other"], "embeddings": q["embeddings"], "depth": depth,
           "whole_4bit_share": depth * q["layer_4bit"] / whole,
           "one_layer_model_4bit_share": q["params_4bit"] / (q["params_4bit"] + q["params_other"]),
           "bytes_vs_bf16": b["bytes_other"] / (q["bytes_4bit"] + q["bytes_other"]),
           "peak_rss_mb_4bit": q["peak_rss_mb"], "load_s_4bit": q["seconds"]}
    print(f"{LABELS[arch]}: decoder layer {layer / 1e6:.1f} M params, {row['layer_4bit_share']:.3%} in Linear4bit "
          f"({q['layer_other']:,} other: norms, routers, gates, biases); embed_tokens + lm_head "
          f"{q['embeddings'] / 1e6:.1f} M (16-bit by design); whole model at {depth} layers: "
          f"{row['whole_4bit_share']:.1%} of {whole / 1e9:.2f} B params in 4-bit; the one-layer model itself "
          f"{row['one_layer_model_4bit_share']:.1%}; weight bytes {row['bytes_vs_bf16']:.2f}x smaller than bf16; "
          f"peak RSS loading 4-bit {q['peak_rss_mb']} MB ({q['seconds']} s)")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/continual/bench_4bit")
    ap.add_argument("--arch", action="append", choices=list(REAL), help="repeatable (default: all)")
    ap.add_argument("--child")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (up to 3.4 GB each)")
    ap.add_argument("--json", help="write the rows to this file")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.arch[0], Path(a.work) / a.arch[0])
    rows = []
    for arch in a.arch or list(REAL):
        base = Path(a.work) / arch
        if not (base / "model.safetensors.index.json").is_file():
            run_child("build", arch, base)
        q, b = run_child("4bit", arch, base), run_child("bf16", arch, base)
        rows.append(report(arch, q, b))
        if not a.keep:
            import shutil

            shutil.rmtree(base)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
