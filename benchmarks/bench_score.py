"""Benchmark: `vocab score` with the nested fast path against tokenizing every candidate, same run.

Grid: Mixtral's real tokenizer cut to N sizes (nested, like `vocab train` output) and scored on real
Chinese news, reviews and English text. Both sides compute the same rows (checked); the baseline
runs SentencePiece once per candidate, the fast path once per grid.

    .venv/bin/python benchmarks/bench_score.py                 # 16 candidates, 20k lines
    .venv/bin/python benchmarks/bench_score.py --sizes 32 --lines 40000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.alp import sample_lines  # noqa: E402
from analysis.nested import ModelInfo, truncate_merges  # noqa: E402
from analysis.score import Sample, ScoreConfig, read_candidates, score_rows  # noqa: E402
from common.tokenizer_files import load_model_proto  # noqa: E402
from demo import sources  # noqa: E402

SCRATCH = Path("/tmp/analysis/bench_score")


def build_grid(n_sizes: int) -> Path:
    root = SCRATCH / f"mixtral_{n_sizes}"
    if (root / "manifest.json").is_file():
        return root
    base = load_model_proto(sources.base_tokenizer_model())
    info = ModelInfo.from_proto(base)
    n = len(info.merges) - 14  # keep Mixtral's 14 tied whitespace merges out of the cut points
    (root / "candidates").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(1, n_sizes + 1):
        proto = truncate_merges(base, n * i // n_sizes)
        rel = f"candidates/chars{len(info.chars)}_size{len(proto.pieces)}.model"
        (root / rel).write_bytes(proto.SerializeToString())
        entries.append({"chars": len(info.chars), "size": len(proto.pieces), "path": rel})
    (root / "manifest.json").write_text(json.dumps({"candidates": entries}))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, default=16, help="candidates in the grid")
    ap.add_argument("--lines", type=int, default=20000, help="sampled lines")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="SentencePiece threads (0: all), both sides")
    args = ap.parse_args()

    grid = build_grid(args.sizes)
    texts = list(sources.people_daily_lines()) + list(sources.review_lines()) + list(sources.english_paragraphs())
    lines = sample_lines(texts, args.lines, seed=1)
    sample = Sample(lines=lines, chars=sum(map(len, lines)), bytes=sum(len(s.encode()) for s in lines),
                    script_chars={}, rejected=0, reject_summary="", files=[])
    cands = read_candidates(grid)
    cfg = ScoreConfig(candidates_dir=str(grid), corpus=[], out=str(SCRATCH / "out"), threads=args.threads,
                      progress=False)
    direct_cfg = ScoreConfig(**{**cfg.__dict__, "nested": False})
    print(f"{len(cands)} nested candidates (Mixtral cut to {cands[0]['size']}..{cands[-1]['size']} pieces); "
          f"{len(lines)} lines, {sample.chars} chars, {sample.bytes / 1e6:.1f} MB; best of {args.repeats}")
    best = {"direct": float("inf"), "nested": float("inf")}
    rows = {}
    for _ in range(args.repeats):
        for name, c in (("direct", direct_cfg), ("nested", cfg)):
            t = time.perf_counter()
            rows[name], _ = score_rows(c, sample, cands)
            best[name] = min(best[name], time.perf_counter() - t)
    for a, b in zip(rows["direct"], rows["nested"]):
        assert a["tokens"] == b["tokens"] and abs(a["alp"] - b["alp"]) <= 1e-9, (a, b)
    print(f"  direct (one SentencePiece pass per candidate): {best['direct']:7.2f} s")
    print(f"  nested (one pass + merge-rank replay)         : {best['nested']:7.2f} s")
    print(f"  speed-up direct / nested = {best['direct'] / best['nested']:.2f}x  (rows identical, ALP within 1e-9)")
    for r in rows["nested"][:: max(1, len(cands) // 4)] + [rows["nested"][-1]]:
        print(f"    size {r['size']:>6}: ALP {r['alp']:9.2f}  tokens/char {r['tokens_per_char']:.4f}  "
              f"renyi {r['renyi_efficiency']:.4f}  never produced {r['never_produced']}")


if __name__ == "__main__":
    main()
