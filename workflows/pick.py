"""`vocab.pick` stage: choose a candidate from a `vocab score` folder into a folder of its own.

`graft vocab pick` records its choice inside the score folder; a workflow stage needs its own
output folder instead, so that changing `size`/`chars` re-runs only the pick and what follows
(merge, embed init, ...) without re-scoring. The choice itself is analysis.knee.choose.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.io import atomic_path, write_manifest
from common.rerun import guard, overwrite_field


@dataclass
class PickStageConfig:
    """Choose the candidate vocabulary: the knee of the ALP curves (or `size`/`chars`), best ALP there."""

    scores: str = field(metadata={"help": "folder written by `graft vocab score`"})
    out: str = field(metadata={"help": "output folder: the chosen .model + manifest.json (key 'pick')"})
    size: int = field(default=0, metadata={"help": "take this size instead of the knee (0 = knee)"})
    chars: int = field(default=0, metadata={"help": "only this chars curve (0 = all)"})
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:  # out-of-range values fail when the workflow file is read
        from common.validate import check_ranges

        check_ranges(self, {"size": ">=0", "chars": ">=0"})


def pick_stage(cfg: PickStageConfig) -> Path:
    from analysis.knee import choose
    from analysis.pick import read_scores

    started = time.time()
    skip, rerun = guard(cfg, cfg.out, stage="vocab.pick", inputs={"scores": cfg.scores})
    if skip:
        return Path(cfg.out)
    scores, _ = read_scores(cfg.scores)
    result = choose(scores["rows"], size=cfg.size or None, chars=cfg.chars or None)
    pick = dict(result["pick"])
    src = Path(pick["path"])
    if not src.is_absolute():
        src = Path(cfg.scores) / src
    out = Path(cfg.out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        name = "chosen" + (src.suffix or ".model")  # chosen.model, or chosen.json for a byte-level candidate
        shutil.copyfile(src, tmp / name)
        pick["source"] = str(src)
        pick["path"] = str((out / name).resolve())
        print(f"pick: chars {pick['chars']}, size {pick['size']} (knee {result['knee']['method']} at "
              f"{result['knee']['size']}) -> {pick['path']}")
        write_manifest(tmp, stage="vocab.pick", config=cfg, started=started, inputs={"scores": cfg.scores},
                       counts={"chars": pick["chars"], "size": pick["size"], "alp": pick.get("alp")},
                       pick=pick, knee=result["knee"], rerun=rerun)
    return out
