"""`graft vocab check`: verify a merged tokenizer folder against its base, on real text.

Each invariant is a count of violations; all must be 0. Exit status 1 when any is not.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GraftError
from common.io import read_json
from common.tokenizer_files import CONTROL, NORMAL, load_fast_tokenizer, load_model_proto, load_sentencepiece

# Always checked for losslessness and fast/slow agreement, whatever the corpus.
PROBES = (
    "中文和English混合的句子，包括全角标点：“引号”、（括号）！？",
    "emoji 😀👍🏽 and 🇨🇳 flags",
    "CJK Extension B: 𠀀𠁁𪚥 and 𠮷野家",
    "tabs\tand\t\ttabs, runs of spaces:  two   three    four",
    "  leading spaces and trailing spaces  ",
    "数字12345和2024年1月1日，代码 print('你好')",
    "全角ＡＢＣ１２３　全角空格",
)


@dataclass
class CheckConfig:
    """Check a merged tokenizer folder's invariants against its base, on corpus text.

    Prints, as counts of violations (all must be 0): base pieces changed, duplicate pieces, added pieces
    without a target-script character, added pieces unreachable in sentencepiece / HF fast, non-target
    lines whose ids differ from the base, lines where HF fast ids differ from sentencepiece, lines not
    restored by decode(encode(x)), special tokens that are not one id, AutoTokenizer load problems.
    Also prints tokens per character on target and non-target lines against the base.
    Exits 1 if any invariant fails.

    Example:
      graft vocab check runs/tok --base BASE.model --corpus zh_dev.jsonl en.jsonl
    """

    tokenizer: str = field(metadata={"help": "merged tokenizer folder (from `graft vocab merge`)"})
    base: str = field(metadata={"help": "base SentencePiece .model or HF folder with tokenizer.model; or the "
                                        "byte-level base (tokenizer.json folder/file or tekken JSON)"})
    corpus: list[str] = field(metadata={"help": "text files or globs (jsonl/parquet/txt); each line is checked"})
    script: str | None = field(default=None, metadata={"help": "target script (default: the one recorded by "
                                                               "vocab merge, else Han)"})
    max_lines: int = field(default=20000, metadata={"help": "check at most this many lines (the first ones)"})
    json: bool = field(default=False, metadata={"help": "print the report as JSON"})

    def __post_init__(self) -> None:  # out-of-range values fail when the config is built (CLI, workflow)
        from common.validate import check_ranges

        check_ranges(self, {"max_lines": ">=1"})


def _lines(patterns: list[str], max_lines: int) -> tuple[list[str], dict]:
    from corpus.readers import RejectLog, iter_texts

    rejects = RejectLog()
    out: list[str] = []
    for rec in iter_texts(patterns, rejects=rejects):
        for line in rec.text.split("\n"):
            if line.strip():
                out.append(line)
                if len(out) >= max_lines:
                    return out, dict(rejects.counts)
    return out, dict(rejects.counts)


def load_offline(folder: Path) -> tuple[Any, list[str]]:
    """`AutoTokenizer.from_pretrained(folder)` offline, and what is wrong with it so far: (None, [why]) when it
    does not load, (tok, ["not fast"]) for a slow tokenizer."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # anything that stops loading is the finding
        return None, [f"AutoTokenizer.from_pretrained failed: {type(e).__name__}: {str(e)[:200]}"]
    return tok, ([] if tok.is_fast else ["AutoTokenizer did not load a fast tokenizer"])


def tally(stats: dict[str, list[int]], script, line: str, base_ids: list[int], ids: list[int]) -> bool:
    """Count a checked line into stats[target | non_target] (lines, chars, base tokens, merged tokens); True for
    a line without the target script whose ids differ from the base's."""
    kind = "target" if script.has(line) else "non_target"
    s = stats[kind]
    s[0] += 1
    s[1] += len(line)
    s[2] += len(base_ids)
    s[3] += len(ids)
    return kind == "non_target" and ids != base_ids


