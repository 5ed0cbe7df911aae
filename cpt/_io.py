"""Everything cpt writes, and how it reads it back: whole folders swapped in at once.

Writing (`write_folder`): the folder is built under a temporary sibling ``.<name>.tmp-<id>``,
every file and folder in it flushed to disk, then exchanged with the old folder in one
``renameat2(RENAME_EXCHANGE)`` call, so the path holds the complete old folder or the complete
new one at every instant, never a mix and never nothing; the old folder (now at the temporary
name) is then deleted. Where the exchange is not supported (another OS, a file system without
it) the old folder is renamed aside to ``.<name>.old-<id>`` and the new one renamed in, and
`open_folder` bridges the instant between the two renames. Writers of folders that share a
parent hold a lock on that parent (`locked`: ``flock`` on the folder on POSIX, ``msvcrt.locking``
on a ``.cpt.lock`` file in it on Windows; both released by the OS when the holder dies, so no
owner is ever stale), waiting at most `LOCK_TIMEOUT` seconds; two writers never interleave, and
a writer deletes only its own temporary folder plus those of writers that died (found under the
lock, when no other writer can be running). Files get mode 0666 and folders 0777, less the umask.
`check_target` says up front whether a folder can be written, so callers can refuse a bad output
before hours of training.

Reading (`open_folder`): where the OS opens files relative to a folder descriptor (POSIX), all
files are read through one descriptor of the folder, so they come from one save even if a writer
swaps the folder meanwhile; elsewhere (Windows) they are read by path, and a read during which the
folder at the path changed is run again. A read that fails because the folder was swapped under
it (a file deleted with the old folder) is retried on the new folder.

No OS-specific module is needed to import this one: ``fcntl`` and ``msvcrt`` are used where present.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import signal
import stat
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

try:  # POSIX
    import fcntl
except ImportError:
    fcntl = None  # type: ignore[assignment]
try:  # Windows
    import msvcrt
except ImportError:
    msvcrt = None  # type: ignore[assignment]

from cpt.warning import CPTWarning

T = TypeVar("T")

TMP_TAG = "tmp"  # .<name>.tmp-<pid>-<hex>: a folder being built (or, after the swap, the old one)
OLD_TAG = "old"  # .<name>.old-<pid>-<hex>: the old folder, moved aside (fallback swap only)
READ_ATTEMPTS = 8  # a reader retries this often when the folder is swapped under it
SWAP_WAITS = 3  # a reader that finds no folder waits this often for a fallback swap to end ...
SWAP_WAIT = 0.01  # ... seconds, doubled each time, before it reads the folder moved aside
_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h)
_AT_FDCWD = -100
LOCK_TIMEOUT = 60.0  # seconds a writer waits for another writer of the same parent folder
LOCK_FILE = ".cpt.lock"  # the lock where a folder cannot be opened to lock it (Windows)
_LOCK_POLL = 0.05  # seconds between tries of a held lock
# Folder descriptors: read every file of a folder through one descriptor (POSIX; not Windows).
DIR_FDS = (
    hasattr(os, "O_DIRECTORY") and {os.open, os.stat} <= os.supports_dir_fd and os.listdir in os.supports_fd
)
_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
# Windows flushes a file only through a descriptor open for writing.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _BINARY  # a FIFO's open must not wait for a writer
_READ_CHUNK = 2**20  # bytes read at a time from a file that grew while read
_SYNC_FLAGS = os.O_RDONLY if os.name == "posix" else os.O_RDWR | _BINARY


# ---------------------------------------------------------------------- modes


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of the files cpt writes: 0666 less the umask (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """Mode of the folders cpt writes: 0777 less the umask (0755 under the usual 022)."""
    return 0o777 & ~_umask()


# ---------------------------------------------------------------------- files


def write_bytes(path: str | Path, data: bytes) -> None:
    """Writes a file inside a folder that `write_folder` is building (flushed by it)."""
    Path(path).write_bytes(data)


def write_json(path: str | Path, data: Any) -> None:
    """Writes ``data`` as indented JSON inside a folder that `write_folder` is building."""
    write_bytes(path, json_bytes(data))


def json_bytes(data: Any) -> bytes:
    """``data`` as the JSON text cpt writes (sorted keys, indented, no NaN)."""
    return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def fsync_folder(path: str | Path) -> None:
    """Flushes a folder's entries (new names, renames) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. file systems that cannot sync a folder
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- folders


