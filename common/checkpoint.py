"""Read and rewrite Hugging Face safetensors checkpoints shard by shard, never loading the whole model.

A checkpoint folder holds `config.json` and either one `model.safetensors` or several shards named in
`model.safetensors.index.json` (`{"metadata": {"total_size": N}, "weight_map": {tensor: file}}`).

Typical use (grow two tensors, keep everything else):

    from common.io import atomic_path
    src = open_checkpoint("base/")                    # validates index, shards and headers
    old = src.read_tensor("model.embed_tokens.weight")
    plan = {"model.embed_tokens.weight": TensorPlan((57000, 4096), "BF16", lambda: grown_matrix())}
    with atomic_path("out/") as tmp:
        rewrite_checkpoint(src, tmp, plan)           # links untouched shards, streams the rest
        ...write config.json, tokenizer, manifest...

`rewrite_checkpoint` hard-links (or copies) every shard that holds no changed tensor and rewrites the
others tensor by tensor: unchanged tensors are copied as raw bytes in chunks, changed ones are produced
one at a time by their `TensorPlan.produce()` and freed after writing. Peak memory is therefore about the
largest changed tensor (plus whatever `produce` needs), independent of shard count and model size.

The safetensors format (https://github.com/huggingface/safetensors): 8-byte little-endian header length
N, N bytes of JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`
(offsets relative to the end of the header), then the data. Headers are parsed here without torch, so
validation is cheap and a truncated or corrupt shard is reported before any work starts.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from common.errors import GraftError, input_error
from common.io import atomic_write_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                 "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_COPY_CHUNK = 64 << 20
_MAX_HEADER = 100 << 20


# The dtype names of the configs (merge dtype, compute_dtype, quant_storage) as safetensors names.
_CONFIG_DTYPES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "fp32": "F32",
                  "float32": "F32", "uint8": "U8"}


def torch_dtype(name: str):
    """The torch dtype for a safetensors dtype name ("BF16") or a config's ("bf16", "bfloat16") -> torch.bfloat16."""
    import torch

    return getattr(torch, _TORCH_DTYPES[_CONFIG_DTYPES.get(name, name)])


