"""`graft vocab train`: candidate SentencePiece BPE vocabularies over a grid of chars x sizes.

Why one training per `--chars` value: on the same text and settings, SentencePiece BPE is a
deterministic sequence of merges, and a piece's score is its merge rank. A vocabulary of size N is
therefore the first N - 259 - C merges of a larger one plus the same C characters, so every smaller
candidate is cut from the largest one (tests/test_vocab_train.py checks this against an independent
training).

Why we choose the characters ourselves: SentencePiece picks characters by `character_coverage`, a
float32 fraction that cannot select an exact count on a large corpus (the tail characters differ by
less than float precision). We count characters exactly as its trainer does, keep the C most frequent,
and split lines at the other characters, which is what the trainer does with characters it drops (it
replaces them with an unmergeable placeholder). The trainer then sees exactly C characters and keeps
them all (`character_coverage=1.0`).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from common.errors import GraftError
from common.io import atomic_path, atomic_write_bytes, write_manifest
from common.bytelevel import looks_bytelevel
from common.rerun import guard, overwrite_field
from vocab.grid import parse_chars, parse_sizes

WS = "\u2581"  # SentencePiece's whitespace symbol
RESERVED = 3 + 256  # <unk> <s> </s> + 256 byte pieces
# Characters the trainer never keeps as pieces: tab (its boundary marker), its unknown placeholder, NUL.
NEVER_KEPT = {"\t", "\u2585", "\0"}


class DefaultChars(list):
    """The default --chars list: its type tells a config that left --chars out from one that set it (a
    byte-level base refuses --chars)."""
    is_default = True


@dataclass
class VocabTrainConfig:
    """Train candidate SentencePiece BPE vocabularies on target-language text.

    The grid is --chars (exact numbers of single characters kept) x --sizes (total pieces of each
    candidate, including 3 control pieces and 256 byte pieces). SentencePiece trains once per --chars
    value, at the largest size; the smaller candidates are cut from it (BPE vocabularies are nested).
    Settings match Mixtral's tokenizer: BPE, byte fallback, split digits, identity normalisation,
    no whitespace collapsing, dummy prefix.

    Example:
      graft vocab train --corpus zh.jsonl --out runs/cands --chars 4451,5435 --sizes 8000:30000:2000
    """

    inputs: list[str] = field(metadata={"help": "text files or globs (.jsonl[.gz|.zst] field 'text', .parquet column "
                                                "'text', .txt[.gz] one document per line)", "flag": "--corpus"})
    out: str = field(metadata={"help": "output folder: candidates/chars{C}_size{N}.model + manifest.json"})
    base: str | None = field(default=None, metadata={
        "help": "base tokenizer. A byte-level BPE (tokenizer.json folder or file, or Mistral's tekken JSON): "
                "candidates continue its merges and --sizes counts added tokens. A SentencePiece base: unused"})
    chars: list[int] = field(default_factory=lambda: DefaultChars([4451, 5435, 6414, 7434]),
                             metadata={"help": "exact numbers of single characters kept (the most frequent ones; "
                                               "SentencePiece only)"})
    sizes: list[str] = field(default_factory=lambda: ["8000:40000:1000"],
                             metadata={"help": "pieces per candidate: START:STOP:STEP (STOP included) or a list",
                                       "split": False})
    max_sentences: int = field(default=1_000_000,
                               metadata={"help": "lines sampled from the corpus (reservoir sampling, so any corpus size works)"})
    seed: int = field(default=1, metadata={"help": "sampling seed; same inputs + seed give identical files"})
    script: str = field(default="Han", metadata={"help": "target script the corpus must contain (Han, Hangul, Cyrillic, any)"})
    threads: int = field(default=2, metadata={"help": "SentencePiece training threads"})
    max_sentencepiece_length: int = field(default=16, metadata={"help": "longest piece in characters (Mixtral: 16)"})
    overwrite: bool = overwrite_field()
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


    def __post_init__(self) -> None:  # out-of-range values fail when the config is built (CLI, TOML, workflow)
        from common.validate import check_ranges

        check_ranges(self, {"chars": ">=1", "max_sentences": ">=1", "threads": ">=1",
                            "max_sentencepiece_length": ">=1"})
        if looks_bytelevel(self.base):  # --sizes counts added tokens there; --chars is refused
            from vocab.bytelevel_stages import check_train_config

            check_train_config(self)
            return
        sizes = parse_sizes(self.sizes)  # the grid too: a bad range or a size too small for --chars
        for c in parse_chars(self.chars):
            check_size(c, sizes[0])

# ---------------------------------------------------------------------------------------------
# characters

def _norm(ch: str) -> str:
    return WS if ch == " " else ch


def count_chars(lines: Iterable[str]) -> Counter:
    """Character counts as SentencePiece's trainer sees them (dummy prefix, spaces as '▁')."""
    counts: Counter = Counter()
    for line in lines:
        counts.update(line)
        counts[WS] += 1  # dummy prefix
    if " " in counts:
        counts[WS] += counts.pop(" ")
    for ch in NEVER_KEPT:
        counts.pop(ch, None)
    return counts


