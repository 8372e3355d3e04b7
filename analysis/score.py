"""`graft vocab score`: ALP, compression and Rényi efficiency of every candidate of `vocab train`.

Candidates that share a `chars` value are nested (each is the largest one cut to its first merges),
so each group is tokenized once, with its largest candidate, and the counts of the others are
derived by replaying merge ranks (analysis/nested.py). Candidates that are not nested are
tokenized on their own (column `method`: "nested" or "direct"). Formulas: analysis/alp.py.
Candidates of a byte-level base (base + first N new merges; `chars` is 0 there) are nested the same
way, by splitting new tokens back into their merge parts (analysis/nested_bytelevel.py).
"""
from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GraftError, input_error
from common.rerun import guard, listed, overwrite_field

SCORE_COLUMNS = (
    "chars", "size", "vocab_pieces", "merges", "alp", "renyi_efficiency", "tokens", "tokens_per_char",
    "chars_per_token", "bytes_per_token", "ratio_to_base", "never_produced", "tokens_han", "tokens_latin",
    "tokens_digits", "tokens_other", "byte_tokens", "method", "path")


@dataclass
class ScoreConfig:
    """Score every candidate vocabulary of a `graft vocab train` folder.

    For each candidate: ALP (average log probability, exactly as VoCapXLM's compute_alp), tokens per
    character, characters and bytes per token, the ratio of its token count to a --base tokenizer's,
    Rényi efficiency (alpha 2.5), pieces never produced, and tokens per script (Han, Latin, digits,
    other). Nested candidates are scored from one tokenization per --chars value. Picks the knee of
    the ALP curves (Kneedle), then the highest ALP at that size.

    Writes scores.csv, scores.json, alp.png, report.md and manifest.json (with "pick").

    Example:
      graft vocab score runs/cands --corpus zh_dev.jsonl --out runs/scores --samples 100000
    """

    candidates_dir: str = field(metadata={"help": "folder written by `graft vocab train` (manifest.json + candidates/)"})
    corpus: list[str] = field(metadata={"help": "evaluation text: files or globs (.jsonl[.gz|.zst], .parquet, .txt[.gz])", "metavar": "FILE", "split": False})
    out: str = field(metadata={"help": "output folder", "metavar": "DIR"})
    samples: int = field(default=1_000_000, metadata={"help": "lines sampled for ALP (VoCapXLM's n_sample)"})
    base: str | None = field(default=None, metadata={"help": "base tokenizer (.model, tokenizer.json, tekken JSON or "
                                                             "HF folder) for the token-count ratio column; byte-level "
                                                             "candidates continue it (default: the base recorded by "
                                                             "vocab train)", "metavar": "PATH"})
    seed: int = field(default=1, metadata={"help": "shuffle seed of the sample (VoCapXLM uses 1)"})
    nested: bool = field(default=True, metadata={"help": "derive nested candidates from one tokenization per "
                                                         "--chars value (--no-nested tokenizes every candidate)"})
    field_name: str = field(default="text", metadata={"help": "JSON field / parquet column holding the text"})
    threads: int = field(default=0, metadata={"help": "SentencePiece encoding threads (0: all cores)"})
    overwrite: bool = overwrite_field()
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


    def __post_init__(self) -> None:  # out-of-range values fail when the config is built (CLI, TOML, workflow)
        from common.validate import check_ranges

        check_ranges(self, {"samples": ">=1", "threads": ">=0"})

@dataclass
class Sample:
    lines: list[str]
    chars: int
    bytes: int
    script_chars: dict[str, int]
    rejected: int
    reject_summary: str
    files: list[str]


# ---------------------------------------------------------------------------------------------
# inputs

def read_candidates(candidates_dir: str | Path) -> list[dict[str, Any]]:
    """The candidates listed in a `vocab train` manifest, with absolute paths, sorted by (chars, size)."""
    from common.io import read_json

    root = Path(candidates_dir)
    if not root.is_dir():
        raise input_error(root, "candidates folder not found", "pass the --out folder of `graft vocab train`")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise input_error(root, "no manifest.json in the candidates folder (it is not a finished "
                                "`graft vocab train` output)", "run `graft vocab train ... --out "
                                f"{root}` to completion, or pass the folder it wrote")
    manifest = read_json(manifest_path)
    entries = manifest.get("candidates") if isinstance(manifest, dict) else None
    if not entries:
        raise input_error(manifest_path, "lists no candidates", "re-run `graft vocab train`")
    if manifest.get("kind") == "bytelevel":  # candidates of a byte-level base: sizes only (chars 0)
        out = []
        for e in entries:
            path = (root / str(e.get("path"))).resolve()
            if not path.is_file():
                raise input_error(path, "candidate listed in manifest.json is missing", "re-run `graft vocab train`")
            out.append({"chars": 0, "size": int(e["size"]), "path": str(path), "kind": "bytelevel"})
        return sorted(out, key=lambda c: c["size"])
    out = []
    for e in entries:
        try:
            chars, size, rel = int(e["chars"]), int(e["size"]), str(e["path"])
        except (KeyError, TypeError, ValueError):
            raise input_error(manifest_path, f"candidate entry {e!r} lacks chars/size/path",
                              "re-run `graft vocab train`") from None
        path = (root / rel).resolve()
        if not path.is_file():
            raise input_error(path, "candidate listed in manifest.json is missing", "re-run `graft vocab train`")
        out.append({"chars": chars, "size": size, "path": str(path)})
    return sorted(out, key=lambda c: (c["chars"], c["size"]))


