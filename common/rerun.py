"""One re-run rule for every stage, and the input fingerprints it compares.

A stage that finds its output folder already there calls `check_rerun` before doing any work:

- the folder holds a finished output (manifest.json, status done) made with the **same settings and
  inputs**: nothing to do, the stage prints "already complete" and returns it (`check_rerun` -> True);
- it was made with **different** settings or inputs, or it is a folder that is not a finished output of
  this stage: the stage refuses, naming what differs and the fix (another --out, or --overwrite);
- the stage's own unfinished run: stages that write atomically leave only temporaries (removed by the next
  run); stages that write in place (score, audit, mix) mark the folder with `.graft-stage`, so the same
  command runs again without --overwrite; corpus prepare resumes from its plan.json;
- with `--overwrite` the stage runs and replaces the folder; the old one stays whole until the new one
  is complete (outputs are renamed into place), or, for stages that write in place, it is removed first.

What is compared is recorded in the manifest under `rerun`: the settings (the config without the fields
that only change how a stage runs, such as `progress`, `workers`, `overwrite`) and one fingerprint per input
file or folder (`input_fingerprint`): the sha256 of the contents of every file up to 64 MiB, so an edit that
keeps the size is noticed; larger files (model shards, big corpus files) by size and modification time only,
so they are not re-read on every run. An edit of a file over 64 MiB that keeps its size and mtime (e.g.
restored with `touch -r`) is therefore not noticed: use --overwrite after such an edit. A folder that another
graft stage wrote is fingerprinted by its manifest.json, which that stage rewrites whenever it runs (a prepared
corpus is not re-read to decide whether a mix is current); checkpoint shards there are guarded by the sha256
each manifest records (`shard_files`, checked when a stage reads them).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, Iterable

from common.errors import GraftError
from common.io import MANIFEST, file_sha256, is_complete, open_input, read_json, to_jsonable

CONTENT_HASH_LIMIT = 64 << 20  # bigger files are fingerprinted by size + mtime
# Fields that change how a stage runs, never what it writes.
VOLATILE = frozenset({"out", "overwrite", "progress", "workers", "threads", "batch_chars", "shard_index",
                      "num_shards", "link"})


def file_fingerprint(path: Path) -> str:
    st = path.stat()
    if st.st_size > CONTENT_HASH_LIMIT:
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    with open_input(path) as f:  # the same error the stage's own reader gives, before it even starts
        h = hashlib.sha256()
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def input_fingerprint(path: str | Path | None) -> str | None:
    """sha256 of a file's contents (size+mtime over 64 MiB); for a folder written by a graft stage, of its
    manifest.json; for any other folder, of its files' names and fingerprints (hidden files left out).
    None: no such path."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return file_fingerprint(p)
    if not p.is_dir():
        return None
    if is_complete(p):  # another stage's finished output: its manifest is rewritten whenever that stage runs
        return "manifest:" + file_sha256(p / MANIFEST)
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts):
            h.update(f"{f.relative_to(p).as_posix()}\0{file_fingerprint(f)}\n".encode())
    return "dir:" + h.hexdigest()


def settings_of(config: Any, volatile: Iterable[str] = ()) -> dict[str, Any]:
    """The config as JSON, without the fields that do not change the output."""
    values = to_jsonable(config)
    skip = VOLATILE | set(volatile)
    return {k: v for k, v in values.items() if k not in skip}


def rerun_record(config: Any, inputs: dict[str, str | Path | None], volatile: Iterable[str] = ()) -> dict[str, Any]:
    """What `check_rerun` compares; also written to the manifest as `rerun`."""
    return {"settings": settings_of(config, volatile),
            "inputs": {k: input_fingerprint(v) for k, v in sorted(inputs.items())}}


def has_content(out: Path) -> bool:
    """`out` exists and is a file, or a folder with something in it besides hidden temporaries (`.x.tmp-PID`,
    written by a concurrent task of the same run)."""
    if not out.exists():
        return False
    return not out.is_dir() or any(not p.name.startswith(".") for p in out.iterdir())


STAGE_MARKER = ".graft-stage"  # written by stages that write in place, so their own unfinished run is recognised


