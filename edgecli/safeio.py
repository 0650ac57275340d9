"""The one guarded opener and the one bounded reader for every path a user hands edgecli.

A path from a config, a command line or a stdin request may name a FIFO (``open`` blocks until a
writer comes), a device (``/dev/zero`` never ends), a directory, or a file far larger than anything
edgecli reads. ``open_user_file`` opens with ``O_NONBLOCK`` (so opening a FIFO returns at once), then
``fstat``s the open descriptor (no race between check and use) and refuses anything that is not a
regular file or that is over the caller's size limit; ``read_user_bytes`` / ``read_user_text`` also
stop reading at the limit in case the file grows while it is read. Every refusal is one line of the
caller's error kind (config error, usage error, data error), naming the path.

Also here: temporary directories named after the process that made them, so the next run removes
what a killed (SIGKILLed) run left under ``$TMPDIR``, and ``one_line`` for printing user-given names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

from edgecli.errors import DataError, EdgeError

MiB = 1 << 20
# A pipeline config is a few KB; a results.json keeps every timed latency (a few MB for long runs).
CONFIG_LIMIT = 4 * MiB
BASELINE_LIMIT = 256 * MiB
INPUT_LIMIT = 256 * MiB  # one infer input file (.csv, .npy, image, text)
IMAGE_PIXEL_LIMIT = 64_000_000  # decoded pixels of one image (a 64 MP photo decodes to ~190 MB RGB)


def _fmt(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n} bytes"


def shown(path: str | os.PathLike) -> str:
    """A user-given path or name as it may appear in a one-line message (newlines escaped)."""
    return one_line(str(path))


def one_line(text: str) -> str:
    """``text`` with control characters escaped, so a hostile name cannot forge extra output lines."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def open_user_file(path: str | os.PathLike, what: str, limit: int, error: type[EdgeError] = DataError):
    """Open a user's file for binary reading: a regular file of at most ``limit`` bytes, or ``error``.

    Never blocks: ``O_NONBLOCK`` makes opening a FIFO return at once, and ``fstat`` on the open
    descriptor then refuses it (and devices, sockets, directories) before anything is read.
    """
    name = shown(path)
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except IsADirectoryError:
        raise error(f"{name}: is a directory, expected {what}") from None
    except PermissionError:
        raise error(f"{name}: permission denied") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a FIFO opened for writing with no reader
            raise error(f"{name}: not a regular file (FIFO, device or socket); refused") from None
        raise error(f"{name}: cannot open ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{name}: is a directory, expected {what}")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{name}: not a regular file (FIFO, device or socket); refused, it could block or never end")
        if st.st_size > limit:
            raise error(f"{name}: {_fmt(st.st_size)}, over the {_fmt(limit)} limit for {what}; refused")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_user_bytes(path: str | os.PathLike, what: str, limit: int, error: type[EdgeError] = DataError) -> bytes:
    """The whole file, read through ``open_user_file``, never more than ``limit`` bytes."""
    with open_user_file(path, what, limit, error) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{shown(path)}: cannot read ({e.strerror or type(e).__name__})") from None
    if len(data) > limit:
        raise error(f"{shown(path)}: over the {_fmt(limit)} limit for {what} (it grew while being read); refused")
    return data


def read_user_text(path: str | os.PathLike, what: str, limit: int, error: type[EdgeError] = DataError) -> str:
    """``read_user_bytes`` decoded as UTF-8 (a BOM is dropped); undecodable bytes are ``error``."""
    data = read_user_bytes(path, what, limit, error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{shown(path)}: not a UTF-8 text file, expected {what}") from None


# --------------------------------------------------------------------------- temporary directories

TMP_PREFIX = "edgecli-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_stale_temp(root: str | os.PathLike | None = None) -> list[str]:
    """Remove ``edgecli-<kind>-<pid>-*`` directories of this user whose process is gone.

    Only real directories (never links) owned by this user, named by ``temp_dir``, whose pid is no
    longer running: a run killed with SIGKILL could not clean its own.
    """
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    uid = os.getuid()
    for e in entries:
        if not e.name.startswith(TMP_PREFIX):
            continue
        parts = e.name.split("-")
        if len(parts) < 4 or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            st = os.lstat(e.path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.path)
    return removed


@contextlib.contextmanager
def temp_dir(kind: str):
    """A private temporary directory ``edgecli-<kind>-<pid>-XXXX``, removed on exit.

    The pid in the name lets the next run remove it should this process be killed before cleaning
    up (``clean_stale_temp``, called here first).
    """
    clean_stale_temp()
    d = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{kind}-{os.getpid()}-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