def tokens_per_char(stats: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """The report's tokens-per-character table from {kind: [lines, chars, base tokens, merged tokens]}."""
    out = {}
    for kind, (n, chars, b, m) in stats.items():
        out[kind] = {"lines": n, "chars": chars, "base_tokens": b, "merged_tokens": m,
                     "base_tokens_per_char": round(b / chars, 4) if chars else None,
                     "merged_tokens_per_char": round(m / chars, 4) if chars else None,
                     "token_reduction": round(1 - m / b, 4) if b else None}
    return out


def make_report(folder: Path, cfg: Any, script, lines: list[str], rejects: dict, invariants: dict[str, int],
                stats: dict[str, list[int]], problems: list[str], examples: dict[str, list[str]], **extra: Any) -> dict:
    """The report of `graft vocab check`: the fields both kinds of tokenizer share, and `extra`."""
    return {"tokenizer": str(folder), "base": str(cfg.base), "script": script.name, **extra,
            "lines_checked": len(lines), "probe_lines": len(PROBES), "rejected_records": rejects,
            "invariants": invariants, "ok": not any(invariants.values()), "tokens_per_char": tokens_per_char(stats),
            "problems": problems, "examples": {k: v[:5] for k, v in examples.items() if v}}


def _autotokenizer_problems(folder: Path, base) -> list[str]:
    tok, problems = load_offline(folder)
    if tok is None:
        return problems
    spec = base.trainer_spec
    for attr, i in (("bos_token", spec.bos_id), ("eos_token", spec.eos_id), ("unk_token", spec.unk_id)):
        want = base.pieces[i].piece if i >= 0 else None
        if getattr(tok, attr) != want or (want is not None and tok.convert_tokens_to_ids(want) != i):
            problems.append(f"{attr} is {getattr(tok, attr)!r}, base has {want!r} (id {i})")
    return problems


def check_tokenizer(cfg: CheckConfig) -> dict[str, Any]:
    """Compute the report (invariant counts + token-per-character figures)."""
    from tqdm import tqdm

    from vocab.merge import reachability_failures
    from common.scripts import ScriptFilter

    folder = Path(cfg.tokenizer)
    if folder.is_dir() and not (folder / "tokenizer.model").exists() and (folder / "tokenizer.json").is_file():
        from vocab.bytelevel_check import check_bytelevel  # grown from a byte-level base

        return check_bytelevel(cfg)
    if not folder.is_dir() or not (folder / "tokenizer.model").is_file() or not (folder / "tokenizer.json").is_file():
        raise GraftError(f"{folder}: not a merged tokenizer folder (needs tokenizer.model and tokenizer.json). "
                         "Fix: pass the --out folder of `graft vocab merge`")
    manifest = read_json(folder / "manifest.json") if (folder / "manifest.json").is_file() else {}
    script_name = cfg.script or manifest.get("config", {}).get("script") or "Han"
    script = ScriptFilter(script_name)
    base = load_model_proto(cfg.base)
    merged = load_model_proto(folder)
    base_sp, sp = load_sentencepiece(cfg.base), load_sentencepiece(folder)
    fast = load_fast_tokenizer(folder)
    lines, rejects = _lines(cfg.corpus, cfg.max_lines)
    if not lines:
        raise GraftError(f"{', '.join(cfg.corpus)}: no text lines found. Fix: pass files with text")

    n_base = len(base.pieces)
    changed = sum(1 for i, p in enumerate(base.pieces)
                  if i >= len(merged.pieces) or (merged.pieces[i].piece, merged.pieces[i].score, merged.pieces[i].type)
                  != (p.piece, p.score, p.type))
    all_pieces = [p.piece for p in merged.pieces]
    duplicates = len(all_pieces) - len(set(all_pieces))
    specials = list(manifest.get("special_tokens", []))
    added = [p.piece for p in merged.pieces[n_base:] if p.type == NORMAL]
    no_script = sum(1 for p in added if not script.has(p))
    unreachable = reachability_failures(merged, fast, added)

    control_text = {p.piece for p in merged.pieces if p.type == CONTROL}
    stats = {k: [0, 0, 0, 0] for k in ("target", "non_target")}  # lines, chars, base tokens, merged tokens
    non_target_changed = fast_mismatch = lossy = skipped_control = metaspace_lines = 0
    examples: dict[str, list[str]] = {"non_target_changed": [], "fast_mismatch": [], "lossy": []}
    for line in tqdm(list(PROBES) + lines, desc="checking lines", disable=len(lines) < 2000, mininterval=1.0):
        ids = sp.encode(line)
        base_ids = base_sp.encode(line)
        if tally(stats, script, line, base_ids, ids):
            non_target_changed += 1
            examples["non_target_changed"].append(line[:80])
        fast_ids = fast.encode(line, add_special_tokens=False).ids
        if any(c in line for c in control_text):
            skipped_control += 1  # HF matches literal "<s>" as the control token; sentencepiece does not
        elif fast_ids != ids:
            fast_mismatch += 1
            examples["fast_mismatch"].append(line[:80])
        if "\u2581" in line:
            metaspace_lines += 1  # "▁" means space to SentencePiece: it decodes to " " with the base too
        elif sp.decode(ids) != line or fast.decode(fast_ids, skip_special_tokens=False) != line:
            lossy += 1
            examples["lossy"].append(line[:80])
    # sentencepiece puts the dummy-prefix "▁" before a special token; the token itself must be one id
    special_bad = [t for t in specials if sp.encode(t)[-1:] != [sp.piece_to_id(t)]
                   or fast.encode(t, add_special_tokens=False).ids != [sp.piece_to_id(t)]]
    invariants = {
        "base_pieces_changed": changed,
        "duplicate_pieces": duplicates,
        "added_without_target_script": no_script if script.name != "any" else 0,
        "unreachable_sentencepiece": len(unreachable["sentencepiece"]),
        "unreachable_hf_fast": len(unreachable["hf_fast"]),
        "non_target_lines_changed": non_target_changed,
        "fast_slow_mismatch_lines": fast_mismatch,
        "lossy_lines": lossy,
        "special_tokens_not_single_id": len(special_bad),
        "autotokenizer_problems": len(problems := _autotokenizer_problems(folder, base)),
    }
    return make_report(folder, cfg, script, lines, rejects, invariants, stats, problems, examples,
                  vocab_size=len(merged.pieces), base_vocab_size=n_base, added_pieces=len(added),
                  lines_with_control_text=skipped_control, lines_with_metaspace_char=metaspace_lines,
                  unreachable_examples={k: v[:10] for k, v in unreachable.items() if v})


def format_report(r: dict[str, Any]) -> str:
    lines = [f"tokenizer {r['tokenizer']}: {r['vocab_size']} pieces ({r['added_pieces']} added to "
             f"{r['base_vocab_size']}), script {r['script']}, {r['lines_checked']} corpus lines + "
             f"{r['probe_lines']} probes", "", "invariant (violations; must be 0)"]
    for k, v in r["invariants"].items():
        lines.append(f"  {'ok  ' if v == 0 else 'FAIL'} {k:32s} {v}")
    lines += ["", f"{'':10s} {'lines':>8s} {'chars':>10s} {'base tok/char':>14s} {'merged tok/char':>16s} {'reduction':>10s}"]
    for kind, s in r["tokens_per_char"].items():
        if s["lines"]:
            lines.append(f"{kind:10s} {s['lines']:>8d} {s['chars']:>10d} {s['base_tokens_per_char']:>14.4f} "
                         f"{s['merged_tokens_per_char']:>16.4f} {s['token_reduction'] * 100:>9.2f}%")
    for k, v in r.get("examples", {}).items():
        lines.append(f"examples of {k}: {v}")
    for p in r.get("problems", []):
        lines.append(f"problem: {p}")
    lines.append("")
    lines.append("all invariants hold" if r["ok"] else "SOME INVARIANTS FAIL")
    return "\n".join(lines)


def run_check(cfg: CheckConfig) -> dict[str, Any]:
    report = check_tokenizer(cfg)
    print(json.dumps(report, indent=2, ensure_ascii=False) if cfg.json else format_report(report))
    if not report["ok"]:
        sys.exit(1)
    return report
