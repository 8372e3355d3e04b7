"""`graft audit`: token counts of several tokenizers on the same corpora, side by side.

Reproduces the reference's "encoding efficiency" table (tokens on a shard per tokenizer) and
Baichuan's "compress rate" table. Each corpus is streamed in batches of about `batch_mb` MB, so
files larger than memory work; every batch is encoded by every tokenizer, in this process or in
`--workers` processes. Counting needs only the lengths of the encodings, so the overhead over the
tokenizer's own batch encoding is reading the file (benchmarks/bench_audit.py measures it).

Tokenizers: a Hugging Face folder (its tokenizer.json), a tokenizer.json, or a SentencePiece
`.model` (encoded with SentencePiece itself, the reference implementation). A folder with only a
tokenizer.model is encoded with SentencePiece too. Special tokens (BOS) are not added.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from common.errors import input_error
from common.rerun import guard, listed, overwrite_field
from corpus.readers import ON_CORRUPT_HELP, prefetch

FORMATS = ("md", "csv", "json")
COLUMNS = ("corpus", "tokenizer", "vocab_size", "documents", "chars", "bytes", "tokens", "tokens_per_char",
           "chars_per_token", "bytes_per_token", "relative_tokens")


@dataclass
class AuditConfig:
    """Compare tokenizers on your text: tokens, tokens per character, characters and bytes per token.

    Prints one table per corpus (each --corpus argument is one corpus; a glob is one corpus), with the
    token count relative to the first --tokenizer. With --out, also writes audit.csv, audit.json,
    audit.md, audit.png (bar chart of tokens per character) and manifest.json. Unreadable records are
    counted, skipped and written to OUT/rejects.jsonl.

    Example:
      graft audit --tokenizer base/tokenizer.model --tokenizer runs/merged --corpus zh.jsonl en.jsonl
    """

    tokenizers: list[str] = field(default_factory=list, metadata={"cli": False})
    corpus: list[str] = field(default_factory=list, metadata={
        "help": "text files or globs, one corpus each (.jsonl[.gz|.zst] field 'text', .parquet column 'text', "
                ".txt[.gz] one document per line)", "split": False, "metavar": "FILE"})
    out: str | None = field(default=None, metadata={"help": "folder for audit.csv/json/md/png + manifest.json", "metavar": "DIR"})
    format: str = field(default="md", metadata={"help": "table printed on stdout: md, csv or json"})
    workers: int = field(default=1, metadata={"help": "encoding processes (each encodes whole batches)"})
    batch_mb: float = field(default=1.0, metadata={"help": "text per batch, in MB"})
    field_name: str = field(default="text", metadata={"help": "JSON field / parquet column holding the text"})
    on_corrupt: str = field(default="stop", metadata={"help": ON_CORRUPT_HELP})
    overwrite: bool = overwrite_field()
    progress: bool = field(default=True, metadata={"help": "show a progress bar with MB/s"})

    def __post_init__(self) -> None:  # out-of-range values fail when the config is built (CLI, TOML, workflow)
        from common.validate import check_ranges
        from corpus.readers import ON_CORRUPT

        check_ranges(self, {"workers": ">=1", "batch_mb": ">0"}, choices={"format": FORMATS, "on_corrupt": ON_CORRUPT})

    def validate(self) -> "AuditConfig":
        """Ready to run: at least one tokenizer and one corpus."""
        from common.validate import check_required

        self.__post_init__()  # fields may have been set after the config was built
        check_required(self, {"tokenizers": "pass --tokenizer PATH (twice or more to compare)",
                              "corpus": "pass --corpus FILE (a .jsonl, .parquet or .txt file, or a glob)"})
        return self

# ---------------------------------------------------------------------------------------------
# tokenizers

def tokenizer_kind(path: str | Path) -> str:
    """"sentencepiece" or "tokenizers" for a tokenizer path; a GraftError saying what to pass otherwise.

    A folder with tokenizer.json, or a .json file: tokenizers. A .model file, a folder with only
    tokenizer.model, or any other file that parses as a SentencePiece model (Mixtral ships
    `tokenizer.model.v1`): sentencepiece.
    """
    from common.tokenizer_files import HF_FILE, SPM_FILE, is_sentencepiece

    p = Path(path)
    if not p.exists():
        raise input_error(p, "tokenizer not found", "check the path")
    if p.is_dir():
        if (p / HF_FILE).is_file():
            return "tokenizers"
        if (p / SPM_FILE).is_file():
            return "sentencepiece"
    elif p.suffix == ".json":
        return "tokenizers"
    elif p.suffix == ".model" or is_sentencepiece(p):
        return "sentencepiece"
    raise input_error(p, "is neither a tokenizer folder, a tokenizer.json nor a SentencePiece .model",
                      "pass a Hugging Face tokenizer folder, its tokenizer.json, or a .model file")


def tokenizer_name(path: str | Path) -> str:
    p = Path(path)
    if p.name in ("tokenizer.json", "tokenizer.model") and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name or str(p)


class TokenCounter:
    """Counts tokens of text batches with one tokenizer (no special tokens)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        from common.tokenizer_files import load_fast_tokenizer, load_sentencepiece

        p = Path(path)
        self.path = str(p)
        self.threads = threads  # SentencePiece threads (None: its default, all cores)
        self.sp = self.fast = None
        if tokenizer_kind(p) == "sentencepiece":
            self.sp = load_sentencepiece(p)
            self.vocab_size = self.sp.get_piece_size()
            self.kind = "sentencepiece"
        else:
            self.fast = load_fast_tokenizer(p)
            self.vocab_size = self.fast.get_vocab_size(with_added_tokens=True)
            self.kind = "tokenizers"

    def count(self, texts: list[str]) -> int:
        if self.fast is not None:
            return sum(map(len, self.fast.encode_batch_fast(texts, add_special_tokens=False)))
        if self.threads:
            return sum(map(len, self.sp.encode(texts, num_threads=self.threads)))
        return sum(map(len, self.sp.encode(texts)))


