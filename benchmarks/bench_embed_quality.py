"""Quality of new-row initialisation: held-out Chinese bits per byte right after growing the vocabulary.

1. Train a small Llama-style model (untied lm_head; default hidden 256, 4 layers, 19.5M parameters, 800
   steps of 16 x 128 tokens, about 19 minutes on 2 idle cores) from scratch on mixed Chinese (People's
   Daily, every 20th paragraph held out) and English (pydoc topics, every 20th paragraph held out) with
   Mixtral's base tokenizer.
2. Grow the tokenizer with a Chinese BPE trained on the training paragraphs only (`graft vocab merge`).
3. `graft embed init` with mean, hf-mean and random (and, as an ablation, the reference script's mean that
   encodes with BOS and the dummy-prefix space), then evaluate, before any further training, the loss in
   bits per byte (total NLL in bits / UTF-8 bytes: comparable across vocabularies) on held-out Chinese and
   English, next to the base model with the base tokenizer.
4. Train each of mean, hf-mean and random for --continue-steps steps with the new tokenizer (same data
   order, schedule and seed) and evaluate again (--continue-curve: also at intermediate steps).

With --snapshots, step 3 also runs on the base model saved at those step counts (weaker bases, same run;
step 4 too with --continue-all), and a summary line per base model ends the output. On CUDA, training
runs under bf16 autocast.

Columns: "nll new/old" = NLL per token (nats) at positions whose target is a new / an old id;
"new-id mass" = mean probability on all new ids together at old-id targets (0 for the base model);
"logits old/new" = median old-id logit / mean new-id logit, averaged over positions (where the new
rows land among the old ones).

--demo RUNS (issue 13): instead of training a model here, take the demo workflow's base model (a tiny Mixtral,
hidden 128, 2 layers, 4 experts, 250 steps on CPU) and grown tokenizer (36,251 ids) from RUNS (after
`graft run workflows/demo.toml --to vocab_merge`), and for every (embed_tokens, lm_head) method pair of DEMO_PAIRS
and every seed (init draws and data order; the same for every pair): grow with `graft embed init`
(--pad-to-multiple-of 64), score zh and en bits per byte of the demo's dev files (documents as BOS text EOS,
like the eval stage) at step 0, the probability all new ids take at English positions whose next token is old,
and the largest probability all padding rows take at any position; then train the first --demo-train pairs
(all parameters, AdamW lr --continue-lr, --batch blocks of 128 tokens of zh news + pydoc with the new
tokenizer) and score again after 25 and --continue-steps steps. Prints a markdown table (mean ± sd over seeds)
and writes WORK/demo_results.json; --table FILE prints the table of such a file again. `calibrated` calibrates on
--calibration-tokens tokens of the training files (zh news, pydoc), never the dev files. --pairs picks pairs.
The 7 Dec run in docs/embed_init.md (about 35 min on 2 busy cores):
       python benchmarks/bench_embed_quality.py --demo runs/demo --work /tmp/bench_demo --seeds 3 --batch 4
           --eval-docs 45 --continue-steps 100 --demo-train 2 --pairs mean,mean/calibrated,random

Usage: python benchmarks/bench_embed_quality.py [--steps 800] [--work /tmp/embed_init/bench_quality] [--keep]
       python benchmarks/bench_embed_quality.py --reuse --keep --size 3000   # kept base model, other vocab
       the H200 run in docs/embed_init.md (368 s):
       python benchmarks/bench_embed_quality.py --device cuda --hidden 512 --layers 8 --heads 8 --batch 64
           --lr 1e-3 --steps 3600 --snapshots 1200 --continue-steps 200 --continue-curve 10,25,50,100 --continue-all
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def blocks(ids_per_doc: list[list[int]], bos: int, size: int) -> list[list[int]]:
    stream = [t for ids in ids_per_doc for t in [bos] + ids]
    return [stream[i:i + size] for i in range(0, len(stream) - size + 1, size)]


def train_steps(model, data: list[list[int]], steps: int, batch: int, lr: float, seed: int, warmup: int = 50,
                on_step=None) -> float:
    """Plain AdamW training on fixed-size blocks (seeded order, cosine schedule); returns the last loss.

    Runs on the model's device; on CUDA the forward runs under bf16 autocast (fp32 master weights).
    `on_step(n)` is called after n optimiser steps (to save snapshots of the base model).
    """
    import contextlib

    import torch

    device = next(model.parameters()).device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    blocks_t = torch.tensor(data, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = order[(step * batch) % len(data):(step * batch) % len(data) + batch]
        if len(idx) < batch:
            idx = order[:batch]
        x = blocks_t[idx.to(device)]
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return loss.item()


def mixed_blocks(train_zh, train_en, tok, seq: int) -> list[list[int]]:
    return blocks([tok.encode(t) for t in train_zh], 1, seq) + blocks([tok.encode(t) for t in train_en], 1, seq)


def train_base(out: Path, train_zh, train_en, tok, steps: int, seq: int = 128, batch: int = 8, seed: int = 0,
               hidden: int = 128, layers: int = 2, heads: int = 4, lr: float = 3e-3, device: str = "cpu",
               snapshots: tuple[int, ...] = ()) -> dict:
    """Train the base model and save it to `out`; also save it after each step in `snapshots` to `out_<step>`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    data = mixed_blocks(train_zh, train_en, tok, seq)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(device)

    def save(n: int) -> None:
        if n in snapshots and n < steps:
            model.save_pretrained(snapshot_dir(out, n), max_shard_size="8MB", safe_serialization=True)

    t0 = time.time()
    loss = train_steps(model, data, steps, batch, lr, seed, on_step=save)
    model.save_pretrained(out, max_shard_size="8MB", safe_serialization=True)
    return {"train_blocks": len(data), "train_tokens": len(data) * seq, "steps": steps, "seq": seq, "batch": batch,
            "final_loss": round(loss, 4), "train_seconds": round(time.time() - t0, 1), "device": device,
            "params": sum(p.numel() for p in model.parameters()), "hidden": hidden, "layers": layers,
            "heads": heads, "lr": lr, "snapshots": [n for n in snapshots if n < steps]}