def safetensors_dtype(dtype) -> str:
    """The safetensors dtype name for a torch dtype (torch.bfloat16 -> "BF16")."""
    name = str(dtype).removeprefix("torch.")
    for k, v in _TORCH_DTYPES.items():
        if v == name:
            return k
    raise ValueError(f"no safetensors dtype for {dtype}")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file, dtype, shape and absolute byte range in that file."""
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class ShardHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_shard_header(path: str | Path) -> ShardHeader:
    """Parse and validate one .safetensors file's header (no tensor data is read).

    Raises a GraftError naming the file when it is missing, truncated or not a safetensors file.
    """
    path = Path(path)
    fix = "re-download or re-create this shard (compare its size with the source)"
    if not path.is_file():
        raise input_error(path, "shard file is missing", fix)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise input_error(path, f"corrupt shard: only {size} bytes, too short for a safetensors header", fix)
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise input_error(path, f"corrupt shard: header length {n} does not fit a {size}-byte file", fix)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise input_error(path, "corrupt shard: the safetensors header is not valid JSON", fix) from None
    if not isinstance(header, dict):
        raise input_error(path, "corrupt shard: the safetensors header is not a JSON object", fix)
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
            expect = math.prod(shape) * DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            raise input_error(path, f"corrupt shard: bad header entry for tensor {name!r}", fix) from None
        if e - b != expect or b < 0:
            raise input_error(path, f"corrupt shard: tensor {name!r} has {e - b} bytes, expected {expect}", fix)
        data_end = max(data_end, e)
        tensors[name] = TensorInfo(name, path, dtype, shape, base + b, base + e)
    if base + data_end != size:
        raise input_error(path, f"corrupt shard: the header describes {base + data_end} bytes but the file has "
                                f"{size} (truncated or partly written)", fix)
    return ShardHeader(path, tensors, metadata)


@dataclass
class Checkpoint:
    """A validated checkpoint folder. Build it with `open_checkpoint(dir)`."""
    dir: Path
    config: dict[str, Any]
    sharded: bool                      # True when an index file names the shards
    index_metadata: dict[str, Any]     # the index's "metadata" (without total_size semantics changed)
    headers: dict[str, ShardHeader]    # shard file name -> parsed header, in index order
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file name

    @property
    def shards(self) -> list[str]:
        """Shard file names (relative to `dir`), in order."""
        return list(self.headers)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of a tensor (KeyError with a clear message when absent)."""
        try:
            return self.headers[self.weight_map[name]].tensors[name]
        except KeyError:
            raise KeyError(f"{self.dir}: no tensor named {name!r} in this checkpoint") from None

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def read_tensor(self, name: str, out=None):
        """Load one tensor into memory (only that tensor's bytes are read).

        Reads with plain file reads (no mmap, so the file's pages do not add to this process's RSS).
        `out`: a contiguous tensor of the same shape and dtype to read into (e.g. the first rows of a
        larger matrix), saving a copy.
        """
        import torch

        info = self.info(name)
        if out is None:
            out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        elif tuple(out.shape) != info.shape or safetensors_dtype(out.dtype) != info.dtype or not out.is_contiguous():
            raise ValueError(f"read_tensor({name!r}): out is {tuple(out.shape)} {out.dtype}, "
                             f"expected contiguous {info.shape} {info.dtype}")
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(info.file, "rb") as f:
            f.seek(info.start)
            done = 0
            while done < info.nbytes:
                n = f.readinto(buf[done:])
                if not n:
                    raise input_error(info.file, f"shard ended early while reading {name!r}",
                                      "re-download or re-create this shard")
                done += n
        return out

    def iter_tensors(self, shard: str) -> Iterator[tuple[str, Any]]:
        """Yield (name, tensor) for every tensor of one shard, one at a time."""
        from safetensors import safe_open

        with safe_open(self.dir / shard, framework="pt") as f:
            for name in self.headers[shard].tensors:
                yield name, f.get_tensor(name)

    @property
    def total_size(self) -> int:
        """Sum of all tensors' data bytes (what HF writes as metadata.total_size)."""
        return sum(t.nbytes for h in self.headers.values() for t in h.tensors.values())


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Open and validate a HF safetensors checkpoint folder without reading any tensor data.

    Checks: the folder and `config.json` exist; the index (when present) is valid JSON and every file it
    names exists; every shard's header is valid and its size matches; the index and the shard headers
    agree on which tensor is where.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise input_error(d, "model folder not found", "pass a Hugging Face checkpoint folder (with config.json)")
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise input_error(cfg_path, "config.json is missing", "pass a Hugging Face checkpoint folder")
    from common.io import read_json

    config = read_json(cfg_path)
    index_path = d / INDEX_FILE
    headers: dict[str, ShardHeader] = {}
    weight_map: dict[str, str] = {}
    if (d / SINGLE_FILE).is_file():
        # transformers prefers model.safetensors over an index when both exist; so do we.
        h = read_shard_header(d / SINGLE_FILE)
        headers[SINGLE_FILE] = h
        weight_map = {name: SINGLE_FILE for name in h.tensors}
        return Checkpoint(d, config, False, {}, headers, weight_map)
    if not index_path.is_file():
        if any(d.glob("*.bin")) or any(d.glob("*.pt")):
            raise input_error(d, "only PyTorch .bin weights found; safetensors are required",
                              "convert with `model.save_pretrained(dir, safe_serialization=True)`")
        raise input_error(d, f"neither {SINGLE_FILE} nor {INDEX_FILE} found",
                          "pass a Hugging Face checkpoint folder saved with safetensors")
    index = read_json(index_path)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise input_error(index_path, "no \"weight_map\" in the index", "re-save the checkpoint with save_pretrained")
    for shard in sorted(dict.fromkeys(wm.values())):
        if not (d / shard).is_file():
            names = [k for k, v in wm.items() if v == shard]
            raise input_error(index_path, f"the index names shard {shard!r} (for {len(names)} tensors, e.g. "
                                          f"{names[0]!r}) but {d / shard} does not exist",
                              "copy the missing shard into the folder, or fix the index")
        headers[shard] = read_shard_header(d / shard)
    for name, shard in wm.items():
        if name not in headers[shard].tensors:
            raise input_error(index_path, f"the index puts tensor {name!r} in {shard!r} but that shard does not "
                                          "contain it", "re-save the checkpoint, or fix the index")
    return Checkpoint(d, config, True, dict(index.get("metadata") or {}), headers, dict(wm))


