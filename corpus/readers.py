"""Streaming text readers for .jsonl(.gz/.zst), .parquet and .txt(.gz) with reject accounting.

Nothing is lost silently: a record that cannot be used (bad JSON, missing or non-string text,
invalid UTF-8, empty, too long, a parquet file without the text column) is counted per reason
and, when a `RejectLog` has a path, written to `rejects.jsonl` with its file and line number.
A missing or unreadable file is an error: that is a setup problem, not a bad record.

A truncated or corrupt file (a .gz/.zst stream that ends early or does not decompress, a parquet file
whose footer or pages do not read) is never taken as a short file: the records read before the break are
known, and so is where it broke (compressed byte offset; parquet row group). `on_corrupt="stop"` (the
default) raises a `CorruptFileError` saying both; `on_corrupt="skip"` keeps the records read so far, logs
one `corrupt_file` reject with the offsets, and goes on with the next file.
"""
from __future__ import annotations

import glob
import json
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from common.errors import GraftError, input_error
from common.io import open_input

FORMATS = ("jsonl", "parquet", "txt")
ON_CORRUPT = ("stop", "skip")
ON_CORRUPT_HELP = ("a truncated or corrupt input file (.gz, .zst, parquet): stop (the run fails, naming the file, "
                   "the records read and the byte offset where it broke) | skip (keep the records read before the "
                   "break, log a corrupt_file reject with the offset, go on)")
_CHUNK = 1 << 16
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
    corrupt: list = field(default_factory=list)  # one dict per truncated/corrupt file (offsets, records read)
    _fh: IO[str] | None = field(default=None, repr=False)

    def add(self, reason: str, source: str | Path, line: int | None, raw: bytes | str | None = None,
            n: int = 1, **extra) -> None:
        self.counts[reason] += n
        if extra:
            self.corrupt.append({"file": str(source), **extra})
        if self.path is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        if isinstance(raw, bytes):
            raw = raw[: self.preview_chars * 4].decode("utf-8", errors="replace")
        entry = {"file": str(source), "line": line, "reason": reason, "count": n,
                 "preview": None if raw is None else raw[: self.preview_chars], **extra}
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


class CorruptFileError(GraftError):
    """A truncated or corrupt input file, with what was read before the break and where it broke."""

    def __init__(self, message: str, detail: dict | None = None):  # default: unpickled in a worker's parent
        super().__init__(message)
        self.detail = detail or {}


class _Broken(Exception):
    def __init__(self, problem: str, offset: int):
        super().__init__(problem)
        self.problem, self.offset = problem, offset


def _decompressor(name: str):
    """(new decompressing object, error types) for a compressed file name, or None for a plain file."""
    if name.endswith(".gz"):
        import zlib

        return (lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)), (zlib.error,), "gzip"
    if name.endswith(".zst"):
        import zstandard

        return (lambda: zstandard.ZstdDecompressor().decompressobj()), (zstandard.ZstdError,), "zstd"
    return None


def _chunks(path: Path) -> Iterator[bytes]:
    """The file's (decompressed) bytes in chunks. Raises _Broken at a truncated or corrupt stream: unlike
    gzip.open or zstandard's stream_reader (which returns nothing at all for a truncated .zst), a stream
    that ends before its end marker is an error here. Concatenated members/frames are read in turn."""
    fh = open_input(path)
    codec = _decompressor(path.name.lower())
    offset = 0  # compressed bytes consumed so far

    def read() -> bytes:
        try:
            return fh.read(_CHUNK)
        except OSError as e:
            raise _Broken(f"read error ({e.strerror or e})", offset) from None

    with fh:
        if codec is None:
            while block := read():
                offset += len(block)
                yield block
            return
        new, errors, kind = codec
        d, fed = new(), False
        while block := read():
            while block:
                try:
                    out = d.decompress(block)
                except errors as e:
                    raise _Broken(f"corrupt {kind} data ({e})", offset) from None
                fed = True
                if out:
                    yield out
                if d.eof:  # end of one member/frame: the rest starts the next one
                    consumed = len(block) - len(d.unused_data)
                    offset += consumed
                    block = d.unused_data
                    d, fed = new(), False
                else:
                    offset += len(block)
                    block = b""
        if fed and not d.eof:
            raise _Broken(f"{kind} stream ends before its end marker (truncated)", offset)


def _raw_lines(path: Path) -> Iterator[bytes]:
    parts: list[bytes] = []  # the current line's pieces (a list: a 16 MiB line is not copied per chunk)
    for block in _chunks(path):
        parts.append(block)
        if b"\n" not in block:
            continue
        *lines, last = b"".join(parts).split(b"\n")
        parts = [last] if last else []
        for line in lines:
            yield line + b"\n"
    if parts:
        yield b"".join(parts)