def snapshot_dir(base: Path, step: int) -> Path:
    return base.with_name(f"{base.name}_{step}")


def load_model(model_dir: Path, lm_head_from: Path | None = None, device: str = "cpu"):
    """Load a checkpoint (fp32); with `lm_head_from`, take the output layer from another one (ablation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lm_head_from is not None:
        other = AutoModelForCausalLM.from_pretrained(lm_head_from)
        model.lm_head.weight.data.copy_(other.lm_head.weight.data)
    return model.to(device).eval()


def bits_per_byte(model, texts: list[str], tok) -> dict:
    """Sum of NLL (bits) of every token after BOS over the UTF-8 bytes of the texts (one text at a time).

    Also: NLL per token (nats) split by whether the target is a new or an old id; the probability put on
    all new ids at old-id targets; and where the new rows' logits sit among the old ones (median old logit,
    mean new logit), averaged over positions.
    """
    import torch

    n_old = 32000
    device = next(model.parameters()).device
    acc = dict(nll=0.0, nll_new=0.0, n_new=0, mass=0.0, n_old=0, old_median=0.0, new_mean=0.0, pos=0)
    nbytes = ntok = 0
    with torch.no_grad():
        for t in texts:
            ids = tok.encode(t)  # BOS + text
            x = torch.tensor([ids], device=device)
            logits = model(x).logits[0, :-1].float()
            y = x[0, 1:]
            nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            acc["nll"] += nll.sum().item()
            new_target = y >= n_old
            acc["nll_new"] += nll[new_target].sum().item()
            acc["n_new"] += int(new_target.sum())
            acc["n_old"] += int((~new_target).sum())
            if logits.shape[1] > n_old:
                acc["mass"] += logits.softmax(-1)[~new_target, n_old:].sum().item()
                acc["old_median"] += logits[:, :n_old].median(1).values.sum().item()
                acc["new_mean"] += logits[:, n_old:].mean(1).sum().item()
                acc["pos"] += len(y)
            nbytes += len(t.encode("utf-8"))
            ntok += len(y)
    pos = max(acc["pos"], 1)
    return {"bpb": acc["nll"] / math.log(2) / nbytes, "tokens": ntok, "bytes": nbytes,
            "new_id_share": acc["n_new"] / max(ntok, 1),
            "nll_new_targets": acc["nll_new"] / max(acc["n_new"], 1),
            "nll_old_targets": (acc["nll"] - acc["nll_new"]) / max(acc["n_old"], 1),
            "new_id_mass_at_old_targets": acc["mass"] / max(acc["n_old"], 1),
            "median_old_logit": acc["old_median"] / pos, "mean_new_logit": acc["new_mean"] / pos}


def reference_style_sources(old, new):
    """The reference script's sub-pieces: tokenizer(text) with BOS and with the dummy-prefix space."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(old.proto.SerializeToString())
    out = []
    for i in range(len(old), len(new)):
        s = new.surface(i)
        if s is None:
            out.append([])
        else:
            text = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
            out.append([sp.bos_id()] + sp.encode(text))
    return out


