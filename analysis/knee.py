"""Choose a vocabulary: the knee of ALP against size, then the highest ALP at that size.

Knee: Kneedle (Satopää et al. 2011) on the upper envelope of the curves, i.e. for each size the best
ALP over the `chars` values. Both axes are scaled to [0, 1]; for a rising curve with diminishing
returns the knee is the size where the scaled ALP lies farthest above the diagonal,

    knee = argmax_i ( (alp_i - alp_min) / (alp_max - alp_min) - (size_i - size_min) / (size_max - size_min) )

the point after which more vocabulary buys less ALP than its share of the size range. With fewer
than three sizes there is no knee to find and the largest size is used. Ties go to the smaller size.
"""
from __future__ import annotations

from typing import Any, Sequence

from common.errors import GraftError

METHOD = "kneedle on the upper envelope of ALP vs size"


def kneedle(x: Sequence[float], y: Sequence[float]) -> int:
    """Index of the knee of a rising, concave curve (x ascending). See the module docstring."""
    n = len(x)
    if n != len(y) or n == 0:
        raise ValueError("kneedle needs x and y of the same, non-zero length")
    if n < 3:
        return n - 1
    x0, x1, y0, y1 = min(x), max(x), min(y), max(y)
    if x1 == x0 or y1 == y0:
        return 0
    diff = [(yi - y0) / (y1 - y0) - (xi - x0) / (x1 - x0) for xi, yi in zip(x, y)]
    best = max(diff)
    return diff.index(best)


def envelope(rows: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """[(size, best ALP over chars)] sorted by size."""
    best: dict[int, float] = {}
    for r in rows:
        if r["size"] not in best or r["alp"] > best[r["size"]]:
            best[r["size"]] = r["alp"]
    return sorted(best.items())


def choose(rows: Sequence[dict[str, Any]], size: int | None = None, chars: int | None = None) -> dict[str, Any]:
    """{"knee": {...}, "pick": {"chars", "size", "path", "alp"}}; `size`/`chars` override the choice."""
    pool = [r for r in rows if chars is None or r["chars"] == chars]
    if not pool:
        have = sorted({r["chars"] for r in rows})
        raise GraftError(f"no candidate has chars {chars}. Fix: use one of {', '.join(map(str, have))}")
    if size is None:
        env = envelope(pool)
        i = kneedle([s for s, _ in env], [a for _, a in env])
        knee = {"method": METHOD, "size": env[i][0], "override": False}
    else:
        if not any(r["size"] == size for r in pool):
            have = sorted({r["size"] for r in pool})
            raise GraftError(f"no candidate has size {size}" + (f" with chars {chars}" if chars else "")
                             + f". Fix: use one of {', '.join(map(str, have))}")
        knee = {"method": "--size given", "size": size, "override": True}
    at = [r for r in pool if r["size"] == knee["size"]]
    best = max(at, key=lambda r: (r["alp"], -r["chars"]))
    pick = {"chars": best["chars"], "size": best["size"], "path": best["path"], "alp": best["alp"]}
    if chars is not None or size is not None:
        pick["override"] = {"size": size, "chars": chars}
    return {"knee": knee, "pick": pick}
