"""Stream text files and keep a reproducible sample of lines (reservoir sampling).

The corpus can be far larger than memory: every line is seen once, and at most `max_sentences`
are held. The same files, order and seed give the same sample.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from common.errors import GraftError
from corpus.readers import RejectLog, expand_inputs, iter_texts

# SentencePiece's trainer blanks out text equal to its meta pieces before counting characters; we do
# the same up front so our character counts are exactly the trainer's.
META_TEXT = re.compile(r"<unk>|<s>|</s>|<0x[0-9A-F]{2}>")


@dataclass
class Sample:
    lines: list[str]
    files: list[Path]
    seen_lines: int = 0
    seen_docs: int = 0
    too_long: int = 0
    rejects: dict[str, int] = field(default_factory=dict)


def sample_lines(inputs: Iterable[str], max_sentences: int, seed: int, *, max_line_bytes: int = 1 << 16,
                 rejects: RejectLog | None = None, progress: bool = True) -> Sample:
    """Reservoir-sample up to `max_sentences` non-blank lines from the documents of `inputs`.

    A document is split into lines (SentencePiece trains on lines). Lines longer than
    `max_line_bytes` are counted in `too_long` and written to `rejects` ("line_too_long"). The kept lines are returned in corpus
    order, so the result depends only on the files and the seed.
    """
    from tqdm import tqdm

    if max_sentences <= 0:
        raise GraftError(f"--max-sentences must be positive, got {max_sentences}. Fix: pass e.g. 1000000")
    files = expand_inputs(inputs)
    rejects = rejects if rejects is not None else RejectLog()
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    seen = docs = too_long = 0
    bar = tqdm(desc="reading", unit=" docs", disable=not progress, mininterval=1.0)
    for record in iter_texts(files, rejects=rejects):
        docs += 1
        for line in record.text.split("\n"):
            line = META_TEXT.sub(" ", line.rstrip("\r"))
            if not line.strip():
                continue
            if len(line) * 4 > max_line_bytes and len(line.encode("utf-8")) > max_line_bytes:
                too_long += 1
                rejects.add("line_too_long", record.source, record.line, line)
                continue
            if seen < max_sentences:
                reservoir.append((seen, line))
            else:
                j = rng.randrange(seen + 1)
                if j < max_sentences:
                    reservoir[j] = (seen, line)
            seen += 1
        bar.update(1)
    bar.close()
    reservoir.sort()
    return Sample([t for _, t in reservoir], files, seen, docs, too_long, dict(rejects.counts))
