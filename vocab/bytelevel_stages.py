"""The byte-level path of `graft vocab train` and `graft vocab merge`, and `graft vocab convert`.

`vocab train INPUTS --base BASE` (BASE byte-level): continued BPE from the base's merges on the sampled
text (vocab/bytelevel.py), once at the largest size; each candidate `candidates/added{N}.json` is the first N
new merges. `--sizes` counts the tokens added to the base (the candidate's vocabulary is the base's plus N);
`--chars` has no meaning here and is refused.

`vocab merge --base BASE --add CANDIDATE.json`: appends the candidate's merges (and their tokens, at ids
after every base id) to the base's tokenizer.json; writes a Hugging Face folder.

`vocab convert TEKKEN.json|VOCAB.gguf --out DIR`: Mistral's tekken file, or the byte-level tokenizer of a
llama.cpp GGUF file (Llama-3, Qwen2), as a Hugging Face tokenizer folder.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.bytelevel import (ByteLevelTokenizer, load_bytelevel, tekken_hf_config, tekken_to_tokenizer,
                              token_text, write_hf_folder)
from common.errors import GraftError, input_error
from common.io import atomic_path, atomic_write_json, file_sha256, write_manifest
from common.rerun import guard, overwrite_field

CANDIDATE_FORMAT = "vocab-graft byte-level extension v1"
MIN_COUNT = 2  # a pair seen once is not merged (the training stops there)


def model_fingerprint(base: ByteLevelTokenizer) -> str:
    """sha256 of the BPE vocabulary and merges (the same for a tekken file and its converted tokenizer.json)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(base.vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    h.update(json.dumps(base.merges, ensure_ascii=False).encode())
    return h.hexdigest()


def candidate_name(size: int) -> str:
    return f"candidates/added{size}.json"


# ---------------------------------------------------------------------------------------------
# vocab train (byte-level)

def check_train_config(cfg: Any) -> None:
    """The byte-level rules of VocabTrainConfig, checked when the config is built."""
    from vocab.grid import parse_sizes

    if not getattr(cfg.chars, "is_default", False):
        raise GraftError(f"--chars {','.join(map(str, cfg.chars))}: --chars has no meaning for a byte-level BPE base "
                         f"({cfg.base}): its alphabet is the 256 bytes, and characters come from merges like any "
                         "other token. Fix: leave --chars out (--sizes counts the tokens added to the base)")
    parse_sizes(cfg.sizes)


def train_bytelevel(cfg: Any) -> Path:
    """`graft vocab train` on a byte-level base (see the module docstring); returns the output folder."""
    from common.scripts import ScriptFilter
    from corpus.readers import RejectLog, expand_inputs
    from vocab.bytelevel import collect_words, continue_bpe
    from vocab.grid import parse_sizes
    from vocab.sample import sample_lines

    started = time.time()
    check_train_config(cfg)
    out = Path(cfg.out)
    sizes = parse_sizes(cfg.sizes)
    script = ScriptFilter(cfg.script)
    files = expand_inputs(cfg.inputs)
    inputs = {f"input_{i}": f for i, f in enumerate(files)}
    skip, rerun = guard(cfg, out, stage="vocab.train", inputs={**inputs, "base": Path(cfg.base)})
    if skip:
        return out
    base = load_bytelevel(cfg.base)
    rejects = RejectLog()
    sample = sample_lines(files, cfg.max_sentences, cfg.seed, rejects=rejects, progress=cfg.progress)
    where = ", ".join(str(f) for f in files)
    if not sample.lines:
        raise GraftError(f"{where}: no text found ({rejects.summary()}). "
                         "Fix: pass files with text (jsonl field 'text', parquet column 'text', or .txt lines)")
    words = collect_words(base, sample.lines, script, progress=cfg.progress)
    if not words.lines_with_target:
        raise GraftError(f"{where}: no {script.name} text found in {len(sample.lines)} sampled lines. "
                         f"Fix: pass {script.name}-script text, or --script any to train on any text")
    ext = continue_bpe(base, words, sizes[-1], script, min_count=MIN_COUNT, progress=cfg.progress)
    if len(ext.merges) < sizes[-1]:
        raise GraftError(f"{where}: the sampled text supports only {len(ext.merges)} new tokens on {cfg.base} "
                         f"(no allowed pair of tokens occurs {MIN_COUNT}+ times any more), but --sizes asks for "
                         f"up to {sizes[-1]}. Fix: keep --sizes at or below {len(ext.merges)}, or add text "
                         "(or raise --max-sentences)")
    fingerprint = model_fingerprint(base)
    base_info = {"path": str(cfg.base), "source": base.source, "vocab_size": base.size(),
                 "merges": len(base.merges), "model_sha256": fingerprint}
    candidates = []
    with atomic_path(out) as tmp:
        (tmp / "candidates").mkdir(parents=True)
        for n in sizes:
            name = candidate_name(n)
            atomic_write_json(tmp / name, {
                "format": CANDIDATE_FORMAT, "base": base_info, "script": script.name, "size": n,
                "merges": [list(m) for m in ext.merges[:n]], "pair_counts": ext.counts[:n]})
            candidates.append({"size": n, "path": name, "vocab_size": base.size() + n})
        if rejects.counts:
            atomic_write_json(tmp / "rejects.json", dict(rejects.counts))
        write_manifest(tmp, stage="vocab.train", config=cfg, started=started, rerun=rerun, kind="bytelevel",
                       inputs={"files": [str(f) for f in files], "base": base_info},
                       counts={"docs_read": sample.seen_docs, "lines_seen": sample.seen_lines,
                               "lines_sampled": len(sample.lines), "lines_too_long": sample.too_long,
                               "rejected_records": sample.rejects, "lines_with_target": words.lines_with_target,
                               "pre_tokens": words.pre_tokens, "distinct_target_words": len(words.seqs),
                               "trainings": 1, "candidates": len(candidates)},
                       training=ext.stats, candidates=candidates)
    return out


# ---------------------------------------------------------------------------------------------
# vocab merge (byte-level)

@dataclass
class Candidate:
    path: Path
    merges: list[tuple[str, str]]
    base: dict


def load_candidate(path: str | Path, base_path: str | Path) -> Candidate:
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "candidate not found", "pass a candidates/added{N}.json written by "
                          f"`graft vocab train ... --base {base_path}`")
    if path.suffix != ".json":
        raise input_error(path, f"is not a byte-level candidate, and {base_path} is a byte-level BPE base "
                          "(a SentencePiece candidate cannot be grafted onto it)",
                          f"train candidates for this base: graft vocab train INPUTS --base {base_path} --out DIR")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise input_error(path, f"not valid JSON ({e})", "re-run `graft vocab train`") from None
    if not isinstance(data, dict) or data.get("format") != CANDIDATE_FORMAT:
        raise input_error(path, f"is not a byte-level candidate (format {data.get('format') if isinstance(data, dict) else None!r}, "
                          f"expected {CANDIDATE_FORMAT!r})",
                          f"pass a candidates/added{{N}}.json written by `graft vocab train ... --base {base_path}`")
    merges = []
    for i, m in enumerate(data.get("merges") or []):
        if not (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)):
            raise input_error(path, f"merges[{i}] is not a pair of tokens", "re-run `graft vocab train`")
        merges.append((m[0], m[1]))
    return Candidate(path, merges, data.get("base") or {})


