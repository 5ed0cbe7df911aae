"""The one writer and the one reader of `cpt._io`: whole folders, swapped in at once."""

import ast
import errno
import importlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import tracemalloc
import types
from pathlib import Path

import pytest

from cpt import _io

LIMIT = 2**20  # bytes a test file may hold


def _fill(files: dict[str, str]):
    def fill(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)

    return fill


def _read_all(folder: _io.Folder) -> dict[str, str]:
    return {name: folder.read_bytes(name, "file", LIMIT).decode() for name in folder.names()}


def test_write_creates_then_replaces_the_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out"
    assert _io.write_folder(target, _fill({"a": "1", "b": "1"})) == target
    _io.write_folder(target, _fill({"a": "2", "c": "2"}))
    assert sorted(os.listdir(target)) == ["a", "c"]  # b, of the old save, is gone
    assert _io.open_folder(target, _read_all, "thing") == {"a": "2", "c": "2"}
    assert sorted(os.listdir(target.parent)) == ["out"]  # no temporary sibling left


def test_keep_carries_other_files_over(tmp_path: Path) -> None:
    target = tmp_path / "out"
    _io.write_folder(target, _fill({"mine": "1", "README.md": "notes"}))
    _io.write_folder(target, _fill({"mine": "2"}), keep=lambda name: name != "mine")
    assert _io.open_folder(target, _read_all, "thing") == {"mine": "2", "README.md": "notes"}


def test_if_missing_keeps_an_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    _io.write_folder(target, _fill({"a": "first"}), if_missing=True)
    _io.write_folder(target, lambda folder: pytest.fail("not called"), if_missing=True)
    assert _io.open_folder(target, _read_all, "thing") == {"a": "first"}
    assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_modes_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _io.write_folder(tmp_path / "a", _fill({"f": "x", "sub/g": "y"}))
        os.umask(0o077)
        _io.write_folder(tmp_path / "b", _fill({"f": "x"}))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert (mode(tmp_path / "a"), mode(tmp_path / "a" / "sub"), mode(tmp_path / "a" / "f")) == (0o755, 0o755, 0o644)
    assert mode(tmp_path / "a" / "sub" / "g") == 0o644
    assert (mode(tmp_path / "b"), mode(tmp_path / "b" / "f")) == (0o700, 0o600)