def print_header() -> None:
    print(f"{'':48}{'zh bpb':>8}{'zh tok':>8}{'new ids':>9}{'nll new/old':>13}{'en bpb':>8}"
          f"{'new-id mass zh/en':>19}{'logits old/new':>16}")


def evaluate(name: str, model, dev_zh, dev_en, tok) -> dict:
    """bits_per_byte on both dev sets, printed as one row."""
    zh, e = bits_per_byte(model, dev_zh, tok), bits_per_byte(model, dev_en, tok)
    mass = f"{zh['new_id_mass_at_old_targets']:.2f}/{e['new_id_mass_at_old_targets']:.2f}"
    nll = f"{zh['nll_new_targets']:.2f}/{zh['nll_old_targets']:.2f}"
    logits = f"{zh['median_old_logit']:.1f}/{zh['mean_new_logit']:.1f}"
    print(f"{name:48}{zh['bpb']:>8.3f}{zh['tokens']:>8}{zh['new_id_share']:>9.1%}{nll:>13}{e['bpb']:>8.3f}"
          f"{mass:>19}{logits:>16}", flush=True)
    return {"zh": zh, "en": e}


def print_ratios(results: dict, mean: str, random: str, hf_mean: str, base: str) -> None:
    bpb = {k: results[k]["zh"]["bpb"] for k in (mean, random, hf_mean, base)}
    print(f"ratio zh bpb random / mean = {bpb[random] / bpb[mean]:.3f}; hf-mean / mean = "
          f"{bpb[hf_mean] / bpb[mean]:.3f}; mean / base = {bpb[mean] / bpb[base]:.3f}", flush=True)


def compare_inits(label: str, base: Path, work: Path, new_tok_dir: Path, old_tok, new_tok, dev_zh, dev_en,
                  device: str) -> dict:
    """Grow `base` with every init (plus the reference-style mean and two ablations) and evaluate each."""
    import embed_init.grow as grow_mod
    from common.io import is_complete
    from demo.sources import base_tokenizer_model
    from embed_init.config import EmbedInitConfig
    from embed_init.grow import grow_embeddings

    def grown(method: str, name: str) -> Path:
        out = work / f"{label}_{name}"
        if not is_complete(out):
            grow_embeddings(EmbedInitConfig(model=str(base), old_tokenizer=str(base_tokenizer_model()),
                                            new_tokenizer=str(new_tok_dir), out=str(out), method=method,
                                            output_method=method, progress=False, overwrite=True))
        return out

    rows = {"base (old tokenizer)": ((base, None), old_tok)}
    for method in ("mean", "hf-mean", "random"):
        rows[method] = ((grown(method, method), None), new_tok)
    real = grow_mod.surface_sources
    grow_mod.surface_sources = reference_style_sources
    try:
        rows["mean, reference-style (BOS + dummy prefix)"] = ((grown("mean", "mean_ref"), None), new_tok)
    finally:
        grow_mod.surface_sources = real
    # Ablations: which matrix makes the difference.
    rows["ablation: mean embed + random lm_head"] = ((work / f"{label}_mean", work / f"{label}_random"), new_tok)
    rows["ablation: random embed + mean lm_head"] = ((work / f"{label}_random", work / f"{label}_mean"), new_tok)

    results = {}
    print(f"\n[{label}] held-out bits per byte ({len(dev_zh)} zh docs, {len(dev_en)} en docs), "
          "before further training:")
    print_header()
    for name, ((path, lm_head_from), tok) in rows.items():
        model = load_model(path, lm_head_from, device)
        results[name] = evaluate(name, model, dev_zh, dev_en, tok)
        del model
    print_ratios(results, "mean", "random", "hf-mean", "base (old tokenizer)")
    return results


