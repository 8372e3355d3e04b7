"""`graft embed check`: verify a grown checkpoint against the one it came from.

Tensor checks compare bytes straight from the safetensors files (no model load). The forward check loads
both models and compares the logits of the old ids on text that both tokenizers encode identically
(English prose: the new ids only cover the new language).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from common.checkpoint import open_checkpoint, tensors_equal_bytes
from common.errors import GraftError
from common.io import atomic_write_json
from embed_init.config import EmbedCheckConfig
from embed_init.grow import find_matrices, load_grown_manifest, padded_rows
from embed_init.tokens import load_pieces


def _same_text(old_tok, new_tok, max_tokens: int) -> list[int]:
    """Old-tokenizer ids of sample text that the new tokenizer encodes the same way (up to max_tokens)."""
    from corpus.texts import english_paragraphs

    ids: list[int] = []
    for text in english_paragraphs():
        a = old_tok.encode(text, add_special_tokens=False)
        if a and a == new_tok.encode(text, add_special_tokens=False):
            ids.extend(a)
            if len(ids) >= max_tokens:
                break
    return ids[:max_tokens]


def _forward_check(cfg: EmbedCheckConfig, old_tok_path: str, n_old: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    new_tok = AutoTokenizer.from_pretrained(cfg.out)
    p = Path(old_tok_path)
    if p.is_dir():
        old_tok = AutoTokenizer.from_pretrained(p)
    else:  # a bare .model: convert it the way `graft embed init` converts one
        import tempfile

        from embed_init.grow import write_tokenizer

        with tempfile.TemporaryDirectory(prefix="embed_check_") as d:
            write_tokenizer(p, Path(d))
            old_tok = AutoTokenizer.from_pretrained(d)
    ids = _same_text(old_tok, new_tok, cfg.max_tokens)
    if len(ids) < 8:
        return {"ok": False, "detail": "found no sample text that both tokenizers encode identically"}
    bos = old_tok.bos_token_id
    x = torch.tensor([([bos] if bos is not None else []) + ids])
    logits = []
    for path in (cfg.model, cfg.out):
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        model.eval()
        with torch.no_grad():
            logits.append(model(x).logits[0, :, :n_old].float())
        del model
    diff = float((logits[0] - logits[1]).abs().max())
    ok = diff <= cfg.atol
    return {"ok": ok, "detail": f"{x.shape[1]} tokens, max |logit difference| on old ids = {diff:g} "
                                f"(allowed {cfg.atol:g})", "max_abs_diff": diff, "tokens": int(x.shape[1])}


def check_grown(cfg: EmbedCheckConfig) -> dict[str, Any]:
    """Run every check; write OUT/check.json; raise GraftError listing the failures (if any)."""
    import torch

    started = time.time()
    out = Path(cfg.out)
    manifest = load_grown_manifest(out)
    src, dst = open_checkpoint(cfg.model), open_checkpoint(out)
    old_tok_path = cfg.old_tokenizer or manifest["inputs"]["old_tokenizer"]
    old, new = load_pieces(old_tok_path), load_pieces(out)
    n_old, n_new = len(old), len(new)
    rows = padded_rows(n_new, int(manifest["config"].get("pad_to_multiple_of") or 0))
    checks: dict[str, dict[str, Any]] = {}

    def record(name: str, ok: bool, detail: str, **kw: Any) -> None:
        checks[name] = {"ok": bool(ok), "detail": detail, **kw}

    embed, lm_head, tied = find_matrices(src)
    d_embed, d_lm_head, d_tied = find_matrices(dst)
    record("tying", (embed, lm_head, tied) == (d_embed, d_lm_head, d_tied),
           f"tie_word_embeddings={tied}, lm_head stored: {lm_head is not None}")
    vocab = dst.config.get("vocab_size")
    record("config_vocab_size", vocab == rows,
           f"config.json vocab_size={vocab}; new tokenizer has {n_new} pieces; expected {rows} rows")
    for name in [embed] + ([lm_head] if lm_head else []):
        a, b = src.info(name), dst.info(name)
        record(f"shape:{name}", b.shape == (rows, a.shape[1]) and b.dtype == a.dtype,
               f"{list(a.shape)} {a.dtype} -> {list(b.shape)} {b.dtype}")
        same = b.shape[0] >= n_old and tensors_equal_bytes(a, b, rows=n_old)
        record(f"old_rows:{name}", same, f"first {n_old} rows {'bit-identical' if same else 'DIFFER'}")
        t = dst.read_tensor(name)
        finite = bool(torch.isfinite(t[n_old:]).all())
        record(f"new_rows_finite:{name}", finite, f"{t.shape[0] - n_old} new rows {'finite' if finite else 'have NaN/inf'}")
        del t
    others = [n for n in src.weight_map if n not in (embed, lm_head)]
    missing = [n for n in others if not dst.has(n)]
    changed = [n for n in others if dst.has(n) and not tensors_equal_bytes(src.info(n), dst.info(n))]
    extra = [n for n in dst.weight_map if not src.has(n)]
    record("other_tensors", not (missing or changed or extra),
           f"{len(others)} tensors; missing {missing[:3]}, changed {changed[:3]}, unexpected {extra[:3]}")
    old_pieces_ok = new.pieces[:n_old] == old.pieces
    record("tokenizer_extends_old", old_pieces_ok and n_new >= n_old,
           f"new tokenizer in {out} has {n_new} pieces, first {n_old} equal the old ones: {old_pieces_ok}")
    if cfg.forward:
        checks["forward_old_ids"] = _forward_check(cfg, old_tok_path, n_old)
    result = {"ok": all(c["ok"] for c in checks.values()), "checks": checks,
              "duration_s": round(time.time() - started, 3)}
    atomic_write_json(out / "check.json", result)
    if not result["ok"]:
        bad = "; ".join(f"{k}: {v['detail']}" for k, v in checks.items() if not v["ok"])
        raise GraftError(f"{out}: embed check failed: {bad}. Fix: re-run `graft embed init --overwrite` "
                         f"from the original model (details in {out / 'check.json'})")
    return result
