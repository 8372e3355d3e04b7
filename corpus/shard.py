"""One work unit: read one input file, split its documents train/dev, tokenize, pack, write.

The train/dev split is decided per document by a keyed BLAKE2b hash of the document's UTF-8 text:
`dev` when hash % (train + dev) < dev. It needs no extra pass, gives the same answer on every run
and machine (it does not depend on file names, order, batching or worker count), and puts exact
duplicate documents into the same split, so a duplicate cannot leak from train into dev.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from corpus.blocks import SPLITS
from corpus.pack import BlockWriter, Packer, doc_token_array
from corpus.readers import DEFAULT_MAX_DOC_BYTES, RejectLog, iter_file, prefetch

STATS_FILE = "stats.json"
REJECTS_FILE = "rejects.jsonl"


def split_key(seed: int) -> bytes:
    return f"vocab-graft-split-{seed}".encode()


def split_of(text: str, train: int, dev: int, key: bytes = split_key(0)) -> str:
    """'train' or 'dev' for one document (stable keyed hash of its text; see the module docstring)."""
    if dev == 0:
        return "train"
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest(), "big")
    return "dev" if h % (train + dev) < dev else "train"


@dataclass
class ShardJob:
    """Everything a worker process needs for one input file (picklable)."""

    index: int
    shard_id: str
    path: str
    fmt: str | None
    text_field: str
    split: tuple[int, int]
    split_seed: int = 0
    tokenizer: str | None = None  # None: count documents and characters only
    eos_token: str | None = None
    bos_token: str | None = None
    add_bos: bool = False
    block_size: int = 2048
    batch_chars: int = 1_000_000
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    out: str | None = None  # folder to write train/, dev/, leftovers, stats; None: count only
    meta: dict | None = None  # corpus.pack.block_meta(block_size), computed once by the parent
    on_corrupt: str = "stop"  # a truncated/corrupt file: stop (GraftError) | skip (keep what was read, log it)


def empty_counts() -> dict[str, dict[str, int]]:
    return {s: {"documents": 0, "characters": 0, "tokens": 0, "blocks": 0} for s in SPLITS}


def sum_counts(stats: Iterable[dict]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Add up the per-split counts and per-reason rejects of several `process_shard` results."""
    counts, rejects = empty_counts(), Counter()
    for st in stats:
        for s in SPLITS:
            for k in counts[s]:
                counts[s][k] += st["counts"][s][k]
        rejects.update(st["rejects"])
    return counts, dict(rejects)


_TOKENIZERS: dict = {}


def remember_tokenizer(path: str, eos_token: str | None, bos_token: str | None, tok) -> None:
    """Let in-process shard jobs reuse a tokenizer the caller already loaded."""
    _TOKENIZERS[(str(path), eos_token, bos_token)] = tok


def _tokenizer(job: ShardJob):
    from corpus.tokens import load_pack_tokenizer

    key = (str(job.tokenizer), job.eos_token, job.bos_token)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_pack_tokenizer(job.tokenizer, job.eos_token, job.bos_token)
    return _TOKENIZERS[key]


def _read_batches(job: ShardJob, rejects: RejectLog) -> Iterator[dict[str, list[str]]]:
    """The file's documents as {split: [text, ...]} batches of about `batch_chars` characters."""
    key = split_key(job.split_seed)
    train_parts, dev_parts = job.split
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    chars = 0
    for rec in iter_file(job.path, fmt=job.fmt, field_name=job.text_field, rejects=rejects,
                         max_doc_bytes=job.max_doc_bytes, on_corrupt=job.on_corrupt):
        pending[split_of(rec.text, train_parts, dev_parts, key)].append(rec.text)
        chars += len(rec.text)
        if chars >= job.batch_chars:
            yield pending
            pending, chars = {s: [] for s in SPLITS}, 0
    yield pending


def process_shard(job: ShardJob, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run one work unit; returns {"counts": per split, "rejects": per reason, ...}.

    With `job.out`, writes `<out>/<split>/` datasets folders, `leftover_<split>.npy` (the tokens that
    did not fill a block, packed later with every shard's leftovers), rejects.jsonl and stats.json.
    Bad records are counted and logged, never fatal; an unreadable file raises GraftError.
    """
    tok = _tokenizer(job) if job.tokenizer else None
    write = job.out is not None
    out = Path(job.out) if write else None
    rejects = RejectLog(path=out / REJECTS_FILE if write else None)
    counts = empty_counts()
    packers = {s: Packer(job.block_size) for s in SPLITS} if write else {}
    writers = {s: BlockWriter(out / s, job.block_size, job.meta) for s in SPLITS} if write else {}
    per_doc_extra = 1 + int(job.add_bos)
    bos_id = tok.bos_id if tok is not None and job.add_bos else None
    try:
        for batch in prefetch(_read_batches(job, rejects)):
            docs = tokens = 0
            for s, texts in batch.items():
                if not texts:
                    continue
                c = counts[s]
                c["documents"] += len(texts)
                c["characters"] += sum(map(len, texts))
                docs += len(texts)
                if tok is None:
                    continue
                encs = tok.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
                if write:
                    arr = doc_token_array(encs, tok.eos_id, bos_id)
                    n = len(arr)
                    blocks = packers[s].add(arr)
                    writers[s].write(blocks)
                    c["blocks"] += len(blocks)
                else:
                    n = sum(len(e) for e in encs) + per_doc_extra * len(texts)
                c["tokens"] += n
                tokens += n
            if progress is not None and docs:
                progress(docs, tokens)
    finally:
        rejects.close()
    stats = {"shard_id": job.shard_id, "path": job.path, "counts": counts, "rejects": dict(rejects.counts),
             "corrupt": rejects.corrupt}
    if write:
        for s in SPLITS:
            writers[s].close()
            np.save(out / f"leftover_{s}.npy", packers[s].leftover)
            stats["counts"][s]["leftover_tokens"] = int(len(packers[s].leftover))
        (out / STATS_FILE).write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return stats


def set_threads(threads: int) -> None:
    """Cap the tokenizers (Rayon) thread pool of this process; must run before its first batch."""
    if threads > 0:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
