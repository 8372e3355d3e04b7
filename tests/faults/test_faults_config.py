"""Out-of-range settings are refused when the config is built, naming the key (issue 19, item 4)."""
from __future__ import annotations

import pytest

import workflows.cli
from common.errors import GraftError
from workflows.spec import load_workflow


def _load_error(wf, text: str) -> str:
    """The error of loading a workflow file holding `text`."""
    wf.write_text(text)
    with pytest.raises(GraftError) as e:
        load_workflow(wf)
    return str(e.value)


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
    assert _load_error(wf, '[workflow]\nname = "w"\n\n'
                           '[base_model]\nkind = "demo.base"\ninputs = ["a.jsonl"]\ntokenizer = "t.model"\n'
                           'learning_rate = -0.001\n\n'
                           '[prep]\nkind = "corpus.prepare"\nname = "x"\ntokenizer = "@base_model"\nfiles = ["a.jsonl"]\n'
                           'workers = 0\nbatch_chars = 0\nlast_block = "padd"\n') == (
        f"{wf}: invalid workflow:\n"
        "  line 8: [base_model] `learning_rate` (--learning-rate) = -0.001 must be > 0. Fix: set learning_rate to a "
        "positive value\n"
        "  [prep] out-of-range settings:\n"
        "    line 15: `workers` (--workers) = 0 must be >= 1. Fix: set workers to 1 or more\n"
        "    line 16: `batch_chars` (--batch-chars) = 0 must be >= 1. Fix: set batch_chars to 1 or more\n"
        "    line 17: `last_block` (--last-block) = 'padd' is not one of drop, pad. Fix: set last_block to one of "
        "drop, pad")


_BAD_TRAIN = '''learning_rate = -1e-5
embedding_lr = 0.0
lora_dropout = 1.0
warmup_ratio = 1.5
min_lr_ratio = -0.1
weight_decay = -0.01
max_grad_norm = inf
max_steps = -1
seq_len = 1
eval_every = -1
eval_blocks = -8
save_every = -100
'''


@pytest.mark.fault("out-of-range setting", "error")
def test_train_toml_out_of_range_values_are_all_named_with_the_file(tmp_path, capsys):
    toml = tmp_path / "train.toml"
    toml.write_text(f'model = "m"\ntrain_data = "d"\nout = "{tmp_path / "t"}"\n' + _BAD_TRAIN)
    rc = workflows.cli.main(["train", "--config", str(toml)])
    assert rc == 2
    assert capsys.readouterr().err == (
        f"graft: error: {toml}: out-of-range settings:\n"
        "  `learning_rate` (--learning-rate) = -1e-05 must be > 0. Fix: set learning_rate to a positive value\n"
        "  `embedding_lr` (--embedding-lr) = 0.0 must be > 0. Fix: set embedding_lr to a positive value\n"
        "  `weight_decay` (--weight-decay) = -0.01 must be >= 0. Fix: set weight_decay to 0 or a positive value\n"
        "  `warmup_ratio` (--warmup-ratio) = 1.5 must be in [0, 1]. Fix: set warmup_ratio to a value from 0 to 1\n"
        "  `min_lr_ratio` (--min-lr-ratio) = -0.1 must be in [0, 1]. Fix: set min_lr_ratio to a value from 0 to 1\n"
        "  `max_grad_norm` (--max-grad-norm) = inf is not a finite number. Fix: set max_grad_norm to 0 or a "
        "positive value\n"
        "  `lora_dropout` (--lora-dropout) = 1.0 must be in [0, 1). Fix: set lora_dropout to a value from 0 up to, "
        "not including, 1\n"
        "  `max_steps` (--max-steps) = -1 must be >= 0. Fix: set max_steps to 0 or a positive value\n"
        "  `seq_len` (--seq-len) = 1 must be >= 2. Fix: set seq_len to 2 or more\n"
        "  `eval_every` (--eval-every) = -1 must be >= 0. Fix: set eval_every to 0 or a positive value\n"
        "  `eval_blocks` (--eval-blocks) = -8 must be >= 0. Fix: set eval_blocks to 0 or a positive value\n"
        "  `save_every` (--save-every) = -100 must be >= 0. Fix: set save_every to 0 or a positive value\n")
    assert not (tmp_path / "t").exists()


