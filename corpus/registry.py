"""The dataset registry: a `datasets.toml` naming each corpus, its files, format, text field and split.

One table per dataset (relative paths are relative to the registry file's folder):

    [SkyPile-2022]
    files = ["skypile/2022-*.jsonl"]      # files or globs, expanded in sorted order
    format = "jsonl"                      # jsonl | parquet | txt; omitted = from the file name
    text_field = "text"                   # JSON key / parquet column holding the document
    split = "999:1"                       # train:dev parts, decided per document by a stable hash
    encoded = "prepared/SkyPile-2022"     # where `graft corpus prepare` wrote the blocks (optional)

`graft corpus add` rewrites the file with tomli-w, so comments in it are not kept.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import GraftError, input_error
from common.io import atomic_write_text
from corpus.readers import FORMATS, detect_format, expand_inputs
from corpus.table import format_table

DEFAULT_REGISTRY = "datasets.toml"
DEFAULT_SPLIT = "999:1"
_KEYS = {"files", "format", "text_field", "split", "encoded"}


def parse_split(split: str, where: str = "split") -> tuple[int, int]:
    """'999:1' -> (999, 1): train and dev parts (integers, train > 0, dev >= 0)."""
    try:
        train, dev = (int(x) for x in str(split).split(":"))
    except ValueError:
        raise GraftError(f"{where}: {split!r} is not TRAIN:DEV. Fix: give integer parts, e.g. '999:1'") from None
    if train <= 0 or dev < 0:
        raise GraftError(f"{where}: {split!r} needs train > 0 and dev >= 0. Fix: e.g. '999:1' or '1:0' (no dev)")
    return train, dev


@dataclass
class DatasetEntry:
    """One registered dataset. `root` is the folder relative paths are resolved against."""

    name: str
    files: list[str]
    format: str | None = None
    text_field: str = "text"
    split: str = DEFAULT_SPLIT
    encoded: str | None = None
    root: Path = Path(".")

    def resolve(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(self.root, p))

    def paths(self) -> list[Path]:
        """The dataset's files, globs expanded (sorted); a pattern matching nothing is an error."""
        return expand_inputs([self.resolve(p) for p in self.files])

    def encoded_path(self) -> Path | None:
        return Path(self.resolve(self.encoded)) if self.encoded else None

    def to_toml(self) -> dict:
        out: dict = {"files": list(self.files)}
        if self.format:
            out["format"] = self.format
        out["text_field"] = self.text_field
        out["split"] = self.split
        if self.encoded:
            out["encoded"] = self.encoded
        return out


def load_registry(path: str | Path = DEFAULT_REGISTRY, *, must_exist: bool = True) -> dict[str, DatasetEntry]:
    """Read `datasets.toml` into {name: DatasetEntry}, checking every entry."""
    path = Path(path)
    if not path.is_file():
        if must_exist:
            raise input_error(path, "dataset registry not found",
                              "register a dataset first: graft corpus add NAME --files 'data/*.jsonl' "
                              "(or pass --registry PATH)")
        return {}
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise input_error(path, f"not valid TOML ({e})", "fix the syntax, or delete the file and re-add datasets") from None
    root = path.resolve().parent
    out = {}
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise input_error(path, f"{name!r} is not a table", f"write it as [{name}] with files = [...]")
        unknown = set(table) - _KEYS
        if unknown:
            raise input_error(path, f"[{name}] has unknown keys {sorted(unknown)}", f"use only {sorted(_KEYS)}")
        files = table.get("files")
        if isinstance(files, str):
            files = [files]
        if not files or not all(isinstance(f, str) for f in files):
            raise input_error(path, f"[{name}] needs files = [\"glob\", ...]", "list the dataset's files or globs")
        fmt = table.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise input_error(path, f"[{name}] format {fmt!r} is unknown", f"use one of {', '.join(FORMATS)}")
        split = str(table.get("split", DEFAULT_SPLIT))
        parse_split(split, where=f"{path} [{name}] split")
        out[name] = DatasetEntry(name=name, files=files, format=fmt, text_field=table.get("text_field", "text"),
                                 split=split, encoded=table.get("encoded"), root=root)
    return out


def get_dataset(name: str, registry: str | Path = DEFAULT_REGISTRY) -> DatasetEntry:
    """The registered dataset `name`, or a GraftError listing the names that exist."""
    entries = load_registry(registry)
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise GraftError(f"unknown dataset {name!r} in {registry} (registered: {known}). "
                         f"Fix: graft corpus add {name} --files 'PATH/*.jsonl' --registry {registry}")
    return entries[name]


def save_registry(path: str | Path, entries: dict[str, DatasetEntry]) -> Path:
    import tomli_w

    return atomic_write_text(path, tomli_w.dumps({n: e.to_toml() for n, e in entries.items()}))


