"""`graft vocab pick`: print the chosen candidate of a score folder, optionally overriding the knee (read only)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import input_error


@dataclass
class PickConfig:
    """Print the path of the chosen candidate vocabulary of a `graft vocab score` folder.

    Without options: the knee of the ALP curves, then the highest ALP at that size (what `vocab score`
    chose). --size N takes the highest-ALP candidate of size N; --chars C restricts to that curve (its own
    knee unless --size is given too). It only reads: the score folder stays as `vocab score` finished
    it (its manifest.json keeps the knee's pick); a workflow's `vocab.pick` stage writes its choice to a
    folder of its own (workflows/pick.py).

    Example:
      graft vocab pick runs/scores --size 20000
    """

    scores_dir: str = field(metadata={"help": "folder written by `graft vocab score`"})
    size: int | None = field(default=None, metadata={"help": "take this size instead of the knee"})
    chars: int | None = field(default=None, metadata={"help": "take this chars curve only"})

    def __post_init__(self) -> None:  # out-of-range values fail when the config is built (CLI)
        from common.validate import check_ranges

        check_ranges(self, {"size": ">=1", "chars": ">=1"})


def read_scores(scores_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scores.json, manifest.json) of a finished score folder."""
    from common.io import is_complete, read_json, read_manifest

    d = Path(scores_dir)
    if not d.is_dir():
        raise input_error(d, "scores folder not found", "pass the --out folder of `graft vocab score`")
    if not is_complete(d) or not (d / "scores.json").is_file():
        raise input_error(d, "not a finished `graft vocab score` folder (no complete manifest.json or "
                             "scores.json)", "run `graft vocab score CANDIDATES --corpus ... --out "
                             f"{d}` to completion")
    return read_json(d / "scores.json"), read_manifest(d)


def pick(cfg: PickConfig) -> Path:
    """The chosen candidate's path (knee or override); writes nothing."""
    from analysis.knee import choose

    scores, _ = read_scores(cfg.scores_dir)
    return Path(choose(scores["rows"], size=cfg.size, chars=cfg.chars)["pick"]["path"])


def run(cfg: PickConfig) -> Path:
    path = pick(cfg)
    print(path)
    return path