def continue_training(label: str, work: Path, train_zh, train_en, new_tok, dev_zh, dev_en, steps: int, lr: float,
                      batch: int, device: str, results: dict, curve_at: tuple[int, ...] = ()) -> None:
    """Train mean, hf-mean and random `steps` steps with the new tokenizer (same data order, schedule, seed).

    With `curve_at`, also evaluate held-out Chinese bits per byte after each of those step counts.
    """
    print(f"\n[{label}] continued training: {steps} steps, lr {lr}, new tokenizer", flush=True)
    data = mixed_blocks(train_zh, train_en, new_tok, 128)
    after, curve = {}, {}
    for method in ("mean", "hf-mean", "random"):
        model = load_model(work / f"{label}_{method}", device=device)
        points = curve[method] = {0: results[method]["zh"]["bpb"]}

        def record(n: int, model=model, points=points) -> None:
            if n in curve_at and n < steps:
                model.eval()
                points[n] = bits_per_byte(model, dev_zh, new_tok)["bpb"]
                model.train()

        t0 = time.time()
        train_steps(model, data, steps, batch, lr, seed=1, warmup=10, on_step=record)
        after[method] = {"seconds": round(time.time() - t0, 1), "model": model}
    print(f"\n[{label}] held-out bits per byte after {steps} steps of training with the new tokenizer:")
    print_header()
    for method in ("mean", "hf-mean", "random"):
        results[f"{method}, after {steps} steps"] = evaluate(method, after[method].pop("model"), dev_zh, dev_en,
                                                             new_tok)
    for method in curve:
        curve[method][steps] = results[f"{method}, after {steps} steps"]["zh"]["bpb"]
    results["continue"] = {"steps": steps, "lr": lr, "blocks": len(data), "zh_bpb_curve": curve,
                           "seconds": {m: a["seconds"] for m, a in after.items()}}
    print_ratios(results, *(f"{m}, after {steps} steps" for m in ("mean", "random", "hf-mean")),
                 "base (old tokenizer)")
    if curve_at:
        print(f"\n[{label}] held-out zh bits per byte during continued training:")
        print(f"{'steps':>8}" + "".join(f"{m:>10}" for m in curve) + f"{'random/mean':>13}")
        for n in sorted(curve["mean"]):
            print(f"{n:>8}" + "".join(f"{curve[m][n]:>10.3f}" for m in curve)
                  + f"{curve['random'][n] / curve['mean'][n]:>13.3f}", flush=True)


def print_summary(by_base: dict) -> None:
    """One line per base model: its own bpb and each init's, before further training."""
    print("\nsummary, held-out zh bits per byte before further training:")
    print(f"{'base model':>16}{'base':>8}{'mean':>8}{'hf-mean':>9}{'random':>8}{'random/mean':>13}{'en mean/random':>16}")
    for label, r in by_base.items():
        b = {k: r[k]["zh"]["bpb"] for k in ("base (old tokenizer)", "mean", "hf-mean", "random")}
        en = f"{r['mean']['en']['bpb']:.3f}/{r['random']['en']['bpb']:.3f}"
        print(f"{label:>16}{b['base (old tokenizer)']:>8.3f}{b['mean']:>8.3f}{b['hf-mean']:>9.3f}{b['random']:>8.3f}"
              f"{b['random'] / b['mean']:>13.3f}{en:>16}", flush=True)


def save_results(results: dict, work: Path, extra: str | None) -> None:
    from common.io import atomic_write_json

    for path in [work / "results.json"] + ([Path(extra)] if extra else []):
        atomic_write_json(path, results)


# ------------------------------------------------------------------ --demo: the CPU demo model, methods x seeds

# (embed_tokens method, lm_head method). The first --demo-train are trained too; all are scored at step 0.
DEMO_PAIRS = [("mean", "mean"), ("mean", "calibrated"), ("mean", "prefix-share"), ("random", "random"),
              ("hf-mean", "hf-mean"),
              ("first-last", "first-last"), ("interpolation", "interpolation"), ("mean", "hf-mean"),
              ("weighted-mean", "weighted-mean"), ("mean", "first-last"), ("mean", "interpolation"),
              ("mean", "random"), ("random", "mean"), ("first-last", "prefix-share")]


def pair_name(pair: tuple[str, str]) -> str:
    return pair[0] if pair[0] == pair[1] else f"{pair[0]} / {pair[1]}"


