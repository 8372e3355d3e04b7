"""Peak memory of `graft embed init` vs transformers' resize_token_embeddings, same run, same checkpoint.

Checkpoint: a full-width, shallow Mixtral (hidden 4096, intermediate 14336, 8 experts, vocab 32,000,
2 layers, bf16 ~6 GB) written shard by shard (never materialised as a model); embed_tokens and lm_head
are random, the other weights constant (their values do not affect memory).
New tokenizer: Mixtral's + a Chinese BPE appended with `graft vocab merge` (~60k pieces).

- ours:     `graft embed init` in a subprocess (peak RSS = VmHWM of that process).
- baseline: a subprocess that loads the model with AutoModelForCausalLM.from_pretrained, calls
            resize_token_embeddings (mean_resizing, transformers' default) and save_pretrained.
Target: ours <= 2 x (embed_tokens + lm_head bytes) + largest shard.

Usage: python benchmarks/bench_embed_memory.py [--work /tmp/embed_init/bench_mem] [--layers 2] [--keep]
Needs ~20 GB of free disk and ~9 GB of free RAM (for the baseline). Deletes its work folder at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Peak RSS is read from /proc/self/status VmHWM inside the measured process at exit. (wait4's ru_maxrss is
# not usable: Linux carries the parent's high-water mark across fork+exec into the child.)
HWM = ("import atexit, sys\n"
       "def _hwm():\n"
       "    return int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]) * 1024\n"
       "atexit.register(lambda: sys.stderr.write(f'\\nVMHWM {_hwm()}\\n'))\n")

GRAFT = HWM + "from workflows.cli import main\nsys.argv[0] = 'graft'\nsys.exit(main())\n"

BASELINE = HWM + r"""
import time, torch
from transformers import AutoModelForCausalLM
src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.time()
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
after_load = _hwm()
m.resize_token_embeddings(n, mean_resizing=sys.argv[4] == "1")
peak_resize = _hwm()
resize_s = time.time() - t0
m.save_pretrained(out, max_shard_size="1500MB")
print({"after_load": after_load, "peak_to_resize": peak_resize, "resize_seconds": resize_s,
       "seconds": time.time() - t0})
"""


def write_random_mixtral(out: Path, layers: int, shard_bytes: int = 1500 * 2**20, seed: int = 0) -> Path:
    """Write a bf16 Mixtral checkpoint tensor by tensor: at most one tensor is in memory at a time."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from common.checkpoint import tensor_writer, write_index, write_shard

    cfg = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with torch.device("meta"):
        meta = MixtralForCausalLM(cfg)
    specs = [(n, tuple(t.shape)) for n, t in meta.state_dict().items()]
    shards, cur, size = [], [], 0
    for n, shape in specs:
        nb = math.prod(shape) * 2
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((n, shape))
        size += nb
    shards.append(cur)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def make(name, shape):
        def produce():
            if name.endswith("norm.weight"):
                return torch.ones(shape, dtype=torch.bfloat16)
            if "embed_tokens" in name or "lm_head" in name:
                return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            # Other weights do not affect memory or the embedding math: a cheap constant keeps this fast.
            return torch.full(shape, 0.01, dtype=torch.bfloat16)
        return produce

    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out / fname, [(n, "BF16", s, tensor_writer(make(n, s), n, "BF16", s)) for n, s in tensors])
        for n, s in tensors:
            weight_map[n] = fname
            total += math.prod(s) * 2
        print(f"  wrote {fname} ({(out / fname).stat().st_size / 2**30:.2f} GiB)", flush=True)
    write_index(out, weight_map, total)
    cfg.save_pretrained(out)
    return out