@dataclass
class TensorPlan:
    """A tensor to write instead of (or in addition to) the source's: shape, safetensors dtype, producer.

    `produce()` is called only when the tensor is written, and its result is dropped right after, so
    at most one planned tensor is in memory at a time. It must return a contiguous tensor of exactly
    `shape` and `dtype`.
    """
    shape: tuple[int, ...]
    dtype: str
    produce: Callable[[], Any]
    shard: str | None = None   # output shard for a tensor the source lacks (default: a new shard file)


def link_or_copy(src: str | Path, dst: str | Path, link: bool = True) -> str:
    """Hard-link `src` to `dst` when allowed and possible (same filesystem), else copy. Returns "link"/"copy".

    A hard link shares the file's bytes: safe because shards are only ever replaced, never edited in place.
    """
    if link:
        try:
            os.link(src, dst)
            return "link"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return "copy"


def _tensor_bytes(t) -> memoryview:
    import torch

    t = t.detach().cpu().contiguous()
    # Byte view without a copy (works for bfloat16, which numpy cannot hold).
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_shard(path: str | Path, entries: list[tuple[str, str, tuple[int, ...], Callable[[], Any]]],
                metadata: Mapping[str, str] | None = None) -> int:
    """Stream a safetensors file: `entries` = [(name, dtype, shape, write_fn)], header first, then data.

    `write_fn(file)` must write exactly the tensor's bytes (see `tensor_writer` / `byte_range_writer`).
    Tensors are written in the given order, so only one needs to be in memory at a time. Not atomic by
    itself: write into a temporary folder (common.io.atomic_path) or a temporary name. Returns bytes written.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape, _ in entries:
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, write_fn in entries:
            before = f.tell()
            write_fn(f)
            n = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if f.tell() - before != n:
                raise RuntimeError(f"{path}: tensor {name!r} wrote {f.tell() - before} bytes, expected {n}")
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def tensor_writer(produce: Callable[[], Any], name: str, dtype: str, shape: tuple[int, ...]):
    """A `write_fn` for `write_shard` that produces a tensor, checks it, writes it and drops it."""
    def write(f) -> None:
        t = produce()
        if tuple(t.shape) != tuple(shape) or safetensors_dtype(t.dtype) != dtype:
            raise RuntimeError(f"planned tensor {name!r} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
        f.write(_tensor_bytes(t))
    return write


def byte_range_writer(info: TensorInfo):
    """A `write_fn` for `write_shard` that copies a tensor's raw bytes from its source shard in chunks."""
    def write(f) -> None:
        with open(info.file, "rb") as src:
            src.seek(info.start)
            left = info.nbytes
            while left:
                block = src.read(min(_COPY_CHUNK, left))
                if not block:
                    raise input_error(info.file, f"shard ended early while reading {info.name!r}",
                                      "re-download or re-create this shard")
                f.write(block)
                left -= len(block)
    return write


SHARD_FILES = "shard_files"  # manifest key: {shard: {"bytes": N, "sha256": hex}} of the shards a stage wrote


def shard_digest(path: str | Path) -> dict[str, Any]:
    from common.io import file_sha256

    p = Path(path)
    return {"bytes": p.stat().st_size, "sha256": file_sha256(p)}


def shard_references(ckpt: Checkpoint) -> dict[str, tuple[dict[str, Any], str]]:
    """What each shard's bytes should be, where that is known: the `shard_files` of the folder's manifest.json
    (written by graft stages), or the name of a Hugging Face cache blob (`blobs/<sha256>`) a shard links to.
    Safetensors itself has no checksum."""
    refs: dict[str, tuple[dict[str, Any], str]] = {}
    manifest = ckpt.dir / "manifest.json"
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8")).get(SHARD_FILES) or {}
        except (json.JSONDecodeError, OSError):
            recorded = {}
        for shard in ckpt.headers:
            if isinstance(recorded.get(shard), dict) and recorded[shard].get("sha256"):
                refs[shard] = (recorded[shard], f"{manifest} ({SHARD_FILES})")
    for shard in ckpt.headers:
        p = ckpt.dir / shard
        if shard not in refs and p.is_symlink():
            blob = p.resolve().name
            if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
                refs[shard] = ({"sha256": blob}, f"the Hugging Face cache blob name {blob}")
    return refs


