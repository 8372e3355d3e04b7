"""`graft corpus prepare`: tokenize a dataset and pack it into fixed-length token blocks.

Work unit = one input file (datatrove style). Each finished file gets `shards/<id>/` (renamed into
place when whole) and then `completions/<id>`; a re-run skips files with a completion marker and
redoes any other. `--shard-index i --num-shards n` takes files i, i+n, i+2n, ... so a Slurm array
or several machines split the work with no coordination; whichever run finds every file done
packs the leftovers into `tail/` and writes `manifest.json` (written last = complete).
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import GraftError
from common.io import atomic_path, atomic_write_json, is_complete, read_json, read_manifest, write_manifest
from corpus.blocks import COMPLETIONS_DIR, PREPARE_STAGE, SHARDS_DIR, SPLITS, TAIL_DIR
from common.rerun import check_rerun, file_fingerprint, has_content
from corpus.readers import DEFAULT_MAX_DOC_BYTES, FORMATS, ON_CORRUPT, ON_CORRUPT_HELP, expand_inputs
from corpus.registry import DEFAULT_REGISTRY, DEFAULT_SPLIT, get_dataset, parse_split, set_encoded
from corpus.shard import REJECTS_FILE, STATS_FILE, ShardJob, process_shard, remember_tokenizer, sum_counts

PLAN_FILE = "plan.json"
LAST_BLOCK = ("drop", "pad")


@dataclass
class PrepareConfig:
    """Tokenize a dataset and pack it into fixed-length token blocks, split train/dev.

    Each document becomes BOS ids EOS (--no-bos: ids EOS); documents are concatenated and cut into --block-size
    blocks. The remainder carries over between batches and between files, so only the very last
    partial block of each split is dropped or padded. Output: per input file, a Hugging Face
    `datasets` folder (column input_ids) per split, plus manifest.json with document, token and
    block counts, the tokenizer hash and the settings. Bad records are counted and written to
    rejects.jsonl. Re-running resumes: finished files are skipped, an interrupted one is redone.

    Example:
      graft corpus add news --files 'data/news/*.jsonl'
      graft corpus prepare news --tokenizer tok/ --block-size 2048 --out prepared/news --workers 2
    """

    name: str = field(metadata={"help": "registered dataset (see `graft corpus list`), or a label when --files is given"})
    tokenizer: str = field(metadata={"help": "tokenizer: HF folder, tokenizer.json or SentencePiece .model"})
    out: str | None = field(default=None, metadata={"help": "output folder (default: the dataset's `encoded` entry in the registry)"})
    block_size: int = field(default=2048, metadata={"help": "tokens per block"})
    registry: str = field(default=DEFAULT_REGISTRY, metadata={"help": "dataset registry file"})
    files: list[str] = field(default_factory=list, metadata={"help": "files/globs to read instead of the registry entry", "split": False})
    format: str | None = field(default=None, metadata={"help": "jsonl | parquet | txt (default: registry, else from file names)"})
    text_field: str | None = field(default=None, metadata={"help": "JSON key / parquet column with the text (default: registry, else 'text')"})
    split: str | None = field(default=None, metadata={"help": f"train:dev parts per document (default: registry, else {DEFAULT_SPLIT})"})
    split_seed: int = field(default=0, metadata={"help": "key of the split hash; change it to draw a different dev set"})
    bos: bool = field(default=True, metadata={"help": "put BOS before each document (EOS always follows it); recorded "
                                                      "as `bos` in manifest.json, which training and eval read"})
    last_block: str = field(default="drop", metadata={"help": "the final partial block of each split: drop | pad"})
    pad_id: int | None = field(default=None, metadata={"help": "id used by --last-block pad (default: EOS)"})
    eos_token: str | None = field(default=None, metadata={"help": "EOS token (default: tokenizer_config.json, else </s>)"})
    bos_token: str | None = field(default=None, metadata={"help": "BOS token (default: tokenizer_config.json, else <s>)"})
    workers: int = field(default=1, metadata={"help": "worker processes (each takes one input file at a time)"})
    threads: int = field(default=0, metadata={"help": "tokenizer threads per worker (0: cores // workers)"})
    shard_index: int = field(default=0, metadata={"help": "this task's index for Slurm arrays: takes files i, i+n, ..."})
    num_shards: int = field(default=1, metadata={"help": "number of tasks splitting the files (n)"})
    batch_chars: int = field(default=1_000_000, metadata={"help": "characters per tokenizer batch (memory vs. speed; output is the same)"})
    max_doc_bytes: int = field(default=DEFAULT_MAX_DOC_BYTES, metadata={"help": "longer documents are rejected as too_long"})
    on_corrupt: str = field(default="stop", metadata={"help": ON_CORRUPT_HELP})
    overwrite: bool = field(default=False, metadata={"help": "start --out over when it was prepared with other "
                                                             "settings or inputs (the same ones: resumed or skipped)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


    def __post_init__(self) -> None:  # out-of-range values fail when the config is built (CLI, TOML, workflow)
        from common.validate import check_ranges

        check_ranges(self, {"block_size": ">=1", "workers": ">=1", "threads": ">=0", "num_shards": ">=1",
                            "shard_index": ">=0", "batch_chars": ">=1", "max_doc_bytes": ">=1", "pad_id": ">=0"},
                     choices={"last_block": LAST_BLOCK, "format": FORMATS, "on_corrupt": ON_CORRUPT})
        if not self.shard_index < self.num_shards:
            raise GraftError(f"--shard-index {self.shard_index} must be in [0, --num-shards {self.num_shards})")
        if self.split is not None:
            parse_split(self.split)

    def validate(self) -> "PrepareConfig":
        """Ready to run: a tokenizer is named (the output folder may come from the registry)."""
        from common.validate import check_required

        self.__post_init__()  # fields may have been set after the config was built
        check_required(self, ("tokenizer",), how="pass --tokenizer DIR (a HF tokenizer folder, tokenizer.json or .model)")
        return self


@dataclass
class _Resolved:
    name: str
    files: list[Path]
    fmt: str | None
    text_field: str
    split: tuple[int, int]
    out: Path
    from_registry: bool


def _resolve(cfg: PrepareConfig) -> _Resolved:
    cfg.validate()
    # block_size, last_block, format, shards, workers and on_corrupt are checked when the config is built
    # (PrepareConfig.__post_init__), so a workflow file with a bad value fails when it is read.
    if cfg.files:
        files, fmt, field_name, split, out = expand_inputs(cfg.files), cfg.format, cfg.text_field, cfg.split, cfg.out
        from_registry = False
    else:
        entry = get_dataset(cfg.name, cfg.registry)
        files = entry.paths()
        fmt = cfg.format or entry.format
        field_name = cfg.text_field or entry.text_field
        split = cfg.split or entry.split
        out = cfg.out or (str(entry.encoded_path()) if entry.encoded else None)
        from_registry = True
    if not out:
        raise GraftError(f"no output folder for {cfg.name!r}. Fix: pass --out DIR")
    return _Resolved(cfg.name, files, fmt, field_name or "text", parse_split(split or DEFAULT_SPLIT), Path(out),
                     from_registry)


def shard_ids(files: list[Path]) -> list[str]:
    """Stable, unique, filesystem-safe ids: '<index>-<file name>'."""
    return [f"{i:05d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', p.name)[:80]}" for i, p in enumerate(files)]


def _plan(cfg: PrepareConfig, r: _Resolved, tok) -> dict:
    """Everything that decides the output; a re-run into the same folder must match it."""
    return {
        # contents: sha256 up to 64 MiB, size + mtime above (common/rerun.py)
        "files": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "fingerprint": file_fingerprint(p)}
                  for p in r.files],
        "on_corrupt": cfg.on_corrupt,
        "format": r.fmt, "text_field": r.text_field, "split": list(r.split), "split_seed": cfg.split_seed,
        "tokenizer_sha256": tok.sha256, "eos_id": tok.eos_id, "bos_id": tok.bos_id if cfg.bos else None,
        "block_size": cfg.block_size, "last_block": cfg.last_block, "pad_id": _pad_id(cfg, tok),
        "max_doc_bytes": cfg.max_doc_bytes,
    }


def _pad_id(cfg: PrepareConfig, tok) -> int:
    return tok.eos_id if cfg.pad_id is None else cfg.pad_id


def _legacy(old: dict, plan: dict) -> dict:
    """A plan written before inputs were fingerprinted by content and before --on-corrupt: compare it
    as it was (size only, stop), so an existing prepared folder is not refused after an upgrade."""
    if old.get("files") and "fingerprint" not in old["files"][0]:
        plan = {**plan, "files": [{k: v for k, v in f.items() if k != "fingerprint"} for f in plan["files"]]}
    if "on_corrupt" not in old and plan.get("on_corrupt") == "stop":
        plan = {k: v for k, v in plan.items() if k != "on_corrupt"}
    return plan


def _check_plan(out: Path, plan: dict, overwrite: bool) -> None:
    """The re-run rule (common/rerun.py) for a folder that resumes: the same plan resumes or skips; another
    one is refused, or started over with --overwrite."""
    path = out / PLAN_FILE
    if path.is_file():
        old = read_json(path)
        if old != _legacy(old, plan):
            if overwrite:
                check_rerun(out, {}, stage=PREPARE_STAGE, overwrite=True, in_place=True)
            else:
                diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise GraftError(f"{out} was prepared with different settings or inputs ({', '.join(diff)} changed). "
                                 "Fix: use a new --out folder, or pass --overwrite to start this one over")
    elif has_content(out):  # not a prepare folder (another task's temporary plan.json does not count)
        check_rerun(out, {}, stage=PREPARE_STAGE, overwrite=overwrite, in_place=True)
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, plan)


def prepare_one(job: ShardJob, report=None) -> dict:
    """Worker entry: write one shard folder atomically, then its completion marker."""
    final = Path(job.out)
    # A folder left by a killed run (another pid) is garbage: clear it before redoing the shard.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_path(final) as tmp:
        tmp_job = ShardJob(**{**job.__dict__, "out": str(tmp)})
        stats = process_shard(tmp_job, report)
    marker = final.parent.parent / COMPLETIONS_DIR / job.shard_id
    atomic_write_json(marker, {"shard_id": job.shard_id, "path": job.path, "finished": time.time()})
    return stats


def _finalize(cfg: PrepareConfig, r: _Resolved, tok, ids: list[str], started: float, meta: dict[str, str]) -> dict:
    """Pack every shard's leftovers into tail/, gather counts and rejects, write the manifest."""
    out = r.out
    stats = [read_json(out / SHARDS_DIR / sid / STATS_FILE) for sid in ids]
    counts, rejects = sum_counts(stats)
    corrupt = [c for st in stats for c in st.get("corrupt", [])]
    from corpus.pack import finish_blocks, write_blocks

    with atomic_path(out / TAIL_DIR) as tmp:
        for s in SPLITS:
            left = [np.load(out / SHARDS_DIR / sid / f"leftover_{s}.npy") for sid in ids]
            left = np.concatenate(left) if left else np.empty(0, np.int32)
            blocks, padded, dropped = finish_blocks(left, cfg.block_size, cfg.last_block, _pad_id(cfg, tok))
            write_blocks(tmp / s, blocks, cfg.block_size, meta)
            counts[s]["blocks"] += len(blocks)
            counts[s]["tail_blocks"] = len(blocks)
            counts[s]["padded_tokens"] = padded
            counts[s]["dropped_tokens"] = dropped
    with atomic_path(out / REJECTS_FILE) as tmp:
        with open(tmp, "wb") as dst:
            for sid in ids:
                src = out / SHARDS_DIR / sid / REJECTS_FILE
                if src.is_file():
                    with open(src, "rb") as f:
                        shutil.copyfileobj(f, dst)
    write_manifest(out, stage=PREPARE_STAGE, config=cfg,
                   inputs={"files": [str(p.resolve()) for p in r.files], "tokenizer": str(Path(cfg.tokenizer).resolve())},
                   counts=counts, started=started, dataset=r.name, shards=ids, block_size=cfg.block_size,
                   splits=list(SPLITS), split=list(r.split), rejects=rejects, bos=cfg.bos,
                   tokenizer={"sha256": tok.sha256, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
                              "eos_token": tok.eos_token, "bos_token": tok.bos_token, "vocab_size": tok.vocab_size},
                   shard_counts={st["shard_id"]: st["counts"] for st in stats},
                   corrupt_files=corrupt)
    return {"counts": counts, "rejects": rejects, "corrupt_files": corrupt}


