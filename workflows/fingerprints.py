"""Stage fingerprints: what decides whether a finished stage is still up to date (docs/workflows.md).

A stage's fingerprint hashes its kind, the config values that differ from the dataclass defaults
(references kept as written), the `output_id` of every stage it references, and the content of every
existing file or folder named in its config (files over 64 MiB by size + mtime; hashes are cached in
the state file).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
from pathlib import Path
from typing import Any

from common.config import config_fields
from common.io import MANIFEST, file_sha256, is_complete, to_jsonable
from workflows.refs import iter_strings, parse_ref
from workflows.spec import Stage, Workflow

CONTENT_HASH_LIMIT = 64 << 20  # bigger files are fingerprinted by size + mtime


def _hash_path(path: Path, cache: dict[str, list]) -> str:
    """Content hash of a file, or of a folder's files (names + hashes); big files by size+mtime."""
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
                h.update(f"{p.relative_to(path).as_posix()}\0{_hash_path(p, cache)}\n".encode())
        return "dir:" + h.hexdigest()
    st = path.stat()
    if st.st_size > CONTENT_HASH_LIMIT:
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    digest = "sha256:" + file_sha256(path)
    cache[key] = [st.st_size, st.st_mtime_ns, digest]
    return digest


def _external_inputs(values: dict[str, Any], cache: dict[str, list]) -> dict[str, str]:
    """Hashes of the existing files/folders (and glob matches) named by non-reference strings."""
    out: dict[str, str] = {}
    for s in iter_strings(values):
        if parse_ref(s) is not None or not s or len(s) > 4096 or "{@" in s:
            continue
        if any(c in s for c in "*?["):
            matches = sorted(glob.glob(s, recursive=True))
            if matches:
                h = hashlib.sha256()
                for m in matches:
                    h.update(f"{m}\0{_hash_path(Path(m), cache)}\n".encode())
                out[s] = "glob:" + h.hexdigest()
            continue
        try:
            p = Path(s)
            if p.exists():
                out[s] = _hash_path(p, cache)
        except OSError:
            continue
    return out


def effective_values(stage: Stage) -> dict[str, Any]:
    """TOML values plus the config's defaults (the output folder excluded)."""
    vals: dict[str, Any] = {}
    for name, (f, _) in config_fields(stage.config_class).items():
        if name == stage.kind.out_field:
            continue
        if name in stage.values:
            vals[name] = stage.values[name]
        elif f.default is not dataclasses.MISSING:
            vals[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            vals[name] = f.default_factory()
    return to_jsonable(vals)


def _volatile(stage: Stage) -> set[str]:
    return {"progress", *stage.kind.volatile}


def _non_default_values(stage: Stage) -> dict[str, Any]:
    """The TOML values that differ from the config's defaults.

    Hashing these (not the full effective config) means a field added to a stage's config in a
    new version, or a value written out that equals its default, does not re-run a two-week
    stage. The flip side: a changed *default* goes unnoticed; use --force after such an upgrade.
    """
    out = {}
    effective = effective_values(stage)
    for name, (f, _) in config_fields(stage.config_class).items():
        if name == stage.kind.out_field or name not in stage.values or name in _volatile(stage):
            continue
        if f.default is not dataclasses.MISSING:
            default = to_jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = to_jsonable(f.default_factory())
        else:
            default = dataclasses.MISSING
        if effective[name] != default:
            out[name] = effective[name]
    return out


def fingerprint(stage: Stage, upstream_ids: dict[str, str | None], cache: dict[str, list]) -> tuple[str, dict]:
    inputs = {f"@{d}": upstream_ids.get(d) for d in stage.deps}
    inputs.update(_external_inputs(stage.values, cache))
    blob = json.dumps({"kind": stage.kind.name, "config": _non_default_values(stage), "inputs": inputs},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:20], inputs


def _workflow_section(out: Path) -> dict[str, Any] | None:
    if not is_complete(out):
        return None
    try:
        section = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("workflow")
    except (OSError, json.JSONDecodeError):
        return None
    return section if isinstance(section, dict) else None


def upstream_ids(wf: Workflow, stage: Stage) -> dict[str, str | None]:
    """The output_id of every stage `stage` reads (None where it has no finished output)."""
    ids = {}
    for d in stage.deps:
        sec = _workflow_section(wf.stage(d).out)
        ids[d] = sec.get("output_id") if sec else None
    return ids