def _special_list(cfg_special: list[str], base: ByteLevelTokenizer) -> tuple[list[str], list[str]]:
    existing = set(base.vocab) | {t["content"] for t in base.added_tokens}
    out, skipped = [], []
    for tok in cfg_special:
        tok = tok.strip()
        if not tok:
            continue
        (skipped if tok in existing or tok in out else out).append(tok)
    return out, skipped


def _hf_configs(base: ByteLevelTokenizer, special: list[str], first_special_id: int) -> tuple[dict, dict]:
    config = json.loads(json.dumps(base.config))
    special_map = json.loads(json.dumps(base.special_map))
    decoder = config.setdefault("added_tokens_decoder", {})
    for k, s in enumerate(special):
        decoder[str(first_special_id + k)] = {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": True}
    if special:
        extra = [t for t in config.get("additional_special_tokens") or [] if isinstance(t, str)]
        config["additional_special_tokens"] = extra + [t for t in special if t not in extra]
        special_map["additional_special_tokens"] = config["additional_special_tokens"]
    if "tokenizer_class" not in config:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return config, special_map


def merge_bytelevel(cfg: Any, rerun: dict) -> Path:
    """`graft vocab merge` on a byte-level base (cfg: vocab.merge.VocabMergeConfig); returns the output folder."""
    from common.scripts import ScriptFilter
    from vocab.bytelevel import extended_json, plan_extension, unreachable

    started = time.time()
    base_path, add_path = Path(cfg.base), Path(cfg.add)
    script = ScriptFilter(cfg.script)
    base = load_bytelevel(base_path)
    cand = load_candidate(add_path, base_path)
    fingerprint = model_fingerprint(base)
    if cand.base.get("model_sha256") != fingerprint:
        raise input_error(add_path, f"was trained on another base ({cand.base.get('path')}, "
                          f"{cand.base.get('vocab_size')} ids), not on {base_path} ({base.size()} ids): its merges "
                          "continue that base's merges", f"train candidates on this base: graft vocab train INPUTS "
                          f"--base {base_path} --out DIR, or pass the base they were trained on")
    special, special_skipped = _special_list(cfg.special, base)
    plan = plan_extension(base, cand.merges, script)
    if not plan.merges and not special:
        c = plan.counts
        raise input_error(add_path, f"has no merge to add with a {script.name} character ({c['candidate_merges']} "
                          f"merges: {c['duplicates']} already tokens of the base, {c['not_target_script']} without "
                          "the script)", f"pass a candidate trained on {script.name} text, or --script any")
    data, first = extended_json(base, plan.merges, special)
    tokens = [a + b for a, b in plan.merges]
    bad = unreachable(data, tokens, first)
    if any(bad.values()):
        raise GraftError(f"internal error: added tokens not reachable ({ {k: len(v) for k, v in bad.items()} }, e.g. "
                         f"{[token_text(t) for v in bad.values() for t in v][:5]}). Fix: report this with {add_path}")
    config, special_map = _hf_configs(base, special, first + len(plan.merges))
    out = Path(cfg.out)
    counts = dict(plan.counts, base_vocab_size=base.size(), base_pieces=base.size(), base_merges=len(base.merges),
                  vocab_size=first + len(plan.merges) + len(special), added_total=len(plan.merges),
                  special_added=len(special), special_skipped_existing=len(special_skipped),
                  unreachable_merges=0, unreachable_text=0, partial_character_tokens=sum(
                      1 for t in tokens if not _is_text(t)))
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        files = write_hf_folder(tmp, data, config, special_map)
        with open(tmp / "added_tokens.tsv", "w", encoding="utf-8") as f:
            f.write("id\ttoken\ttext\tleft\tright\n")
            for i, (a, b) in enumerate(plan.merges, start=first):
                f.write(f"{i}\t{a + b}\t{_tsv(token_text(a + b))}\t{a}\t{b}\n")
        write_manifest(tmp, stage="vocab.merge", config=cfg, started=started, counts=counts, kind="bytelevel",
                       inputs={"base": {"path": str(base_path), "source": base.source, "sha256": file_sha256(base.file),
                                        "model_sha256": fingerprint},
                               "add": {"path": str(add_path), "sha256": file_sha256(add_path)}},
                       special_tokens=special, special_skipped_existing=special_skipped, first_added_id=first,
                       tokenizer_files=files + ["added_tokens.tsv"], rerun=rerun)
    return out


def _is_text(token: str) -> bool:
    from common.bytelevel import from_bytelevel

    try:
        from_bytelevel(token).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _tsv(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# ---------------------------------------------------------------------------------------------
# vocab convert

@dataclass
class ConvertConfig:
    """Convert a byte-level base that has no tokenizer.json into a Hugging Face tokenizer folder: Mistral's
    tekken JSON (Mistral-Nemo and later) or the tokenizer of a llama.cpp GGUF file (Llama-3, Qwen2).

    The folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json, manifest.json) encodes text to
    the same ids as the source. tekken: as mistral-common's Tekkenizer (specials first, ids 0..999, then the
    ranks offset by the number of specials, merges derived from the ranks, the file's regex as a Split
    pre-tokenizer followed by ByteLevel, ignore_merges; BOS added like `Tekkenizer.encode(bos=True)`). GGUF:
    its tokens, token types and merges with the pre-tokenizer named by `tokenizer.ggml.pre` (llama-bpe = Llama-3,
    qwen2), as the family's own tokenizer.json. `AutoTokenizer.from_pretrained(OUT)` loads it offline.

    Example:
      graft vocab convert .venv/lib/python3.11/site-packages/mistral_common/data/tekken_240718.json --out runs/nemo_tok
      graft vocab convert .cache/llama.cpp/0c1e57098/models/ggml-vocab-llama-bpe.gguf --out runs/llama3_tok
    """

    source: str = field(metadata={"help": "tekken JSON file (e.g. tekken.json of a Mistral-Nemo repository) or a "
                                          "GGUF file with a byte-level BPE tokenizer (tokenizer.ggml.model gpt2)"})
    out: str = field(metadata={"help": "output folder (a Hugging Face tokenizer folder)"})
    overwrite: bool = overwrite_field()


def convert_base(cfg: ConvertConfig) -> Path:
    """Write the converted folder `cfg.out`; returns its path."""
    from common.gguf_vocab import gguf_hf_config, gguf_to_tokenizer, is_gguf_file

    started = time.time()
    src, out = Path(cfg.source), Path(cfg.out)
    skip, rerun = guard(cfg, out, stage="vocab.convert", inputs={"source": src})
    if skip:
        return out
    if not src.is_file():
        raise input_error(src, "not found", "pass the path of a tekken JSON file or a GGUF file")
    if is_gguf_file(src):
        tok, info = gguf_to_tokenizer(src)
        config, special_map = gguf_hf_config(info)
        counts = {"vocab_size": info.n_vocab, "special_tokens": len(info.specials) + len(info.user_defined),
                  "regular_tokens": info.n_vocab - len(info.specials) - len(info.user_defined),
                  "padding_dropped": info.n_padding}
        about = {"source_kind": "gguf", "gguf_pre_tokenizer": info.pre, "family": info.family}
    else:
        tok, info = tekken_to_tokenizer(src)
        config, special_map = tekken_hf_config(info)
        counts = {"vocab_size": info.n_special + info.n_vocab, "special_tokens": info.n_special,
                  "regular_tokens": info.n_vocab}
        about = {"source_kind": "tekken", "tekken_version": info.version}
    text = tok.to_str(pretty=True)
    counts["merges"] = len(json.loads(text)["model"]["merges"])
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        files = write_hf_folder(tmp, text, config, special_map)
        write_manifest(tmp, stage="vocab.convert", config=cfg, started=started, rerun=rerun,
                       inputs={"source": {"path": str(src), "sha256": file_sha256(src)}},
                       counts=counts, tokenizer_files=files, **about)
    return out


__all__ = ["train_bytelevel", "merge_bytelevel", "ConvertConfig", "convert_base", "load_candidate",
           "model_fingerprint", "CANDIDATE_FORMAT", "check_train_config"]
