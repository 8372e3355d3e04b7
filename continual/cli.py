"""Commands of this stage for `graft` (see common/cli.py)."""
from common.cli import Groups


def register(groups: Groups) -> None:
    """Declare this package's commands; filled in by the stage's issue."""
