"""The README's CLI examples run as written (all but the workflow block, which test_workflow_demo covers)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli_blocks() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## CLI reference"):text.index("### Workflows")]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S))


def test_readme_cli_examples_run(tmp_path):
    script = _cli_blocks()
    # Run with this interpreter's graft, from the repository root, as a user would.
    script = script.replace(".venv/bin/python", sys.executable)
    script = script.replace("G=.venv/bin/graft", f"G='{sys.executable} -m workflows.cli'")
    # Its outputs go to a temporary folder, not to the repository's runs/readme.
    runs = tmp_path / "readme"
    script = script.replace("runs/readme", str(runs))
    assert "runs/readme" not in script
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("cands", "scores", "tok", "audit", "grown", "prep_news", "mix", "train", "merged",
                  "nemo_tok", "nemo_cands", "nemo_scores", "nemo_graft", "nemo_audit", "nemo_grown", "llama3_tok"):
        assert json.loads((runs / stage / "manifest.json").read_text())["status"] == "done", stage
    assert (runs / "train.sbatch").read_text().startswith("#!")
    assert "accelerate launch" in proc.stdout
    assert json.loads((runs / "merged" / "config.json").read_text())["vocab_size"] % 64 == 0
