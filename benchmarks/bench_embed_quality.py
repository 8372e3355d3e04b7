"""Quality of new-row initialisation: held-out Chinese bits per byte right after growing the vocabulary.

1. Train a small Llama-style model (untied lm_head) from scratch on CPU on mixed Chinese (People's Daily,
   every 20th paragraph held out) and English (pydoc topics, every 20th paragraph held out) with
   Mixtral's base tokenizer.
2. Grow the tokenizer with a Chinese BPE trained on the training paragraphs only (`graft vocab merge`).
3. `graft embed init` with mean, hf-mean and random (and, as an ablation, the reference script's mean that
   encodes with BOS and the dummy-prefix space), then evaluate, before any further training, the loss in
   bits per byte (total NLL in bits / UTF-8 bytes: comparable across vocabularies) on held-out Chinese and
   English, next to the base model with the base tokenizer. "new-id mass" = mean probability the model
   puts on all new ids together at positions whose next token is an old id (0 for the base model).

Usage: python benchmarks/bench_embed_quality.py [--steps 300] [--work /tmp/embed_init/bench_quality] [--keep]
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


def train_base(out: Path, train_zh, train_en, tok, steps: int, seq: int = 128, batch: int = 8, seed: int = 0,
               hidden: int = 128, layers: int = 2, lr: float = 3e-3) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    zh = [tok.encode(t) for t in train_zh]
    en = [tok.encode(t) for t in train_en]
    data = blocks(zh, 1, seq) + blocks(en, 1, seq)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = order[(step * batch) % len(data):(step * batch) % len(data) + batch]
        if len(idx) < batch:
            idx = order[:batch]
        x = torch.tensor([data[i] for i in idx])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.save_pretrained(out, max_shard_size="8MB", safe_serialization=True)
    return {"train_blocks": len(data), "train_tokens": len(data) * seq, "steps": steps, "seq": seq, "batch": batch,
            "final_loss": round(loss.item(), 4), "train_seconds": round(time.time() - t0, 1),
            "params": sum(p.numel() for p in model.parameters())}


def load_model(model_dir: Path, lm_head_from: Path | None = None):
    """Load a checkpoint; with `lm_head_from`, take the output layer from another one (ablation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lm_head_from is not None:
        other = AutoModelForCausalLM.from_pretrained(lm_head_from)
        model.lm_head.weight.data.copy_(other.lm_head.weight.data)
    return model.eval()


def bits_per_byte(model, texts: list[str], tok) -> dict:
    """Sum of NLL (bits) of every token after BOS over the UTF-8 bytes of the texts (one text at a time)."""
    import torch

    nll, nbytes, ntok, new_tok, mass_sum, mass_n = 0.0, 0, 0, 0, 0.0, 0
    n_old = 32000
    with torch.no_grad():
        for t in texts:
            ids = tok.encode(t)  # BOS + text
            x = torch.tensor([ids])
            logits = model(x).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            if logits.shape[1] > n_old:
                # probability the model puts on new ids where the next token is an old one
                old_target = x[0, 1:] < n_old
                mass_sum += logits.softmax(-1)[old_target, n_old:].sum().item()
                mass_n += int(old_target.sum())
            nbytes += len(t.encode("utf-8"))
            ntok += len(ids) - 1
            new_tok += sum(1 for i in ids if i >= n_old)
    return {"bpb": nll / math.log(2) / nbytes, "tokens": ntok, "bytes": nbytes, "new_id_share": new_tok / max(ntok, 1),
            "new_id_mass_at_old_targets": mass_sum / max(mass_n, 1)}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/embed_init/bench_quality")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-docs", type=int, default=300)
    ap.add_argument("--size", type=int, default=8000, help="size of the Chinese BPE appended to the base")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--reuse", action="store_true", help="reuse a kept work folder (skip training)")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    import embed_init.grow as grow_mod
    from bench_embed_tokenizer import build_zh_tokenizer
    from corpus.sources import base_tokenizer_model, english_paragraphs, people_daily_lines
    from embed_init.config import EmbedInitConfig
    from embed_init.grow import grow_embeddings, write_tokenizer

    torch.set_num_threads(2)
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
        print("training the base model...", flush=True)
        train_info = train_base(base, train_zh, train_en, old_tok, args.steps, batch=args.batch,
                                hidden=args.hidden, layers=args.layers, lr=args.lr)
        for f in old_dir.iterdir():
            shutil.copy(f, base / f.name)
        (work / "train.json").write_text(json.dumps(train_info))
    new_tok_dir = build_zh_tokenizer(work / "zh_tok", train_zh, size=args.size)
    new_tok = AutoTokenizer.from_pretrained(new_tok_dir)
    print(f"grown tokenizer: {len(new_tok)} pieces", flush=True)

    from common.io import is_complete

    def grown(method: str, name: str) -> Path:
        out = work / name
        if not is_complete(out):
            grow_embeddings(EmbedInitConfig(model=str(base), old_tokenizer=str(base_tokenizer_model()),
                                            new_tokenizer=str(new_tok_dir), out=str(out), method=method,
                                            progress=False, overwrite=True))
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
    rows["ablation: mean embed + random lm_head"] = ((work / "mean", work / "random"), new_tok)
    rows["ablation: random embed + mean lm_head"] = ((work / "random", work / "mean"), new_tok)

    results = {"train": train_info, "new_vocab": len(new_tok), "dev_zh_docs": len(dev_zh), "dev_en_docs": len(dev_en)}
    print(f"\nheld-out bits per byte ({len(dev_zh)} zh docs, {len(dev_en)} en docs), before further training:")
    print(f"{'':48}{'zh bpb':>8}{'zh tok':>8}{'new ids':>9}{'en bpb':>8}{'new-id mass zh/en':>19}")
    for name, ((path, lm_head_from), tok) in rows.items():
        model = load_model(path, lm_head_from)
        zh, e = bits_per_byte(model, dev_zh, tok), bits_per_byte(model, dev_en, tok)
        del model
        results[name] = {"zh": zh, "en": e}
        mass = f"{zh['new_id_mass_at_old_targets']:.2f}/{e['new_id_mass_at_old_targets']:.2f}"
        print(f"{name:48}{zh['bpb']:>8.3f}{zh['tokens']:>8}{zh['new_id_share']:>9.1%}{e['bpb']:>8.3f}{mass:>19}",
              flush=True)
    r = results
    print(f"\nratio zh bpb random / mean = {r['random']['zh']['bpb'] / r['mean']['zh']['bpb']:.3f}; "
          f"hf-mean / mean = {r['hf-mean']['zh']['bpb'] / r['mean']['zh']['bpb']:.3f}; "
          f"mean / base = {r['mean']['zh']['bpb'] / r['base (old tokenizer)']['zh']['bpb']:.3f}")
    print(json.dumps(results))
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


if __name__ == "__main__":
    main()
