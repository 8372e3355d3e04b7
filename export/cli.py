"""Commands of this package for `graft` (see common/cli.py): `graft export gguf`."""
from __future__ import annotations

from common.cli import Groups, command
from export.config import GgufConfig


def _run_gguf(cfg: GgufConfig) -> None:
    from export.gguf import export_gguf

    path = export_gguf(cfg)
    print(f"wrote {path}; run it with llama.cpp, e.g. llama-cli -m {path} -p 'text'")


def register(groups: Groups) -> None:
    command(groups, "export gguf", GgufConfig, _run_gguf)
