"""`report` stage: one report (report.md + report.html, same PNGs) from the stage output folders.

It reads only what the stages wrote (manifest.json, scores.json, audit.json, metrics.csv,
bpb.json, PNGs); the only model it loads is the merged checkpoint, to show a generated sample. It is
loaded the way the eval stage loads models (continual.load.plan_load: in `dtype` when it fits the
GPUs or half the free RAM, else NF4 4-bit as training did); when neither fits (Mixtral-8x7B on a
CPU-only machine), the sample is skipped and the report says so, with the sizes and the rule. Each
section appears when its folder is given; a folder that is given but unfinished is an error naming it.
The Markdown/HTML document model is analysis/doc.py; the generated sample, analysis/sample.py.
"""
from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.doc import Doc, cell
from common.errors import GraftError, input_error
from common.io import atomic_path, is_complete, read_json, read_manifest, write_manifest
from common.rerun import guard, listed, overwrite_field


@dataclass
class ReportConfig:
    """Write report.md and report.html (with the same PNGs) from the stage output folders."""

    out: str = field(metadata={"help": "report folder"})
    title: str = field(default="vocab-graft report", metadata={"help": "report title"})
    scores: str = field(default="", metadata={"help": "`vocab score` folder: ALP curves and candidates"})
    pick: str = field(default="", metadata={"help": "`vocab.pick` folder (default: the pick in the scores manifest)"})
    tokenizer: str = field(default="", metadata={"help": "`vocab merge` folder: the extended tokenizer"})
    audit: str = field(default="", metadata={"help": "`audit` folder: base vs extended tokenizer"})
    corpus: list[str] = field(default_factory=list, metadata={"help": "`corpus prepare`/`corpus mix` folders: token budget"})
    base: str = field(default="", metadata={"help": "base model folder (demo.base: its training curve)"})
    embed: str = field(default="", metadata={"help": "`embed init` folder"})
    train: str = field(default="", metadata={"help": "`train` folder: loss curves (metrics.csv)"})
    eval: str = field(default="", metadata={"help": "`eval.bpb` folder: dev bits per byte"})
    merged: str = field(default="", metadata={"help": "merged checkpoint folder: path and a generated sample"})
    prompts: list[str] = field(default_factory=lambda: ["中国经济", "The for statement"],
                               metadata={"help": "prompts for the generated sample"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per prompt"})
    generate: bool = field(default=True, metadata={"help": "generate a sample with the merged checkpoint (skipped, "
                                                          "with the reason in the report, when it does not fit)"})
    load: str = field(default="auto", metadata={"help": "auto | full | nf4: how the merged checkpoint is loaded "
                                                       "for the sample (as in the eval stage)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU) | float32 | "
                                                        "bfloat16 | float16"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:  # bad values fail when the workflow is read, not after training
        from common.validate import check_ranges
        from continual.load import DTYPES, LOADS

        check_ranges(self, {"max_new_tokens": ">=0"}, choices={"load": LOADS, "dtype": DTYPES})


# ---------------------------------------------------------------- inputs

def _finished(folder: str, what: str) -> dict[str, Any]:
    p = Path(folder)
    if not is_complete(p):
        raise input_error(p, f"is not a finished {what} folder (no manifest.json with status done)",
                          f"run the {what} stage first (graft run resumes the workflow)")
    return read_manifest(p)


def _copy_png(src: Path, out: Path, name: str) -> str | None:
    if not src.is_file():
        return None
    shutil.copyfile(src, out / name)
    return name


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(s: str | None) -> float | None:
    try:
        return float(s) if s not in (None, "") else None
    except ValueError:
        return None


def _duration(m: dict[str, Any]) -> float | None:
    return (m.get("workflow") or {}).get("duration_s") or m.get("duration_s")


# ---------------------------------------------------------------- sections

def _vocab(doc: Doc, cfg: ReportConfig, out: Path, summary: list[str]) -> None:
    m = _finished(cfg.scores, "vocab score")
    scores = read_json(Path(cfg.scores) / "scores.json")
    pick = _finished(cfg.pick, "vocab pick").get("pick") if cfg.pick else m.get("pick")
    doc.h(2, "Vocabulary: ALP curves and the chosen candidate")
    s = scores.get("sample", {})
    doc.p(f"{len(scores.get('rows', []))} candidates scored on {s.get('lines', '?'):,} held-out lines "
          f"({s.get('chars', '?'):,} characters). ALP = mean over lines of the sum of ln p(token), with p the "
          "unigram frequency on the same sample (higher is better).")
    if (img := _copy_png(Path(cfg.scores) / "alp.png", out, "alp.png")):
        doc.img(img, "ALP per candidate")
    knee = scores.get("knee") or m.get("knee") or {}
    if pick:
        doc.p(f"Knee ({knee.get('method', '?')}) at size {knee.get('size', '?')}. **Chosen: chars {pick['chars']}, "
              f"size {pick['size']:,}** (ALP {pick.get('alp', float('nan')):.3f}) -> `{pick.get('path')}`")
        summary.append(f"chosen vocabulary: chars {pick['chars']}, size {pick['size']:,}")
    rows = sorted(scores.get("rows", []), key=lambda r: (r["chars"], r["size"]))
    doc.table(["chars", "size", "ALP", "tokens/char", "Rényi eff.", "never produced"],
              [[r["chars"], r["size"], r.get("alp"), r.get("tokens_per_char"), r.get("renyi_efficiency"),
                r.get("never_produced")] for r in rows])


def _tokenizer(doc: Doc, cfg: ReportConfig, summary: list[str]) -> None:
    m = _finished(cfg.tokenizer, "vocab merge")
    c = m.get("counts", {})
    doc.h(2, "Merged tokenizer")
    items = [f"`{Path(cfg.tokenizer)}`: {c.get('vocab_size', '?'):,} pieces ({c.get('base_pieces', '?'):,} base)"]
    for k, v in c.items():
        if k not in ("vocab_size", "base_pieces") and isinstance(v, (int, float)):
            items.append(f"{k.replace('_', ' ')}: {cell(v)}")
    doc.bullets(items)
    if "vocab_size" in c:
        summary.append(f"tokenizer: {c.get('base_pieces', 0):,} -> {c['vocab_size']:,} pieces")


def _audit(doc: Doc, cfg: ReportConfig, out: Path, summary: list[str]) -> None:
    _finished(cfg.audit, "audit")
    rows = read_json(Path(cfg.audit) / "audit.json")
    doc.h(2, "Audit: base against extended tokenizer")
    if (img := _copy_png(Path(cfg.audit) / "audit.png", out, "audit.png")):
        doc.img(img, "tokens per character")
    doc.table(["corpus", "tokenizer", "vocab", "documents", "characters", "tokens", "tokens/char", "bytes/token",
               "relative to first"],
              [[Path(r["corpus"]).name, r["tokenizer"], r["vocab_size"], r["documents"], r["chars"], r["tokens"],
                r["tokens_per_char"], r.get("bytes_per_token"), r.get("relative_tokens")] for r in rows])
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        rs = [r for r in rows if r["corpus"] == corpus]
        if len(rs) >= 2 and rs[-1].get("relative_tokens") is not None:
            summary.append(f"{Path(corpus).name}: extended tokenizer uses {rs[-1]['relative_tokens']:.1%} of the "
                           f"base's tokens ({rs[0]['tokens']:,} -> {rs[-1]['tokens']:,})")


def _budget(doc: Doc, cfg: ReportConfig, summary: list[str]) -> None:
    doc.h(2, "Token budget per dataset")
    for folder in cfg.corpus:
        m = _finished(folder, "corpus prepare/mix")
        if m.get("sources"):  # a mix
            bs = m.get("block_size")
            total = sum(s["tokens"] for s in m["sources"]) or 1
            doc.p(f"Mixture `{Path(folder).name}` (block size {bs} tokens; train split):")
            doc.table(["dataset", "weight", "blocks", "selected blocks", "tokens", "share"],
                      [[Path(s["name"]).name, f"{s['weight']:g}", s["train_blocks"], s["selected_blocks"], s["tokens"],
                        f"{100 * s['tokens'] / total:.1f}%"] for s in m["sources"]]
                      + [["total", "", sum(s["train_blocks"] for s in m["sources"]),
                          sum(s["selected_blocks"] for s in m["sources"]), total, "100.0%"]])
            summary.append(f"training mixture: {total:,} tokens")
        else:
            c = m.get("counts", {})
            rows = [[split, c[split].get("documents"), c[split].get("characters"), c[split].get("tokens"),
                     c[split].get("blocks")] for split in ("train", "dev") if isinstance(c.get(split), dict)]
            name = (m.get("config") or {}).get("name") or Path(folder).name
            doc.p(f"Prepared `{name}` (block size {m.get('block_size', (m.get('config') or {}).get('block_size'))}):")
            doc.table(["split", "documents", "characters", "tokens", "blocks"], rows)


def _embed(doc: Doc, cfg: ReportConfig) -> None:
    m = _finished(cfg.embed, "embed init")
    c = m.get("counts", {})
    doc.h(2, "Embedding initialisation")
    method = (m.get("config") or {}).get("method", "?")
    doc.bullets([f"method: {method}"] + [f"{k.replace('_', ' ')}: {cell(v)}" for k, v in c.items()
                                         if isinstance(v, (int, float))])


def _training(doc: Doc, cfg: ReportConfig, out: Path, summary: list[str]) -> None:
    from analysis.plots import line_chart

    doc.h(2, "Training and dev loss")
    if cfg.base:
        bm = _finished(cfg.base, "base model")
        rows = _read_csv(Path(cfg.base) / bm.get("losses", "losses.csv"))
        series = {"train loss": ([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])}
        for col in [k for k in rows[0] if k.endswith("_loss") and k != "loss"]:
            pts = [(int(r["step"]), _num(r[col])) for r in rows if _num(r[col]) is not None]
            if pts:
                series[f"dev {col[:-5]}"] = ([x for x, _ in pts], [y for _, y in pts])
        line_chart(out / "base_loss.png", series, xlabel="step", ylabel="loss (nats/token)",
                   title="Base model (demo.base), base tokenizer")
        doc.p(f"Base model: {bm['counts'].get('steps')} steps, {bm['counts'].get('tokens_seen', 0):,} tokens, "
              f"{bm['counts'].get('params', 0):,} parameters.")
        doc.img("base_loss.png", "base model loss")
    if cfg.train:
        tm = _finished(cfg.train, "train")
        rows = _read_csv(Path(cfg.train) / "metrics.csv")
        tr = [(int(r["step"]), _num(r.get("ce_loss")) or _num(r.get("loss"))) for r in rows]
        tr = [(s, v) for s, v in tr if v is not None and s > 0]
        dev = [(int(r["step"]), _num(r.get("dev_loss"))) for r in rows if _num(r.get("dev_loss")) is not None]
        series = {}
        if tr:
            series["train loss"] = ([s for s, _ in tr], [v for _, v in tr])
        if dev:
            series["dev loss"] = ([s for s, _ in dev], [v for _, v in dev])
        if series:
            line_chart(out / "train_loss.png", series, xlabel="step", ylabel="loss (nats/token)",
                       title="QLoRA continued pretraining, extended tokenizer")
            doc.img("train_loss.png", "training and dev loss")
        c = tm.get("counts", {})
        tps = [_num(r.get("tokens_per_s")) for r in rows if _num(r.get("tokens_per_s"))]
        items = [f"steps: {c.get('steps', '?')}, tokens: {cell(c.get('tokens'))}, sequence length {c.get('seq_len')}"]
        bpb = [(int(r["step"]), _num(r.get("dev_bpb"))) for r in rows if _num(r.get("dev_bpb")) is not None]
        if dev:
            items.append(f"dev loss: {dev[0][1]:.4f} at step {dev[0][0]} -> {dev[-1][1]:.4f} at step {dev[-1][0]}")
        if bpb:
            items.append(f"dev bits per byte (trainer's dev blocks, 4-bit base): {bpb[0][1]:.4f} at step {bpb[0][0]} "
                         f"-> {bpb[-1][1]:.4f} at step {bpb[-1][0]}")
            summary.append(f"QLoRA dev loss {dev[0][1]:.3f} -> {dev[-1][1]:.3f} ({c.get('steps')} steps)")
        if tps:
            items.append(f"median throughput: {sorted(tps)[len(tps) // 2]:,.0f} tokens/s")
        for k in ("params_4bit", "params_total", "fraction_4bit", "share_4bit"):
            if k in c:
                items.append(f"{k.replace('_', ' ')}: {cell(c[k])}")
        doc.bullets(items)


def _bpb(doc: Doc, cfg: ReportConfig, out: Path, summary: list[str]) -> None:
    from analysis.plots import bar_chart

    _finished(cfg.eval, "eval.bpb")
    res = read_json(Path(cfg.eval) / "bpb.json")
    labels = list(res)
    dev_sets = [k for k, v in res[labels[0]].items() if isinstance(v, dict) and "bpb" in v]
    doc.h(2, "Dev bits per byte")
    loads = {lab: res[lab].get("load") for lab in labels}
    how = "; ".join(f"{lab}: {_load_words(ld)}" for lab, ld in loads.items() if ld) or "full precision"
    doc.p("The same held-out documents, scored by each model with its own tokenizer; bits per UTF-8 byte "
          f"compare across vocabularies (lower is better). {_layout_words(read_manifest(cfg.eval).get('bos'))} "
          f"Loaded as: {how}.")
    doc.table(["model", "vocab"] + [f"{d} bpb" for d in dev_sets] + [f"{d} tokens/byte" for d in dev_sets],
              [[lab, res[lab]["vocab_size"]] + [res[lab][d]["bpb"] for d in dev_sets]
               + [res[lab][d]["tokens_per_byte"] for d in dev_sets] for lab in labels])
    bar_chart(out / "bpb.png", {d: {lab: res[lab][d]["bpb"] for lab in labels} for d in dev_sets},
              ylabel="bits per byte (lower is better)", title="Dev bits per byte")
    doc.img("bpb.png", "dev bits per byte")
    for d in dev_sets:
        summary.append(f"{d} bits/byte: " + ", ".join(f"{lab} {res[lab][d]['bpb']:.3f}" for lab in labels))


def _load_words(ld: dict[str, Any]) -> str:
    return (f"NF4 4-bit (compute {ld['dtype']})" if ld["mode"] == "nf4" else ld["dtype"]) + f" on {ld['device']}"


def _layout_words(bos: bool | None) -> str:
    if bos is None:  # an eval.bpb folder written before BOS was one setting
        return "Each document was scored as BOS + text (EOS not predicted)."
    start = "BOS" if bos else "the previous document's EOS (corpus without BOS)"
    return f"Each document is scored as the training blocks hold it: {start}, text, EOS."


def _merged(doc: Doc, cfg: ReportConfig, summary: list[str]) -> dict[str, Any]:
    from analysis.sample import generate_samples
    from continual.load import plan_load

    _finished(cfg.merged, "merge")
    path = Path(cfg.merged).resolve()
    doc.h(2, "Merged checkpoint and a generated sample")
    doc.p(f"Merged checkpoint: `{path}` (loads with `AutoModelForCausalLM.from_pretrained`).")
    summary.append(f"merged checkpoint: {path}")
    if not cfg.generate:
        doc.p("**Sample skipped**: `generate = false` in the report stage.")
        return {"path": str(path), "samples": [], "skipped": "generate = false"}
    try:
        plan = plan_load(path, cfg.load, cfg.dtype)
    except GraftError as e:
        doc.p(f"**Sample skipped**: {e}")
        summary.append("generated sample skipped: the merged model does not fit this machine")
        return {"path": str(path), "samples": [], "skipped": str(e)}
    samples = generate_samples(plan, cfg.prompts, cfg.max_new_tokens, cfg.seed)
    for sample in samples:
        doc.code(sample["text"])
    doc.p(f"Loaded as {plan.describe()} ({plan.rule}). Sampling: top-k 50, top-p 0.9, temperature 0.8, repetition "
          f"penalty 1.2, seed {cfg.seed}, {cfg.max_new_tokens} new tokens. A tiny demo model produces text-like "
          "noise; the point is that the merged checkpoint loads and generates with the extended tokenizer.")
    return {"path": str(path), "samples": samples, "load": {"mode": plan.mode, "dtype": plan.dtype,
                                                            "device": plan.device, "rule": plan.rule}}


def _stage_times(doc: Doc, cfg: ReportConfig) -> None:
    folders = [("scores", cfg.scores), ("pick", cfg.pick), ("tokenizer", cfg.tokenizer), ("audit", cfg.audit),
               ("base", cfg.base), ("embed", cfg.embed), *[("corpus", c) for c in dict.fromkeys(cfg.corpus)],
               ("train", cfg.train), ("eval", cfg.eval), ("merged", cfg.merged)]
    rows = []
    for label, folder in folders:
        if folder and is_complete(folder):
            m = read_manifest(folder)
            d = _duration(m)
            wf = m.get("workflow") or {}
            cpu = wf.get("cpu_s")
            rows.append((wf.get("started", 0), [wf.get("stage", label), wf.get("kind", m.get("stage", "")),
                                                Path(folder).as_posix(), f"{d:.1f}s" if d is not None else "",
                                                f"{cpu:.1f}s" if cpu is not None else ""]))
    if rows:
        doc.h(2, "Stages")
        doc.table(["stage", "kind", "output", "wall time", "CPU time"],
                  [r for _, r in sorted(rows, key=lambda x: x[0])])


def write_report(cfg: ReportConfig) -> Path:
    """Write OUT/report.md, OUT/report.html and the PNGs; returns OUT."""
    started = time.time()
    if not any([cfg.scores, cfg.tokenizer, cfg.audit, cfg.corpus, cfg.train, cfg.eval, cfg.merged]):
        raise GraftError("nothing to report: no stage folder given. Fix: set scores, audit, train, eval, ... in "
                         "the report stage")
    out = Path(cfg.out)
    skip, rerun = guard(cfg, out, stage="report", inputs={
        **{k: getattr(cfg, k) or None for k in ("scores", "pick", "tokenizer", "audit", "base", "embed", "train", "eval",
                                                 "merged")}, **listed("corpus", cfg.corpus)})
    if skip:
        return out
    body = Doc()
    summary: list[str] = []
    extra: dict[str, Any] = {}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        if cfg.scores:
            _vocab(body, cfg, tmp, summary)
        if cfg.tokenizer:
            _tokenizer(body, cfg, summary)
        if cfg.audit:
            _audit(body, cfg, tmp, summary)
        if cfg.corpus:
            _budget(body, cfg, summary)
        if cfg.embed:
            _embed(body, cfg)
        if cfg.base or cfg.train:
            _training(body, cfg, tmp, summary)
        if cfg.eval:
            _bpb(body, cfg, tmp, summary)
        if cfg.merged:
            extra["merged"] = _merged(body, cfg, summary)
        _stage_times(body, cfg)
        doc = Doc()
        doc.h(1, cfg.title)
        doc.p("Every figure below was read from the stage output folders (manifest.json and the files next to it).")
        doc.h(2, "Summary")
        doc.bullets(summary)
        doc.blocks += body.blocks
        (tmp / "report.md").write_text(doc.markdown(), encoding="utf-8")
        (tmp / "report.html").write_text(doc.html(cfg.title), encoding="utf-8")
        write_manifest(tmp, stage="report", config=cfg, started=started,
                       inputs={k: v for k, v in vars(cfg).items() if k not in ("out", "title", "prompts", "overwrite")},
                       counts={"sections": sum(1 for k, _ in doc.blocks if k == "h") - 2,
                               "images": len(list(tmp.glob("*.png")))},
                       images=sorted(p.name for p in tmp.glob("*.png")),
                       summary=summary, report_md=str((out / "report.md").resolve()),
                       report_html=str((out / "report.html").resolve()), rerun=rerun, **extra)
    return out