def _marker(out: Path) -> str | None:
    try:
        return (out / STAGE_MARKER).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def check_rerun(out: str | Path, record: dict[str, Any], *, stage: str, overwrite: bool,
                in_place: bool = False) -> bool:
    """Apply the re-run rule (module docstring) to `out`. True: already complete with the same settings and
    inputs, skip the stage. False: run it (with `overwrite`, an existing folder is replaced; `in_place`
    stages get it removed here). Raises GraftError when the folder may not be replaced."""
    out = Path(out)
    if not has_content(out):
        return False
    complete = is_complete(out)
    if in_place and not complete and _marker(out) == stage and not overwrite:
        print(f"{out}: an unfinished {stage} run wrote here; running it again in place")
        return False
    old = read_json(out / MANIFEST) if complete else {}
    same_stage = old.get("stage") == stage
    old_record = old.get("rerun")
    if complete and same_stage and old_record == record and not overwrite:
        print(f"{out}: already complete with the same settings and inputs; nothing to do "
              "(--overwrite to run it again)")
        return True
    if overwrite:
        if in_place:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        print(f"{out}: exists; replacing it (--overwrite)")
        return False
    if not complete:
        what = "is a folder that is not a finished output (no finished manifest.json: another program's files, " \
               "or a run stopped before the end)" if out.is_dir() else "is a file, not an output folder"
    elif not same_stage:
        what = f"holds the output of another stage ({old.get('stage')!r}, not {stage!r})"
    elif old_record is None:
        what = "holds a finished output written by an earlier version, which did not record its inputs"
    else:
        keys = sorted(k for k in set(old_record["settings"]) | set(record["settings"])
                      if old_record["settings"].get(k) != record["settings"].get(k))
        inputs = sorted(k for k in set(old_record["inputs"]) | set(record["inputs"])
                        if old_record["inputs"].get(k) != record["inputs"].get(k))
        parts = ([f"settings {', '.join(keys)}"] if keys else []) + \
                ([f"inputs {', '.join(inputs)} (contents)"] if inputs else [])
        what = f"holds a finished {stage} output made with different {' and '.join(parts) or 'settings'}"
    raise GraftError(f"{out}: {what}. Fix: choose another --out, or pass --overwrite to replace it")


OVERWRITE_HELP = ("replace --out when it holds an output made with other settings or inputs, or other files "
                  "(the same settings and inputs: skipped)")


def overwrite_field():
    """The `overwrite` config field every stage shares (`overwrite: bool = overwrite_field()`)."""
    from dataclasses import field

    return field(default=False, metadata={"help": OVERWRITE_HELP})


def guard(cfg: Any, out: str | Path, *, stage: str, inputs: dict[str, str | Path | None], in_place: bool = False,
          volatile: Iterable[str] = ()) -> tuple[bool, dict[str, Any]]:
    """`check_rerun` for a stage config with an `overwrite` field: (skip?, the record for the manifest's `rerun`)."""
    record = rerun_record(cfg, inputs, volatile)
    skip = check_rerun(out, record, stage=stage, overwrite=bool(getattr(cfg, "overwrite", False)), in_place=in_place)
    if in_place and not skip:  # mark the folder as this stage's, so an interrupted run can be re-run plainly
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / STAGE_MARKER).write_text(stage + "\n", encoding="utf-8")
    return skip, record


def listed(name: str, paths: Iterable[str | Path]) -> dict[str, str | Path]:
    """Inputs named `name_0`, `name_1`, ... for a list of paths; a glob counts each file it matches."""
    import glob

    out: dict[str, str | Path] = {}
    for p in paths:
        p = str(p)
        for m in (sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]):
            out[f"{name}_{len(out)}"] = m
    return out


def check_finished_settings(out: str | Path, config: Any, *, stage: str, volatile: Iterable[str] = ()) -> None:
    """For a stage that does not record `rerun` (graft train): refuse a finished output of `stage` whose
    recorded config differs from `config` (settings only; its inputs are not fingerprinted). With
    `config.overwrite` the old output is removed and the stage runs afresh."""
    out = Path(out)
    if not is_complete(out):
        return
    old = read_json(out / MANIFEST)
    if old.get("stage") != stage:
        return
    was, now = settings_of(old.get("config", {}), volatile), settings_of(config, volatile)
    keys = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if not keys:
        return
    if getattr(config, "overwrite", False):
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise GraftError(f"{out}: --overwrite cannot replace a finished {stage} run from a multi-process launch. "
                             "Fix: delete the folder first, or choose another out")
        print(f"{out}: holds a finished {stage} run with other settings ({', '.join(keys)}); replacing it (--overwrite)")
        shutil.rmtree(out)
        return
    raise GraftError(f"{out}: holds a finished {stage} run made with different settings {', '.join(keys)}. "
                     "Fix: choose another out, or delete that folder to train again")
