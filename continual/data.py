"""Training/dev blocks: loading, checks, a resumable seeded order, and byte counts for bits per byte.

Bits per byte (bpb) on dev = total cross-entropy in nats / ln 2 / total UTF-8 bytes of the text the
predicted tokens stand for. The bytes of a block are counted by decoding its predicted tokens
(ids[1:]) with the run's tokenizer (`skip_special_tokens=True`) and encoding the text as UTF-8.
A byte-fallback character cut at a block boundary decodes to U+FFFD (3 bytes), a negligible error at
real block sizes. bpb compares models with different vocabularies, per-token loss does not.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from common.errors import input_error
from common.io import MANIFEST

if TYPE_CHECKING:
    import datasets
    import numpy as np

COLUMN = "input_ids"


def load_split(folder: str | Path, split: str) -> "datasets.Dataset":
    """Blocks of a corpus prepare/mix folder (corpus.blocks.load_blocks), or of a plain `datasets` folder."""
    import datasets

    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        from corpus.blocks import load_blocks

        ds = load_blocks(folder, split)
    elif (folder / split / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(folder / split))
    elif (folder / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(folder))
    else:
        raise input_error(folder, f"is neither a corpus folder nor a `datasets` folder (no {MANIFEST}, no "
                                  "dataset_info.json)", "pass the --out folder of `graft corpus prepare`/`mix`")
    if COLUMN not in ds.column_names:
        raise input_error(folder, f"the {split} blocks have no `{COLUMN}` column (columns: {ds.column_names})",
                          "tokenize the corpus with `graft corpus prepare`")
    return ds


def corpus_bos(folder: str | Path) -> bool | None:
    """Whether the blocks of `folder` start every document with BOS: the `bos` its `corpus prepare`/`mix`
    manifest records; None for a plain `datasets` folder (no manifest, setting unknown)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return None
    from corpus.blocks import corpus_bos as manifest_bos

    return manifest_bos(folder)


def same_bos(train: str | Path, dev: str | Path) -> bool | None:
    """The one BOS setting of the train and dev corpora; an error naming both when they differ."""
    a, b = corpus_bos(train), corpus_bos(dev)
    if a is not None and b is not None and a != b:
        raise input_error(dev, f"was prepared with bos = {str(b).lower()} but the training data {train} with "
                               f"bos = {str(a).lower()} (manifest.json key `bos`); dev bits per byte would not "
                               "measure what training sees",
                          "prepare both with the same `graft corpus prepare --bos/--no-bos`")
    return a if a is not None else b


def block_length(ds: "datasets.Dataset", where: str | Path, expected: int | None) -> int:
    """The common length of all blocks; an error if they differ from each other or from `expected`."""
    import pyarrow.compute as pc

    if len(ds) == 0:
        raise input_error(where, "has no blocks", "prepare more text, or check the split")
    col = ds.data.column(COLUMN)
    lengths = pc.list_value_length(col)
    lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
    if lo != hi:
        raise input_error(where, f"blocks have different lengths ({lo}..{hi}); training needs fixed-length blocks",
                          "re-run `graft corpus prepare` (it packs text into fixed blocks)")
    if expected is not None and lo != expected:
        raise input_error(where, f"blocks are {lo} tokens long, expected {expected}",
                          f"prepare the corpus with block_size {expected}, or set seq_len = {lo}")
    return lo


def max_token_id(ds: "datasets.Dataset", limit: int | None = 20_000) -> int:
    """Largest token id in the first `limit` stored blocks (a sample: a full scan of a 42B-token corpus
    would take long; the corpus manifest already ties the blocks to their tokenizer)."""
    import pyarrow.compute as pc

    table = ds.data if limit is None else ds.data.slice(0, limit)
    return int(pc.max(pc.list_flatten(table.column(COLUMN))).as_py())


def epoch_order(n: int, seed: int, epoch: int) -> "np.ndarray":
    """The block order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same."""
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batches(n_blocks: int, micro_batch_size: int, seed: int, start: int, rank: int = 0,
                  world: int = 1) -> Iterator[tuple[int, "np.ndarray"]]:
    """Yield (global micro-batch index, block indices for this rank) from global index `start` on, forever.

    One global micro-batch = `world` per-rank micro-batches. An epoch's tail that does not fill one is
    dropped, so every rank always gets a full batch.
    """
    per_global = micro_batch_size * world
    per_epoch = n_blocks // per_global
    if per_epoch == 0:
        raise ValueError(f"{n_blocks} blocks are fewer than one global micro-batch ({per_global})")
    i = start
    while True:
        epoch, j = divmod(i, per_epoch)
        order = epoch_order(n_blocks, seed, epoch)
        while j < per_epoch:
            lo = j * per_global + rank * micro_batch_size
            yield i, order[lo:lo + micro_batch_size]
            i += 1
            j += 1


def utf8_bytes_of_blocks(ds: "datasets.Dataset", tokenizer, limit: int | None = None) -> int:
    """UTF-8 bytes of the text behind the predicted tokens (ids[1:]) of the first `limit` blocks."""
    n = len(ds) if not limit else min(limit, len(ds))
    total = 0
    for row in ds.select(range(n))[COLUMN]:
        total += len(tokenizer.decode(row[1:], skip_special_tokens=True).encode("utf-8"))
    return total