def sibling_names(target: Path, tag: str) -> list[Path]:
    """The ``.<name>.<tag>-*`` entries next to ``target``."""
    prefix = f".{target.name}.{tag}-"
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return sorted(target.parent / n for n in names if n.startswith(prefix))


@contextmanager
def locked(folder: Path) -> Iterator[bool]:
    """Holds an exclusive lock on ``folder`` (which must exist) for the block.

    The lock is ``flock`` on the folder itself where ``fcntl`` exists, else ``msvcrt.locking``
    on the file `LOCK_FILE` in it; either is released by the OS when its holder dies. Yields
    whether the lock is held: False (with a warning) where the file system has no locks.

    Raises:
        TimeoutError: if another process holds the lock for `LOCK_TIMEOUT` seconds.
        ValueError: if ``folder`` cannot be opened (e.g. it is not readable).
    """
    try:
        fd = _lock_handle(folder)
    except OSError as error:
        raise ValueError(f"cannot lock the folder {folder}: {error.strerror or error}") from None
    held = False
    try:
        held = _wait_for_lock(fd, folder)
        yield held
    finally:
        if held and fcntl is None and msvcrt is not None:
            _unlock_msvcrt(fd)
        os.close(fd)  # releases the lock


def _lock_handle(folder: Path) -> int:
    if fcntl is not None:
        return os.open(folder, os.O_RDONLY)  # the folder itself: nothing is left in it
    return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | _BINARY, file_mode())


def _wait_for_lock(fd: int, folder: Path) -> bool:
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            if _try_lock(fd):
                return True
        except OSError as error:  # e.g. a network file system without locks
            warnings.warn(
                f"cannot lock {folder} ({error.strerror or error}); writing without the lock", CPTWarning, stacklevel=4
            )
            return False
        if time.monotonic() >= deadline:
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"another process has held the lock on the folder {folder} for {LOCK_TIMEOUT:g} s "
                "(a save into it still running?); try again when it is done",
            )
        time.sleep(_LOCK_POLL)


def _try_lock(fd: int) -> bool:
    """Takes the lock without waiting; False if another holder has it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # the file's first byte
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EDEADLK):  # held by another
                return False
            raise
        return True
    raise OSError(errno.ENOLCK, "this system offers no file locks")


def _unlock_msvcrt(fd: int) -> None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass  # closing releases it too


def check_target(target: str | Path) -> Path:
    """Checks, before anything is written, that `write_folder` can create or replace ``target``.

    Callers that write at the end of a long run (training) call this first, so a bad path is
    refused before the work rather than after it.

    Returns:
        ``target``, a link to a folder resolved to the folder.

    Raises:
        ValueError: ``cannot write <target>: ...``: the path names no folder of its own (``''``,
            ``.``, ``..``, a root), it or a parent is a file, the folder to write in is not
            readable or writable, or the old folder holds entries this user cannot delete.
    """
    target = Path(target)
    if target.name in ("", ".."):
        raise ValueError(
            f"cannot write {str(target)!r}: it names no folder of its own; give one, such as {target / 'adapter'}"
        )
    if os.path.islink(target):
        target = Path(os.path.realpath(target))
    existing = target
    while not os.path.lexists(existing) and existing != existing.parent:  # lexists: False also
        existing = existing.parent  # where a parent cannot be searched
    if not os.path.isdir(existing):
        culprit = "it" if existing == target else existing
        raise ValueError(f"cannot write {target}: {culprit} {_not_a_folder(existing)}")
    folder = target.parent if existing == target else existing  # where the new folder is made
    problem = _access_problem(folder)
    if problem:
        raise ValueError(f"cannot write {target}: the folder {folder} {problem}")
    if existing == target:
        stuck = _undeletable(target)
        if stuck:
            raise ValueError(
                f"cannot write {target}: the old folder cannot be replaced, as this user cannot delete "
                f"what is in {stuck}; remove it, or write elsewhere"
            )
    return target


def _not_a_folder(path: Path) -> str:
    """What ``path``, which exists but is no folder, is instead: the end of a refusal."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:  # a link in a loop
        return f"is a link that leads to no folder ({error.strerror or error})"
    return "is a file, not a folder" if stat.S_ISREG(mode) else "is not a folder (a FIFO, socket or device)"