def demo_eval(model, tok, texts: list[str], *, bos: int, eos: int, n_old: int, n_new: int, max_len: int = 128,
              batch_size: int = 8) -> dict:
    """Bits per byte of `texts` as the demo's eval stage scores them (workflows.evaluate.bits_per_byte: BOS text
    EOS, windows of max_len), plus the probability all new ids (n_old..n_new-1) together take where the next
    token is an old id, and the largest / mean probability all padding ids (>= n_new) together take at any
    position."""
    from workflows.evaluate import bits_per_byte as eval_bpb

    acc = {"mass": 0.0, "n_old_targets": 0, "pad_max": 0.0, "pad_sum": 0.0, "n_pos": 0}

    def on_positions(logits, t) -> None:
        p = logits.double().softmax(-1)
        old_t = t < n_old
        acc["mass"] += float(p[old_t, n_old:n_new].sum())
        acc["n_old_targets"] += int(old_t.sum())
        if p.shape[1] > n_new:
            pad = p[:, n_new:].sum(-1)
            acc["pad_max"], acc["pad_sum"] = max(acc["pad_max"], float(pad.max())), acc["pad_sum"] + float(pad.sum())
        acc["n_pos"] += len(t)

    r = eval_bpb(model, tok, texts, bos=bos, eos=eos, max_len=max_len, batch_size=batch_size,
                 on_positions=on_positions)
    return {"bpb": r["bpb"], "new_id_mass": acc["mass"] / max(1, acc["n_old_targets"]),
            "pad_mass_max": acc["pad_max"], "pad_mass_mean": acc["pad_sum"] / max(1, acc["n_pos"]),
            "positions": acc["n_pos"]}


