"""Paths a user names, checked before any work, and the lock that makes a run directory one run's.

- Inputs must be regular files: a FIFO is refused without being opened (opening one waits for
  a writer forever), a directory where a file is expected gets a message, not a traceback.
- Outputs must be writable places that are not one of the command's inputs, checked before
  anything is computed, so a typo in `out` costs one line, not a run.
- `run_lock` is an exclusive `fcntl.flock` on `<run dir>/.lock`, held by the command that
  writes a run directory (`msscale certify`, the array command, `msscale merge`), so two
  commands never write one directory at the same time.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from msscale.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` if it is a regular file (or a link to one); UserError naming `what` otherwise."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if not path.is_file():  # a directory, a FIFO, a device: never opened
        raise UserError(f"{what} {path} is not a regular file")
    return path


def _named(path: str | os.PathLike, what: str) -> Path:
    """Path('') is '.', so an empty name must be refused before it becomes a Path."""
    if not str(path).strip():
        raise UserError(f"{what} is empty: name a path")
    return Path(path)


def _writable_ancestor(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a directory this user may write in."""
    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {parent} is not writable")


def output_dir(path: str | os.PathLike, what: str) -> Path:
    """A directory to write into: not empty-named, not an existing file, writable."""
    path = _named(path, what)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory")
    _writable_ancestor(path, what)
    return path


def output_file(path: str | os.PathLike, what: str, inputs=()) -> Path:
    """A file to write: not empty-named, not a directory, writable, and none of `inputs`."""
    path = _named(path, what)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory")
    if path.exists() and not path.is_file():
        raise UserError(f"{what} {path} exists and is not a regular file")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise UserError(f"{what} {path} is the input {source}: it would be overwritten")
    _writable_ancestor(path.parent, what)
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


@contextmanager
def run_lock(out: str | os.PathLike, command: str, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive lock of run directory `out` (created if missing) for the block.

    Another holder makes this a UserError after `wait_s` seconds (naming the holder as it
    described itself). A run directory this call created and left holding nothing but the
    lock file is removed again, so a command that failed before any work leaves no trace.
    The lock is an advisory flock: on a file system without locks it is skipped, with a
    warning.
    """
    out = output_dir(out, "out")
    created = not out.exists()
    path = out / LOCK_NAME
    fd = _acquire(path, out, wait_s)
    try:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, f"{command} (pid {os.getpid()} on {socket.gethostname()})\n".encode())
        yield out
    finally:
        if fd is not None:
            if created and sorted(p.name for p in out.iterdir()) == [LOCK_NAME]:
                path.unlink()  # while still locked: a waiting opener retries (see _acquire)
                out.rmdir()
            os.close(fd)  # releases the lock


def _acquire(path: Path, out: Path, wait_s: float) -> int | None:
    """An fd holding the flock of `path`, or None where the file system has no locks."""
    deadline = time.monotonic() + wait_s
    while True:
        out.mkdir(parents=True, exist_ok=True)  # again, if a holder removed it (see run_lock)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise UserError(
                    f"{out} is in use by another command ({_holder(path)}); wait for it to "
                    "end, or use another out directory"
                ) from None
            time.sleep(0.2)
            continue
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                os.close(fd)
                raise
            log.warning("%s: the file system has no locks (%s); not locking", out, err.strerror)
            os.close(fd)
            return None
        # The holder may have removed the file before we locked it: then our lock is on a
        # file nobody else will open, so start again on the current one.
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"