def run_measured(cmd: list[str]) -> tuple[int, float, str]:
    """Run `cmd` (a python -c HWM-wrapped script); return (its peak RSS in bytes, seconds, stdout)."""
    import tempfile

    t0 = time.time()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        rc = subprocess.call(cmd, stdout=fo, stderr=fe, cwd=REPO)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if rc != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    peak = int(next(line.split()[1] for line in reversed(err.splitlines()) if line.startswith("VMHWM ")))
    return peak, time.time() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/embed_init/bench_mem")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--mean-resizing", action=argparse.BooleanOptionalAction, default=True,
                    help="baseline resize with mean_resizing (transformers' default; its sampling is slow)")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = sys.executable
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_embed_tokenizer import build_zh_tokenizer

    from common.checkpoint import open_checkpoint
    from demo.sources import base_tokenizer_model, people_daily_lines
    from embed_init.tokens import load_pieces

    t0 = time.time()
    tok = build_zh_tokenizer(work / "tok", people_daily_lines(), size=30000)
    n_new = len(load_pieces(tok))
    print(f"tokenizer: {n_new} pieces ({time.time() - t0:.0f}s)")
    t0 = time.time()
    base = write_random_mixtral(work / "base", args.layers)
    ckpt = open_checkpoint(base)
    embed_b = ckpt.info("model.embed_tokens.weight").nbytes + ckpt.info("lm_head.weight").nbytes
    largest = max((base / s).stat().st_size for s in ckpt.shards)
    target = 2 * embed_b + largest
    print(f"checkpoint: {ckpt.total_size / 2**30:.2f} GiB in {len(ckpt.shards)} shards, largest "
          f"{largest / 2**30:.2f} GiB; embed+lm_head {embed_b / 2**20:.0f} MiB ({time.time() - t0:.0f}s)")

    ours_rss, ours_s, _ = run_measured([py, "-c", GRAFT, "embed", "init", "--model", str(base), "--old-tokenizer",
                                        str(base_tokenizer_model()), "--new-tokenizer", str(tok),
                                        "--out", str(work / "ours"), "--no-progress"])
    check_rss, check_s, check_out = run_measured([py, "-c", GRAFT, "embed", "check", str(work / "ours"), "--model", str(base),
                                                  "--no-forward"])
    results = {"n_new": n_new, "layers": args.layers, "checkpoint_bytes": ckpt.total_size, "shards": len(ckpt.shards),
               "largest_shard": largest, "embed_lm_head_bytes": embed_b, "target": target,
               "ours_peak_rss": ours_rss, "ours_seconds": round(ours_s, 1),
               "check_peak_rss": check_rss, "check_seconds": round(check_s, 1)}
    print(f"graft embed init: peak RSS {ours_rss / 2**30:.2f} GiB, {ours_s:.1f}s; target {target / 2**30:.2f} GiB",
          flush=True)
    print(check_out.strip().splitlines()[-1], flush=True)
    if not args.skip_baseline:
        base_rss, base_s, out = run_measured([py, "-c", BASELINE, str(base), str(work / "hf"), str(n_new),
                                              "1" if args.mean_resizing else "0"])
        phases = eval(out.strip().splitlines()[-1])  # noqa: S307  (our own subprocess's dict)
        results.update(baseline_mean_resizing=args.mean_resizing, baseline_peak_rss=base_rss,
                       baseline_seconds=round(base_s, 1), baseline_peak_to_resize=phases["peak_to_resize"],
                       baseline_resize_seconds=round(phases["resize_seconds"], 1),
                       baseline_after_load=phases["after_load"])
    g = 2**30
    print(f"\n{'':28}{'peak RSS':>10}{'seconds':>9}")
    print(f"{'graft embed init':28}{ours_rss / g:>9.2f}G{ours_s:>9.1f}")
    if "baseline_peak_rss" in results:
        print(f"{'HF load+resize':28}{results['baseline_peak_to_resize'] / g:>9.2f}G"
              f"{results['baseline_resize_seconds']:>9.1f}")
        print(f"{'HF load+resize+save':28}{results['baseline_peak_rss'] / g:>9.2f}G{results['baseline_seconds']:>9.1f}")
        print(f"ratio ours / HF load+resize: {ours_rss / results['baseline_peak_to_resize']:.3f}; "
              f"ours / HF load+resize+save: {ours_rss / results['baseline_peak_rss']:.3f}")
    print(f"target 2x(embed+lm_head)+largest shard = {target / g:.2f}G -> "
          f"{'MET' if ours_rss <= target else 'MISSED'} ({ours_rss / target:.2f} of target)")
    print(json.dumps(results))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