def _access_problem(folder: Path) -> str | None:
    if not os.access(folder, os.R_OK | os.X_OK):
        return "is not readable by this user"
    if not os.access(folder, os.W_OK):
        return "is not writable by this user"
    return None


def _undeletable(folder: Path) -> Path | None:
    """The first folder under ``folder`` (itself included) whose entries this user cannot delete."""
    unlisted: list[OSError] = []  # folders that cannot be listed
    for root, _, _ in os.walk(folder, onerror=unlisted.append):
        if not os.access(root, os.W_OK | os.X_OK) and not _mine(root):  # the owner may open it up
            return Path(root)
    return next((Path(e.filename) for e in unlisted if not _mine(e.filename)), None)


def _mine(path: str | Path) -> bool:
    """Whether this user owns ``path`` (so may change its mode); True where the OS has no owners."""
    if not hasattr(os, "geteuid"):
        return True
    try:
        return os.stat(path).st_uid == os.geteuid()
    except OSError:
        return False


def write_folder(
    target: str | Path,
    fill: Callable[[Path], None],
    *,
    keep: Callable[[str], bool] | None = None,
    if_missing: bool = False,
) -> Path:
    """Creates or replaces the folder ``target`` as a whole with what ``fill`` writes.

    Args:
        target: the folder; its parent is created if needed.
        fill: called with an empty temporary folder to write the new content into (plain
            writes: flushing, modes and the swap are done here).
        keep: if given, the names of entries of the old folder to carry over into the new one
            (hard links where possible), e.g. files of other tools kept beside an adapter.
        if_missing: leave an existing ``target`` as it is and write nothing (``fill`` is not
            called), e.g. a cache another process has just built; decided under the lock.

    Returns:
        ``target``.

    Raises:
        ValueError: what `check_target` refuses, checked before anything is written.
        TimeoutError: if another writer holds the parent's lock for `LOCK_TIMEOUT` seconds.
        OSError: if writing fails; ``target`` is then as it was and no temporary folder is left.
    """
    if if_missing and os.path.isdir(target):
        return Path(target)  # e.g. a shared cache: used as it is, even where it cannot be written
    target = check_target(target)
    _make_parents(target.parent)
    with locked(target.parent) as held:
        recover(target)
        if held:  # no live writer holds the lock we hold: these are dead writers' leftovers
            for stale in sibling_names(target, TMP_TAG) + sibling_names(target, OLD_TAG):
                _remove(stale)
        if if_missing and os.path.lexists(target):
            return target
        tmp = target.parent / f".{target.name}.{TMP_TAG}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            os.mkdir(tmp)
            fill(tmp)  # may take long (a model's conversion): an interrupt stops it
            with interrupts_held():  # the swap, once begun, ends: no folder aside, no temp left
                if keep is not None and target.is_dir():
                    _carry_over(target, tmp, keep)
                _seal(tmp)
                _swap_in(tmp, target)
                fsync_folder(target.parent)
        except OSError as error:  # a full disk, a read-only folder: say where
            raise _write_error(target, error) from error
        finally:
            with interrupts_held():
                _remove(tmp)  # the unfinished new folder, or after the swap the old one
    return target