def read_sample(patterns: list[str], n_samples: int, seed: int, rejects_path: Path | None,
                field_name: str = "text") -> Sample:
    """Read every record, shuffle with the seed, keep n_samples lines (stripped)."""
    from analysis.alp import SCRIPTS, sample_lines, script_char_counts
    from corpus.readers import RejectLog, expand_inputs, iter_texts

    if n_samples <= 0:  # before reading the corpus
        raise GraftError(f"--samples must be positive, got {n_samples}. Fix: pass e.g. --samples 100000")
    files = [str(p) for p in expand_inputs(patterns)]
    rejects = RejectLog(rejects_path)
    try:
        texts = [r.text for r in iter_texts(files, field_name=field_name, rejects=rejects)]
    finally:
        rejects.close()
    lines = [line for line in sample_lines(texts, n_samples, seed) if line]
    if not lines:
        raise input_error(", ".join(files), f"the corpus has no usable text ({rejects.summary()})",
                          "pass files with non-empty 'text' fields (.jsonl/.parquet) or non-empty lines (.txt)")
    script = dict.fromkeys(SCRIPTS, 0)
    for line in lines:
        for k, v in script_char_counts(line).items():
            script[k] += v
    return Sample(lines=lines, chars=sum(map(len, lines)), bytes=sum(len(s.encode("utf-8")) for s in lines),
                  script_chars=script, rejected=rejects.total, reject_summary=rejects.summary(), files=files)


# ---------------------------------------------------------------------------------------------
# counting

def sp_counts(sp: Any, lines: list[str], threads: int, chunk: int = 8192):
    """Token-id counts of `lines` encoded by a SentencePieceProcessor."""
    import numpy as np

    counts = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for i in range(0, len(lines), chunk):
        ids = sp.encode(lines[i:i + chunk], num_threads=threads or -1)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
        counts += np.bincount(flat, minlength=len(counts))
    return counts


def fast_counts(tok: Any, lines: list[str], chunk: int = 8192):
    """Token-id counts of `lines` encoded by a `tokenizers.Tokenizer` (no special tokens)."""
    import numpy as np

    counts = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for i in range(0, len(lines), chunk):
        encs = tok.encode_batch_fast(lines[i:i + chunk], add_special_tokens=False)
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int64)
        counts += np.bincount(flat, minlength=len(counts))
    return counts


