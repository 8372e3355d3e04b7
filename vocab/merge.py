"""`graft vocab merge`: append a candidate vocabulary to a base SentencePiece BPE tokenizer.

How added pieces stay reachable. SentencePiece BPE joins the adjacent pair with the highest-scoring
concatenation. Appending pieces with score 0 (the usual recipe) lets them fire before, or in the
middle of, the base's merges, and a piece whose halves never meet is dead. Here:
- every added piece scores below every base merge, and the candidate's own merge order is kept
  (each added piece scores lower than the previous one), so the base's behaviour is untouched and the
  candidate's merges run after it;
- each added piece is planned with SentencePiece's BPE rule (vocab/bpe.py) against all pieces scored
  above it. If encoding its text stops at 3+ symbols, intermediate pieces (each holding a target-script
  character) are added just above it so the symbols join step by step. A piece scored lower can never
  change the segmentation of one scored higher, so planning in score order is final;
- characters of added pieces that the base lacks are added when they are target-script characters;
  a piece that needs a missing non-target character is skipped (adding that character would change
  how non-target text is encoded);
- the result is verified with sentencepiece and with the HF fast tokenizer.
Text without a target-script character cannot contain any added piece, so it encodes to the base ids.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GraftError, input_error
from common.io import atomic_path, write_manifest
from common.rerun import overwrite_field
from common.tokenizer_files import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, load_model_proto, require_bpe, sentencepiece_to_fast
from vocab.bpe import bpe_segment

# Base scores below this are not merge ranks (Mixtral's whitespace-run pieces score -1e9).
_SCORE_FLOOR = -1e8


@dataclass
class VocabMergeConfig:
    """Append a candidate BPE vocabulary to a base tokenizer; write a Hugging Face folder.

    A byte-level BPE base (tokenizer.json, tekken JSON) gets the candidate's merges appended after its own,
    with their tokens at ids after every base id (see docs/vocab.md, "Byte-level bases").

    Every base piece keeps its id, score and type; only pieces with a target-script character are added
    (after the base ids, without duplicates); every added piece is reachable in sentencepiece and in the
    HF fast tokenizer; text without the target script encodes exactly as with the base.
    Output: tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json, manifest.json.

    Example:
      graft vocab merge --base BASE.model --add runs/cands/candidates/chars4451_size30000.model --out runs/tok
      graft vocab merge --base tekken.json --add runs/cands_nemo/candidates/added25000.json --out runs/tok_nemo
    """

    base: str = field(metadata={"help": "base tokenizer: a SentencePiece .model or a HF folder with tokenizer.model; "
                                        "or a byte-level BPE: a HF folder / tokenizer.json (Llama-3, Qwen2, ...) or "
                                        "Mistral's tekken JSON"})
    add: str = field(metadata={"help": "candidate from `graft vocab train`: a SentencePiece .model, or for a "
                                       "byte-level base a candidates/added{N}.json trained with --base BASE"})
    out: str = field(metadata={"help": "output folder (a Hugging Face tokenizer folder)"})
    script: str = field(default="Han", metadata={"help": "add only pieces with a character of this script "
                                                         "(Han, Hangul, Cyrillic, or any)"})
    special: list[str] = field(default_factory=list,
                               metadata={"help": "special tokens to add once each, e.g. '<|im_start|>,<|im_end|>'"})
    overwrite: bool = overwrite_field()


@dataclass
class Plan:
    pieces: list[tuple[str, float, str]]  # (piece, score, kind) appended after the base, in id order
    counts: dict[str, int]


def plan_additions(base, cand, script_name: str = "Han") -> Plan:
    """Decide which pieces to append, with which scores (see the module docstring)."""
    from common.scripts import ScriptFilter

    script = ScriptFilter(script_name)
    base_pieces = {p.piece for p in base.pieces}
    scores = {p.piece: p.score for p in base.pieces if p.type in (NORMAL, USER_DEFINED)}
    base_chars = {p.piece for p in base.pieces if p.type == NORMAL and len(p.piece) == 1}
    floor = min(p.score for p in base.pieces if p.type == NORMAL and p.score > _SCORE_FLOOR)
    merges = [p.piece for p in cand.pieces if p.type == NORMAL and len(p.piece) > 1]
    cand_chars = [p.piece for p in cand.pieces if p.type == NORMAL and len(p.piece) == 1]
    counts = {"candidate_pieces": len(merges) + len(cand_chars), "duplicates": 0, "not_target_script": 0,
              "needs_missing_non_target_char": 0, "added_merges": 0, "added_chars": 0,
              "added_intermediates": 0}

    wanted, new_chars = [], []
    for piece in merges:
        if piece in base_pieces:
            counts["duplicates"] += 1
        elif not script.has(piece):
            counts["not_target_script"] += 1
        elif any(ch not in base_chars and not script.is_char(ch) for ch in piece):
            counts["needs_missing_non_target_char"] += 1
        else:
            wanted.append(piece)
            new_chars.extend(ch for ch in piece if ch not in base_chars)
    for ch in cand_chars:
        if ch in base_pieces:
            counts["duplicates"] += 1
        elif not script.is_char(ch):
            counts["not_target_script"] += 1
        else:
            new_chars.append(ch)

    out: list[tuple[str, float, str]] = []
    next_score = float(floor) - 1.0

    def take(piece: str, kind: str) -> None:
        nonlocal next_score
        out.append((piece, next_score, kind))
        scores[piece] = next_score
        next_score -= 1.0

    added = set()
    for piece in wanted:
        if piece in added:
            counts["duplicates"] += 1
            continue
        seg = bpe_segment(piece, scores)
        while len(seg) > 2:  # stuck: no adjacent pair joins; add the shortest target-script join
            best = min((i for i in range(len(seg) - 1) if script.has(seg[i] + seg[i + 1])),
                       key=lambda i: (len(seg[i]) + len(seg[i + 1]), i))
            inter = seg[best] + seg[best + 1]
            take(inter, "intermediate")
            added.add(inter)
            counts["added_intermediates"] += 1
            seg = bpe_segment(piece, scores)
        take(piece, "merge")
        added.add(piece)
        counts["added_merges"] += 1
        assert bpe_segment(piece, scores) == [piece], piece
    # New characters go last, as in a trained model (their scores do not matter: a single character is
    # never the result of a merge); each once, in first-seen order.
    for ch in dict.fromkeys(new_chars):
        take(ch, "char")
        counts["added_chars"] += 1
    counts["added_total"] = len(out)
    return Plan(out, counts)


def build_merged_proto(base, plan: Plan, special: list[str]):
    from sentencepiece import sentencepiece_model_pb2 as pb

    merged = pb.ModelProto()
    merged.CopyFrom(base)
    for piece, score, _ in plan.pieces:
        p = merged.pieces.add()
        p.piece, p.score, p.type = piece, score, NORMAL
    for tok in special:
        p = merged.pieces.add()
        p.piece, p.score, p.type = tok, 0.0, USER_DEFINED
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged


def _special_list(cfg_special: list[str], base) -> tuple[list[str], list[str]]:
    existing = {p.piece for p in base.pieces}
    out, skipped = [], []
    for tok in cfg_special:
        tok = tok.strip()
        if not tok:
            continue
        if tok in existing or tok in out:
            skipped.append(tok)
        else:
            out.append(tok)
    return out, skipped


def reachability_failures(merged, fast, pieces: list[str]) -> dict[str, list[str]]:
    """Added pieces that do not encode to themselves, per encoder (dummy prefix off, as a piece is text)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    probe = pb.ModelProto()
    probe.CopyFrom(merged)
    probe.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(probe.SerializeToString())
    bad_sp, bad_hf = [], []
    for piece in pieces:
        text = piece.replace("\u2581", " ")
        if sp.encode(text, out_type=str) != [piece]:
            bad_sp.append(piece)
        if [t.value for t in fast.model.tokenize(piece)] != [piece]:
            bad_hf.append(piece)
    return {"sentencepiece": bad_sp, "hf_fast": bad_hf}


