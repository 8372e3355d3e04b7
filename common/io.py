"""Atomic output and manifests.

Every stage writes its results through these helpers, so an interrupted stage never leaves
a file or folder that looks complete: data goes to a temporary name next to the target and is
renamed into place only when it is whole (rename is atomic on one filesystem).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"

# Packages whose versions go into every manifest (those installed, without importing them).
_VERSIONED = ("vocab-graft", "torch", "transformers", "tokenizers", "sentencepiece", "peft",
              "bitsandbytes", "safetensors", "datasets", "numpy", "pyarrow")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed to `path`.

    Works for a file or a folder written by a library (e.g. `savefig`, `save_to_disk`).
    On an exception the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            # A folder cannot be replaced in one rename; move the old one aside first.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def remove_stale_temps(out: str | Path) -> None:
    """Remove temp folders that an interrupted (killed) earlier run on this machine left next to `out`
    (`.NAME.tmp-PID` / `.NAME.old-PID` whose process is gone)."""
    out = Path(out)
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name.rpartition("-")
        if not kind.endswith((".tmp", ".old")) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that process is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tuples and sets as plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        return sorted(items, key=str) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    from common.errors import input_error

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise input_error(path, "file not found", "check the path, or run the stage that writes it") from None
    except json.JSONDecodeError as e:
        raise input_error(path, f"not valid JSON ({e.msg})", "re-run the stage that wrote it", line=e.lineno) from None


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def open_input(path: str | Path):
    """`open(path, "rb")` for an input file; a file that cannot be opened is a GraftError naming it and the fix
    (not found, permission denied, a folder, any other OS error)."""
    from common.errors import input_error

    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise input_error(path, "file not found", "check the path") from None
    except PermissionError:
        raise input_error(path, "permission denied", "make the file readable (chmod +r) or copy it") from None
    except IsADirectoryError:
        raise input_error(path, "is a folder, not a file", "pass the file inside it") from None
    except OSError as e:
        raise input_error(path, f"cannot open ({e.strerror})", "check that the file is readable") from None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(out_dir: str | Path, *, stage: str, config: Any, inputs: dict[str, Any] | None = None,
                   counts: dict[str, Any] | None = None, started: float | None = None,
                   **extra: Any) -> Path:
    """Write `out_dir/manifest.json` atomically: the stage's config, inputs, counts and versions.

    Write it last: its presence (with `status == "done"`) is what marks the output complete.
    """
    manifest = {
        "stage": stage,
        "status": "done",
        "config": to_jsonable(config),
        "inputs": to_jsonable(inputs or {}),
        "counts": to_jsonable(counts or {}),
        "versions": package_versions(),
        "argv": sys.argv,
        **to_jsonable(extra),
    }
    if started is not None:
        manifest["duration_s"] = round(time.time() - started, 3)
    return atomic_write_json(Path(out_dir) / MANIFEST, manifest)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(out_dir) / MANIFEST)


def is_complete(out_dir: str | Path) -> bool:
    """True when a stage finished writing `out_dir` (its manifest exists and says done)."""
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("status") == "done"
    except (json.JSONDecodeError, OSError):
        return False


def output_snapshot(out: str | Path | None) -> dict[str, Any] | None:
    """What `out` was before a stage ran (for settle_partial_output)."""
    if out is None:
        return None
    p = Path(out)
    m = p / MANIFEST
    return {"existed": p.exists(), "manifest": m.stat().st_mtime_ns if is_complete(p) else None}


def settle_partial_output(out: str | Path | None, before: dict[str, Any] | None, resumable: bool) -> str:
    """After a stage failed on an I/O error (e.g. a full disk): make sure nothing half-written looks complete
    and say what became of the output. A resumable stage keeps its finished parts (a re-run resumes);
    otherwise a folder the run created is removed, and an earlier finished output is left as it was."""
    if out is None or before is None:
        return "Partial files are written under temporary names, which were removed"
    p = Path(out)
    if resumable:
        return (f"The finished parts in {p} are kept and the unfinished one was removed; the same command "
                "resumes from them")
    if before["manifest"] is not None and is_complete(p) and (p / MANIFEST).stat().st_mtime_ns == before["manifest"]:
        return f"The earlier finished output in {p} is unchanged (the new one was written under a temporary name, now removed)"
    if p.exists() and not is_complete(p):
        if not before["existed"]:
            try:
                _remove(p)
                return f"The partial output {p} was removed"
            except OSError:
                pass
        return f"{p} is incomplete (no finished manifest.json), so it is never taken as a result"
    if not p.exists():
        return f"Nothing was left in {p} (the partial output was written under a temporary name, now removed)"
    return f"{p} was not changed"