def _broken(path: Path, rejects: RejectLog, on_corrupt: str, problem: str, records: int, next_line: int,
            offset: int, unit: str = "line", extra: dict | None = None) -> None:
    """Report a truncated/corrupt file: raise (stop) or log one corrupt_file reject and return (skip)."""
    size = path.stat().st_size
    detail = {"problem": problem, "records_read": records, f"first_unread_{unit}": next_line,
              "byte_offset": offset, "file_bytes": size, **(extra or {})}
    where = f"at byte {offset:,} of {size:,}" if "truncated" in problem else f"at or after byte {offset:,} of {size:,}"
    kept = f"{records:,} records read before the break ({unit}s 1-{next_line - 1:,})" if next_line > 1 else \
        "no record read before the break"
    if on_corrupt == "skip":
        rejects.add("corrupt_file", str(path), next_line, None, **detail)
        return
    raise CorruptFileError(str(input_error(path, f"{problem} {where}; {kept}",
                                           "re-download or re-compress it, or pass --on-corrupt skip to keep the "
                                           "records read before the break (the loss is logged in rejects.jsonl "
                                           "and counted in the manifest as corrupt_file)")), detail)


def _iter_lines(path: Path, fmt: str, field_name: str, rejects: RejectLog, max_doc_bytes: int,
                on_corrupt: str = "stop") -> Iterator[Record]:
    src = str(path)
    lineno = records = 0
    lines = _raw_lines(path)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except _Broken as b:
            # A line cut off by the break is not a record: it is part of what was lost.
            _broken(path, rejects, on_corrupt, b.problem, records, lineno + 1, b.offset)
            return
        lineno += 1
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
        records += 1
        yield Record(text, src, lineno)


def _iter_parquet(path: Path, field_name: str, rejects: RejectLog, max_doc_bytes: int,
                  batch_rows: int = 4096, on_corrupt: str = "stop") -> Iterator[Record]:
    import pyarrow.parquet as pq

    src = str(path)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise input_error(path, "file not found", "check the path") from None
    except Exception as e:  # pyarrow raises ArrowInvalid and friends (a truncated file has no footer)
        _broken(path, rejects, on_corrupt, f"not a readable parquet file ({e})", 0, 1, 0, unit="row")
        return
    if field_name not in pf.schema_arrow.names:
        # The whole file is unusable; count its rows so the loss is visible, and go on.
        rejects.add("missing_column", src, None, f"columns: {pf.schema_arrow.names}", n=pf.metadata.num_rows)
        return
    row = records = 0
    col = pf.schema_arrow.names.index(field_name)
    for g in range(pf.metadata.num_row_groups):
        try:
            texts = pf.read_row_group(g, columns=[field_name]).column(0).to_pylist()
        except Exception as e:  # a corrupt page or a cut-off row group
            meta = pf.metadata.row_group(g).column(col)
            offset = meta.dictionary_page_offset or meta.data_page_offset
            _broken(path, rejects, on_corrupt, f"row group {g} of {pf.metadata.num_row_groups} does not read ({e})",
                    records, row + 1, offset, unit="row", extra={"row_group": g})
            return
        for text in texts:
            row += 1
            if not isinstance(text, str):
                rejects.add("missing_text" if text is None else "non_string_text", src, row, repr(text))
            elif len(text) * 4 > max_doc_bytes and len(text.encode("utf-8")) > max_doc_bytes:
                rejects.add("too_long", src, row, text)
            elif not text.strip():
                rejects.add("empty", src, row, text)
            else:
                records += 1
                yield Record(text, src, row)


def iter_file(path: str | Path, *, fmt: str | None = None, field_name: str = "text",
              rejects: RejectLog | None = None, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
              on_corrupt: str = "stop") -> Iterator[Record]:
    """Stream the documents of one file (a .txt line is one document). See the module docstring for
    `on_corrupt`."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise GraftError(f"unknown format {fmt!r}. Fix: use one of {', '.join(FORMATS)}")
    check_on_corrupt(on_corrupt)
    if not path.exists():
        raise input_error(path, "file not found", "check the path")
    rejects = rejects if rejects is not None else RejectLog()
    if fmt == "parquet":
        yield from _iter_parquet(path, field_name, rejects, max_doc_bytes, on_corrupt=on_corrupt)
    else:
        yield from _iter_lines(path, fmt, field_name, rejects, max_doc_bytes, on_corrupt)


def check_on_corrupt(value: str) -> None:
    if value not in ON_CORRUPT:
        raise GraftError(f"--on-corrupt {value!r} is not one of {', '.join(ON_CORRUPT)}. Fix: pick one of them")


def iter_texts(patterns: Iterable[str | Path], *, fmt: str | None = None, field_name: str = "text",
               rejects: RejectLog | None = None, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
               on_corrupt: str = "stop") -> Iterator[Record]:
    """Stream the documents of several files or globs, in sorted order per pattern."""
    for path in expand_inputs(patterns):
        yield from iter_file(path, fmt=fmt, field_name=field_name, rejects=rejects, max_doc_bytes=max_doc_bytes,
                             on_corrupt=on_corrupt)


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