def add_dataset(registry: str | Path, name: str, files: list[str], *, format: str | None = None,
                text_field: str = "text", split: str = DEFAULT_SPLIT, encoded: str | None = None,
                force: bool = False) -> DatasetEntry:
    """Register (or with `force`, replace) a dataset; its files must exist now.

    Paths are stored relative to the registry's folder when they are relative, so the registry
    keeps working when run from elsewhere.
    """
    registry = Path(registry)
    if not name or any(c in name for c in ",:[]\"'") or name != name.strip():
        raise GraftError(f"bad dataset name {name!r}. Fix: use letters, digits, '-', '_' or '.'")
    entries = load_registry(registry, must_exist=False)
    if name in entries and not force:
        raise GraftError(f"dataset {name!r} is already in {registry}. Fix: pick another name, or pass --force to replace it")
    parse_split(split)
    if format is not None and format not in FORMATS:
        raise GraftError(f"unknown format {format!r}. Fix: use one of {', '.join(FORMATS)}")
    root = registry.resolve().parent

    def rel(p: str) -> str:
        return p if os.path.isabs(p) else os.path.relpath(os.path.abspath(p), root)

    entry = DatasetEntry(name=name, files=[rel(f) for f in files], format=format, text_field=text_field,
                         split=split, encoded=rel(encoded) if encoded else None, root=root)
    paths = entry.paths()  # fail now, not at prepare time, if a glob matches nothing
    if format is None:
        for p in paths:
            detect_format(p)
    entries[name] = entry
    save_registry(registry, entries)
    return entry


def set_encoded(registry: str | Path, name: str, out: str | Path) -> str | None:
    """Record where `name` was prepared (so `graft corpus mix` can find it by name).

    Only fills an empty `encoded`; returns a note when the registry already points elsewhere.
    """
    entries = load_registry(registry)
    entry = entries[name]
    if entry.encoded:
        if Path(entry.resolve(entry.encoded)).resolve() != Path(out).resolve():
            return (f"note: {registry} [{name}] keeps encoded = {entry.encoded!r}; `graft corpus mix` by name uses "
                    f"that folder. Pass {out} in the mix spec to use this one.")
        return None
    entry.encoded = os.path.relpath(os.path.abspath(out), entry.root)
    save_registry(registry, entries)
    return None


@dataclass
class AddConfig:
    """Register a dataset in the registry (datasets.toml): its files, format, text field and split.

    The files must exist now (globs are checked). Relative paths are stored relative to the
    registry's folder. Example:
      graft corpus add SkyPile-2022 --files 'skypile/2022-*.jsonl'
      graft corpus add SlimPajama --files 'slimpajama/*.parquet' --format parquet
    """

    name: str = field(metadata={"help": "dataset name (used by prepare, count and mix specs)"})
    files: list[str] = field(default_factory=list, metadata={"help": "files or globs (quote globs)", "split": False})
    format: str | None = field(default=None, metadata={"help": "jsonl | parquet | txt (default: from each file name)"})
    text_field: str = field(default="text", metadata={"help": "JSON key / parquet column holding the text"})
    split: str = field(default=DEFAULT_SPLIT, metadata={"help": "train:dev parts, decided per document by a stable hash"})
    encoded: str | None = field(default=None, metadata={"help": "prepare output folder (set by prepare if empty)"})
    registry: str = field(default=DEFAULT_REGISTRY, metadata={"help": "registry file (created if missing)"})
    force: bool = field(default=False, metadata={"help": "replace an existing entry of the same name"})

    def __post_init__(self) -> None:  # a bad train:dev split fails when the config is built
        parse_split(self.split, where="`split` (--split)")


def add(cfg: AddConfig) -> DatasetEntry:
    if not cfg.files:
        raise GraftError("no files given. Fix: pass --files 'PATH/*.jsonl'")
    entry = add_dataset(cfg.registry, cfg.name, cfg.files, format=cfg.format, text_field=cfg.text_field,
                        split=cfg.split, encoded=cfg.encoded, force=cfg.force)
    print(f"registered {cfg.name} in {cfg.registry}: {len(entry.paths())} files")
    return entry


@dataclass
class ListConfig:
    """List the registered datasets: files matched, format, text field, split and prepared folder."""

    registry: str = field(default=DEFAULT_REGISTRY, metadata={"help": "registry file"})


def list_datasets(cfg: ListConfig) -> dict[str, DatasetEntry]:
    entries = load_registry(cfg.registry)
    rows = [("dataset", "files", "matched", "format", "text_field", "split", "encoded")]
    for name, e in entries.items():
        try:
            matched = str(len(e.paths()))
        except GraftError:
            matched = "0 (missing!)"
        rows.append((name, " ".join(e.files), matched, e.format or "auto", e.text_field, e.split, e.encoded or "-"))
    print(format_table(rows) if entries else f"no datasets in {cfg.registry}")
    return entries