def top_chars(counts: Counter, n: int) -> list[str]:
    """The n most frequent characters, ties broken by code point (the trainer's order)."""
    return [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], ord(kv[0])))[:n]]


def segments(lines: Iterable[str], keep: set[str], dropped: Iterable[str] = ()) -> Iterator[str]:
    """Each line with a leading space (the dummy prefix), split at characters not kept.

    `dropped` lists the characters of `lines` that are not in `keep` (a regex over them is much faster
    than testing every character); the characters the trainer never keeps are always split at.
    """
    drop = set(dropped) | NEVER_KEPT
    if WS not in keep:
        drop |= {" ", WS}
    drop -= keep
    splitter = re.compile("[" + "".join(re.escape(c) for c in sorted(drop)) + "]+")
    for line in lines:
        for seg in splitter.split(" " + line):
            if seg:
                yield seg


# ---------------------------------------------------------------------------------------------
# training and cutting

def _trainer_args(vocab_size: int, threads: int, max_piece: int, max_bytes: int) -> dict:
    return dict(
        model_type="bpe", vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True,
        split_digits=True, split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
        max_sentencepiece_length=max_piece, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False,  # the prefix is already in the segments (see segments())
        treat_whitespace_as_suffix=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=max_bytes, num_threads=threads, vocabulary_output_piece_score=True,
        minloglevel=2,
    )


def train_bpe(lines: list[str], chars: int, size: int, *, threads: int = 2, max_piece: int = 16,
              model_path: str = "<corpus>", counts: Counter | None = None):
    """Train one SentencePiece BPE model with exactly `chars` single characters; returns a ModelProto."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    counts = count_chars(lines) if counts is None else counts
    if len(counts) < chars:
        raise GraftError(f"{model_path}: the sampled text has only {len(counts)} distinct characters, so "
                         f"--chars {chars} cannot be met. Fix: lower --chars to at most {len(counts)}, "
                         "or add text (or raise --max-sentences)")
    check_size(chars, size)
    keep = set(top_chars(counts, chars))
    segs = list(segments(lines, keep, dropped=[c for c in counts if c not in keep]))
    max_bytes = max((len(s.encode("utf-8")) for s in segs), default=1) + 16
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(segs), model_writer=buf,
                                       **_trainer_args(size, threads, max_piece, max_bytes))
    except RuntimeError as e:
        msg = str(e)
        if "smaller than required_chars" in msg:
            raise GraftError(f"size {size} is smaller than --chars {chars} + {RESERVED} reserved pieces. "
                             f"Fix: use sizes of at least {chars + RESERVED + 1}, or fewer --chars") from None
        raise GraftError(f"{model_path}: SentencePiece training failed ({msg.strip()[:300]}). "
                         "Fix: check the corpus and the settings") from None
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    proto.normalizer_spec.add_dummy_prefix = True  # how the candidate is meant to be used, like the base
    got = sum(1 for p in proto.pieces if p.type == 1 and len(p.piece) == 1)
    if got != chars:  # would mean our character counting drifted from the trainer's
        raise GraftError(f"internal error: trained model has {got} single characters, expected {chars}. "
                         "Fix: report this with the corpus")
    return proto


def check_size(chars: int, size: int) -> None:
    if size <= chars + RESERVED:
        raise GraftError(
            f"size {size} is smaller than required: --chars {chars} needs {chars} character pieces plus "
            f"{RESERVED} reserved pieces (<unk>, <s>, </s> and 256 byte pieces), i.e. SentencePiece's "
            f"'Vocabulary size is smaller than required_chars'. Fix: use --sizes of at least "
            f"{chars + RESERVED + 1} for --chars {chars}, or lower --chars")


def n_merges(proto, chars: int) -> int:
    return len(proto.pieces) - RESERVED - chars


def cut(proto, chars: int, size: int):
    """The candidate of `size` pieces cut from a larger model: first merges + the same characters.

    Scores are renumbered as SentencePiece numbers them (the i-th final piece scores -i), so the cut
    model is what training at `size` writes.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    k = size - RESERVED - chars
    if k > n_merges(proto, chars):
        raise ValueError(f"size {size} exceeds the trained model")
    out = pb.ModelProto()
    out.CopyFrom(proto)
    del out.pieces[:]
    out.pieces.extend(proto.pieces[: RESERVED + k])
    for j, p in enumerate(proto.pieces[len(proto.pieces) - chars:]):
        q = out.pieces.add()
        q.CopyFrom(p)
        q.score = -float(k + j)
    out.trainer_spec.vocab_size = size
    return out


def candidate_name(chars: int, size: int) -> str:
    return f"candidates/chars{chars}_size{size}.model"


# ---------------------------------------------------------------------------------------------
# the stage

