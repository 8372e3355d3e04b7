"""`graft corpus count`: documents, characters, tokens and blocks per split of registered datasets.

Counts exactly what `graft corpus prepare` would produce with the same settings (same reader,
same split hash, same EOS/BOS accounting), without writing anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.errors import GraftError
from corpus.blocks import SPLITS
from corpus.table import format_table
from corpus.readers import DEFAULT_MAX_DOC_BYTES, ON_CORRUPT, ON_CORRUPT_HELP
from corpus.registry import DEFAULT_REGISTRY, get_dataset, load_registry, parse_split
from corpus.shard import ShardJob, process_shard, remember_tokenizer, sum_counts


@dataclass
class CountConfig:
    """Count documents, characters, tokens and blocks per split of one or all registered datasets.

    Without --tokenizer only documents and characters are counted (fast). With --tokenizer, tokens
    include one EOS and one BOS per document (no BOS with --no-bos), and blocks = tokens // --block-size, which is
    what `graft corpus prepare` writes with --last-block drop.

    Example:
      graft corpus count news --tokenizer tok/ --block-size 2048
    """

    name: str | None = field(default=None, metadata={"help": "dataset to count (default: every registered dataset)"})
    registry: str = field(default=DEFAULT_REGISTRY, metadata={"help": "dataset registry file"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder/file, to count tokens and blocks"})
    block_size: int = field(default=2048, metadata={"help": "tokens per block"})
    bos: bool = field(default=True, metadata={"help": "count a BOS per document, as prepare does (--no-bos: as "
                                                      "prepare --no-bos)"})
    split_seed: int = field(default=0, metadata={"help": "key of the split hash (as in prepare)"})
    workers: int = field(default=1, metadata={"help": "worker processes (one file at a time each)"})
    threads: int = field(default=0, metadata={"help": "tokenizer threads per worker (0: cores // workers)"})
    max_doc_bytes: int = field(default=DEFAULT_MAX_DOC_BYTES, metadata={"help": "longer documents are rejected"})
    on_corrupt: str = field(default="stop", metadata={"help": ON_CORRUPT_HELP})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:  # out-of-range values fail when the config is built (CLI, TOML, workflow)
        from common.validate import check_ranges

        check_ranges(self, {"block_size": ">=1", "workers": ">=1", "threads": ">=0", "max_doc_bytes": ">=1"},
                     choices={"on_corrupt": ON_CORRUPT})

    def validate(self) -> "CountConfig":
        """Ready to run: values set after the config was built are checked too."""
        self.__post_init__()
        return self


def count(cfg: CountConfig) -> dict[str, dict]:
    """Returns {dataset: {"counts": {split: {documents, characters, tokens, blocks}}, "rejects": {...}}}."""
    from corpus.runner import Progress, run_jobs

    cfg.validate()
    if cfg.name is None:
        entries = load_registry(cfg.registry)
    else:
        entries = {cfg.name: get_dataset(cfg.name, cfg.registry)}
    if cfg.tokenizer:
        from corpus.tokens import load_pack_tokenizer

        # Fail early on a bad tokenizer, before starting workers; in-process jobs reuse it.
        remember_tokenizer(cfg.tokenizer, None, None, load_pack_tokenizer(cfg.tokenizer))
    results = {}
    for name, entry in entries.items():
        files = entry.paths()
        jobs = [ShardJob(index=i, shard_id=f"{i:05d}", path=str(p), fmt=entry.format, text_field=entry.text_field,
                         split=parse_split(entry.split), split_seed=cfg.split_seed, tokenizer=cfg.tokenizer,
                         add_bos=cfg.bos, block_size=cfg.block_size, max_doc_bytes=cfg.max_doc_bytes,
                         on_corrupt=cfg.on_corrupt)
                for i, p in enumerate(files)]
        progress = Progress(f"count {name}", len(jobs), enabled=cfg.progress, unit="tok" if cfg.tokenizer else "doc")
        try:
            done, failures = run_jobs(jobs, process_shard, workers=cfg.workers, threads=cfg.threads, progress=progress)
        finally:
            progress.close()
        if failures:
            raise GraftError("; ".join(failures.values()))
        counts, rejects = sum_counts(done.values())
        for s in SPLITS:  # what prepare writes with --last-block drop (count jobs pack nothing)
            counts[s]["blocks"] = counts[s]["tokens"] // cfg.block_size
        results[name] = {"counts": counts, "rejects": rejects, "files": len(files),
                         "corrupt_files": [c for st in done.values() for c in st.get("corrupt", [])]}
    print(count_table(results, with_tokens=bool(cfg.tokenizer)))
    return results


def count_table(results: dict, with_tokens: bool) -> str:
    head = ("dataset", "split", "files", "documents", "characters") + (("tokens", "blocks") if with_tokens else ())
    rows = [head]
    notes = []
    for name, r in results.items():
        for s in SPLITS:
            c = r["counts"][s]
            row = (name, s, str(r["files"]), f"{c['documents']:,}", f"{c['characters']:,}")
            rows.append(row + ((f"{c['tokens']:,}", f"{c['blocks']:,}") if with_tokens else ()))
        if r["rejects"]:
            parts = ", ".join(f"{k}: {v}" for k, v in sorted(r["rejects"].items()))
            notes.append(f"{name}: rejected {sum(r['rejects'].values()):,} records ({parts})")
        for c in r.get("corrupt_files", []):
            notes.append(f"{name}: corrupt file skipped: {c['file']}: {c['problem']} at byte {c['byte_offset']:,}; "
                         f"counted the {c['records_read']:,} records read before it")
    return "\n".join([format_table(rows)] + notes)
