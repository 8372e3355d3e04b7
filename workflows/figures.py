"""Key figures per stage kind for `graft status`, read from each stage's manifest.json.

Each function gets the manifest dict and returns a short string; missing keys give "" so
that a stage whose manifest lacks a figure never breaks the status table.
"""
from __future__ import annotations

from typing import Any, Callable


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _get(m: dict, *path: str) -> Any:
    obj: Any = m
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return None
        obj = obj[p]
    return obj


def _pairs(m: dict, items: list[tuple[str, tuple[str, ...]]]) -> str:
    out = []
    for label, path in items:
        v = _get(m, *path)
        if v is not None and not isinstance(v, (dict, list)):
            out.append(f"{label} {_num(v)}")
    return ", ".join(out)


def generic(m: dict) -> str:
    counts = m.get("counts") or {}
    items = [(k, v) for k, v in counts.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k} {_num(v)}" for k, v in items[:3])


def vocab_train(m: dict) -> str:
    cands = m.get("candidates") or []
    return f"{len(cands)} candidates" if cands else generic(m)


def vocab_score(m: dict) -> str:
    pick = m.get("pick") or {}
    if not pick:
        return generic(m)
    return f"pick chars {pick.get('chars')} size {_num(pick.get('size'))}"


def vocab_merge(m: dict) -> str:
    return _pairs(m, [("vocab", ("counts", "vocab_size")), ("added", ("counts", "added_total")),
                      ("unreachable", ("counts", "unreachable_hf_fast"))]) or generic(m)


def embed_init(m: dict) -> str:
    method = (m.get("config") or {}).get("method", "")
    out = m.get("output_method")  # the lm_head method as resolved (manifests before issue 13: none)
    if method and out and out != method:
        method = f"{method} / {out}"
    return (f"{method}: " if method else "") + _pairs(m, [("rows", ("counts", "rows")), ("added", ("counts", "added"))])


def demo_base(m: dict) -> str:
    return _pairs(m, [("steps", ("counts", "steps")), ("train loss", ("counts", "final_train_loss")),
                      ("zh dev bpb", ("counts", "dev_bpb"))]) or generic(m)


def demo_corpora(m: dict) -> str:
    counts = m.get("counts") or {}
    docs = sum(v.get("documents", 0) for v in counts.values() if isinstance(v, dict))
    chars = sum(v.get("characters", 0) for v in counts.values() if isinstance(v, dict))
    return f"{len(counts)} files, {docs:,} docs, {chars:,} chars" if counts else ""


def corpus_blocks(m: dict) -> str:
    """corpus.prepare and corpus.mix: both record their train split's tokens and blocks."""
    c = (m.get("counts") or {}).get("train") or {}
    return _pairs({"c": c}, [("train tokens", ("c", "tokens")), ("blocks", ("c", "blocks"))]) or generic(m)


def audit(m: dict) -> str:
    return f"{(m.get('counts') or {}).get('rows', 0)} rows (audit.md)"


def eval_bpb(m: dict) -> str:
    counts = m.get("counts") or {}
    return ", ".join(f"{k.replace('_bpb', '')} {v:.3f}" for k, v in list(counts.items())[:3])


def report(m: dict) -> str:
    return str(m.get("report_md", ""))


def continual_train(m: dict) -> str:
    c = m.get("counts") or {}
    dev = m.get("final_dev") or {}
    parts = [f"steps {c['steps']}"] if "steps" in c else []
    parts += [f"{k.replace('_', ' ')} {v:.4f}" for k, v in dev.items() if isinstance(v, (int, float))]
    return ", ".join(parts) or generic(m)


FIGURES: dict[str, Callable[[dict], str]] = {
    "vocab.train": vocab_train,
    "vocab.score": vocab_score,
    "vocab.pick": vocab_score,
    "vocab.merge": vocab_merge,
    "embed.init": embed_init,
    "continual.train": continual_train,
    "demo.corpora": demo_corpora,
    "corpus.prepare": corpus_blocks,
    "corpus.mix": corpus_blocks,
    "audit": audit,
    "eval.bpb": eval_bpb,
    "report": report,
    "demo.base": demo_base,
}


def key_figures(kind: str, manifest: dict) -> str:
    try:
        return FIGURES.get(kind, generic)(manifest)
    except Exception:  # a figure is a nicety; a malformed manifest must not break `graft status`
        return ""
