"""How much of a full-width Mixtral-8x7B layer our trainer holds in 4-bit, measured on real weights.

Writes a one-layer Mixtral with the real widths (hidden 4096, intermediate 14336, 8 experts, 32,000 vocab;
1.7 B params, 3.4 GB bf16) tensor by tensor, then in fresh subprocesses loads it
- with the trainer's loader (continual.model.load_base_4bit: NF4, double quant, router + lm_head kept out), and
- plainly in bf16 (the baseline),
and reports params/bytes held in Linear4bit vs other tensors and each child's peak RSS.
(The unit test tests/test_continual_train.py checks the same module split on the meta device; this
benchmark quantizes real weights, too heavy for CI.)

    .venv/bin/python benchmarks/bench_continual_4bit.py [--work /tmp/continual/bench_4bit]
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




def build(base: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from common.checkpoint import write_index
    from common.tiny import tiny_mixtral_config

    h, inter, E, V, kv = 4096, 14336, 8, 32000, 1024
    cfg = tiny_mixtral_config(vocab_size=V, hidden=h, layers=1, experts=E, intermediate=inter, heads=32, kv_heads=8)
    cfg.torch_dtype = "bfloat16"
    base.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(base)
    p = "model.layers.0."
    groups = [{"model.embed_tokens.weight": (V, h), "lm_head.weight": (V, h), "model.norm.weight": (h,),
               p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
               p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
               p + "block_sparse_moe.gate.weight": (E, h), p + "input_layernorm.weight": (h,),
               p + "post_attention_layernorm.weight": (h,)}]
    for e in range(E):  # one shard per expert (~350 MB)
        q = f"{p}block_sparse_moe.experts.{e}."
        groups.append({q + "w1.weight": (inter, h), q + "w2.weight": (h, inter), q + "w3.weight": (inter, h)})
    g = torch.Generator().manual_seed(0)
    wm, total = {}, 0
    for i, shapes in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
        save_file(tensors, str(base / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        wm.update({k: name for k in tensors})
        del tensors
    write_index(base, wm, total)


def child(mode: str, base: Path) -> None:
    import torch

    t0 = time.time()
    if mode == "build":
        build(base)
        counts = {}
    elif mode == "4bit":
        from continual.model import count_4bit_params, load_base_4bit

        model = load_base_4bit(base, torch.bfloat16)
        counts = count_4bit_params(model)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        counts = {"params_4bit": 0, "bytes_4bit": 0, "params_other": n,
                  "bytes_other": sum(p.numel() * p.element_size() for p in model.parameters())}
    rss = peak_rss_mb()
    print(json.dumps({"mode": mode, **counts, "peak_rss_mb": round(rss), "seconds": round(time.time() - t0, 1)}))


def run_child(mode: str, base: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(base.parent)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode:
        sys.exit(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/continual/bench_4bit")
    ap.add_argument("--child")
    ap.add_argument("--keep", action="store_true", help="keep the 3.4 GB checkpoint")
    a = ap.parse_args()
    base = Path(a.work) / "base"
    if a.child:
        return child(a.child, base)
    if not (base / "model.safetensors.index.json").is_file():
        run_child("build", base)
    q, b = run_child("4bit", base), run_child("bf16", base)
    total = q["params_4bit"] + q["params_other"]
    print(f"params: {total / 1e9:.3f} B; held in 4-bit: {q['params_4bit'] / total:.1%} "
          f"({q['params_4bit'] / 1e9:.3f} B in Linear4bit, {q['params_other'] / 1e6:.0f} M other)")
    qb = q["bytes_4bit"] + q["bytes_other"]
    print(f"weight bytes: ours {qb / 2**20:.0f} MB (4-bit part {q['bytes_4bit'] / 2**20:.0f} MB incl. quant "
          f"state) vs bf16 {b['bytes_other'] / 2**20:.0f} MB -> {b['bytes_other'] / qb:.2f}x smaller")
    print(f"peak RSS while loading: ours {q['peak_rss_mb']} MB ({q['seconds']} s; quantizing materializes each "
          f"weight); bf16 {b['peak_rss_mb']} MB ({b['seconds']} s; its tensors stay memory-mapped from the files "
          "until first touched, so this RSS is not comparable; compare the weight bytes above)")
    if not a.keep:
        import shutil

        shutil.rmtree(base)


if __name__ == "__main__":
    main()
