"""Commands of this stage for `graft` (see common/cli.py): vocab score, vocab pick, audit.

The config modules import nothing heavy at top level (numpy, sentencepiece, tokenizers and
matplotlib are imported inside the functions), so `graft --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses

from analysis.audit import AuditConfig, audit
from analysis.pick import PickConfig
from analysis.pick import run as run_pick
from analysis.score import ScoreConfig
from analysis.score import run as run_score
from common.cli import Groups, command, config_from_args


def _audit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", dest="tokenizer", action="extend", nargs="+", required=True,
                        metavar="PATH", help="a Hugging Face tokenizer folder, a tokenizer.json or a SentencePiece "
                                             ".model; repeat to compare (the first is the reference)")


def _audit_config(ns: argparse.Namespace) -> AuditConfig:
    return dataclasses.replace(config_from_args(AuditConfig, ns), tokenizers=list(ns.tokenizer))


def register(groups: Groups) -> None:
    command(groups, "vocab score", ScoreConfig, run_score, positional=("candidates_dir",))
    command(groups, "vocab pick", PickConfig, run_pick, positional=("scores_dir",))
    command(groups, "audit", AuditConfig, audit, extra_args=_audit_args, make_config=_audit_config)