def _write_error(target: Path, error: OSError) -> OSError:
    """``cannot write <target>: <the OS's reason>``, keeping ``errno``; the reason of a nested
    write (a checkpoint's adapter) is the OS's, not that write's message about its temporary folder."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    kind = type(OSError(error.errno, reason)) if error.errno else OSError  # PermissionError for EACCES ...
    wrapped = kind(f"cannot write {target}: {reason}")  # one argument: printed without "[Errno n]"
    wrapped.errno = error.errno
    return wrapped


HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Holds `HELD_SIGNALS` (Ctrl-C, ``kill``) until the block ends, then delivers them.

    So a save's swap and its clean-up finish before an interrupt acts, and leave no temporary
    folder behind. Only Python-level handlers can be held, and only in the main thread; elsewhere
    the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    for number in HELD_SIGNALS:
        if signal.getsignal(number) is not None:  # None: a handler set outside Python, left alone
            previous[number] = signal.signal(number, lambda got, frame: caught.append(got))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)  # now the restored handler acts (KeyboardInterrupt ...)


def recover(target: Path) -> None:
    """Puts the old folder back if a fallback swap died between its two renames.

    Only then is ``target`` missing while an ``.old-`` sibling exists; ``.tmp-`` folders may be
    incomplete and are never used. Call with the parent's lock held.
    """
    if os.path.lexists(target):
        return
    aside = sibling_names(target, OLD_TAG)
    if aside:
        os.rename(max(aside, key=lambda p: p.stat().st_mtime), target)


def _make_parents(folder: Path) -> None:
    """Creates ``folder`` and its missing parents (`check_target` has ruled out a file in the way)."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)


def _remove(path: Path) -> None:
    """Deletes ``path`` (a folder with all it holds); warns, naming it, if it cannot."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):  # e.g. a sub-folder without write permission: ours to open up
            _open_up(path)
            shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass
    if os.path.lexists(path):
        warnings.warn(f"cannot delete {path}; delete it by hand", CPTWarning, stacklevel=3)


def _open_up(folder: str | Path) -> None:
    """Gives the owner full access to ``folder`` and the folders under it, so they can be deleted."""
    try:
        os.chmod(folder, stat.S_IRWXU)
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _open_up(entry.path)


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    for entry in os.scandir(old):
        if not keep(entry.name) or os.path.lexists(new / entry.name):
            continue
        source = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(source, new / entry.name, symlinks=True)
            continue
        try:
            os.link(source, new / entry.name, follow_symlinks=False)
        except (OSError, NotImplementedError):  # no hard links here, or (Windows) not of a link
            shutil.copy2(source, new / entry.name, follow_symlinks=False)


def _seal(folder: Path) -> None:
    """Sets modes by the umask and flushes every file and folder under ``folder`` to disk."""
    files, folders = file_mode(), folder_mode()
    for root, dirs, names in os.walk(folder, topdown=False):
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            if stat.S_IMODE(os.lstat(path).st_mode) != files:
                os.chmod(path, files)
            fd = os.open(path, _SYNC_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(root, folders)
        fsync_folder(root)


def _swap_in(new: Path, target: Path) -> None:
    """Makes ``new`` appear at ``target``; afterwards ``new`` names the old folder, if any."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):
        return
    aside = target.parent / f".{target.name}.{OLD_TAG}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, new)  # so the caller's clean-up deletes it


_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the entries ``a`` and ``b`` atomically; False where the OS or file system cannot."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            function = libc.renameat2
            function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
            _renameat2 = function
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


# ---------------------------------------------------------------------- reading