def test_a_failing_fill_leaves_the_old_folder_and_no_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "out"
    _io.write_folder(target, _fill({"a": "1"}))

    def broken(folder: Path) -> None:
        (folder / "a").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.write_folder(target, broken)
    assert _io.open_folder(target, _read_all, "thing") == {"a": "1"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_during_the_swap_waits_for_the_swap_to_end(tmp_path: Path, name: str) -> None:
    number = getattr(signal, name)
    target = tmp_path / "out"
    _io.write_folder(target, _fill({"a": "old"}))

    def keep(name: str) -> bool:  # runs inside the swap: the signal arrives there
        os.kill(os.getpid(), number)
        return False

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM raises too, as in `cpt`
    try:
        with pytest.raises(KeyboardInterrupt):
            _io.write_folder(target, _fill({"a": "new"}), keep=keep)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (target / "a").read_text() == "new"  # the save that began ended ...
    assert os.listdir(tmp_path) == ["out"]  # ... leaving no temporary folder; then the interrupt acted


def test_dead_writers_leftovers_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    target = tmp_path / "out"
    _io.write_folder(target, _fill({"a": "1"}))
    for tag in ("tmp", "old"):
        stale = tmp_path / f".out.{tag}-12345-deadbeef"
        stale.mkdir()
        (stale / "a").write_text("partial")
    other = tmp_path / ".other.tmp-1-cafe"  # another folder's leftovers are not ours to delete
    other.mkdir()
    assert _io.open_folder(target, _read_all, "thing") == {"a": "1"}  # readers ignore them
    _io.write_folder(target, _fill({"a": "2"}))
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-1-cafe", "out"]


def test_a_fallback_swap_killed_between_its_renames_is_recovered(tmp_path: Path) -> None:
    target = tmp_path / "out"
    _io.write_folder(target, _fill({"a": "1"}))
    # The state a writer without RENAME_EXCHANGE leaves when killed between its two renames.
    os.rename(target, tmp_path / ".out.old-1-aa")
    (tmp_path / ".out.tmp-1-bb").mkdir()
    assert _io.open_folder(target, _read_all, "thing") == {"a": "1"}  # the old one, moved aside
    _io.write_folder(target, _fill({"b": "2"}))  # the next writer puts the old one back first
    assert _io.open_folder(target, _read_all, "thing") == {"b": "2"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_fallback_swap_without_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    _io.write_folder(target, _fill({"a": "1"}))
    _io.write_folder(target, _fill({"a": "2"}))
    assert _io.open_folder(target, _read_all, "thing") == {"a": "2"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("mine")
    with pytest.raises(ValueError, match=r"cannot write .*/out: it is a file, not a folder"):
        _io.write_folder(tmp_path / "out", _fill({"a": "1"}))
    with pytest.raises(ValueError, match=r"cannot write .*/out/deeper/x: .*/out is a file, not a folder"):
        _io.write_folder(tmp_path / "out" / "deeper" / "x", _fill({"a": "1"}))
    assert (tmp_path / "out").read_text() == "mine"


def test_a_link_loop_or_a_fifo_in_the_way_is_named_for_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ValueError, match=r"cannot write .*/loop: it is a link that leads to no folder \(Too many levels"):
        _io.check_target(tmp_path / "loop")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match=r"cannot write .*/fifo/x: .*/fifo is not a folder \(a FIFO, socket or device\)"):
        _io.check_target(tmp_path / "fifo" / "x")


def test_reading_sets_aside_the_file_s_size_not_its_limit(tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"x" * 100)
    tracemalloc.start()
    try:  # read(limit + 1) set a whole limit aside for every read: 256 MiB for a checkpoint's state
        assert _io.open_folder(tmp_path, lambda f: f.read_bytes("small", "file", 2**30), "folder") == b"x" * 100
        assert _io.read_file(tmp_path / "small", "file", 2**30) == b"x" * 100
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_reader_retries_when_the_folder_is_swapped_under_it(tmp_path: Path) -> None:
    target = tmp_path / "out"
    _io.write_folder(target, _fill({"a": "1", "b": "1"}))
    calls = []

    def read(folder: _io.Folder) -> dict[str, str]:
        first = folder.read_bytes("a", "file", LIMIT).decode()
        if not calls:  # a writer swaps the folder between this reader's two files
            calls.append(1)
            _io.write_folder(target, _fill({"a": "2", "b": "2"}))
        return {"a": first, "b": folder.read_bytes("b", "file", LIMIT).decode()}

    assert _io.open_folder(target, read, "thing") == {"a": "2", "b": "2"}  # never a mix


def _most_writers_at_once(target: Path) -> int:
    """Four threads write ``target`` 20 times each; returns the most that were filling at once."""
    inside, overlap = [0], []

    def fill(n: int):
        def write(folder: Path) -> None:
            inside[0] += 1
            overlap.append(inside[0])
            (folder / "n").write_text(str(n))
            inside[0] -= 1

        return write

    threads = [threading.Thread(target=lambda n=n: [_io.write_folder(target, fill(n)) for _ in range(20)]) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return max(overlap)


def test_writers_take_turns_under_the_lock(tmp_path: Path) -> None:
    assert _most_writers_at_once(tmp_path / "out") == 1  # never two writers filling at once
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_write_error_names_the_folder(tmp_path: Path) -> None:
    def full(folder: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write .*/out: No space left on device") as error:
        _io.write_folder(tmp_path / "out", full)
    assert error.value.errno == 28 and str(error.value) == f"cannot write {tmp_path / 'out'}: No space left on device"
    with pytest.raises(OSError) as error:  # a nested write (a checkpoint's adapter): the outer folder, once
        _io.write_folder(tmp_path / "outer", lambda folder: _io.write_folder(folder / "inner", full))
    assert str(error.value) == f"cannot write {tmp_path / 'outer'}: No space left on device"
    with pytest.raises(PermissionError, match="cannot write"):
        _io.write_folder(tmp_path / "out", lambda folder: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    assert sorted(os.listdir(tmp_path)) == []


# ---------------------------------------------------------------------- sizes


@pytest.mark.parametrize("size", [LIMIT + 1, 40 * 2**30], ids=["one-byte-over", "40GiB"])
def test_a_file_over_its_limit_is_refused_before_it_is_read(tmp_path: Path, size: int) -> None:
    _io.write_folder(tmp_path / "out", _fill({"big": ""}))
    os.truncate(tmp_path / "out" / "big", size)  # sparse: nothing is written to disk
    with pytest.raises(ValueError, match=rf"file .*/out/big is larger than it can be: {size} bytes, at most {LIMIT}"):
        _io.open_folder(tmp_path / "out", _read_all, "thing")


# ---------------------------------------------------------------------- the lock


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A second process that holds ``folder``'s writer lock until killed."""
    code = "import sys, time; from cpt import _io\nwith _io.locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline() == "held\n"
    return holder


def _in_thread(action) -> list[BaseException]:  # type: ignore[no-untyped-def]
    """Runs ``action`` and returns what it raised; a hang fails the test instead of stalling it."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            raised.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the writer hung waiting for the lock"
    return raised


def test_a_writer_waits_for_a_held_lock_only_so_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "LOCK_TIMEOUT", 0.5)
    _io.write_folder(tmp_path / "out", _fill({"a": "1"}))
    holder = _hold_lock(tmp_path)
    try:
        raised = _in_thread(lambda: _io.write_folder(tmp_path / "out", _fill({"a": "2"})))
    finally:
        holder.kill()
        holder.wait()
    assert len(raised) == 1 and isinstance(raised[0], TimeoutError)
    assert f"another process has held the lock on the folder {tmp_path} for 0.5 s" in str(raised[0])
    assert _io.open_folder(tmp_path / "out", _read_all, "thing") == {"a": "1"}
    _io.write_folder(tmp_path / "out", _fill({"a": "3"}))  # the holder died: its lock went with it
    assert _io.open_folder(tmp_path / "out", _read_all, "thing") == {"a": "3"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------------- paths checked up front


@pytest.mark.parametrize("name", ["", ".", "..", "/", "sub/.."])
def test_a_path_that_names_no_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="names no folder of its own"):
        _io.check_target(name)
    with pytest.raises(ValueError, match="names no folder of its own"):
        _io.write_folder(name, _fill({"a": "1"}))
    assert sorted(os.listdir(tmp_path)) == ["sub"] and os.listdir(tmp_path / "sub") == []


def test_check_target_accepts_what_write_folder_can_write(tmp_path: Path) -> None:
    assert _io.check_target(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    _io.write_folder(tmp_path / "out", _fill({"a": "1"}))
    (tmp_path / "link").symlink_to(tmp_path / "out")
    assert _io.check_target(tmp_path / "link") == tmp_path / "out"
    assert sorted(os.listdir(tmp_path)) == ["link", "out"]  # a check writes nothing
    (tmp_path / "dangling").symlink_to(tmp_path / "later")  # a link to a folder not made yet
    assert _io.check_target(tmp_path / "dangling") == tmp_path / "later"  # is written where it points
    assert sorted(os.listdir(tmp_path)) == ["dangling", "link", "out"]


# ---------------------------------------------------------------------- as another user

NOBODY = 65534  # the unprivileged user a root test run acts as


@pytest.fixture
def shared(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A folder the user of `_as_user` owns: a fresh one owned by nobody when the tests run as root."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="cpt-test-"))
    os.chown(folder, NOBODY, NOBODY)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def _as_user(action) -> str:  # type: ignore[no-untyped-def]
    """Runs ``action`` in a forked child as an unprivileged user (nobody when root, where permission
    bits would not stop it; else this user); returns ``ok`` or ``<exception type>: <message>``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            if os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            action()
            text = "ok"
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            text = f"{type(error).__name__}: {error}"
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return text


def test_an_unreadable_parent_folder_is_named(shared: Path) -> None:
    locked_away = shared / "private"
    _io.write_folder(locked_away / "out", _fill({"a": "1"}))
    os.chmod(locked_away, 0o000)  # as root, owned by root: closed to nobody
    try:
        wrote = _as_user(lambda: _io.write_folder(locked_away / "new", _fill({"a": "1"})))
        read = _as_user(lambda: _io.open_folder(locked_away / "out", _read_all, "thing"))
        looked = _as_user(lambda: _io.entry_kind(locked_away / "out", "thing"))
    finally:
        os.chmod(locked_away, 0o755)
    assert wrote == f"ValueError: cannot write {locked_away}/new: the folder {locked_away} is not readable by this user"
    assert read == f"ValueError: cannot read thing {locked_away}/out: the folder {locked_away} is not readable by this user"
    assert looked == read
    assert sorted(os.listdir(locked_away)) == ["out"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a second user: the tests act as nobody when run as root")
def test_an_old_folder_this_user_cannot_delete_is_refused_before_writing(shared: Path) -> None:
    _io.write_folder(shared / "out", _fill({"a": "root's"}))  # root's folder, in nobody's
    result = _as_user(lambda: _io.write_folder(shared / "out", _fill({"a": "nobody's"})))
    assert result == (
        f"ValueError: cannot write {shared}/out: the old folder cannot be replaced, as this user cannot "
        f"delete what is in {shared}/out; remove it, or write elsewhere"
    )
    assert sorted(os.listdir(shared)) == ["out"]  # no temporary folder left behind
    assert (shared / "out" / "a").read_text() == "root's"


def test_read_only_folders_in_a_failed_or_dead_write_are_still_removed(shared: Path) -> None:
    def fill_and_fail(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "f").write_text("x")
        os.chmod(folder / "sub", 0o555)  # its owner cannot delete f without opening it up first
        raise OSError("disk full")

    def dead_writer_then_save() -> None:
        stale = shared / ".out.tmp-12345-deadbeef"
        stale.mkdir()
        (stale / "sub").mkdir()
        (stale / "sub" / "f").write_text("partial")
        os.chmod(stale / "sub", 0o555)
        _io.write_folder(shared / "out", _fill({"a": "2"}))

    assert _as_user(lambda: _io.write_folder(shared / "out", fill_and_fail)) == "OSError: cannot write " + str(
        shared / "out"
    ) + ": disk full"
    assert os.listdir(shared) == []
    assert _as_user(dead_writer_then_save) == "ok"
    assert sorted(os.listdir(shared)) == ["out"]


# ---------------------------------------------------------------------- other operating systems


def test_no_module_of_cpt_imports_an_os_specific_module_unguarded() -> None:
    specific = {"fcntl", "msvcrt", "termios", "tty", "pty", "pwd", "grp", "resource", "posix", "nt", "winreg", "_winapi"}
    found = []
    for path in sorted((Path(__file__).parents[1] / "cpt").glob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.Try)
            and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in block.handlers)
            for node in ast.walk(block)
        }
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if {n.split(".")[0] for n in names} & specific and id(node) not in guarded:
                found.append(f"{path.name}:{node.lineno}")
    assert found == []


@pytest.fixture
def without_fcntl(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """`cpt._io` imported where ``fcntl`` does not exist (as on Windows)."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # an import of it now fails
    importlib.reload(_io)
    yield
    monkeypatch.undo()
    importlib.reload(_io)


def test_io_imports_and_writes_without_fcntl(tmp_path: Path, without_fcntl: None) -> None:
    assert _io.fcntl is None and _io.msvcrt is None  # neither lock exists: written without one
    with pytest.warns(UserWarning, match="no file locks"):
        _io.write_folder(tmp_path / "out", _fill({"a": "1"}))
    assert _io.open_folder(tmp_path / "out", _read_all, "thing") == {"a": "1"}


def _msvcrt_on_flock() -> types.SimpleNamespace:
    """Windows' ``msvcrt.locking`` as documented (a held lock fails with EACCES), made of flock."""
    real = importlib.import_module("fcntl")

    def locking(fd: int, mode: int, nbytes: int) -> None:
        assert nbytes == 1
        if mode == 0:
            real.flock(fd, real.LOCK_UN)
            return
        try:
            real.flock(fd, real.LOCK_EX | real.LOCK_NB)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None

    return types.SimpleNamespace(LK_UNLCK=0, LK_NBLCK=2, locking=locking)


@pytest.fixture
def like_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Windows paths: ``msvcrt`` for the lock, no folder descriptors, no RENAME_EXCHANGE."""
    monkeypatch.setattr(_io, "fcntl", None)
    monkeypatch.setattr(_io, "msvcrt", _msvcrt_on_flock())
    monkeypatch.setattr(_io, "DIR_FDS", False)
    monkeypatch.setattr(_io, "_renameat2", False)


def test_the_windows_lock_lets_writers_take_turns_and_times_out(tmp_path: Path, like_windows: None, monkeypatch) -> None:
    assert _most_writers_at_once(tmp_path / "out") == 1
    assert sorted(os.listdir(tmp_path)) == [_io.LOCK_FILE, "out"]  # Windows cannot lock the folder itself
    monkeypatch.setattr(_io, "LOCK_TIMEOUT", 0.2)
    with _io.locked(tmp_path):
        raised = _in_thread(lambda: _io.write_folder(tmp_path / "out", _fill({"n": "late"})))
    assert len(raised) == 1 and isinstance(raised[0], TimeoutError) and str(tmp_path) in str(raised[0])


def test_reading_by_path_never_mixes_two_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "DIR_FDS", False)  # as on Windows: files are opened by path
    monkeypatch.setattr(_io, "_renameat2", False)  # as on macOS and Windows: the two-rename swap
    test_reader_retries_when_the_folder_is_swapped_under_it(tmp_path)  # a read that mixed is run again
    test_a_fallback_swap_killed_between_its_renames_is_recovered(tmp_path / "killed")
    test_write_creates_then_replaces_the_whole_folder(tmp_path / "whole")
