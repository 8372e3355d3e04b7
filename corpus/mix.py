"""`graft corpus mix`: weighted mixtures of prepared datasets, as a shuffled list of block indices.

A spec like "1:SkyPile-2022, 0.1:SkyPile-2023, 2:SlimPajama" gives each dataset a weight in
multiples of its own tokens (= its blocks, all blocks have one size):
- the whole part of a weight repeats the dataset, each repeat in a different seeded random order;
- the fraction takes a seeded random sample of round(fraction * blocks) blocks, without replacement.
All selected blocks are then shuffled together (seeded). Only indices are written; the blocks stay
in the prepare folders, so a mix costs 8 bytes per selected block on disk and no copy.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import GraftError, input_error
from common.io import atomic_path, write_manifest
from common.rerun import guard, overwrite_field
from corpus.blocks import MIX_INDICES, MIX_STAGE, PREPARE_STAGE, manifest_bos, read_complete_manifest
from corpus.registry import DEFAULT_REGISTRY, load_registry
from corpus.table import format_table

_REPEAT, _FRACTION, _GLOBAL = 1, 2, 3  # seed-sequence tags, so each draw has its own stream


@dataclass
class MixConfig:
    """Mix prepared datasets by weight into one shuffled training set.

    SPEC is "WEIGHT:DATASET, ..." where DATASET is a registered name that was prepared (its
    `encoded` folder) or the path of a `graft corpus prepare` output folder. A weight is a multiple
    of the dataset's own tokens: 0.1 = a seeded random 10% of its blocks, 1 = all of it once,
    2 = two epochs, each in a different order. The mix folder holds shuffled indices into the
    prepared blocks; load it with corpus.blocks.load_blocks(DIR, "train"|"dev").

    Example:
      graft corpus mix "1:SkyPile-2022, 0.1:SkyPile-2023, 2:SlimPajama" --out mixes/zh-en
    """

    spec: str = field(metadata={"help": "mixture, e.g. '1:SkyPile-2022, 0.1:SkyPile-2023, 2:SlimPajama'"})
    out: str = field(metadata={"help": "output folder"})
    registry: str = field(default=DEFAULT_REGISTRY, metadata={"help": "dataset registry used to resolve names"})
    seed: int = field(default=0, metadata={"help": "seed of the samples and shuffles"})
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:  # weights fail when the config is built (CLI or workflow file)
        parse_spec(self.spec)


def parse_spec(spec: str) -> list[tuple[float, str]]:
    """'1:A, 0.1:B' -> [(1.0, 'A'), (0.1, 'B')]. Weights must be finite and > 0; names unique."""
    out = []
    for term in (t.strip() for t in spec.split(",")):
        if not term:
            continue
        weight, sep, name = term.partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not name.strip() or not math.isfinite(w) or w <= 0:
            raise GraftError(f"bad mixture term {term!r}. Fix: write WEIGHT:DATASET with a weight > 0, "
                             "e.g. '1:SkyPile-2022, 0.1:SkyPile-2023, 2:SlimPajama'")
        out.append((w, name.strip()))
    if not out:
        raise GraftError("empty mixture spec. Fix: e.g. '1:SkyPile-2022, 2:SlimPajama'")
    names = [n for _, n in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise GraftError(f"dataset(s) {dupes} appear twice in the mixture. Fix: give each dataset one weight")
    return out


def source_draws(n: int, weight: float, seed: int, i: int) -> list[np.ndarray]:
    """Source i's selection before the global shuffle: one permutation of range(n) per whole repeat,
    then a random sample (without replacement) of round(fraction * n) rows."""
    repeats = int(math.floor(weight))
    sampled = int(round((weight - repeats) * n))
    draws = [np.random.default_rng([seed, _REPEAT, i, r]).permutation(n) for r in range(repeats)]
    if sampled:
        draws.append(np.random.default_rng([seed, _FRACTION, i]).permutation(n)[:sampled])
    return draws


def mixture_indices(n_blocks: list[int], weights: list[float], seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Rows into the concatenation of the sources (source i starts at sum(n_blocks[:i])), shuffled.

    Returns (indices, per-source {"blocks", "repeats", "sampled", "selected"}).
    """
    offset, parts, info = 0, [], []
    for i, (n, w) in enumerate(zip(n_blocks, weights)):
        draws = source_draws(int(n), w, seed, i)
        parts.extend(d + offset for d in draws)
        repeats = int(math.floor(w))
        selected = sum(len(d) for d in draws)
        info.append({"blocks": int(n), "repeats": repeats, "sampled": selected - repeats * int(n), "selected": selected})
        offset += int(n)
    idx = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
    return np.random.default_rng([seed, _GLOBAL]).permutation(idx), info