def summary_lines(name: str, counts: dict, rejects: dict, out: Path | None = None,
                  corrupt: list | None = None) -> list[str]:
    lines = []
    for s in SPLITS:
        c = counts[s]
        lines.append(f"  {s:5s} documents={c['documents']:,} characters={c['characters']:,} "
                     f"tokens={c['tokens']:,} blocks={c['blocks']:,}")
    if rejects:
        total = sum(rejects.values())
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(rejects.items()))
        where = f" (listed in {out / REJECTS_FILE})" if out else ""
        lines.append(f"  rejected {total:,} records ({parts}){where}")
    else:
        lines.append("  no records rejected")
    for c in corrupt or []:
        lines.append(f"  corrupt file skipped (--on-corrupt skip): {c['file']}: {c['problem']} at byte "
                     f"{c['byte_offset']:,} of {c['file_bytes']:,}; kept the {c['records_read']:,} records read before it")
    return [f"{name}:"] + lines


def prepare(cfg: PrepareConfig) -> Path:
    """Tokenize and pack `cfg.name` into `cfg.out`; returns the output folder (see module docstring)."""
    from corpus.runner import Progress, run_jobs
    from corpus.tokens import load_pack_tokenizer

    started = time.time()
    r = _resolve(cfg)
    tok = load_pack_tokenizer(cfg.tokenizer, cfg.eos_token, cfg.bos_token)
    remember_tokenizer(cfg.tokenizer, cfg.eos_token, cfg.bos_token, tok)
    plan = _plan(cfg, r, tok)
    _check_plan(r.out, plan, cfg.overwrite)
    if r.from_registry:
        note = set_encoded(cfg.registry, cfg.name, r.out)
        if note:
            print(note)
    ids = shard_ids(r.files)
    if is_complete(r.out):
        m = read_manifest(r.out)
        print(f"{r.out} is already complete ({len(ids)} files); nothing to do.")
        print("\n".join(summary_lines(r.name, m["counts"], m.get("rejects", {}), r.out, m.get("corrupt_files"))))
        return r.out
    from corpus.pack import block_meta

    meta = block_meta(cfg.block_size)
    jobs = [ShardJob(index=i, shard_id=sid, path=str(p), fmt=r.fmt, text_field=r.text_field, split=r.split,
                     split_seed=cfg.split_seed, tokenizer=str(cfg.tokenizer), eos_token=cfg.eos_token,
                     bos_token=cfg.bos_token, add_bos=cfg.bos, block_size=cfg.block_size,
                     batch_chars=cfg.batch_chars, max_doc_bytes=cfg.max_doc_bytes,
                     out=str(r.out / SHARDS_DIR / sid), meta=meta, on_corrupt=cfg.on_corrupt)
            for i, (sid, p) in enumerate(zip(ids, r.files)) if i % cfg.num_shards == cfg.shard_index]
    done_marker = lambda sid: (r.out / COMPLETIONS_DIR / sid).is_file()  # noqa: E731
    todo = [j for j in jobs if not done_marker(j.shard_id)]
    print(f"prepare {r.name}: {len(ids)} files; this task: {len(jobs)}, {len(jobs) - len(todo)} done earlier, "
          f"{len(todo)} to do -> {r.out}")
    progress = Progress(f"prepare {r.name}", len(todo), enabled=cfg.progress)
    try:
        _, failures = run_jobs(todo, prepare_one, workers=cfg.workers, threads=cfg.threads, progress=progress)
    finally:
        progress.close()
    missing = [sid for sid in ids if not done_marker(sid)]
    if not missing:
        try:
            result = _finalize(cfg, r, tok, ids, started, meta)
        except OSError:
            # Two array tasks finishing at once both finalize; the rename race can fail one of them.
            if not is_complete(r.out):
                raise
            result = read_manifest(r.out)
            result.setdefault("corrupt_files", [])
            print("another task finalized the output at the same time")
        print("\n".join(summary_lines(r.name, result["counts"], result["rejects"], r.out,
                                     result.get("corrupt_files"))))
        print(f"wrote {r.out} (load with corpus.blocks.load_blocks)")
    elif not failures:
        print(f"{len(missing)} of {len(ids)} files are not done yet (other --shard-index tasks?); the manifest "
              "is written by whichever run finishes the last one. Re-run without --shard-index to finish here.")
    if failures:
        msg = "; ".join(f"{sid}: {err}" for sid, err in failures.items())
        raise GraftError(f"{len(failures)} of {len(todo)} files failed ({msg}). The other files are done; "
                         "fix or remove the failed files and re-run the same command to resume")
    return r.out
