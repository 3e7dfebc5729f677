"""Bad input from a user, and the one place where it becomes a one-line message and exit 2.

`UserError` is for what a user can fix (a config value, a path, a file); programmer misuse
raises ordinary exceptions (ValueError, TypeError) and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from msscale.logs import setup_logging


class UserError(Exception):
    """Bad input from the user (a config, a path, a file). The message names what is wrong."""


def run_command(name: str, call: Callable[[], object], verbose: bool = False) -> int:
    """Run `call()` as a command: logging set up, UserError -> one line on stderr and exit 2."""
    setup_logging(verbose)
    try:
        call()
    except UserError as err:
        sys.stderr.write(f"{name}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