@pytest.mark.fault("out-of-range setting", "error")
def test_train_flag_out_of_range_over_a_good_toml(tmp_path, capsys):
    toml = tmp_path / "train.toml"
    toml.write_text(f'model = "m"\ntrain_data = "d"\nout = "{tmp_path / "t"}"\nlearning_rate = 1e-4\n')
    rc = workflows.cli.main(["train", "--config", str(toml), "--lora-dropout", "-0.05", "--learning-rate", "nan"])
    assert rc == 2
    assert capsys.readouterr().err == (
        "graft: error: out-of-range settings:\n"
        "  `learning_rate` (--learning-rate) = nan is not a finite number. Fix: set learning_rate to a positive value\n"
        "  `lora_dropout` (--lora-dropout) = -0.05 must be in [0, 1). Fix: set lora_dropout to a value from 0 up to, "
        "not including, 1\n")
    assert not (tmp_path / "t").exists()


@pytest.mark.fault("out-of-range setting", "error")
def test_vocab_grid_too_small_for_its_chars_fails_before_reading(tmp_path, capsys):
    missing = tmp_path / "not-read.jsonl"  # never opened: the grid is checked when the config is built
    rc = workflows.cli.main(["vocab", "train", str(missing), "--out", str(tmp_path / "c"),
                             "--chars", "4451,7434", "--sizes", "5000:40000:1000"])
    assert rc == 2
    assert capsys.readouterr().err == (
        "graft: error: size 5000 is smaller than required: --chars 7434 needs 7434 character pieces plus 259 "
        "reserved pieces (<unk>, <s>, </s> and 256 byte pieces), i.e. SentencePiece's 'Vocabulary size is smaller "
        "than required_chars'. Fix: use --sizes of at least 7694 for --chars 7434, or lower --chars\n")
    assert not (tmp_path / "c").exists()


@pytest.mark.fault("out-of-range setting", "error")
def test_workflow_file_every_stage_kind_checked_when_read(tmp_path):
    wf = tmp_path / "wf.toml"
    assert _load_error(wf, '[workflow]\nname = "w"\n\n'
                           '[cands]\nkind = "vocab.train"\ninputs = ["zh.jsonl"]\nchars = [3000]\nsizes = ["2000:8000:1000"]\n\n'
                           '[pick]\nkind = "vocab.pick"\nscores = "s"\nsize = -1\n\n'
                           '[grown]\nkind = "embed.init"\nmodel = "m"\nold_tokenizer = "t"\nnew_tokenizer = "@pick"\n'
                           'pad_to_multiple_of = -64\n\n'
                           '[train]\nkind = "continual.train"\nmodel = "@grown"\ntrain_data = "d"\nlearning_rate = 0\n'
                           'warmup_ratio = 2.0\n\n'
                           '[merged]\nkind = "continual.merge"\nbase = "@grown"\nadapter = "@train/adapter"\ndtype = "int8"\n') == (
        f"{wf}: invalid workflow:\n"
        "  [cands] size 2000 is smaller than required: --chars 3000 needs 3000 character pieces plus 259 reserved "
        "pieces (<unk>, <s>, </s> and 256 byte pieces), i.e. SentencePiece's 'Vocabulary size is smaller than "
        "required_chars'. Fix: use --sizes of at least 3260 for --chars 3000, or lower --chars\n"
        "  line 13: [pick] `size` (--size) = -1 must be >= 0. Fix: set size to 0 or a positive value\n"
        "  line 20: [grown] `pad_to_multiple_of` (--pad-to-multiple-of) = -64 must be >= 0. Fix: set "
        "pad_to_multiple_of to 0 or a positive value\n"
        "  [train] out-of-range settings:\n"
        "    line 26: `learning_rate` (--learning-rate) = 0.0 must be > 0. Fix: set learning_rate to a positive value\n"
        "    line 27: `warmup_ratio` (--warmup-ratio) = 2.0 must be in [0, 1]. Fix: set warmup_ratio to a value from 0 "
        "to 1\n"
        "  line 33: [merged] `dtype` (--dtype) = 'int8' is not one of auto, bf16, bfloat16, fp16, float16, fp32, "
        "float32. Fix: set dtype to one of auto, bf16, bfloat16, fp16, float16, fp32, float32")


