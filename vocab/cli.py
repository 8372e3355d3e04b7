"""Commands of this stage for `graft` (see common/cli.py). Heavy imports stay inside the run functions."""
from common.cli import Groups, command
from vocab.bytelevel_stages import ConvertConfig
from vocab.check import CheckConfig
from vocab.merge import VocabMergeConfig
from vocab.train import VocabTrainConfig


def _train(cfg: VocabTrainConfig) -> None:
    from common.io import read_manifest
    from vocab.train import train_candidates

    out = train_candidates(cfg)
    m = read_manifest(out)
    c = m["counts"]
    print(f"wrote {c['candidates']} candidates from {c['trainings']} trainings "
          f"({c['lines_sampled']} lines sampled of {c['lines_seen']}) to {out}/candidates")


def _merge(cfg: VocabMergeConfig) -> None:
    from common.io import read_manifest
    from vocab.merge import merge_into_base

    out = merge_into_base(cfg)
    m = read_manifest(out)
    c = m["counts"]
    if m.get("kind") == "bytelevel":
        print(f"wrote {out}: {c['vocab_size']} ids = {c['base_vocab_size']} base + {c['added_total']} added tokens "
              f"(merges appended after the base's {c['base_merges']}) + {c['special_added']} special; skipped "
              f"{c['duplicates']} duplicates, {c['not_target_script']} without the target script, "
              f"{c['missing_part']} with a skipped part; all added tokens reachable")
        return
    print(f"wrote {out}: {c['vocab_size']} pieces = {c['base_pieces']} base + {c['added_total']} added "
          f"({c['added_merges']} merges, {c['added_chars']} characters, {c['added_intermediates']} intermediates) "
          f"+ {c['special_added']} special; skipped {c['duplicates']} duplicates, "
          f"{c['not_target_script']} without the target script, {c['needs_missing_non_target_char']} needing "
          "a non-target character the base lacks; all added pieces reachable")


def _convert(cfg: ConvertConfig) -> None:
    from common.io import read_manifest
    from vocab.bytelevel_stages import convert_base

    out = convert_base(cfg)
    c = read_manifest(out)["counts"]
    print(f"wrote {out}: {c['vocab_size']} ids ({c['special_tokens']} special + {c['regular_tokens']} byte-level BPE "
          f"tokens, {c['merges']} merges)")


def _check(cfg: CheckConfig) -> None:
    from vocab.check import run_check

    run_check(cfg)


def register(groups: Groups) -> None:
    command(groups, "vocab train", VocabTrainConfig, _train, positional=("inputs",))
    command(groups, "vocab merge", VocabMergeConfig, _merge)
    command(groups, "vocab check", CheckConfig, _check, positional=("tokenizer",))
    command(groups, "vocab convert", ConvertConfig, _convert, positional=("source",))
