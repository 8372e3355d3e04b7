"""Commands of this stage for `graft` (see common/cli.py): `graft embed init` and `graft embed check`."""
from common.cli import Groups, command
from embed_init.config import EmbedCheckConfig, EmbedInitConfig


def _run_init(cfg: EmbedInitConfig) -> None:
    from embed_init.grow import grow_embeddings

    out = grow_embeddings(cfg)
    print(f"wrote {out} (see {out}/manifest.json); check it with: graft embed check {out} --model {cfg.model}")


def _run_check(cfg: EmbedCheckConfig) -> None:
    from embed_init.check import check_grown

    result = check_grown(cfg)
    for name, r in result["checks"].items():
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {name}: {r['detail']}")
    print(f"all checks passed; wrote {cfg.out}/check.json")


def register(groups: Groups) -> None:
    command(groups, "embed init", EmbedInitConfig, _run_init)
    command(groups, "embed check", EmbedCheckConfig, _run_check, positional=("out",))