# Worker processes keep their tokenizers here (set by _init_worker).
_WORKER: list[TokenCounter] = []


def _init_worker(paths: list[str]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes are the parallelism; one thread each
    _WORKER[:] = [TokenCounter(p, threads=1) for p in paths]


def _count_batch(texts: list[str]) -> list[int]:
    return [c.count(texts) for c in _WORKER]


# ---------------------------------------------------------------------------------------------
# streaming

def _batches(pattern: str, cfg: AuditConfig, rejects: Any) -> Iterator[tuple[list[str], int, int]]:
    """(texts, chars, bytes) batches of about cfg.batch_mb MB."""
    from corpus.readers import iter_texts

    limit = max(1, int(cfg.batch_mb * (1 << 20)))
    texts: list[str] = []
    chars = size = 0
    for rec in iter_texts([pattern], field_name=cfg.field_name, rejects=rejects, on_corrupt=cfg.on_corrupt):
        t = rec.text
        texts.append(t)
        chars += len(t)
        size += len(t.encode("utf-8"))
        if size >= limit:
            yield texts, chars, size
            texts, chars, size = [], 0, 0
    if texts:
        yield texts, chars, size


def _audit_corpus(pattern: str, counters: list[TokenCounter], cfg: AuditConfig, rejects: Any,
                  pool: Any) -> dict[str, Any]:
    from tqdm.auto import tqdm

    tokens = [0] * len(counters)
    docs = chars = size = 0
    bar = tqdm(desc=f"audit {Path(pattern).name}", unit="B", unit_scale=True, unit_divisor=1000,
               disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        if pool is None:
            for texts, c, b in prefetch(_batches(pattern, cfg, rejects)):
                for j, counter in enumerate(counters):
                    tokens[j] += counter.count(texts)
                docs, chars, size = docs + len(texts), chars + c, size + b
                bar.update(b)
        else:
            from concurrent.futures import FIRST_COMPLETED, wait

            pending: dict[Any, int] = {}
            window = 2 * cfg.workers  # bounded: never more than this many batches in memory

            def drain(block_until_one: bool) -> None:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED) if block_until_one else (
                    [f for f in pending if f.done()], None)
                for f in done:
                    b = pending.pop(f)
                    for j, n in enumerate(f.result()):
                        tokens[j] += n
                    bar.update(b)

            for texts, c, b in _batches(pattern, cfg, rejects):
                while len(pending) >= window:
                    drain(True)
                pending[pool.submit(_count_batch, texts)] = b
                docs, chars, size = docs + len(texts), chars + c, size + b
            while pending:
                drain(True)
    finally:
        bar.close()
    return {"documents": docs, "chars": chars, "bytes": size, "tokens": tokens}


def audit_tables(cfg: AuditConfig, rejects: Any = None) -> list[dict[str, Any]]:
    """One row per (corpus, tokenizer), in the order given; see COLUMNS."""
    from corpus.readers import RejectLog, expand_inputs

    cfg.validate()
    for pattern in cfg.corpus:
        expand_inputs([pattern])  # fail early on a missing file, before loading tokenizers
    for p in cfg.tokenizers:
        tokenizer_kind(p)  # fail on a bad path before reading anything
    paths = [str(p) for p in cfg.tokenizers]
    counters = [TokenCounter(p) for p in paths]
    names = [tokenizer_name(p) for p in paths]
    if len(set(names)) < len(names):
        names = paths
    rejects = rejects if rejects is not None else RejectLog()
    pool = None
    if cfg.workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=(paths,))
    rows = []
    try:
        for pattern in cfg.corpus:
            before = rejects.total
            res = _audit_corpus(pattern, counters, cfg, rejects, pool)
            if res["documents"] == 0:
                raise input_error(pattern, f"the corpus has no usable text ({rejects.total - before} records "
                                           "rejected)", "pass files with non-empty 'text' fields (.jsonl/"
                                           ".parquet) or non-empty lines (.txt)")
            first = res["tokens"][0]
            for name, counter, tok in zip(names, counters, res["tokens"]):
                rows.append({
                    "corpus": pattern, "tokenizer": name, "vocab_size": counter.vocab_size,
                    "documents": res["documents"], "chars": res["chars"], "bytes": res["bytes"], "tokens": tok,
                    "tokens_per_char": tok / res["chars"], "chars_per_token": res["chars"] / tok if tok else None,
                    "bytes_per_token": res["bytes"] / tok if tok else None,
                    "relative_tokens": tok / first if first else None, "path": counter.path})
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return rows