def demo_benchmark(args) -> dict:
    """Every pair of DEMO_PAIRS on the demo's base model and grown tokenizer, for each seed: zh/en bpb and new-id
    mass on English at step 0, then (the first --demo-train pairs) after 25 and --continue-steps steps of
    training with the new tokenizer. For one seed every pair sees the same data order (seed = init seed)."""
    import torch

    from common.tokenizer_files import load_fast_tokenizer
    from embed_init.config import EmbedInitConfig
    from embed_init.grow import grow_embeddings
    from demo.stages import read_jsonl_texts

    runs = Path(args.demo)
    base, tok_dir, corpora = runs / "base_model", runs / "vocab_merge", runs / "corpora"
    for d in (base, tok_dir, corpora):
        if not (d / "manifest.json").is_file():
            raise SystemExit(f"{d}: missing. Run first: graft run workflows/demo.toml --to vocab_merge")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    old_tok, new_tok = load_fast_tokenizer(base), load_fast_tokenizer(tok_dir)
    n_old, n_new = old_tok.get_vocab_size(), new_tok.get_vocab_size()
    bos, eos = old_tok.token_to_id("<s>"), old_tok.token_to_id("</s>")
    dev_zh = read_jsonl_texts([str(corpora / "zh_news_dev.jsonl")])[:args.eval_docs]
    dev_en = read_jsonl_texts([str(corpora / "en_pydoc_dev.jsonl")])[:max(1, args.eval_docs // 3)]
    zh_train = read_jsonl_texts([str(corpora / "zh_news.jsonl")])[:args.demo_train_docs]
    en_train = read_jsonl_texts([str(corpora / "en_pydoc_train.jsonl")])
    seq = 128

    def blocks_of(texts):
        ids = [t for enc in new_tok.encode_batch(texts, add_special_tokens=False) for t in [bos] + enc.ids + [eos]]
        return [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]

    data = blocks_of(zh_train) + blocks_of(en_train)
    pairs = DEMO_PAIRS[:args.demo_pairs] if args.demo_pairs else DEMO_PAIRS
    if args.pairs:  # e.g. "mean,mean/calibrated,random": these pairs, in this order
        pairs = [tuple(name.split("/")) if "/" in name else (name, name) for name in args.pairs.split(",")]
    # `calibrated` reads training text (never the dev files): the first documents of each training file
    calibration = [str(corpora / "zh_news.jsonl"), str(corpora / "en_pydoc_train.jsonl")]
    seeds = list(range(args.seeds))
    results = {"base": base.as_posix(), "n_old": n_old, "n_new": n_new, "dev_zh_docs": len(dev_zh),
               "dev_en_docs": len(dev_en), "train_blocks": len(data), "seeds": seeds, "pairs": {},
               "steps": [0, 25, args.continue_steps], "batch": args.batch, "lr": args.continue_lr,
               "pad_to_multiple_of": args.pad, "calibration": calibration,
               "calibration_tokens": args.calibration_tokens}
    from transformers import AutoModelForCausalLM

    def score(model, tok, nn_new):
        zh = demo_eval(model, tok, dev_zh, bos=bos, eos=eos, n_old=n_old, n_new=nn_new)
        en = demo_eval(model, tok, dev_en, bos=bos, eos=eos, n_old=n_old, n_new=nn_new)
        return {"zh_bpb": zh["bpb"], "en_bpb": en["bpb"], "en_new_id_mass": en["new_id_mass"],
                "zh_new_id_mass": zh["new_id_mass"], "pad_mass_max": max(zh["pad_mass_max"], en["pad_mass_max"])}

    out_json = work / "demo_results.json"
    if args.resume and out_json.is_file():  # keep the (pair, seed) rows of an earlier run with the same settings
        earlier = json.loads(out_json.read_text())
        same = {k: earlier.get(k) for k in ("n_new", "steps", "batch", "lr", "train_blocks", "pad_to_multiple_of")}
        if same != {k: results[k] for k in same}:
            raise SystemExit(f"{out_json}: made with other settings ({same}); drop --resume")
        results["pairs"], results["unextended"] = earlier["pairs"], earlier["unextended"]
    else:
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        results["unextended"] = score(model, old_tok, n_old)
    print(f"unextended base: {results['unextended']}", flush=True)
    def run(pair: tuple[str, str], seed: int, train_it: bool) -> dict:
        """Grow with `pair` and `seed`, score at step 0, then (train_it) train and score at 25 and the end."""
        out = work / f"grown_{pair[0]}_{pair[1]}_s{seed}"
        grow_embeddings(EmbedInitConfig(model=str(base), old_tokenizer=str(base), new_tokenizer=str(tok_dir),
                                        out=str(out), method=pair[0], output_method=pair[1], seed=seed,
                                        pad_to_multiple_of=args.pad, progress=False, overwrite=True,
                                        calibration=calibration if pair[1] == "calibrated" else [],
                                        calibration_tokens=args.calibration_tokens))
        model = AutoModelForCausalLM.from_pretrained(out)
        shutil.rmtree(out, ignore_errors=True)
        row = {"0": score(model, new_tok, n_new)}
        if train_it:
            def record(n: int) -> None:
                if n == 25 and n < args.continue_steps:
                    row["25"] = score(model, new_tok, n_new)
                    model.train()
            train_steps(model, data, args.continue_steps, args.batch, args.continue_lr, seed=seed, warmup=10,
                        on_step=record)
            row[str(args.continue_steps)] = score(model, new_tok, n_new)
        return row

    random_pair = {"random", "hf-mean"}
    for seed in seeds:  # seeds outermost: a run cut short still has every pair at the first seeds
        for i, pair in enumerate(pairs):
            name, train_it = pair_name(pair), i < args.demo_train
            entry = results["pairs"].setdefault(name, {"embed": pair[0], "lm_head": pair[1], "seeds": {}})
            t0 = time.time()
            done = entry["seeds"].get(str(seed))
            if done and (not train_it or str(args.continue_steps) in done):
                continue  # --resume: measured already
            if seed > 0 and not train_it and not random_pair & set(pair):
                row = entry["seeds"]["0"]  # deterministic and not trained: the same rows for every seed
            else:
                row = run(pair, seed, train_it)
            entry["seeds"][str(seed)] = row
            print(f"{name:32} seed {seed}: " + "; ".join(
                f"{k}: zh {v['zh_bpb']:.3f} en {v['en_bpb']:.3f} en-mass {v['en_new_id_mass']:.4f}"
                for k, v in row.items()) + f" ({time.time() - t0:.0f}s)", flush=True)
            out_json.write_text(json.dumps(results, indent=1))
    print_demo_table(results)
    return results


def _mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def demo_table_rows(results: dict) -> list[dict]:
    """One row per pair: mean (and sd) over seeds of each figure at each step; ratios against the goals."""
    base = results["unextended"]
    rows = []
    rnd = results["pairs"].get("random", {}).get("seeds", {})
    rnd_zh0 = _mean_sd([s["0"]["zh_bpb"] for s in rnd.values()])[0] if rnd else None
    for name, p in results["pairs"].items():
        seeds = list(p["seeds"].values())
        row = {"name": name}
        for step in ("0", "25", str(results["steps"][-1])):
            have = [s for s in seeds if step in s]  # a pair trained at fewer seeds: over those
            if have:
                for k in ("zh_bpb", "en_bpb", "en_new_id_mass", "pad_mass_max"):
                    row[f"{k}@{step}"] = _mean_sd([s[step][k] for s in have])
                row[f"n@{step}"] = len(have)
        row["en_vs_base@0"] = row["en_bpb@0"][0] / base["en_bpb"] - 1
        row["zh_vs_random@0"] = (1 - row["zh_bpb@0"][0] / rnd_zh0) if rnd_zh0 else None
        rows.append(row)
    return rows


def print_demo_table(results: dict) -> None:
    last = str(results["steps"][-1])
    base = results["unextended"]
    print(f"\nunextended base model: zh {base['zh_bpb']:.3f}, en {base['en_bpb']:.3f} bpb; "
          f"{len(results['seeds'])} seeds (mean ± sd)")
    hdr = ("| embed / lm_head | zh@0 | en@0 | en vs base @0 | zh vs random @0 | en new-id mass @0 | zh@25 | en@25 | "
           f"zh@{last} | en@{last} | en new-id mass @{last} | pad mass (max) @0 |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))

    n_seeds = len(results["seeds"])

    def f(row, key, nd=3):
        if key not in row:
            return "–"
        m, sd = row[key]
        n = row.get("n@" + key.split("@")[1], n_seeds)
        return (f"{m:.{nd}f} ± {sd:.{nd}f}" if sd > 0 else f"{m:.{nd}f}") + (f" (n={n})" if n < n_seeds else "")
    for row in demo_table_rows(results):
        zr = row["zh_vs_random@0"]
        print(f"| {row['name']} | {f(row, 'zh_bpb@0')} | {f(row, 'en_bpb@0')} | {row['en_vs_base@0']:+.1%} | "
              f"{'' if zr is None else f'{zr:+.1%}'} | {f(row, 'en_new_id_mass@0', 4)} | {f(row, 'zh_bpb@25')} | "
              f"{f(row, 'en_bpb@25')} | {f(row, f'zh_bpb@{last}')} | {f(row, f'en_bpb@{last}')} | "
              f"{f(row, f'en_new_id_mass@{last}', 4)} | {row['pad_mass_max@0'][0]:.1e} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/embed_init/bench_quality")
    ap.add_argument("--steps", type=int, default=800, help="training steps of the base model")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4, help="attention heads (key/value heads: half of them)")
    ap.add_argument("--batch", type=int, default=16, help="blocks of 128 tokens per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--snapshots", default="",
                    help="comma-separated step counts: also compare the inits on the base model saved after "
                         "these steps (weaker bases, same run)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    ap.add_argument("--continue-steps", type=int, default=100,
                    help="then train each grown model this many steps with the new tokenizer (0 = skip)")
    ap.add_argument("--continue-lr", type=float, default=1e-3)
    ap.add_argument("--continue-curve", default="",
                    help="comma-separated step counts at which to also evaluate held-out Chinese during continued "
                         "training (e.g. 10,25,50)")
    ap.add_argument("--continue-all", action="store_true",
                    help="continue training from every base model (snapshots too), not only the final one")
    ap.add_argument("--eval-docs", type=int, default=300)
    ap.add_argument("--size", type=int, default=8000, help="size of the Chinese BPE appended to the base")
    ap.add_argument("--results", default=None, help="also write results.json here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--demo", default=None, help="runs folder of the demo workflow (e.g. runs/demo, after `graft run "
                    "workflows/demo.toml --to vocab_merge`): compare the methods on its base model and tokenizer "
                    "instead of training a model here")
    ap.add_argument("--seeds", type=int, default=3, help="--demo: seeds (init draws and data order)")
    ap.add_argument("--demo-pairs", type=int, default=0, help="--demo: only the first N method pairs (0 = all)")
    ap.add_argument("--demo-train", type=int, default=4, help="--demo: continue training the first N pairs")
    ap.add_argument("--pairs", default="", help="--demo: only these pairs, in this order (comma-separated "
                    "embed/lm_head names, a single name for both, e.g. mean,mean/calibrated,random)")
    ap.add_argument("--calibration-tokens", type=int, default=4096,
                    help="--demo: --calibration-tokens of `calibrated` (training text: zh news, pydoc)")
    ap.add_argument("--demo-train-docs", type=int, default=3000, help="--demo: zh news paragraphs to train on")
    ap.add_argument("--pad", type=int, default=64, help="--demo: --pad-to-multiple-of of every init")
    ap.add_argument("--resume", action="store_true", help="--demo: keep the rows of WORK/demo_results.json")
    ap.add_argument("--table", default=None, help="print the --demo table of a saved demo_results.json and exit")
    ap.add_argument("--reuse", action="store_true", help="reuse a kept work folder (skip training)")
    args = ap.parse_args()
    if args.table:
        print_demo_table(json.loads(Path(args.table).read_text()))
        return
    if args.demo:
        import torch

        torch.set_num_threads(2)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        res = demo_benchmark(args)
        if args.results:
            Path(args.results).write_text(json.dumps(res, indent=1))
        return

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from bench_embed_tokenizer import build_zh_tokenizer
    from demo.sources import base_tokenizer_model, english_paragraphs, people_daily_lines
    from embed_init.grow import write_tokenizer

    hf_logging.disable_progress_bar()  # one bar per checkpoint load buries the tables
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        torch.set_num_threads(2)
    snapshots = tuple(sorted(int(n) for n in args.snapshots.split(",") if n.strip()))
    work = Path(args.work)
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    news, en = people_daily_lines(), english_paragraphs()
    train_zh = [t for i, t in enumerate(news) if i % 20]
    dev_zh = [t for i, t in enumerate(news) if not i % 20 and 20 <= len(t) <= 400][:args.eval_docs]
    train_en = [t for i, t in enumerate(en) if i % 20]
    dev_en = [t for i, t in enumerate(en) if not i % 20 and 40 <= len(t) <= 1500][:args.eval_docs // 3]

    old_dir = work / "base_tok"
    old_dir.mkdir(exist_ok=True)
    write_tokenizer(base_tokenizer_model(), old_dir)
    old_tok = AutoTokenizer.from_pretrained(old_dir)
    base = work / "base"
    if args.reuse and (work / "train.json").is_file():
        train_info = json.loads((work / "train.json").read_text())
    else:
        print(f"training the base model on {device}...", flush=True)
        train_info = train_base(base, train_zh, train_en, old_tok, args.steps, batch=args.batch, hidden=args.hidden,
                                layers=args.layers, heads=args.heads, lr=args.lr, device=device,
                                snapshots=snapshots)
        for path in [base] + [snapshot_dir(base, n) for n in train_info["snapshots"]]:
            for f in old_dir.iterdir():  # each base model folder is a whole checkpoint, tokenizer included
                shutil.copy(f, path / f.name)
        (work / "train.json").write_text(json.dumps(train_info))
    # The final base model first: it is the one the question is about; snapshots show the trend.
    bases = {f"{train_info['steps']} steps": base}
    bases.update((f"{n} steps", snapshot_dir(base, n)) for n in sorted(train_info.get("snapshots", []), reverse=True))
    new_tok_dir = build_zh_tokenizer(work / "zh_tok", train_zh, size=args.size)
    new_tok = AutoTokenizer.from_pretrained(new_tok_dir)
    print(f"grown tokenizer: {len(new_tok)} pieces", flush=True)

    results = {"train": train_info, "new_vocab": len(new_tok), "dev_zh_docs": len(dev_zh), "dev_en_docs": len(dev_en),
               "by_base": {}}
    for label, path in bases.items():
        results["by_base"][label] = compare_inits(label.replace(" ", "_"), path, work, new_tok_dir, old_tok, new_tok,
                                                  dev_zh, dev_en, device)
        save_results(results, work, args.results)  # a partial table survives a run cut short
    if args.continue_steps:
        curve_at = tuple(int(n) for n in args.continue_curve.split(",") if n.strip())
        for label in list(bases)[:1] if not args.continue_all else bases:
            continue_training(label.replace(" ", "_"), work, train_zh, train_en, new_tok, dev_zh, dev_en,
                              args.continue_steps, args.continue_lr, args.batch, device, results["by_base"][label],
                              curve_at)
            save_results(results, work, args.results)
    print_summary(results["by_base"])
    save_results(results, work, args.results)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


if __name__ == "__main__":
    main()
