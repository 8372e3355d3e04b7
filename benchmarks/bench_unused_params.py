"""Parameters without a gradient under DDP: the cost of each way to make 2 processes train a MoE with LoRA.

In a step, experts that no token was routed to, and new-row embedding deltas of batches without new ids, get
no gradient; plain DDP then fails on the next step ("Expected to have finished reduction in the prior
iteration"). Three ways out, each run here with 2 CPU processes (gloo) on the same tiny 4-bit Mixtral (8 experts,
top-2, LoRA r 8 on attention and experts, new-rows embeddings), the same batches and the same steps:

- zero-term: what graft train does. 0 x the sum of the trainable parameters, built before the forward
  (continual.train._zero_contribution); DDP with find_unused_parameters=False.
- find-unused: DDP(find_unused_parameters=True), which walks the autograd graph after every forward.
- static-graph: DDP(static_graph=True), which assumes the same parameters are used in every step.

Reports the median step time of each (forward + backward + AdamW step, after 2 warm-up steps), its ratio to
zero-term, and the error of those that fail.

    .venv/bin/python benchmarks/bench_unused_params.py [--steps 20] [--work /tmp/bench_unused]
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
MODES = ("zero-term", "find-unused", "static-graph")


def build(work: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))  # tests/tiny_continual.py
    from tiny_continual import make_blocks, make_tiny_base, make_tokenizer

    if (work / "ready").is_file():
        return
    make_tokenizer(work / "tok", n_added=64)
    make_tiny_base(work / "base", work / "tok", old_vocab_size=32000, experts=8, layers=2, hidden=128,
                   intermediate=256)
    make_blocks(work / "data", work / "tok", block_len=16, n_train=256, n_dev=2)
    (work / "ready").write_text("ok")


def worker(work: Path, mode: str, steps: int, result: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from continual import data as D
    from continual import model as M
    from continual.config import TrainConfig
    from continual.train import _zero_contribution

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = TrainConfig(model=str(work / "base"), train_data="x", out="x", lora_r=8, lora_alpha=16, lora_dropout=0.0,
                      embeddings="new-rows")
    vocab = int(M.read_model_config(work / "base")["vocab_size"])
    model = M.load_base_4bit(work / "base", torch.float32)
    model = M.add_adapters(model, cfg, vocab, 32000)
    model.config.output_router_logits = True
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = DDP(model, find_unused_parameters=mode == "find-unused", static_graph=mode == "static-graph")
    opt = torch.optim.AdamW(params, lr=1e-3)
    ds = D.load_split(work / "data", "train")
    batches = D.micro_batches(len(ds), 1, 0, 0, rank, 2)
    times, error = [], None
    try:
        for _ in range(steps + 2):
            _, idx = next(batches)
            batch = torch.tensor(ds[[int(i) for i in idx]]["input_ids"])
            t0 = time.perf_counter()
            zero = _zero_contribution(params) if mode == "zero-term" else None
            loss = ddp(input_ids=batch, labels=batch, use_cache=False).loss
            (loss if zero is None else loss + zero).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    except RuntimeError as e:
        error = str(e).splitlines()[0][:300]
    if rank == 0:
        result.write_text(json.dumps({"mode": mode, "times": times[2:], "error": error}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--work", default="/tmp/bench_unused")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.work)
    if a.worker:
        return worker(work, a.worker, a.steps, Path(a.result))
    build(work)
    torchrun = Path(sys.executable).parent / "torchrun"
    rows = {}
    for mode in MODES:
        result = work / f"{mode}.json"
        result.unlink(missing_ok=True)
        subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, "--worker", mode,
                        "--steps", str(a.steps), "--work", str(work), "--result", str(result)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True, timeout=600)
        rows[mode] = json.loads(result.read_text()) if result.is_file() else {"times": [], "error": "no result"}
    base = None
    print(f"{'mode':<14} {'steps':>5} {'median s/step':>14} {'vs zero-term':>12}  error")
    for mode, r in rows.items():
        t = sorted(r["times"])
        med = t[len(t) // 2] if t else None
        base = base or med
        ratio = f"{med / base:.2f}x" if med and base else "-"
        shown = "-" if med is None else f"{med:.4f}"
        print(f"{mode:<14} {len(t):>5} {shown:>14} {ratio:>12}  {r['error'] or ''}")


if __name__ == "__main__":
    main()