# ---------------------------------------------------------------------------------------------
# formatting

def _f(v: Any, nd: int = 4) -> str:
    return "" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    out: list[str] = []
    cols = ("tokenizer", "vocab_size", "tokens", "tokens_per_char", "chars_per_token", "bytes_per_token",
            "relative_tokens")
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        rs = [r for r in rows if r["corpus"] == corpus]
        out += [f"### {corpus}", "", f"{rs[0]['documents']} documents, {rs[0]['chars']} characters, "
                f"{rs[0]['bytes']} bytes", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_f(r[c]) for c in cols) + " |" for r in rs]
        out.append("")
    return "\n".join(out)


def to_csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    import json

    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


RENDER = {"md": to_markdown, "csv": to_csv, "json": to_json}


def audit(cfg: AuditConfig) -> Path | None:
    """Audit; print the table in cfg.format; with cfg.out write the files and return the folder."""
    from analysis.plots import bar_chart
    from common.io import atomic_write_text, write_manifest
    from corpus.readers import RejectLog

    started = time.time()
    out = Path(cfg.out) if cfg.out else None
    rerun = None
    if out is not None:
        skip, rerun = guard(cfg, out, stage="audit", in_place=True, volatile=("format", "batch_mb"),
                            inputs={**listed("tokenizer", cfg.tokenizers), **listed("corpus", cfg.corpus)})
        if skip:
            return out
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").unlink(missing_ok=True)
        (out / "rejects.jsonl").unlink(missing_ok=True)
    rejects = RejectLog(out / "rejects.jsonl" if out else None)
    try:
        rows = audit_tables(cfg, rejects)
    finally:
        rejects.close()
    print(RENDER[cfg.format](rows), end="")
    if rejects.total:
        print(f"graft: audit: {rejects.summary()}", file=sys.stderr)
    if out is None:
        return None
    atomic_write_text(out / "audit.csv", to_csv(rows))
    atomic_write_text(out / "audit.json", to_json(rows))
    atomic_write_text(out / "audit.md", to_markdown(rows))
    labels = {c: Path(c).name for c in cfg.corpus}
    if len(set(labels.values())) < len(labels):
        labels = {c: c for c in cfg.corpus}
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        groups.setdefault(labels[r["corpus"]], {})[r["tokenizer"]] = r["tokens_per_char"]
    bar_chart(out / "audit.png", groups, ylabel="tokens per character (lower is better)",
              title="Tokenizer audit")
    write_manifest(out, stage="audit", config=cfg, inputs={"tokenizers": [r["path"] for r in rows[:len(cfg.tokenizers)]],
                                                           "corpus": cfg.corpus},
                   counts={"rows": len(rows), "rejected": rejects.total, "rejected_by_reason": dict(rejects.counts)},
                   corrupt_files=rejects.corrupt, rerun=rerun, started=started, files=["audit.csv", "audit.json", "audit.md", "audit.png"])
    return out
