"""The `graft` command: a thin layer that gathers each stage package's commands.

Each stage package has a `cli.py` with `register(groups)`; this module only builds the parser,
runs the chosen command and turns `GraftError` into a one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from common.cli import Groups
from common.errors import GraftError, io_failure
from common.io import output_snapshot, settle_partial_output

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


# Commands that resume in place after a failure (their finished parts are kept).
_RESUMABLE = {"corpus prepare", "train", "vocab train"}


def _command_name(ns: argparse.Namespace) -> str:
    words = [ns.command]
    while (sub := getattr(ns, "_".join(words) + "_cmd", None)) is not None:
        words.append(sub)
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    out = getattr(ns, "out", None) if isinstance(getattr(ns, "out", None), str) else None
    before = output_snapshot(out)
    try:
        ns._run(ns)
    except OSError as e:  # a full disk, a read-only or failing filesystem: one clear message, no traceback
        name = _command_name(ns)
        state = settle_partial_output(out, before, resumable=name in _RESUMABLE)
        print(f"graft: error: {io_failure(e, out, state, what=f'graft {name}')}", file=sys.stderr)
        return 2
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
