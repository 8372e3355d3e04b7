"""The `graft` command: a thin layer that gathers each stage package's commands.

Each stage package has a `cli.py` with `register(groups)`; this module only builds the parser,
runs the chosen command and turns `GraftError` into a one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from common.cli import Groups
from common.errors import GraftError

# Order sets the order in `graft --help`.
_COMMAND_MODULES = ("vocab.cli", "analysis.cli", "embed_init.cli", "corpus.cli", "continual.cli",
                    "export.cli", "workflows.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graft",
        description="vocab-graft: grow an LLM's vocabulary for a new language, initialise the new "
                    "embeddings, prepare corpora and continue pretraining with QLoRA.\n"
                    "Run `graft COMMAND --help` for each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = Groups(top)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        ns._run(ns)
    except GraftError as e:
        print(f"graft: error: {e}", file=sys.stderr)
        return 2
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        print("graft: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
