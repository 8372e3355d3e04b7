"""Peak memory of `graft merge` (shard by shard) vs peft's full-model merge_and_unload, same run.

Builds a bf16 Mixtral-shaped checkpoint (default: hidden 1024, 4 layers, 8 experts, intermediate 3584,
57,000-row vocabulary, ~0.5 B params, 200 MB shards) written tensor by tensor, and a LoRA adapter
(r 64, all of q,k,v,o,w1,w2,w3 + full embed_tokens/lm_head) for it. Each merge runs in a fresh
subprocess; peak RSS is the child's ru_maxrss. Also reports the RSS of a child that only imports the
libraries (the constant) and checks that both merges give the same tensors.

    .venv/bin/python benchmarks/bench_merge_memory.py [--work /tmp/continual/bench_merge] [--layers 4]
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




def build(work: Path, layers: int, hidden: int, inter: int, vocab: int, experts: int, shard_mb: int) -> None:
    """Base checkpoint written tensor by tensor (never a whole model in memory), then the adapter."""
    import torch
    from safetensors.torch import save_file

    from common.checkpoint import write_index
    from demo.tiny import tiny_mixtral_config

    base = work / "base"
    base.mkdir(parents=True, exist_ok=True)
    cfg = tiny_mixtral_config(vocab_size=vocab, hidden=hidden, layers=layers, experts=experts, intermediate=inter,
                              heads=16, kv_heads=4)
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(base)
    kv = hidden // 16 * 4
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "block_sparse_moe.gate.weight": (experts, hidden),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes.update({q + "w1.weight": (inter, hidden), q + "w2.weight": (hidden, inter),
                           q + "w3.weight": (inter, hidden)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    g = torch.Generator().manual_seed(0)
    shard, size, n, wm, total = {}, 0, 1, {}, 0
    names = list(shapes)

    def flush():
        nonlocal shard, size, n
        fname = f"model-{n:05d}.safetensors"
        save_file(shard, str(base / fname), metadata={"format": "pt"})
        wm.update({k: fname for k in shard})
        shard, size, n = {}, 0, n + 1

    for k in names:
        t = (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16)
        if size and size + t.numel() * 2 > shard_mb << 20:
            flush()
        shard[k] = t
        size += t.numel() * 2
        total += t.numel() * 2
    flush()
    write_index(base, wm, total)

    # adapter: random A and B (non-zero B so the merge changes every target), full embedding copies
    ad = work / "adapter"
    ad.mkdir(exist_ok=True)
    r, alpha = 64, 128
    tensors = {}
    for k, shp in shapes.items():
        mod = k[: -len(".weight")]
        if mod.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"):
            tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(r, shp[1], generator=g) * 0.01
            tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(shp[0], r, generator=g) * 0.01
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[f"base_model.model.{k}"] = torch.randn(shapes[k], generator=g) * 0.02
    save_file(tensors, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    (ad / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"], "bias": "none",
        "modules_to_save": ["embed_tokens", "lm_head"], "base_model_name_or_path": str(base),
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}))


def child(mode: str, work: Path) -> None:
    import torch  # noqa: F401  (the constant includes the libraries both merges import)
    import transformers  # noqa: F401
    import peft  # noqa: F401
    import safetensors  # noqa: F401

    t0 = time.time()
    if mode == "build":
        a = json.loads(os.environ["BENCH_BUILD"])
        build(work, **a)
    elif mode == "ours":
        from continual.config import MergeConfig
        from continual.merge import merge_adapter

        merge_adapter(MergeConfig(base=str(work / "base"), adapter=str(work / "adapter"), out=str(work / "ours")))
    elif mode == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(work / "base"), dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, str(work / "adapter")).merge_and_unload()
        model.save_pretrained(str(work / "peft"), max_shard_size="200MB")
    print(json.dumps({"mode": mode, "peak_rss_mb": round(peak_rss_mb(), 1), "seconds": round(time.time() - t0, 1)}))


def run_child(mode: str, work: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work)], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    if res.returncode:
        sys.exit(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(work: Path) -> float:
    """Max |ours - peft| over a few merged tensors (same numbers both ways, up to bf16 rounding)."""
    from safetensors import safe_open

    def load(d: Path, name: str):
        wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(d / wm[name]), "pt") as f:
            return f.get_tensor(name).float()

    worst = 0.0
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.block_sparse_moe.experts.3.w2.weight",
                 "lm_head.weight", "model.embed_tokens.weight"):
        worst = max(worst, (load(work / "ours", name) - load(work / "peft", name)).abs().max().item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/continual/bench_merge")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--vocab", type=int, default=57000)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--shard-mb", type=int, default=200)
    ap.add_argument("--child")
    a = ap.parse_args()
    work = Path(a.work)
    if a.child:
        return child(a.child, work)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    # built in a child, so this process stays small (its memory is not inherited by the measured children)
    os.environ["BENCH_BUILD"] = json.dumps({"layers": a.layers, "hidden": a.hidden, "inter": a.intermediate,
                                            "vocab": a.vocab, "experts": a.experts, "shard_mb": a.shard_mb})
    run_child("build", work)
    shards = sorted((work / "base").glob("model-*.safetensors"))
    largest = max(p.stat().st_size for p in shards) / 2**20
    base_mb = sum(p.stat().st_size for p in shards) / 2**20
    adapter_mb = (work / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20
    const = run_child("imports", work)
    ours = run_child("ours", work)
    peft = run_child("peft", work)
    diff = compare(work)
    print(f"base: {base_mb:.0f} MB in {len(shards)} shards (largest {largest:.0f} MB); adapter {adapter_mb:.0f} MB")
    print(f"imports only (the constant): peak RSS {const['peak_rss_mb']:.0f} MB")
    print(f"graft merge (shard by shard): peak RSS {ours['peak_rss_mb']:.0f} MB, {ours['seconds']} s")
    print(f"peft merge_and_unload (whole model): peak RSS {peft['peak_rss_mb']:.0f} MB, {peft['seconds']} s")
    bound = largest + adapter_mb + const["peak_rss_mb"]
    print(f"bound largest shard + adapter + constant = {bound:.0f} MB; ours within bound: "
          f"{ours['peak_rss_mb'] <= bound}")
    print(f"ratio peft / ours = {peft['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x; "
          f"max |ours - peft| over checked tensors = {diff:.3g}")


if __name__ == "__main__":
    main()
