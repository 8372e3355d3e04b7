"""Out-of-range settings are refused when the config is built, naming the key (issue 19, item 4)."""
from __future__ import annotations

import pytest

import workflows.cli
from common.errors import GraftError
from workflows.spec import load_workflow


@pytest.mark.fault("out-of-range setting", "error")
def test_command_line_value_out_of_range(tmp_path, capsys):
    rc = workflows.cli.main(["corpus", "prepare", "t", "--tokenizer", "tok", "--files", "a.jsonl",
                             "--out", str(tmp_path / "p"), "--block-size", "0", "--workers", "-1"])
    assert rc == 2
    assert capsys.readouterr().err == (
        "graft: error: out-of-range settings:\n"
        "  `block_size` (--block-size) = 0 must be >= 1. Fix: set block_size to 1 or more\n"
        "  `workers` (--workers) = -1 must be >= 1. Fix: set workers to 1 or more\n")
    assert not (tmp_path / "p").exists()


@pytest.mark.fault("out-of-range setting", "error")
def test_workflow_file_value_out_of_range_fails_when_read(tmp_path):
    wf = tmp_path / "wf.toml"
    wf.write_text('[workflow]\nname = "w"\n\n'
                  '[base_model]\nkind = "demo.base"\ninputs = ["a.jsonl"]\ntokenizer = "t.model"\n'
                  'learning_rate = -0.001\n\n'
                  '[prep]\nkind = "corpus.prepare"\nname = "x"\ntokenizer = "@base_model"\nfiles = ["a.jsonl"]\n'
                  'batch_chars = 0\n')
    with pytest.raises(GraftError) as e:
        load_workflow(wf)
    assert str(e.value) == (
        f"{wf}: invalid workflow:\n"
        "  [base_model] `learning_rate` (--learning-rate) = -0.001 must be > 0. Fix: set learning_rate to a positive "
        "value\n"
        "  [prep] `batch_chars` (--batch-chars) = 0 must be >= 1. Fix: set batch_chars to 1 or more")
