"""Bad input from a user, and the one place where it becomes a one-line message and exit 2.

`UserError` is for what a user can fix (a config value, a path, a file); programmer misuse
raises ordinary exceptions (ValueError, TypeError) and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from msscale.logs import setup_logging


class UserError(Exception):
    """Bad input from the user (a config, a path, a file). The message names what is wrong."""


#: OS errors that come from the user's machine, not from a bug: a full disk or quota, a
#: read-only file system, a missing permission, a name too long, a directory where a file
#: is to be written (or the reverse).
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR)


def os_error_line(err: OSError) -> str:
    """'No space left on device: /run/counts.npz' (strerror and the file it concerns)."""
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    reason = err.strerror or str(err)
    return f"{reason}: {' -> '.join(names)}" if names else reason


def run_command(name: str, call: Callable[[], object], verbose: bool = False) -> int:
    """Run `call()` as a command: logging set up; a UserError, or an OS error of USER_ERRNOS
    (disk full, no permission, ...), becomes one line on stderr and exit 2."""
    setup_logging(verbose)
    try:
        call()
    except UserError as err:
        sys.stderr.write(f"{name}: error: {err}\n")
        return 2
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            raise
        sys.stderr.write(f"{name}: error: {os_error_line(err)}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