@pytest.mark.fault("out-of-range setting", "error")
def test_workflow_file_choice_values_fail_when_read(tmp_path):
    """Words that used to be checked only when the stage ran (train's embeddings, compute_dtype and
    quant_storage, the audit's format and on_corrupt, the export's outtype) now fail when the file is read."""
    wf = tmp_path / "wf.toml"
    assert _load_error(wf, '[workflow]\nname = "w"\n\n'
                           '[audit]\nkind = "audit"\ntokenizers = ["t.model"]\ncorpus = ["zh.jsonl"]\nformat = "html"\n'
                           'on_corrupt = "ignore"\n\n'
                           '[train]\nkind = "continual.train"\nmodel = "m"\ntrain_data = "d"\nembeddings = "new_rows"\n\n'
                           '[gguf]\nkind = "export.gguf"\nmodel = "m"\nouttype = "q4_k"\n') == (
        f"{wf}: invalid workflow:\n"
        "  [audit] out-of-range settings:\n"
        "    line 8: `format` (--format) = 'html' is not one of md, csv, json. Fix: set format to one of md, csv, json\n"
        "    line 9: `on_corrupt` (--on-corrupt) = 'ignore' is not one of stop, skip. Fix: set on_corrupt to one of "
        "stop, skip\n"
        "  line 15: [train] `embeddings` (--embeddings) = 'new_rows' is not one of full, new-rows, frozen. Fix: set "
        "embeddings to one of full, new-rows, frozen\n"
        "  line 20: [gguf] `outtype` (--outtype) = 'q4_k' is not one of f32, f16, bf16, q8_0. Fix: set outtype to one "
        "of f32, f16, bf16, q8_0")


@pytest.mark.fault("missing setting", "error")
def test_every_unset_required_setting_is_named_before_the_stage_runs(tmp_path, capsys):
    from analysis.audit import AuditConfig, audit_tables
    from continual.config import MergeConfig, TrainConfig

    with pytest.raises(GraftError) as e:
        TrainConfig(model="m").validate()
    assert str(e.value) == ('settings not set:\n'
                            '  `train_data` is not set. Fix: put `train_data = "..."` in the TOML file or pass '
                            '--train-data\n'
                            '  `out` is not set. Fix: put `out = "..."` in the TOML file or pass --out')
    with pytest.raises(GraftError, match=r"^`adapter` is not set. Fix: pass --adapter DIR$"):
        MergeConfig(base="b", out="o").validate()
    with pytest.raises(GraftError, match=r"^`corpus` is not set. Fix: pass --corpus FILE"):
        audit_tables(AuditConfig(tokenizers=[str(tmp_path / "missing.model")]))  # before the tokenizer is read
    with pytest.raises(GraftError, match=r"^settings not set:\n  `tokenizers` is not set\. Fix: pass --tokenizer "
                                         r"PATH .*\n  `corpus` is not set\. Fix: pass --corpus FILE"):
        audit_tables(AuditConfig())
    # a value set after the config was built is checked again when the stage starts
    cfg = TrainConfig(model="m", train_data="d", out="o")
    cfg.quant_storage = "int4"
    with pytest.raises(GraftError, match=r"`quant_storage` \(--quant-storage\) = 'int4' is not one of uint8, "):
        cfg.validate()
    from export.config import GgufConfig
    from export.gguf import export_gguf

    gguf = GgufConfig(model=str(tmp_path / "m"), out=str(tmp_path / "x.gguf"))
    gguf.outtype = "q4"
    with pytest.raises(GraftError, match=r"`outtype` \(--outtype\) = 'q4' is not one of f32, f16, bf16, q8_0"):
        export_gguf(gguf)  # before the checkpoint is looked at
    assert workflows.cli.main(["export", "gguf", "--model", "m", "--out", str(tmp_path / "x.gguf"),
                               "--outtype", "q4"]) == 2
    assert "`outtype` (--outtype) = 'q4' is not one of f32, f16, bf16, q8_0" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.fault("missing setting", "error")
def test_a_pending_manifest_value_does_not_hide_another_unset_setting(tmp_path):
    """`model = "@pick#pick.path"` is known only when `pick` has run; the train stage's missing train_data is
    still reported when the file is read, and the pending model is not."""
    wf = tmp_path / "wf.toml"
    text = ('[workflow]\nname = "w"\n\n[pick]\nkind = "vocab.pick"\nscores = "s"\n\n'
            '[train]\nkind = "continual.train"\nmodel = "@pick#pick.path"\n')
    assert _load_error(wf, text) == (
        f"{wf}: invalid workflow:\n"
        '  [train] `train_data` is not set. Fix: put `train_data = "..."` in the TOML file or pass --train-data')
    wf.write_text(text + 'train_data = "d"\n')
    assert [s.name for s in load_workflow(wf).stages] == ["pick", "train"]