class Folder:
    """Read access to the files of one folder: through one descriptor (so, from one save) where
    the OS allows (`DIR_FDS`), else by path (`open_folder` then checks the folder stayed put)."""

    def __init__(self, path: Path, fd: int | None, opened: list[int] | None = None, at: Path | None = None) -> None:
        self.path = path  # the name in messages
        self._fd = fd
        self._at = path if at is None else at  # where it is read from without a descriptor
        self._opened = [] if opened is None else opened  # sub-folder descriptors, closed with this one

    def names(self) -> list[str]:
        """The entries of the folder, sorted."""
        return sorted(os.listdir(self._at if self._fd is None else self._fd))

    def _mode(self, name: str) -> int:
        if self._fd is None:
            return os.lstat(self._at / name).st_mode
        return os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode

    def is_file(self, name: str) -> bool:
        try:
            return stat.S_ISREG(self._mode(name))
        except FileNotFoundError:
            return False

    def is_dir(self, name: str) -> bool:
        try:
            return stat.S_ISDIR(self._mode(name))
        except FileNotFoundError:
            return False

    def read_bytes(self, name: str, what: str, limit: int) -> bytes:
        """The bytes of the file ``name``, checked against ``limit`` before any is read.

        Raises:
            ValueError: ``<what> missing: <path>`` if it is not a regular file, or
                ``<what> <path> is larger than ...`` if it holds more than ``limit`` bytes.
            FileNotFoundError: if it vanished between the check and the read (a swap).
        """
        if not self.is_file(name):
            raise ValueError(f"{what} missing: {self.path / name}")
        flags = _READ_FLAGS | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self._at / name, flags) if self._fd is None else os.open(name, flags, dir_fd=self._fd)
        return _read_regular(fd, self.path / name, what, limit)

    def read_json(self, name: str, what: str, limit: int) -> dict[str, Any]:
        """The JSON object in the file ``name``.

        Raises:
            ValueError: ``cannot read <what> <path>: ...`` or ``<what> <path> does not hold a
                JSON object``.
        """
        raw = self.read_bytes(name, what, limit)
        return parse_json_object(raw, self.path / name, what)

    def folder(self, name: str) -> Folder:
        """The sub-folder ``name`` (its descriptor is closed with this one's `open_folder`)."""
        if not self.is_dir(name):
            raise ValueError(f"{self.path / name} is missing or not a folder")
        if self._fd is None:
            return Folder(self.path / name, None, self._opened, self._at / name)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self._fd)
        self._opened.append(fd)
        return Folder(self.path / name, fd, self._opened)


def read_file(path: str | Path, what: str, limit: int) -> bytes:
    """The bytes of the regular file at ``path`` (links followed), at most ``limit`` of them.

    The file is opened without blocking and checked through its descriptor, so that a FIFO, a
    device or ``/dev/stdin`` is refused rather than waited on or read without end, even when one
    replaces the file between a caller's look and the open.

    Raises:
        ValueError: ``<what> <path> ...`` naming the problem: missing, a folder, not a regular
            file, larger than ``limit`` bytes, or unreadable (with the OS's reason).
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not a file") from None
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {_refusal(path, error)}") from None
    try:
        return _read_regular(fd, Path(path), what, limit)
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from None


def _read_regular(fd: int, path: Path, what: str, limit: int) -> bytes:
    """Reads the open ``fd`` (closing it) if it is a regular file of at most ``limit`` bytes."""
    _check_regular(fd, path, what)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ValueError(f"{what} {path} is larger than it can be: {size} bytes, at most {limit} expected")
        data = f.read(size + 1)  # read(n) sets n bytes aside first: the size, not the limit
        while size < len(data) <= limit and (more := f.read(min(_READ_CHUNK, limit + 1 - len(data)))):
            data += more  # a file that grew meanwhile is read on, up to the limit ...
    if len(data) > limit:  # ... and refused past it
        raise ValueError(f"{what} {path} is larger than it can be: more than {limit} bytes")
    return data


def _check_regular(fd: int, path: Path, what: str) -> None:
    """Closes ``fd`` and raises ValueError naming what it is, unless it is a regular file."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {path} is a folder, not a file")
    raise ValueError(f"{what} {path} is not a regular file (a FIFO, socket or device cannot be read)")


MAX_INT_DIGITS = 4300
"""The longest integer JSON text may hold (digits): Python's own limit for turning one into a string."""


def strict_json(text: str, advice: str = "") -> Any:
    """The JSON value in ``text``, read strictly: ``json.loads`` alone would take ``NaN`` and
    ``Infinity``, read ``1e400`` as infinity, and keep only the last of a key given twice.

    Args:
        text: the JSON text.
        advice: added to the refusal of a constant or a number (a data file's "; quote it to keep
            it as a label").

    Raises:
        json.JSONDecodeError: for text that is not JSON.
        ValueError: naming the value refused (``RecursionError`` for nesting too deep is left as it is).
    """
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not valid JSON (JSON has no NaN or Infinity{advice})")

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise ValueError(f"the number {number[:40]} is beyond a float's range{advice}")
        return value

    def bounded(number: str) -> int:
        digits = len(number.lstrip("-"))
        if digits > MAX_INT_DIGITS:
            raise ValueError(f"an integer of {digits} digits is too long{advice}")
        return int(number)

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the key {json.dumps(key)} is given more than once")
            seen.add(key)
        return dict(pairs)

    return json.loads(text, parse_constant=refuse, parse_float=finite, parse_int=bounded, object_pairs_hook=unique)


