"""Peak memory of the eval stage (`eval.bpb`) vs a plain fp32 `from_pretrained`, same run, same checkpoint.

Checkpoint: a full-width, shallow Mixtral (hidden 4096, intermediate 14336, 8 experts, 32 heads / 8 KV
heads, vocab 32,000, 2 layers; bf16 safetensors, ~5.9 GiB), written shard by shard with random
embeddings (bench_embed_memory.write_random_mixtral), plus Mixtral's tokenizer files.
Both sides score the same dev documents (People's Daily + pydoc text) with the same `bits_per_byte`.

- ours:     `evaluate_models(EvalConfig(..., load=LOAD))` in a subprocess: what the workflow runs. `auto`
            chooses full precision only when the model takes at most half the available RAM, else NF4
            (continual.model.load_base_4bit, as training loads the base).
- baseline: a subprocess doing what the eval stage did before: AutoModelForCausalLM.from_pretrained(dtype=
            float32), no device map, then the same bits_per_byte.

Peak RSS = VmHWM of the measured process (file-backed pages of the mmap'd safetensors included); a
sampling thread (every 20 ms) also records the peak of RssAnon, the process's own memory without the
page cache it maps. Usage: python benchmarks/bench_eval_memory.py [--work DIR] [--load auto] [--keep]
Needs ~7 GB of free disk and ~15 GB of free RAM (for the baseline).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# The measured process reports its VmHWM and its sampled peak RssAnon on stderr at exit.
PROBE = r"""
import atexit, sys, threading, time
def _status(key):
    return int([l.split()[1] for l in open('/proc/self/status') if l.startswith(key + ':')][0]) * 1024
_peak_anon = [0]
def _sample():
    while True:
        _peak_anon[0] = max(_peak_anon[0], _status('RssAnon'))
        time.sleep(0.02)
threading.Thread(target=_sample, daemon=True).start()
atexit.register(lambda: sys.stderr.write(f"\nVMHWM {_status('VmHWM')} ANON {max(_peak_anon[0], _status('RssAnon'))}\n"))
"""

OURS = PROBE + r"""
import json
from workflows.evaluate import EvalConfig, evaluate_models
model, dev, out, load, max_docs, max_len = sys.argv[1:7]
t0 = time.time()
evaluate_models(EvalConfig(models=[model], labels=["m"], dev=[dev], out=out, load=load, max_docs=int(max_docs),
                           max_len=int(max_len)))
res = json.load(open(out + "/bpb.json"))["m"]
print(json.dumps({"bpb": res["dev"]["bpb"], "load": res["load"], "seconds": time.time() - t0}))
"""

BASELINE = PROBE + r"""
import json, torch
from transformers import AutoModelForCausalLM
from common.tokenizer_files import load_fast_tokenizer
from demo.stages import read_jsonl_texts
from workflows.evaluate import bits_per_byte
model, dev, max_docs, max_len = sys.argv[1:5]
t0 = time.time()
m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
r = bits_per_byte(m, load_fast_tokenizer(model), read_jsonl_texts([dev])[:int(max_docs)], bos=1, eos=2,
                  max_len=int(max_len))
print(json.dumps({"bpb": r["bpb"], "seconds": time.time() - t0}))
"""


def run_measured(script: str, args: list[str]) -> tuple[int, int, dict]:
    """Run `script` in a fresh python; return (VmHWM bytes, peak RssAnon bytes, its last stdout line as JSON)."""
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}):\n{res.stderr[-3000:]}")
    line = next(x for x in reversed(res.stderr.splitlines()) if x.startswith("VMHWM "))
    _, hwm, _, anon = line.split()
    for x in res.stdout.splitlines():
        if x.startswith("  m: loading"):
            print(" ", x.strip(), flush=True)
    return int(hwm), int(anon), json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/bench_eval_memory")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--load", default="auto", help="the eval stage's `load` (auto | full | nf4)")
    ap.add_argument("--max-docs", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    from bench_embed_memory import write_random_mixtral

    sys.path.insert(0, str(REPO / "tests"))  # tests/tiny_continual.py

    from tiny_continual import make_tokenizer
    from demo import sources
    from continual.load import available_ram, checkpoint_params

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.time()
    model = write_random_mixtral(work / "model", args.layers)
    make_tokenizer(model)
    n = checkpoint_params(model)
    dev = sources.write_jsonl(work / "dev.jsonl", [x for pair in zip(sources.people_daily_lines()[:8:2],
                                                                     sources.english_paragraphs()[:8:2]) for x in pair])
    print(f"checkpoint: {n['total'] / 1e9:.2f}B parameters ({n['quantized'] / n['total']:.1%} in 4-bit under NF4), "
          f"{sum(p.stat().st_size for p in model.glob('*.safetensors')) / 2**30:.2f} GiB bf16 "
          f"({time.time() - t0:.0f}s); available RAM {available_ram() / 2**30:.1f} GiB", flush=True)
    common = [str(args.max_docs), str(args.max_len)]
    ours_hwm, ours_anon, ours = run_measured(OURS, [str(model), str(dev), str(work / "eval"), args.load, *common])
    print(f"eval stage ({ours['load']['mode']}): VmHWM {ours_hwm / 2**30:.2f} GiB, RssAnon peak "
          f"{ours_anon / 2**30:.2f} GiB, {ours['seconds']:.0f}s", flush=True)
    base_hwm, base_anon, base = run_measured(BASELINE, [str(model), str(dev), *common])
    print(f"fp32 from_pretrained: VmHWM {base_hwm / 2**30:.2f} GiB, RssAnon peak {base_anon / 2**30:.2f} GiB, "
          f"{base['seconds']:.0f}s", flush=True)
    g = 2**30
    print(f"\n{'':34}{'VmHWM':>9}{'RssAnon':>9}{'seconds':>9}{'bpb':>8}")
    print(f"{'eval stage, load ' + args.load + ' -> ' + ours['load']['mode']:34}{ours_hwm / g:>8.2f}G"
          f"{ours_anon / g:>8.2f}G{ours['seconds']:>9.0f}{ours['bpb']:>8.3f}")
    print(f"{'plain fp32 from_pretrained':34}{base_hwm / g:>8.2f}G{base_anon / g:>8.2f}G{base['seconds']:>9.0f}"
          f"{base['bpb']:>8.3f}")
    print(f"ratio eval stage / fp32: VmHWM {ours_hwm / base_hwm:.3f}, RssAnon {ours_anon / base_anon:.3f}")
    print(json.dumps({"params": n, "load": ours["load"], "ours_vmhwm": ours_hwm, "ours_rss_anon": ours_anon,
                      "ours_seconds": round(ours["seconds"], 1), "ours_bpb": ours["bpb"], "fp32_vmhwm": base_hwm,
                      "fp32_rss_anon": base_anon, "fp32_seconds": round(base["seconds"], 1), "fp32_bpb": base["bpb"]}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
