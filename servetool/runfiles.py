"""The run folder's own files: a folder only its user may enter (0700), state and key files only its
user may read (0600), and the lifecycle lock, which never hangs.

Every file servetool keeps in a run folder (deployed.json, watch-state.json, canary.json,
server.json, the helpers' supervisor.json and watcher.json, lifecycle.lock) is written here, so
that no other local user can read a key, rewrite what a restart restores, or hold the lock that
every change to a deployment takes (a read-only descriptor is enough for flock: a world-readable
lock file let any user stop `deploy`, `scale`, the watcher and crash restore).

The lock is taken without blocking, in a loop with a deadline (SERVETOOL_LOCK_TIMEOUT_S, 60 s by
default), saying which process holds it; a lock file that another user owns, or that is not a
regular file (a symbolic link planted in the folder), is refused at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from servetool.errors import ServetoolError

FOLDER_MODE = 0o700
FILE_MODE = 0o600
LOCK_TIMEOUT_ENV = "SERVETOOL_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 60.0
LOCK_POLL_S = 0.1
LOCK_REPORT_EVERY_S = 10.0
# the locks this process holds, by file (device, inode): the thread that holds each
_held: dict[tuple[int, int], int] = {}


class RunFileError(ServetoolError):
    """A run folder's file that servetool must not use (another user's, a link, not a file)."""


class LockBusy(ServetoolError):
    """The lock was held by another process for longer than the deadline (a temporary failure)."""


def private_folder(path: Path) -> Path:
    """The run folder, created 0700; an existing one of this user's is set to 0700 too."""
    path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_mode & stat.S_ISVTX:
        raise RunFileError(f"{path} is a shared folder (its sticky bit is set, like /tmp's): a run "
                           "folder must be servetool's own; give a folder of its own with --run-dir")
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) != FOLDER_MODE:
        path.chmod(FOLDER_MODE)
    return path


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    """A descriptor of a file of this user's, 0600 (created so; an existing one tightened),
    never through a symbolic link; another user's file or anything but a regular file is refused."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunFileError(f"{path} is a symbolic link, which servetool does not follow in a run "
                               f"folder (another user may have planted it): remove it (`rm {path}`) "
                               "and run the command again") from None
        if exc.errno == errno.EISDIR:
            raise RunFileError(f"{path} is a folder, not a file: remove it and run the command "
                               "again") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RunFileError(f"{path} is not a regular file: remove it (`rm {path}`) and run the "
                               "command again")
        if info.st_uid != os.getuid():
            raise RunFileError(
                f"{path} belongs to {owner_name(info.st_uid)} (uid {info.st_uid}), not to "
                f"{owner_name(os.getuid())} who runs servetool: another user could read it, or hold "
                f"the lock and stop every change to this deployment. Check who made it, then "
                f"remove it (`rm {path}`) or use a run folder of your own (--run-dir)")
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: str | bytes) -> None:
    """Write a file atomically, readable by this user only: a new 0600 file beside it (O_EXCL,
    never through a link) renamed over it, so a reader sees the old content or the new."""
    payload = data.encode() if isinstance(data, str) else data
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        raise


def lock_timeout_s() -> float:
    """The longest wait for the lock: SERVETOOL_LOCK_TIMEOUT_S, else 60 s."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        raise ServetoolError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def _recorded_pid(fd: int) -> int | None:
    """The pid the holder wrote into the lock file, if it is alive."""
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _alive(pid) else None


def _locks_pid(fd: int) -> int | None:
    """The holder of an flock on this file, from /proc/locks (a servetool that wrote no pid)."""
    info = os.fstat(fd)
    ident = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident:
            with contextlib.suppress(ValueError):
                return int(fields[4]) or None
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_pid(pid: int | None) -> str:
    if pid is None:
        return "another process"
    try:
        command = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(
            errors="replace").replace("\0", " ").split())
    except OSError:
        command = ""
    return f"pid {pid}" + (f" ({command[:120]})" if command else "")


@contextlib.contextmanager
def exclusive(path: Path, *, timeout_s: float | None = None,
              say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a 0600 file of this user's) for the block; waits at most
    `timeout_s` (default: lock_timeout_s()) for another process to let go, then LockBusy."""
    say = say or (lambda message: print(message, file=sys.stderr, flush=True))
    timeout_s = lock_timeout_s() if timeout_s is None else timeout_s
    fd = open_private(path, os.O_RDWR | os.O_CREAT)
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino)
    acquired = False
    try:
        if _held.get(key) == threading.get_ident():
            raise ServetoolError(f"{path} is already held by this very thread (a lock taken twice "
                                 "would wait for itself): this is a bug in servetool")
        started = time.monotonic()
        reported = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                acquired = True
                break
            except BlockingIOError:
                pass
            holder = _recorded_pid(fd) or _locks_pid(fd)
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise LockBusy(
                    f"{path} is held by {describe_pid(holder)}, still after {waited:.0f} s: another "
                    f"servetool command or the watcher is changing this deployment. Try again when "
                    f"it is done; if that process hangs, end it. Nothing was changed "
                    f"({LOCK_TIMEOUT_ENV} sets how long to wait)")
            if reported is None or time.monotonic() - reported >= LOCK_REPORT_EVERY_S:
                who = f"pid {holder}" if holder else "another process"
                say(f"waiting for the lock held by {who} ({path}; {waited:.0f} of at most "
                    f"{timeout_s:.0f} s)")
                reported = time.monotonic()
            time.sleep(min(LOCK_POLL_S, max(0.0, timeout_s - waited)))
        # who holds it, for those who wait (the file is this user's alone: only it can read it)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = threading.get_ident()
        yield
    finally:
        if acquired:
            _held.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a stale pid would name the wrong holder to the next waiter
        os.close(fd)  # releases the lock
