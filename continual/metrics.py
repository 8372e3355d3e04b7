"""Training logs: OUT/metrics.csv (one row per logged step or evaluation) and OUT/tb (TensorBoard).

On resume, rows after the resumed step are dropped first, so the CSV of a resumed run reads like that of
an uninterrupted one.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

COLUMNS = ["step", "tokens", "lr", "embedding_lr", "loss", "ce_loss", "aux_loss", "grad_norm", "tokens_per_s",
           "dev_loss", "dev_bpb", "elapsed_s"]
CSV_NAME = "metrics.csv"


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The rows of OUT/metrics.csv with numbers parsed (empty cells are None)."""
    rows = []
    with open(Path(out) / CSV_NAME, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (None if v == "" else (int(v) if k in ("step", "tokens") else float(v)))
                         for k, v in r.items()})
    return rows


class MetricsLogger:
    def __init__(self, out: str | Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = Path(out) / CSV_NAME
        self.tb = None
        if not enabled:
            return
        kept = ""
        if self.path.is_file() and resume_step > 0:
            text = self.path.read_text()
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            for i, row in enumerate(csv.reader(io.StringIO(text))):
                if i == 0 or (row and int(row[0]) <= resume_step):
                    w.writerow(row)
            kept = buf.getvalue()
        self.path.write_text(kept or ",".join(COLUMNS) + "\n")
        self._f = open(self.path, "a", newline="")
        self._w = csv.writer(self._f, lineterminator="\n")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a dependency, but logs must not stop training
            self.tb = None

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        self._w.writerow([step] + ["" if values.get(c) is None else _fmt(values[c]) for c in COLUMNS[1:]])
        self._f.flush()
        if self.tb is not None:
            for k, v in values.items():
                if v is not None and k not in ("tokens", "elapsed_s") and math.isfinite(float(v)):
                    tag = f"dev/{k[4:]}" if k.startswith("dev_") else f"train/{k}"
                    self.tb.add_scalar(tag, float(v), step)

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self.tb is not None:
                self.tb.close()


def _fmt(v: Any) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)