def _config_key(cfg: VocabTrainConfig, files: list[Path]) -> str:
    # Size + mtime, not a hash: hashing a 10 GB corpus just to decide whether to resume is too slow.
    def stamp(f: Path):
        st = f.stat()
        return [str(f), st.st_size, st.st_mtime_ns]

    blob = json.dumps({"cfg": {k: v for k, v in cfg.__dict__.items() if k not in ("out", "progress", "threads")},
                       "files": [stamp(f) for f in files]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_candidates(cfg: VocabTrainConfig) -> Path:
    """Train the grid and write `out/candidates/chars{C}_size{N}.model` + `out/manifest.json`.

    Re-running with the same config and inputs returns the finished folder; an interrupted run resumes
    from the per-chars models already trained (kept in `.{out}.partial/` next to `out`).
    """
    from tqdm import tqdm

    from corpus.readers import RejectLog, expand_inputs
    from vocab.sample import sample_lines
    from common.scripts import ScriptFilter

    if cfg.base:
        from common.bytelevel import tokenizer_family

        if tokenizer_family(cfg.base) == "bytelevel":
            from vocab.bytelevel_stages import train_bytelevel

            return train_bytelevel(cfg)
    started = time.time()
    out = Path(cfg.out)
    chars_list = parse_chars(cfg.chars)
    sizes = parse_sizes(cfg.sizes)
    script = ScriptFilter(cfg.script)
    for c in chars_list:  # fail before reading a 10 GB corpus
        check_size(c, sizes[0])
    files = expand_inputs(cfg.inputs)
    key = _config_key(cfg, files)  # which partial work (.OUT.partial) can be reused
    skip, rerun = guard(cfg, out, stage="vocab.train", inputs={f"input_{i}": f for i, f in enumerate(files)})
    if skip:
        return out

    partial = out.with_name(f".{out.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    rejects = RejectLog(partial / "rejects.jsonl")
    if (partial / "rejects.jsonl").exists():
        (partial / "rejects.jsonl").unlink()
    sample = sample_lines(files, cfg.max_sentences, cfg.seed, rejects=rejects, progress=cfg.progress)
    rejects.close()
    where = ", ".join(str(f) for f in files)
    if not sample.lines:
        raise GraftError(f"{where}: no text found ({rejects.summary()}). "
                         "Fix: pass files with text (jsonl field 'text', parquet column 'text', or .txt lines)")
    target_chars = sum(script.count(t) for t in sample.lines)
    if target_chars == 0:
        raise GraftError(f"{where}: no {script.name} text found in {len(sample.lines)} sampled lines. "
                         f"Fix: pass {script.name}-script text, or --script any to train on any text")

    largest = sizes[-1]
    counts = count_chars(sample.lines)
    all_chars = sum(counts.values())
    candidates, per_chars = [], {}
    full_models = {}
    for c in tqdm(chars_list, desc="training (one per --chars)", disable=not cfg.progress):
        cache = partial / f"chars{c}_size{largest}.{key}.model"
        if cache.is_file():
            from common.tokenizer_files import load_model_proto

            proto = load_model_proto(cache)
        else:
            proto = train_bpe(sample.lines, c, largest, threads=cfg.threads,
                              max_piece=cfg.max_sentencepiece_length, model_path=where, counts=counts)
            atomic_write_bytes(cache, proto.SerializeToString())
        most = RESERVED + c + n_merges(proto, c)
        too_big = [n for n in sizes if n > most]
        if too_big:
            raise GraftError(f"{where}: the sampled text supports at most {most} pieces with --chars {c} "
                             f"(no pair of symbols left to merge), but --sizes asks for up to {too_big[-1]}. "
                             f"Fix: keep --sizes at or below {most}, or add text / raise --max-sentences")
        full_models[c] = proto
        kept = top_chars(counts, c)
        per_chars[c] = {"character_coverage": sum(counts[k] for k in kept) / all_chars,
                        "merges_trained": n_merges(proto, c)}

    with atomic_path(out) as tmp:
        (tmp / "candidates").mkdir(parents=True)
        for c, proto in full_models.items():
            for n in sizes:
                name = candidate_name(c, n)
                (tmp / name).write_bytes(cut(proto, c, n).SerializeToString())
                candidates.append({"chars": c, "size": n, "path": name})
        if (partial / "rejects.jsonl").exists():
            (partial / "rejects.jsonl").replace(tmp / "rejects.jsonl")
        write_manifest(tmp, stage="vocab.train", config=cfg, started=started, config_key=key, rerun=rerun,
                       inputs={"files": [str(f) for f in files]},
                       counts={"docs_read": sample.seen_docs, "lines_seen": sample.seen_lines,
                               "lines_sampled": len(sample.lines), "lines_too_long": sample.too_long,
                               "rejected_records": sample.rejects, "target_script_chars": target_chars,
                               "distinct_chars": len(counts), "trainings": len(chars_list),
                               "candidates": len(candidates)},
                       per_chars=per_chars, candidates=candidates)
    import shutil

    shutil.rmtree(partial, ignore_errors=True)
    return out