def resolve_source(name: str, registry: str | Path) -> Path:
    """A prepare folder given directly, or a registered dataset's `encoded` folder."""
    p = Path(name)
    if p.is_dir() and (p / "manifest.json").exists():
        return p.resolve()
    entries = load_registry(registry, must_exist=False)
    if name in entries:
        enc = entries[name].encoded_path()
        if enc is None:
            raise GraftError(f"dataset {name!r} is registered but not prepared. Fix: graft corpus prepare {name} "
                             f"--tokenizer DIR --out DIR --registry {registry}")
        return enc.resolve()
    known = ", ".join(sorted(entries)) or "none"
    raise GraftError(f"unknown dataset {name!r}: not a prepare folder and not in {registry} (registered: {known}). "
                     "Fix: register and prepare it, or give the path of its prepare folder")


def mix(cfg: MixConfig) -> Path:
    """Write the mixture's shuffled block indices and manifest to `cfg.out`; print the token budget."""
    if not cfg.out:
        raise GraftError("no output folder. Fix: pass --out DIR")
    started = time.time()
    terms = parse_spec(cfg.spec)
    sources = []
    for w, name in terms:
        path = resolve_source(name, cfg.registry)
        m = read_complete_manifest(path, f"the prepare folder of {name!r}")
        if m.get("stage") != PREPARE_STAGE:
            raise input_error(path, f"is a {m.get('stage')!r} folder, not a prepare folder", "mix prepared datasets")
        sources.append({"name": name, "path": str(path), "weight": w, "block_size": m["block_size"],
                        "tokenizer_sha256": m["tokenizer"]["sha256"], "train_blocks": m["counts"]["train"]["blocks"],
                        "dev_blocks": m["counts"]["dev"]["blocks"], "bos": manifest_bos(path, m)})
    for key, what in (("block_size", "block sizes"), ("tokenizer_sha256", "tokenizers"), ("bos", "BOS settings")):
        values = {s[key] for s in sources}
        if len(values) > 1:
            detail = ", ".join(f"{s['name']}={s[key] if key != 'tokenizer_sha256' else s[key][:12]}" for s in sources)
            raise GraftError(f"the datasets were prepared with different {what} ({detail}; manifest.json keys "
                             "block_size, tokenizer.sha256, bos). Fix: prepare them all with the same --tokenizer, "
                             "--block-size and --bos/--no-bos")
    block_size = sources[0]["block_size"]
    idx, info = mixture_indices([s["train_blocks"] for s in sources], [s["weight"] for s in sources], cfg.seed)
    for s, i in zip(sources, info):
        s.update(selected_blocks=i["selected"], repeats=i["repeats"], sampled_blocks=i["sampled"],
                 tokens=i["selected"] * block_size)
    out = Path(cfg.out)
    # A source is identified by its manifest (rewritten whenever it is prepared again), not by re-reading its blocks.
    skip, rerun = guard(cfg, out, stage=MIX_STAGE, in_place=True,
                        inputs={f"source_{i}": s["path"] for i, s in enumerate(sources)})
    if skip:
        return out
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MIX_INDICES) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, idx)
    total = int(len(idx))
    counts = {"train": {"blocks": total, "tokens": total * block_size},
              "dev": {"blocks": sum(s["dev_blocks"] for s in sources),
                      "tokens": sum(s["dev_blocks"] for s in sources) * block_size}}
    write_manifest(out, stage=MIX_STAGE, config=cfg, inputs={"sources": [s["path"] for s in sources]},
                   counts=counts, started=started, sources=sources, block_size=block_size,
                   tokenizer={"sha256": sources[0]["tokenizer_sha256"]}, bos=sources[0]["bos"], rerun=rerun)
    print(budget_table(sources, block_size))
    print(f"wrote {out} (load with corpus.blocks.load_blocks)")
    return out


def budget_table(sources: list[dict], block_size: int) -> str:
    total = sum(s["tokens"] for s in sources) or 1
    rows = [("dataset", "weight", "blocks", "selected", "tokens", "share")]
    for s in sources:
        rows.append((s["name"], f"{s['weight']:g}", f"{s['train_blocks']:,}", f"{s['selected_blocks']:,}",
                     f"{s['tokens']:,}", f"{100 * s['tokens'] / total:.1f}%"))
    rows.append(("total", "", f"{sum(s['train_blocks'] for s in sources):,}",
                 f"{sum(s['selected_blocks'] for s in sources):,}", f"{sum(s['tokens'] for s in sources):,}", "100.0%"))
    return format_table(rows) + f"\n(block size {block_size} tokens; train split)"

