"""Everything cpt writes, and how it reads it back: whole folders swapped in at once.

Writing (`write_folder`): the folder is built under a temporary sibling ``.<name>.tmp-<id>``,
every file and folder in it flushed to disk, then exchanged with the old folder in one
``renameat2(RENAME_EXCHANGE)`` call, so the path holds the complete old folder or the complete
new one at every instant, never a mix and never nothing; the old folder (now at the temporary
name) is then deleted. Where the exchange is not supported (another OS, a file system without
it) the old folder is renamed aside to ``.<name>.old-<id>`` and the new one renamed in, and
`open_folder` bridges the instant between the two renames. Writers of folders that share a
parent hold an ``fcntl.flock`` lock on that parent, so two writers never interleave, and a writer
deletes only its own temporary folder plus those of writers that died (found under the lock,
when no other writer can be running). Files get mode 0666 and folders 0777, less the umask.

Reading (`open_folder`): all files are read through one descriptor of the folder, so they come
from one save even if a writer swaps the folder meanwhile; a read that fails because the folder
was swapped under it (a file deleted with the old folder) is retried on the new folder.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cpt.warning import CPTWarning

T = TypeVar("T")

TMP_TAG = "tmp"  # .<name>.tmp-<pid>-<hex>: a folder being built (or, after the swap, the old one)
OLD_TAG = "old"  # .<name>.old-<pid>-<hex>: the old folder, moved aside (fallback swap only)
READ_ATTEMPTS = 8  # a reader retries this often when the folder is swapped under it
_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h)
_AT_FDCWD = -100


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
def locked(folder: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``folder`` (which must exist) for the block."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:  # e.g. a network file system without locks
            warnings.warn(
                f"cannot lock {folder} ({error.strerror}); writing without the lock", CPTWarning, stacklevel=3
            )
        yield
    finally:
        os.close(fd)  # releases the lock


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
        ValueError: if ``target`` exists and is not a folder, or a file stands where a parent
            folder should be.
        OSError: if writing fails; ``target`` is then as it was and no temporary folder is left.
    """
    target = Path(target)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot write {target}: it exists and is not a folder")
    _make_parents(target.parent)
    with locked(target.parent):
        recover(target)
        for stale in sibling_names(target, TMP_TAG) + sibling_names(target, OLD_TAG):
            _remove(stale)  # a writer that died: no live writer holds the lock we hold
        if if_missing and os.path.lexists(target):
            return target
        tmp = target.parent / f".{target.name}.{TMP_TAG}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        os.mkdir(tmp)
        try:
            fill(tmp)
            if keep is not None and target.is_dir():
                _carry_over(target, tmp, keep)
            _seal(tmp)
            _swap_in(tmp, target)
            fsync_folder(target.parent)
        except OSError as error:  # a full disk, a read-only folder: say where
            message = f"cannot write {target}: {error.strerror or error}"
            raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
        finally:
            _remove(tmp)  # the unfinished new folder, or after the swap the old one
    return target


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
    """Creates ``folder`` and its missing parents; a file in the way is a ValueError."""
    if folder.is_dir():
        return
    for ancestor in (folder, *folder.parents):
        if os.path.lexists(ancestor) and not ancestor.is_dir():
            raise ValueError(f"cannot create the folder {folder}: {ancestor} is a file")
    folder.mkdir(parents=True, exist_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


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
        except OSError:
            shutil.copy2(source, new / entry.name, follow_symlinks=False)


def _seal(folder: Path) -> None:
    """Sets modes by the umask and flushes every file and folder under ``folder`` to disk."""
    files, folders = file_mode(), folder_mode()
    for root, dirs, names in os.walk(folder, topdown=False):
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != files:
                    os.fchmod(fd, files)
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
    """Read access to the files of one folder, through one descriptor (so, from one save)."""

    def __init__(self, path: Path, fd: int, opened: list[int] | None = None) -> None:
        self.path = path
        self._fd = fd
        self._opened = [] if opened is None else opened  # sub-folder descriptors, closed with this one

    def names(self) -> list[str]:
        """The entries of the folder, sorted."""
        return sorted(os.listdir(self._fd))

    def is_file(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def is_dir(self, name: str) -> bool:
        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def read_bytes(self, name: str, what: str, limit: int | None = None) -> bytes:
        """The bytes of the file ``name``.

        Raises:
            ValueError: ``<what> missing: <path>`` if it is not a regular file, or if it is
                larger than ``limit`` bytes.
            FileNotFoundError: if it vanished between the check and the read (a swap).
        """
        if not self.is_file(name):
            raise ValueError(f"{what} missing: {self.path / name}")
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=self._fd)
        with os.fdopen(fd, "rb") as f:
            if limit is not None and os.fstat(f.fileno()).st_size > limit:
                raise ValueError(f"{what} {self.path / name} is larger than {limit} bytes")
            return f.read()

    def read_json(self, name: str, what: str, limit: int = 64 * 2**20) -> dict[str, Any]:
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
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self._fd)
        self._opened.append(fd)
        return Folder(self.path / name, fd, self._opened)


def parse_json_object(raw: bytes, path: Path, what: str) -> dict[str, Any]:
    """Parses ``raw`` as a JSON object (no NaN or Infinity constants, bounded nesting)."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=refuse)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"cannot read {what} {path}: {type(error).__name__}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} does not hold a JSON object")
    return data


def open_folder(path: str | Path, read: Callable[[Folder], T], what: str) -> T:
    """Runs ``read`` on the folder ``path``, seeing a single save of it.

    If ``read`` fails (ValueError, OSError) and the folder was swapped meanwhile, it is run
    again on the new folder. A fallback swap caught between its two renames is waited for; if
    it stays there (its writer died), the complete old folder it moved aside is read.

    Raises:
        ValueError: ``no <what> folder at <path>`` (or ``<path> is a file``), or what ``read`` raised on an unchanged
            folder (an OSError turned into ``cannot read <what> <path>: ...``).
    """
    path = Path(path)
    source = path
    for attempt in range(READ_ATTEMPTS):
        try:
            fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            aside = sibling_names(path, OLD_TAG)
            if not aside or source != path:
                if path.is_file():
                    raise ValueError(f"{path} is a file, but {what}s are saved as folders") from None
                raise ValueError(f"no {what} folder at {path}") from None
            if attempt < 3:
                time.sleep(0.01 * 2**attempt)  # a fallback swap between its two renames
            else:  # its writer died there: the folder moved aside is the complete old one
                source = max(aside, key=lambda p: p.stat().st_mtime)
            continue
        except OSError as error:
            raise ValueError(f"cannot read {what} {path}: {error.strerror}") from None
        folder = Folder(path, fd)
        try:
            return read(folder)
        except (ValueError, OSError) as error:
            if _same_folder(source, fd) or attempt + 1 == READ_ATTEMPTS:
                if isinstance(error, ValueError):
                    raise
                raise ValueError(f"cannot read {what} {path}: {error}") from None
        finally:
            for child in folder._opened:
                os.close(child)
            os.close(fd)
    raise AssertionError("unreachable")


def _same_folder(path: Path, fd: int) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