def tokenizer_counts(path: str, lines: list[str], threads: int):
    """(counts, pieces) of any tokenizer: SentencePiece for a .model (or a folder with only one)."""
    from analysis.audit import tokenizer_kind
    from common.tokenizer_files import load_fast_tokenizer, load_sentencepiece

    p = Path(path)
    if tokenizer_kind(p) == "sentencepiece":
        sp = load_sentencepiece(p)
        return sp_counts(sp, lines, threads), [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    tok = load_fast_tokenizer(p)
    vocab = {i: s for s, i in tok.get_vocab(with_added_tokens=True).items()}
    counts = fast_counts(tok, lines)
    return counts, [vocab.get(i, "") for i in range(len(counts))]


def metrics_row(counts, classes, byte_mask, learned_mask, sample: Sample) -> dict[str, Any]:
    """All per-candidate figures from a count vector (see analysis/alp.py for the formulas)."""
    import numpy as np

    from analysis.alp import alp_from_counts, renyi_efficiency, script_token_counts

    tokens = int(counts.sum())
    scripts = script_token_counts(counts, classes)
    return {
        "alp": alp_from_counts(counts, len(sample.lines)),
        "renyi_efficiency": renyi_efficiency(counts),
        "tokens": tokens,
        "tokens_per_char": tokens / sample.chars,
        "chars_per_token": sample.chars / tokens if tokens else float("nan"),
        "bytes_per_token": sample.bytes / tokens if tokens else float("nan"),
        "never_produced": int(np.count_nonzero(learned_mask & (counts == 0))),
        **{f"tokens_{k}": v for k, v in scripts.items()},
        "byte_tokens": int(counts[byte_mask].sum()),
    }


def _masks(pieces: list[str], types: list[int] | None):
    import numpy as np

    from analysis.alp import is_byte_piece, script_classes
    from common.tokenizer_files import NORMAL, USER_DEFINED

    classes = script_classes(pieces)
    byte_mask = np.array([is_byte_piece(p) for p in pieces], dtype=bool)
    if types is None:
        learned = ~byte_mask
    else:
        learned = np.array([t in (NORMAL, USER_DEFINED) for t in types], dtype=bool)
    return classes, byte_mask, learned


def score_group(cands: list[dict[str, Any]], sample: Sample, *, nested: bool, threads: int,
                progress: bool = False) -> list[dict[str, Any]]:
    """Rows for the candidates of one `chars` value (one tokenization when they are nested)."""
    import sentencepiece as spm
    from tqdm.auto import tqdm

    from analysis.nested import ModelInfo, NestedCounter, check_nested
    from common.tokenizer_files import load_model_proto, require_bpe

    infos = []
    for c in cands:
        proto = load_model_proto(c["path"])
        require_bpe(proto, c["path"])
        infos.append((c, proto, ModelInfo.from_proto(proto)))
    _, large_proto, large = max(infos, key=lambda t: (len(t[2].merges), len(t[2].pieces)))
    rows: list[dict[str, Any]] = []
    direct = []
    fast = []
    for c, proto, info in infos:
        reason = check_nested(info, large) if nested else "--no-nested"
        (direct if reason else fast).append((c, proto, info, reason))

    def base_row(c, info, method, reason=None):
        row = {"chars": c["chars"], "size": c["size"], "vocab_pieces": len(info.pieces),
               "merges": len(info.merges), "method": method, "path": c["path"]}
        if reason and reason != "--no-nested":
            row["direct_reason"] = reason
        return row

    bar = tqdm(total=len(cands), desc=f"chars {cands[0]['chars']}", unit="cand", disable=not progress, leave=False)
    if fast:
        sp = spm.SentencePieceProcessor(model_proto=large_proto.SerializeToString())
        counter = NestedCounter(large, sp_counts(sp, sample.lines, threads))
        by_k = counter.counts_for(len(info.merges) for _, _, info, _ in fast)
        classes, byte_mask, _ = _masks(counter.symbols, None)
        for c, _, info, _ in fast:
            vec, learned = counter.candidate_vector(info, by_k[len(info.merges)])
            row = base_row(c, info, "nested")
            row.update(metrics_row(vec, classes, byte_mask, learned, sample))
            rows.append(row)
            bar.update()
    for c, proto, info, reason in direct:
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        counts = sp_counts(sp, sample.lines, threads)
        classes, byte_mask, learned = _masks(info.pieces, info.types)
        row = base_row(c, info, "direct", reason)
        row.update(metrics_row(counts, classes, byte_mask, learned, sample))
        rows.append(row)
        bar.update()
    bar.close()
    return rows


# ---------------------------------------------------------------------------------------------
# the stage

def score_rows(cfg: ScoreConfig, sample: Sample, candidates: list[dict[str, Any]]) -> tuple[list[dict], dict | None]:
    """(rows sorted by chars, size; base figures or None)."""
    rows: list[dict[str, Any]] = []
    if candidates and candidates[0].get("kind") == "bytelevel":
        from analysis.nested_bytelevel import score_bytelevel

        rows = score_bytelevel(candidates, sample, nested=cfg.nested, base_path=cfg.base, progress=cfg.progress)
        candidates = []
    for _, group in itertools.groupby(candidates, key=lambda c: c["chars"]):
        rows.extend(score_group(list(group), sample, nested=cfg.nested, threads=cfg.threads,
                                progress=cfg.progress))
    base = None
    if cfg.base:
        counts, pieces = tokenizer_counts(cfg.base, sample.lines, cfg.threads)
        classes, byte_mask, learned = _masks(pieces, None)
        base = {"path": str(Path(cfg.base).resolve()), "vocab_pieces": len(pieces),
                **metrics_row(counts, classes, byte_mask, learned, sample)}
        base.pop("never_produced")  # bytes/specials are not separable without the model's types
    for row in rows:
        row["ratio_to_base"] = row["tokens"] / base["tokens"] if base else None
    rows.sort(key=lambda r: (r["chars"], r["size"]))
    return rows, base


def score_candidates(cfg: ScoreConfig) -> Path:
    """Score all candidates of `cfg.candidates_dir`; write the score folder and return it."""
    from analysis.knee import choose
    from analysis.plots import alp_plot
    from common.io import atomic_write_json, atomic_write_text, file_sha256, write_manifest

    started = time.time()
    out = Path(cfg.out)
    candidates = read_candidates(cfg.candidates_dir)
    skip, rerun = guard(cfg, out, stage="vocab score", in_place=True,
                        inputs={"candidates": cfg.candidates_dir, "base": cfg.base, **listed("corpus", cfg.corpus)})
    if skip:
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # a re-run is not complete until it finishes
    (out / "rejects.jsonl").unlink(missing_ok=True)
    sample = read_sample(cfg.corpus, cfg.samples, cfg.seed, out / "rejects.jsonl", cfg.field_name)
    if sample.rejected:
        print(f"graft: vocab score: {sample.reject_summary}", file=sys.stderr)
    rows, base = score_rows(cfg, sample, candidates)
    pick = choose(rows)
    atomic_write_text(out / "scores.csv", rows_to_csv(rows))
    info = {"sample": {"lines": len(sample.lines), "chars": sample.chars, "bytes": sample.bytes,
                       "script_chars": sample.script_chars, "seed": cfg.seed, "files": sample.files,
                       "rejected": sample.rejected},
            "base": base, "knee": pick["knee"], "pick": pick["pick"], "rows": rows}
    atomic_write_json(out / "scores.json", info)
    alp_plot(out / "alp.png", rows, knee_size=pick["knee"]["size"], pick=pick["pick"])
    atomic_write_text(out / "report.md", scores_markdown(info))
    write_manifest(
        out, stage="vocab score", config=cfg,
        inputs={"candidates_dir": str(Path(cfg.candidates_dir).resolve()),
                "candidates_manifest_sha256": file_sha256(Path(cfg.candidates_dir) / "manifest.json"),
                "corpus": sample.files, "base": str(Path(cfg.base).resolve()) if cfg.base else None},
        counts={"candidates": len(rows), "lines": len(sample.lines), "chars": sample.chars,
                "rejected": sample.rejected,
                "tokenizations": len({r["chars"] for r in rows if r["method"] == "nested"})
                + sum(r["method"] == "direct" for r in rows)},
        started=started, pick=pick["pick"], knee=pick["knee"],
        files=["scores.csv", "scores.json", "alp.png", "report.md"], rerun=rerun)
    return out


def rows_to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...] = SCORE_COLUMNS) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else repr(r[k]) if isinstance(r[k], float) else r[k])
                    for k in columns})
    return buf.getvalue()