def _hf_configs(base_path: Path, merged, special: list[str]) -> tuple[dict, dict]:
    spec = merged.trainer_spec

    def name(i: int) -> str | None:
        return merged.pieces[i].piece if i >= 0 else None

    bos, eos, unk, pad = name(spec.bos_id), name(spec.eos_id), name(spec.unk_id), name(spec.pad_id)
    config: dict[str, Any] = {}
    if base_path.is_dir() and (base_path / "tokenizer_config.json").is_file():
        try:
            config = json.loads((base_path / "tokenizer_config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise input_error(base_path / "tokenizer_config.json", f"not valid JSON ({e.msg})",
                              "fix or remove it", line=e.lineno) from None
    decoder = {}
    for i, p in enumerate(merged.pieces):
        if p.type in (UNKNOWN, CONTROL, USER_DEFINED):
            decoder[str(i)] = {"content": p.piece, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": p.type != USER_DEFINED or p.piece in special}
    extra = [t for t in config.get("additional_special_tokens", []) if isinstance(t, str)]
    config.update({
        "tokenizer_class": "LlamaTokenizer", "bos_token": bos, "eos_token": eos, "unk_token": unk,
        "pad_token": pad, "add_bos_token": config.get("add_bos_token", True),
        "add_eos_token": config.get("add_eos_token", False), "legacy": True,
        "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
        "sp_model_kwargs": {}, "use_default_system_prompt": False,
        "additional_special_tokens": extra + [t for t in special if t not in extra],
        "added_tokens_decoder": decoder,
    })
    config.setdefault("model_max_length", 1000000000000000019884624838656)
    for k in ("add_prefix_space", "auto_map"):
        config.pop(k, None)
    special_map = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    if pad:
        special_map["pad_token"] = pad
    if config["additional_special_tokens"]:
        special_map["additional_special_tokens"] = config["additional_special_tokens"]
    return config, special_map


def merge_into_base(cfg: VocabMergeConfig) -> Path:
    """Write the merged tokenizer folder `cfg.out`; returns its path."""
    from common.io import atomic_write_json, file_sha256
    from common.scripts import ScriptFilter

    from common.rerun import guard

    started = time.time()
    ScriptFilter(cfg.script)  # validate early
    base_path, add_path = Path(cfg.base), Path(cfg.add)
    skip, rerun = guard(cfg, cfg.out, stage="vocab.merge", inputs={"base": base_path, "add": add_path})
    if skip:
        return Path(cfg.out)
    from common.bytelevel import tokenizer_family

    if tokenizer_family(base_path) == "bytelevel":  # tokenizer.json / tekken: appended merges
        from vocab.bytelevel_stages import merge_bytelevel

        return merge_bytelevel(cfg, rerun)
    base = load_model_proto(base_path)
    require_bpe(base, base_path, "vocab merge grows SentencePiece BPE tokenizers (Llama, Mistral, Mixtral); "
                                 "a Unigram base (T5, XLM-R, ...) is not supported")
    cand = load_model_proto(add_path)
    require_bpe(cand, add_path)
    special, special_skipped = _special_list(cfg.special, base)

    plan = plan_additions(base, cand, cfg.script)
    if not plan.pieces and not special:
        c = plan.counts
        raise input_error(add_path, f"has no piece to add with a {cfg.script} character ({c['candidate_pieces']} "
                                    f"pieces: {c['duplicates']} already in the base, {c['not_target_script']} "
                                    f"without the script)", f"pass a candidate trained on {cfg.script} text "
                                    "(graft vocab train), or --script any to add pieces of any script")
    merged = build_merged_proto(base, plan, special)
    fast = sentencepiece_to_fast(merged, add_path, specials=special)
    failures = reachability_failures(merged, fast, [p for p, _, _ in plan.pieces])
    if failures["sentencepiece"] or failures["hf_fast"]:
        raise GraftError(f"internal error: {len(failures['sentencepiece'])} added pieces unreachable in "
                         f"sentencepiece, {len(failures['hf_fast'])} in HF fast (e.g. "
                         f"{(failures['sentencepiece'] + failures['hf_fast'])[:5]}). Fix: report this with {add_path}")
    config, special_map = _hf_configs(base_path, merged, special)
    out = Path(cfg.out)
    counts = dict(plan.counts, base_pieces=len(base.pieces), vocab_size=len(merged.pieces),
                  special_added=len(special), special_skipped_existing=len(special_skipped),
                  unreachable_sentencepiece=0, unreachable_hf_fast=0)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "tokenizer.model").write_bytes(merged.SerializeToString())
        fast.save(str(tmp / "tokenizer.json"))
        atomic_write_json(tmp / "tokenizer_config.json", config)
        atomic_write_json(tmp / "special_tokens_map.json", special_map)
        with open(tmp / "added_pieces.tsv", "w", encoding="utf-8") as f:
            f.write("id\tpiece\tscore\tkind\n")
            for i, (piece, score, kind) in enumerate(plan.pieces, start=len(base.pieces)):
                f.write(f"{i}\t{piece}\t{score:.0f}\t{kind}\n")
        write_manifest(tmp, stage="vocab.merge", config=cfg, started=started, counts=counts,
                       inputs={"base": {"path": str(base_path), "sha256": file_sha256(
                           base_path / "tokenizer.model" if base_path.is_dir() else base_path)},
                               "add": {"path": str(add_path), "sha256": file_sha256(add_path)}},
                       special_tokens=special, special_skipped_existing=special_skipped,
                       first_added_id=len(base.pieces), rerun=rerun)
    return out
