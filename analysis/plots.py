"""PNG charts written atomically (matplotlib, Agg backend, no display needed).

`line_chart` and `bar_chart` are generic so other stages' reports can reuse them; `alp_plot` is the
ALP-vs-size figure of `graft vocab score`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from common.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return Path(path)


def line_chart(path: str | Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
               xlabel: str, ylabel: str, title: str = "", vline: float | None = None,
               vline_label: str = "", marks: Sequence[tuple[float, float, str]] = ()) -> Path:
    """One line per series {label: (xs, ys)}; an optional vertical line and labelled points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=label)
    if vline is not None:
        ax.axvline(vline, color="grey", linestyle="--", linewidth=1, label=vline_label or None)
    for x, y, label in marks:
        ax.plot([x], [y], marker="*", markersize=14, color="crimson", zorder=5)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(8, -14), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def bar_chart(path: str | Path, groups: dict[str, dict[str, float]], *, ylabel: str, title: str = "",
              value_fmt: str = "{:.3f}") -> Path:
    """Grouped bars: {group (e.g. corpus): {bar (e.g. tokenizer): value}}, values printed on the bars."""
    plt = _pyplot()
    names: list[str] = []
    for bars in groups.values():
        names += [n for n in bars if n not in names]
    n_groups, n_bars = len(groups), max(len(names), 1)
    width = 0.8 / n_bars
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * n_groups * n_bars ** 0.5 + 2), 4.5))
    for j, name in enumerate(names):
        xs = [i + (j - (n_bars - 1) / 2) * width for i in range(n_groups)]
        ys = [bars.get(name, 0.0) for bars in groups.values()]
        rects = ax.bar(xs, ys, width=width, label=name)
        ax.bar_label(rects, labels=[value_fmt.format(v) for v in ys], fontsize=7, padding=2)
    ax.set_xticks(range(n_groups), list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def alp_plot(path: str | Path, rows: Sequence[dict[str, Any]], *, knee_size: int,
             pick: dict[str, Any]) -> Path:
    """One ALP curve per chars value against size, the knee as a dashed line, the pick as a star."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in sorted(rows, key=lambda r: (r["chars"], r["size"])):
        xs, ys = series.setdefault(f"chars {r['chars']}", ([], []))
        xs.append(r["size"])
        ys.append(r["alp"])
    return line_chart(path, series, xlabel="vocabulary size (pieces)", ylabel="ALP (higher is better)",
                      title="ALP of candidate vocabularies", vline=knee_size, vline_label=f"knee: {knee_size}",
                      marks=[(pick["size"], pick["alp"], f"pick: chars {pick['chars']}, size {pick['size']}")])