def run(cfg: ScoreConfig) -> Path:
    """CLI entry: score, then print the table and the picked candidate."""
    from common.io import read_json

    out = score_candidates(cfg)
    info = read_json(out / "scores.json")
    print(f"scored {len(info['rows'])} candidates on {info['sample']['lines']} lines -> {out}")
    for r in info["rows"]:
        print(f"  chars {r['chars']:>6} size {r['size']:>7}  ALP {r['alp']:10.3f}  tokens/char "
              f"{r['tokens_per_char']:.4f}  renyi {r['renyi_efficiency']:.4f}  ({r['method']})")
    p = info["pick"]
    print(f"knee at size {info['knee']['size']}; pick: chars {p['chars']} size {p['size']} -> {p['path']}")
    return out


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def scores_markdown(info: dict[str, Any]) -> str:
    """report.md of a score folder: the sample, the pick, and one table row per candidate."""
    s, knee, pick, base = info["sample"], info["knee"], info["pick"], info["base"]
    lines = [
        "# Vocabulary candidates: ALP and compression", "",
        f"Sample: {s['lines']} lines, {s['chars']} characters, {s['bytes']} bytes (seed {s['seed']}; "
        f"{s['rejected']} records rejected) from {', '.join(s['files'])}.",
        "Characters by script: " + ", ".join(f"{k} {v}" for k, v in s["script_chars"].items()) + ".", "",
        "ALP = (1/lines) * sum over tokens of ln p(token), p = unigram frequency on the same sample "
        "(VoCapXLM compute_alp); higher is better. Rényi efficiency: alpha 2.5, log2 base, observed types.", "",
        f"Knee ({knee['method']}): size {knee['size']}. **Pick: chars {pick['chars']}, size {pick['size']}** "
        f"(ALP {pick['alp']:.3f}) -> `{pick['path']}`", "",
        "![ALP per candidate](alp.png)", "",
    ]
    if base:
        lines += [f"Base `{base['path']}`: {base['tokens']} tokens, {base['tokens_per_char']:.4f} tokens/char, "
                  f"ALP {base['alp']:.3f}, Han tokens {base['tokens_han']}, byte tokens {base['byte_tokens']}.", ""]
    cols = ["chars", "size", "alp", "renyi_efficiency", "tokens", "tokens_per_char", "chars_per_token",
            "bytes_per_token", "ratio_to_base", "never_produced", "tokens_han", "byte_tokens", "method"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in info["rows"]:
        lines.append("| " + " | ".join(_fmt(r.get(c), 3 if c == "alp" else 4) for c in cols) + " |")
    return "\n".join(lines) + "\n"