def parse_json_object(raw: bytes, path: Path, what: str) -> dict[str, Any]:
    """Parses ``raw`` as a JSON object (`strict_json`: no NaN, no key twice; bounded nesting)."""
    try:
        data = strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"cannot read {what} {path}: {type(error).__name__}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} does not hold a JSON object")
    return data


def open_folder(path: str | Path, read: Callable[[Folder], T], what: str) -> T:
    """Runs ``read`` on the folder ``path``, seeing a single save of it.

    If ``read`` fails (ValueError, OSError) and the folder was swapped meanwhile, it is run
    again on the new folder; without folder descriptors (`DIR_FDS`), so is a read that succeeded
    while the folder changed. A fallback swap caught between its two renames is waited for; if
    it stays there (its writer died), the complete old folder it moved aside is read.

    Raises:
        ValueError: ``no <what> folder at <path>`` (or ``<path> is a file``), or what ``read`` raised on an unchanged
            folder (an OSError turned into ``cannot read <what> <path>: ...``).
    """
    path = Path(path)
    source = path
    for attempt in range(READ_ATTEMPTS):
        try:
            before = os.stat(source)
            if not stat.S_ISDIR(before.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(source))
            fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY) if DIR_FDS else None
        except (FileNotFoundError, NotADirectoryError):
            aside = sibling_names(path, OLD_TAG)
            if not aside or source != path:
                if os.path.isfile(path):
                    raise ValueError(f"{path} is a file, but {what}s are saved as folders") from None
                raise ValueError(f"no {what} folder at {path}") from None
            if attempt < SWAP_WAITS:
                time.sleep(SWAP_WAIT * 2**attempt)  # a fallback swap between its two renames
            else:  # its writer died there: the folder moved aside is the complete old one
                source = max(aside, key=lambda p: p.stat().st_mtime)
            continue
        except OSError as error:
            raise ValueError(f"cannot read {what} {path}: {_refusal(source, error)}") from None
        if fd is not None:
            before = os.fstat(fd)  # the folder read, even if swapped since the stat
        folder = Folder(path, fd, at=source)
        try:
            result = read(folder)
        except (ValueError, OSError) as error:
            if _same_folder(source, before) or attempt + 1 == READ_ATTEMPTS:
                if isinstance(error, ValueError):
                    raise
                raise ValueError(f"cannot read {what} {path}: {error}") from None
            continue
        finally:
            for child in folder._opened:
                os.close(child)
            if fd is not None:
                os.close(fd)
        if fd is not None or _same_folder(source, before):
            return result
    raise ValueError(f"cannot read {what} {path}: it kept changing while being read ({READ_ATTEMPTS} tries)")


def entry_kind(path: str | Path, what: str) -> str | None:
    """What is at ``path`` (links followed): ``"folder"``, ``"file"``, ``"other"``, or None if nothing.

    Raises:
        ValueError: ``cannot read <what> <path>: the folder <f> is not readable by this user``
            where permissions refuse the look (naming the folder that refuses), or another
            OSError's reason.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {_refusal(path, error)}") from None
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _refusal(path: str | Path, error: OSError) -> str:
    """Why ``path`` cannot be looked at: the first folder on its way this user may not open."""
    if isinstance(error, PermissionError):
        full = Path(os.path.abspath(path))
        for folder in reversed(full.parents):  # from the root down: each must let us through
            if not os.access(folder, os.X_OK):
                return f"the folder {folder} is not readable by this user"
        if os.path.isdir(full) and not os.access(full, os.R_OK | os.X_OK):
            return f"the folder {full} is not readable by this user"
    return str(error.strerror or error)


def _same_folder(path: Path, before: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino)