def verify_shards(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    """Check every shard with a known reference (shard_references) by size and sha256; GraftError on the first
    that differs. Returns {shard: digest} of the shards checked."""
    checked = {}
    for shard, (want, where) in shard_references(ckpt).items():
        path = ckpt.dir / shard
        got = shard_digest(path)
        if "bytes" in want and want["bytes"] != got["bytes"]:
            problem = f"is {got['bytes']:,} bytes but {where} records {want['bytes']:,}"
        elif want["sha256"] != got["sha256"]:
            problem = (f"has sha256 {got['sha256'][:16]}... but {where} records {want['sha256'][:16]}...: its bytes "
                       "changed after it was written (a disk or copy error, or an edit)")
        else:
            checked[shard] = got
            continue
        raise input_error(path, f"corrupt shard: it {problem}",
                          "restore or re-download the shard, or re-run the stage that wrote the checkpoint")
    return checked


def rewrite_checkpoint(src: Checkpoint, out_dir: str | Path, plan: Mapping[str, TensorPlan], *,
                       link: bool = True, new_shard: str = "model-extra.safetensors",
                       move_to_new_shard: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write `src`'s weights into `out_dir` with the tensors in `plan` replaced (or added).

    - Shards with no planned tensor are hard-linked (`link=True`, same filesystem) or copied.
    - Shards with a planned tensor are rewritten under the same file name: other tensors are copied as
      raw bytes, planned ones produced one at a time.
    - `move_to_new_shard=True` (sharded checkpoints): planned tensors the source has are written to
      `new_shard` instead, and their source shards are rewritten without them (dropped when nothing is
      left), so the changed weights sit in a shard of their own.
    - Planned tensors the source lacks go to `plan[name].shard` or `new_shard`.
    - Writes `model.safetensors.index.json` (weight_map and metadata.total_size) for sharded checkpoints;
      a single-file checkpoint stays a single `model.safetensors` (transformers prefers that file over an
      index, so it cannot be split next to it).

    Only weights are written (not config.json or tokenizer files). `out_dir` must exist; write it inside
    `common.io.atomic_path` so an interrupted run leaves nothing that looks complete.
    Source shards with a known sha256 (shard_references) are checked first.
    Returns {"linked": [...], "copied": [...], "rewritten": [...], "new": [...], "dropped": [...],
    "total_size": N, "weight_map": {...}, "shard_files": {shard: {"bytes", "sha256"}} (written),
    "source_shards": {shard: {"bytes"[, "sha256" when checked]}} (read)}.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    report: dict[str, Any] = {"linked": [], "copied": [], "rewritten": [], "new": [], "dropped": []}
    verified = verify_shards(src)  # a shard whose recorded sha256 differs is never linked or read
    move = move_to_new_shard and src.sharded
    extra = [n for n in plan if not src.has(n) or move]
    if extra and not src.sharded:
        raise GraftError(f"{src.dir}: cannot add tensors {extra} to a single-file checkpoint")
    if move and new_shard in src.headers:
        raise GraftError(f"{src.dir}: already has a shard named {new_shard!r}; pick another new_shard name")

    def planned(name: str) -> tuple:
        p = plan[name]
        return (name, p.dtype, tuple(p.shape), tensor_writer(p.produce, name, p.dtype, tuple(p.shape)))

    shard_entries: dict[str, list] = {}
    for shard, header in src.headers.items():
        if not any(n in plan for n in header.tensors):
            continue
        shard_entries[shard] = [planned(name) if name in plan else
                                (name, info.dtype, info.shape, byte_range_writer(info))
                                for name, info in header.tensors.items() if not (move and name in plan)]
        if not shard_entries[shard]:
            del shard_entries[shard]
            report["dropped"].append(shard)
    for name in extra:
        p = plan[name]
        target = p.shard or new_shard
        if target in src.headers and target not in shard_entries:
            raise GraftError(f"cannot add {name!r} to existing unchanged shard {target!r}; pick another shard name")
        shard_entries.setdefault(target, []).append(planned(name))

    weight_map: dict[str, str] = {}
    total = 0
    params = 0
    order = [s for s in src.headers if s not in report["dropped"]] + [s for s in shard_entries if s not in src.headers]
    for shard in tqdm(order, desc="shards", unit="shard", disable=not progress):
        if shard in shard_entries:
            entries = shard_entries[shard]
            # write_shard puts {"format": "pt"} when the source shard has no metadata (or is new).
            write_shard(out / shard, entries, src.headers[shard].metadata if shard in src.headers else None)
            report["rewritten" if shard in src.headers else "new"].append(shard)
            names = [e[0] for e in entries]
            total += sum(math.prod(e[2]) * DTYPE_SIZES[e[1]] for e in entries)
            params += sum(math.prod(e[2]) for e in entries)
        else:
            how = link_or_copy(src.dir / shard, out / shard, link)
            report["linked" if how == "link" else "copied"].append(shard)
            names = list(src.headers[shard].tensors)
            total += sum(t.nbytes for t in src.headers[shard].tensors.values())
            params += sum(math.prod(t.shape) for t in src.headers[shard].tensors.values())
        for n in names:
            weight_map[n] = shard
    if src.sharded:
        # Keep the source index's order for tensors it already had (diffs stay readable).
        ordered = {n: weight_map[n] for n in src.weight_map if n in weight_map}
        ordered.update({n: s for n, s in weight_map.items() if n not in ordered})
        meta = dict(src.index_metadata)
        if "total_parameters" in meta:  # written by transformers >= 4.56
            meta["total_parameters"] = params
        write_index(out, ordered, total, meta)
        weight_map = ordered
    # Sizes and sha256 of what was written, for the manifest (a later stage reading this folder checks them).
    files = {shard: verified[shard] if shard in verified and shard not in shard_entries else shard_digest(out / shard)
             for shard in order}
    # What was read: each source shard's size, and its sha256 where it was checked against a record.
    read = {shard: verified.get(shard) or {"bytes": (src.dir / shard).stat().st_size} for shard in src.headers}
    report.update(total_size=total, weight_map=weight_map, shard_files=files, source_shards=read)
    return report


def write_index(out_dir: str | Path, weight_map: Mapping[str, str], total_size: int,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `model.safetensors.index.json` atomically with `metadata.total_size` = `total_size`."""
    meta = dict(metadata or {})
    meta["total_size"] = int(total_size)
    return atomic_write_json(Path(out_dir) / INDEX_FILE, {"metadata": meta, "weight_map": dict(weight_map)})


def copy_side_files(src_dir: str | Path, out_dir: str | Path, *, skip: Callable[[Path], bool] | None = None) -> list[str]:
    """Copy the non-weight files of a checkpoint folder (config.json, generation_config.json, ...).

    Skips *.safetensors, the index, *.bin, manifest.json, hidden files and sub-folders, and anything
    `skip(path)` accepts. Returns the copied file names.
    """
    copied = []
    for p in sorted(Path(src_dir).iterdir()):
        if (not p.is_file() or p.name.startswith(".") or p.suffix in (".safetensors", ".bin")
                or p.name in (INDEX_FILE, "manifest.json") or (skip and skip(p))):
            continue
        shutil.copy2(p, Path(out_dir) / p.name)
        copied.append(p.name)
    return copied


def tensors_equal_bytes(a: TensorInfo, b: TensorInfo, rows: int | None = None) -> bool:
    """True when two stored tensors have identical bytes (optionally only their first `rows` rows).

    Compares in chunks straight from the files, so it needs no memory for the tensors. Same file
    inode and offset means equal without reading.
    """
    if a.dtype != b.dtype:
        return False
    if rows is None:
        if a.shape != b.shape:
            return False
        n = a.nbytes
    else:
        if a.shape[1:] != b.shape[1:] or min(a.shape[0], b.shape[0]) < rows:
            return False
        n = rows * math.prod(a.shape[1:]) * DTYPE_SIZES[a.dtype]
    try:
        if os.path.samefile(a.file, b.file) and a.start == b.start:
            return True
    except OSError:
        pass
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        fa.seek(a.start)
        fb.seek(b.start)
        while n:
            k = min(_COPY_CHUNK, n)
            if fa.read(k) != fb.read(k):
                return False
            n -= k
    return True


__all__ = ["Checkpoint", "TensorInfo", "TensorPlan", "ShardHeader", "open_checkpoint", "read_shard_header",
           "rewrite_checkpoint", "write_shard", "tensor_writer", "byte_range_writer", "write_index",
           "link_or_copy", "copy_side_files", "tensors_equal_bytes", "torch_dtype", "safetensors_dtype",
           "SINGLE_FILE", "INDEX_FILE", "CONFIG_FILE"]
