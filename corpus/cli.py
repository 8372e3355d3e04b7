"""Commands of the corpus stage for `graft` (see common/cli.py): add, list, count, prepare, mix."""
from __future__ import annotations

from common.cli import Groups, command


def register(groups: Groups) -> None:
    from corpus.count import CountConfig, count
    from corpus.mix import MixConfig, mix
    from corpus.prepare import PrepareConfig, prepare
    from corpus.registry import AddConfig, ListConfig, add, list_datasets

    command(groups, "corpus add", AddConfig, add, positional=("name",))
    command(groups, "corpus list", ListConfig, list_datasets)
    command(groups, "corpus count", CountConfig, count, positional=("name",))
    command(groups, "corpus prepare", PrepareConfig, prepare, positional=("name",))
    command(groups, "corpus mix", MixConfig, mix, positional=("spec",))
