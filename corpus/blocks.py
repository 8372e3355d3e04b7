"""Load packed token blocks for training: `load_blocks(dir, split)`.

Works on the output of `graft corpus prepare` and of `graft corpus mix` and returns one
`datasets.Dataset` with a single column `input_ids`: fixed-length sequences of `block_size`
int32 token ids (memory-mapped Arrow; nothing is read into RAM up front). Cast to int64 where a
loss needs it (e.g. `torch.as_tensor(batch["input_ids"]).long()`).

On-disk layout (all written by this package; `manifest.json` is written last and marks completion):

prepare folder:
    manifest.json          stage "corpus.prepare", counts, tokenizer hash, settings,
                           "shards": [shard ids in input order], "block_size", "splits"
    shards/<id>/<split>/   one Hugging Face `datasets` folder per input file and split
                           (loadable with `datasets.load_from_disk`)
    tail/<split>/          blocks built from the leftovers (< block_size tokens) of every shard,
                           concatenated in shard order; only the last partial block is dropped/padded
    completions/<id>       per-shard completion markers (datatrove style)
    rejects.jsonl          every rejected record with its file, line and reason

mix folder:
    manifest.json          stage "corpus.mix": sources (absolute prepare folders, weights, counts)
    train_indices.npy      int64 rows into the concatenation of the sources' train blocks, shuffled

The mix's "train" split is the weighted, shuffled selection; its "dev" split is every source's
dev blocks once, in source order (evaluation should not be re-weighted or repeated).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import GraftError, input_error
from common.io import MANIFEST, is_complete, read_manifest

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "dev")
PREPARE_STAGE = "corpus.prepare"
MIX_STAGE = "corpus.mix"
SHARDS_DIR = "shards"
TAIL_DIR = "tail"
COMPLETIONS_DIR = "completions"
MIX_INDICES = "train_indices.npy"
COLUMN = "input_ids"


def block_features(block_size: int):
    """The `datasets.Features` of a blocks dataset: `input_ids` = int32 sequences of fixed length."""
    import datasets

    return datasets.Features({COLUMN: datasets.List(datasets.Value("int32"), length=block_size)})


def read_complete_manifest(folder: str | Path, what: str = "a corpus folder") -> dict:
    """The manifest of a finished prepare/mix folder, or a GraftError saying what to run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise input_error(folder, f"not found (expected {what})",
                          "pass the --out folder of `graft corpus prepare` or `graft corpus mix`")
    if not is_complete(folder):
        raise input_error(folder, f"has no finished {MANIFEST} (the run that writes it was interrupted or "
                                  "is still running)", "re-run the same `graft corpus prepare/mix` command to finish it")
    return read_manifest(folder)


def manifest_bos(folder: str | Path, manifest: dict) -> bool:
    """Whether the blocks of a prepare/mix folder put BOS before every document (the manifest's `bos`).

    Prepare folders written before `bos` was a top-level key hold it in `config.bos`; older mixes take it
    from their sources (which must agree).
    """
    if isinstance(manifest.get("bos"), bool):
        return manifest["bos"]
    cfg = manifest.get("config") or {}
    if manifest.get("stage") == PREPARE_STAGE and isinstance(cfg.get("bos"), bool):
        return cfg["bos"]
    if manifest.get("stage") == MIX_STAGE and manifest.get("sources"):
        values = {corpus_bos(s["path"]) for s in manifest["sources"]}
        if len(values) == 1:
            return values.pop()
    raise input_error(Path(folder) / MANIFEST, "records no `bos` setting (whether each document starts with BOS)",
                      "re-run `graft corpus prepare` (and `graft corpus mix`) for this folder")


def corpus_bos(folder: str | Path) -> bool:
    """The BOS setting of a finished prepare/mix folder (see `manifest_bos`)."""
    return manifest_bos(folder, read_complete_manifest(folder))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise GraftError(f"unknown split {split!r}. Fix: use one of {', '.join(SPLITS)}")


def prepare_split_dirs(folder: str | Path, manifest: dict, split: str) -> list[Path]:
    """The dataset folders of one split of a prepare folder, in order (shards, then the tail)."""
    folder = Path(folder)
    dirs = [folder / SHARDS_DIR / sid / split for sid in manifest["shards"]]
    dirs.append(folder / TAIL_DIR / split)
    return dirs


def _load_prepare(folder: Path, manifest: dict, split: str) -> "datasets.Dataset":
    import datasets

    parts = []
    for d in prepare_split_dirs(folder, manifest, split):
        if not d.is_dir():
            raise input_error(d, "missing from a finished prepare folder",
                              "the folder was modified; delete it and re-run `graft corpus prepare`")
        ds = datasets.load_from_disk(str(d))
        if len(ds):
            parts.append(ds)
    if not parts:
        return datasets.Dataset.from_dict({COLUMN: []}, features=block_features(manifest["block_size"]))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_mix(folder: Path, manifest: dict, split: str) -> "datasets.Dataset":
    import datasets
    import numpy as np

    loaded = []
    for src in manifest["sources"]:
        path = Path(src["path"])
        m = read_complete_manifest(path, "a prepare folder used by this mix")
        if m["counts"]["train"]["blocks"] != src["train_blocks"] or m["tokenizer"]["sha256"] != src["tokenizer_sha256"]:
            raise input_error(path, f"changed since the mix {folder} was made (it was prepared again)",
                              "re-run the same `graft corpus mix` command")
        loaded.append(_load_prepare(path, m, split))
    loaded = [d for d in loaded if len(d)]
    if not loaded:
        return datasets.Dataset.from_dict({COLUMN: []}, features=block_features(manifest["block_size"]))
    whole = loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)
    if split == "dev":
        return whole
    indices = np.load(folder / MIX_INDICES, mmap_mode="r")
    return whole.select(indices)


def load_blocks(folder: str | Path, split: str = "train") -> "datasets.Dataset":
    """Open the `split` ("train" or "dev") blocks of a prepare or mix folder as one Dataset.

    The result has one column, `input_ids` (lists of `block_size` int32 ids), and is memory-mapped.
    For a mix folder, "train" is the weighted, shuffled selection and "dev" the sources' dev blocks.
    Raises GraftError if the folder is missing, unfinished, or not a corpus folder.
    """
    _check_split(split)
    folder = Path(folder)
    manifest = read_complete_manifest(folder)
    stage = manifest.get("stage")
    if stage == PREPARE_STAGE:
        return _load_prepare(folder, manifest, split)
    if stage == MIX_STAGE:
        return _load_mix(folder, manifest, split)
    raise input_error(folder, f"is a {stage!r} folder, not a corpus prepare or mix folder",
                      "pass the --out folder of `graft corpus prepare` or `graft corpus mix`")
