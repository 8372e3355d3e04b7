"""Build a grown (base + Chinese) tokenizer for the embed_init benchmarks with `graft vocab`'s own code.

Run alone to build one:  python benchmarks/bench_embed_tokenizer.py OUT_DIR [SIZE]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def build_zh_tokenizer(out: str | Path, lines, size: int = 8000, chars: int | None = None) -> Path:
    """Train a Chinese BPE of `size` pieces on `lines` and append it to Mixtral's tokenizer (vocab merge)."""
    from common.io import is_complete
    from demo.sources import base_tokenizer_model
    from vocab.merge import VocabMergeConfig, merge_into_base
    from vocab.train import count_chars, train_bpe

    out = Path(out)
    if is_complete(out):
        return out
    lines = list(lines)
    chars = chars or min(len(count_chars(lines)), size // 3)
    proto = train_bpe(lines, chars, size)
    cand = out.with_name(out.name + ".cand.model")
    cand.write_bytes(proto.SerializeToString())
    return merge_into_base(VocabMergeConfig(base=str(base_tokenizer_model()), add=str(cand), out=str(out)))


if __name__ == "__main__":
    from demo.sources import people_daily_lines

    t0 = time.time()
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 8000
    d = build_zh_tokenizer(sys.argv[1], people_daily_lines(), size)
    from embed_init.tokens import load_pieces

    print(f"{d}: {len(load_pieces(d))} pieces in {time.time() - t0:.1f}s")
