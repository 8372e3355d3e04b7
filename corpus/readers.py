"""Streaming text readers for .jsonl(.gz/.zst), .parquet and .txt(.gz) with reject accounting.

Nothing is lost silently: a record that cannot be used (bad JSON, missing or non-string text,
invalid UTF-8, empty, too long, a parquet file without the text column) is counted per reason
and, when a `RejectLog` has a path, written to `rejects.jsonl` with its file and line number.
A missing or unreadable file is an error: that is a setup problem, not a bad record.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from common.errors import GraftError, input_error

FORMATS = ("jsonl", "parquet", "txt")
# One document larger than this is rejected ("too_long") rather than tokenized: a 50 MB line is
# almost always a broken dump, and it would dominate memory of a packing worker.
DEFAULT_MAX_DOC_BYTES = 16 << 20


@dataclass
class Record:
    text: str
    source: str  # file path
    line: int  # 1-based line number (jsonl/txt) or row number (parquet)


@dataclass
class RejectLog:
    """Counts rejected records per reason and optionally writes them to a jsonl file."""

    path: Path | None = None
    counts: Counter = field(default_factory=Counter)
    preview_chars: int = 200
    _fh: IO[str] | None = field(default=None, repr=False)

    def add(self, reason: str, source: str | Path, line: int | None, raw: bytes | str | None = None,
            n: int = 1) -> None:
        self.counts[reason] += n
        if self.path is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        if isinstance(raw, bytes):
            raw = raw[: self.preview_chars * 4].decode("utf-8", errors="replace")
        entry = {"file": str(source), "line": line, "reason": reason, "count": n,
                 "preview": None if raw is None else raw[: self.preview_chars]}
        self._fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no records rejected"
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        where = f" (written to {self.path})" if self.path else ""
        return f"{self.total} records rejected ({parts}){where}"

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def detect_format(path: str | Path) -> str:
    name = Path(path).name.lower()
    for suffix in (".gz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    raise input_error(path, "unknown file type",
                      "use .jsonl/.jsonl.gz/.jsonl.zst (field 'text'), .parquet (column 'text') or .txt(.gz), "
                      "or pass the format explicitly")


def expand_inputs(patterns: Iterable[str | Path]) -> list[Path]:
    """Expand files and globs (sorted, so the order is reproducible); error on a pattern matching nothing."""
    out: list[Path] = []
    for pat in patterns:
        pat = str(pat)
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        if not matches:
            raise input_error(pat, "no file matches this pattern", "check the glob and the working directory")
        for m in matches:
            p = Path(m)
            if not p.exists():
                raise input_error(p, "file not found", "check the path")
            if p.is_dir():
                raise input_error(p, "is a folder, not a file", "pass the files inside it, e.g. 'DIR/*.jsonl'")
            out.append(p)
    if not out:
        raise GraftError("no input files given. Fix: pass one or more files or globs")
    return out


def _open_binary(path: Path) -> IO[bytes]:
    try:
        name = path.name.lower()
        if name.endswith(".gz"):
            return gzip.open(path, "rb")
        if name.endswith(".zst"):
            import zstandard

            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
        return open(path, "rb")
    except FileNotFoundError:
        raise input_error(path, "file not found", "check the path") from None
    except PermissionError:
        raise input_error(path, "permission denied", "make the file readable (chmod +r) or copy it") from None
    except OSError as e:
        raise input_error(path, f"cannot open ({e.strerror})", "check that the file is readable") from None


def _iter_lines(path: Path, fmt: str, field_name: str, rejects: RejectLog, max_doc_bytes: int) -> Iterator[Record]:
    src = str(path)
    with _open_binary(path) as fh:
        try:
            for lineno, raw in enumerate(fh, start=1):
                if len(raw) > max_doc_bytes:
                    rejects.add("too_long", src, lineno, raw)
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    rejects.add("invalid_utf8", src, lineno, raw)
                    continue
                line = line.rstrip("\r\n") if fmt == "txt" else line
                if fmt == "txt":
                    text = line
                else:
                    if not line.strip():
                        rejects.add("empty", src, lineno, raw)
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        rejects.add("bad_json", src, lineno, raw)
                        continue
                    if not isinstance(obj, dict) or field_name not in obj:
                        rejects.add("missing_text", src, lineno, raw)
                        continue
                    text = obj[field_name]
                    if not isinstance(text, str):
                        rejects.add("non_string_text", src, lineno, raw)
                        continue
                if not text.strip():
                    rejects.add("empty", src, lineno, raw)
                    continue
                yield Record(text, src, lineno)
        except (EOFError, gzip.BadGzipFile, OSError) as e:
            raise input_error(path, f"file is truncated or corrupt ({e})", "re-download or re-compress it") from None


def _iter_parquet(path: Path, field_name: str, rejects: RejectLog, max_doc_bytes: int,
                  batch_rows: int = 4096) -> Iterator[Record]:
    import pyarrow.parquet as pq

    src = str(path)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise input_error(path, "file not found", "check the path") from None
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise input_error(path, f"not a readable parquet file ({e})", "re-download or re-export it") from None
    if field_name not in pf.schema_arrow.names:
        # The whole file is unusable; count its rows so the loss is visible, and go on.
        rejects.add("missing_column", src, None, f"columns: {pf.schema_arrow.names}", n=pf.metadata.num_rows)
        return
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[field_name]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                rejects.add("missing_text" if text is None else "non_string_text", src, row, repr(text))
            elif len(text) * 4 > max_doc_bytes and len(text.encode("utf-8")) > max_doc_bytes:
                rejects.add("too_long", src, row, text)
            elif not text.strip():
                rejects.add("empty", src, row, text)
            else:
                yield Record(text, src, row)


def iter_file(path: str | Path, *, fmt: str | None = None, field_name: str = "text",
              rejects: RejectLog | None = None, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[Record]:
    """Stream the documents of one file (a .txt line is one document)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise GraftError(f"unknown format {fmt!r}. Fix: use one of {', '.join(FORMATS)}")
    if not path.exists():
        raise input_error(path, "file not found", "check the path")
    rejects = rejects if rejects is not None else RejectLog()
    if fmt == "parquet":
        yield from _iter_parquet(path, field_name, rejects, max_doc_bytes)
    else:
        yield from _iter_lines(path, fmt, field_name, rejects, max_doc_bytes)


def iter_texts(patterns: Iterable[str | Path], *, fmt: str | None = None, field_name: str = "text",
               rejects: RejectLog | None = None, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[Record]:
    """Stream the documents of several files or globs, in sorted order per pattern."""
    for path in expand_inputs(patterns):
        yield from iter_file(path, fmt=fmt, field_name=field_name, rejects=rejects, max_doc_bytes=max_doc_bytes)


_DONE = object()


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run `it` in a background thread, `depth` items ahead (reading and JSON parsing overlap the
    tokenizer, which releases the GIL). Exceptions are re-raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=produce, daemon=True, name="text-reader")
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)
