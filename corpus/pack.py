"""Pack token ids into fixed-length blocks and stream them into a `datasets` folder.

`Packer` keeps the tokens that do not fill a block and carries them into the next batch, so no
token is lost at a batch boundary (the seed pipeline's `group_texts` dropped each map batch's
remainder). `BlockWriter` appends blocks to one Arrow file as they come (memory stays flat in
corpus size) and writes the `state.json`/`dataset_info.json` that `datasets.load_from_disk` reads.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from corpus.blocks import COLUMN, block_features

ARROW_FILE = "data-00000-of-00001.arrow"


def doc_token_array(encodings: Sequence, eos_id: int | None, bos_id: int | None = None) -> np.ndarray:
    """The ids of a batch of `tokenizers` encodings as one int32 array, each doc as [BOS] ids [EOS]."""
    lens = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    total = int(lens.sum())
    flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total)
    if eos_id is not None:
        flat = np.insert(flat, np.cumsum(lens), np.int32(eos_id))
        lens = lens + 1
    if bos_id is not None:
        starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if len(lens) else lens
        flat = np.insert(flat, starts, np.int32(bos_id))
    return flat


class Packer:
    """Concatenate token arrays and emit full `block_size` blocks; keep the remainder for later."""

    def __init__(self, block_size: int):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self._carry = np.empty(0, dtype=np.int32)

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Add tokens; return the full blocks now available, shape (n, block_size)."""
        buf = np.concatenate((self._carry, tokens.astype(np.int32, copy=False))) if len(self._carry) else tokens
        n = len(buf) // self.block_size
        cut = n * self.block_size
        self._carry = buf[cut:].copy()
        return buf[:cut].reshape(n, self.block_size)

    @property
    def leftover(self) -> np.ndarray:
        """Tokens not yet in a block (fewer than block_size)."""
        return self._carry


def finish_blocks(leftover: np.ndarray, block_size: int, last_block: str, pad_id: int) -> tuple[np.ndarray, int, int]:
    """Cut `leftover` into blocks; the final partial one is dropped or padded.

    Returns (blocks, padded_tokens, dropped_tokens).
    """
    packer = Packer(block_size)
    blocks = packer.add(leftover)
    rest = packer.leftover
    if len(rest) and last_block == "pad":
        last = np.full(block_size, pad_id, dtype=np.int32)
        last[: len(rest)] = rest
        return np.concatenate((blocks, last[None])), block_size - len(rest), 0
    return blocks, 0, len(rest)


def block_meta(block_size: int) -> dict[str, str]:
    """The `datasets` metadata of a blocks folder (Arrow schema metadata + dataset_info.json), as text.

    Computed with `datasets` once by the parent and handed to worker processes, so that they write
    with pyarrow alone and do not pay `import datasets` (about 1 CPU-second each).
    """
    from dataclasses import asdict

    from datasets import DatasetInfo

    features = block_features(block_size)
    info = asdict(DatasetInfo(features=features))
    return {"schema": features.arrow_schema.metadata[b"huggingface"].decode(),
            "info": json.dumps({k: info[k] for k in sorted(info)}, indent=2)}


class BlockWriter:
    """Append (n, block_size) int32 blocks to a `datasets` folder (one Arrow stream file, streamed).

    Blocks are buffered and written in record batches of a fixed number of rows (~8 MB), so the
    file's bytes do not depend on how the caller batched its input. The folder is what
    `Dataset.save_to_disk` writes for one shard: data-00000-of-00001.arrow, state.json, dataset_info.json.
    """

    def __init__(self, folder: str | Path, block_size: int, meta: dict[str, str] | None = None,
                 batch_bytes: int = 8 << 20):
        import pyarrow as pa

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.block_size = block_size
        self.meta = meta or block_meta(block_size)
        self._schema = pa.schema([pa.field(COLUMN, pa.list_(pa.int32(), block_size))],
                                 metadata={"huggingface": self.meta["schema"]})
        self._batch_rows = max(1, batch_bytes // (4 * block_size))
        self._sink = pa.OSFile(str(self.folder / ARROW_FILE), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self._schema)
        self.rows = 0
        self._hash = hashlib.sha256()
        self._buf: list[np.ndarray] = []
        self._buffered = 0

    def write(self, blocks: np.ndarray) -> None:
        if not len(blocks):
            return
        self._buf.append(np.ascontiguousarray(blocks, dtype=np.int32))
        self._buffered += len(blocks)
        if self._buffered >= self._batch_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        import pyarrow as pa

        if not self._buffered:
            return
        allrows = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        n = len(allrows) if final else len(allrows) // self._batch_rows * self._batch_rows
        for start in range(0, n, self._batch_rows):
            chunk = allrows[start:start + self._batch_rows].reshape(-1)
            self._hash.update(chunk.tobytes())
            arr = pa.FixedSizeListArray.from_arrays(pa.array(chunk, type=pa.int32()), self.block_size)
            self._writer.write_batch(pa.record_batch([arr], schema=self._schema))
        self.rows += n
        rest = allrows[n:]
        self._buf = [rest] if len(rest) else []
        self._buffered = len(rest)

    def close(self) -> int:
        """Finish the Arrow file and write the metadata `load_from_disk` needs; returns the row count."""
        self._flush(final=True)
        self._writer.close()
        self._sink.close()
        state = {
            "_data_files": [{"filename": ARROW_FILE}],
            "_fingerprint": self._hash.hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        (self.folder / "dataset_info.json").write_text(self.meta["info"], encoding="utf-8")
        return self.rows


def write_blocks(folder: str | Path, blocks: np.ndarray, block_size: int, meta: dict[str, str] | None = None) -> int:
    """Write all `blocks` to a new `datasets` folder at once (small data, e.g. the tail)."""
    w = BlockWriter(folder, block_size, meta)
    w.write(blocks)
    return w.close()


__all__ = ["COLUMN", "Packer", "BlockWriter", "block_meta", "doc_token_array", "finish_blocks", "write_blocks"]
