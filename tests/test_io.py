"""The one writer and the one reader of `cpt._io`: whole folders, swapped in at once."""

import os
import stat
import threading
from pathlib import Path

import pytest

from cpt import _io


def _fill(files: dict[str, str]):
    def fill(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)

    return fill


def _read_all(folder: _io.Folder) -> dict[str, str]:
    return {name: folder.read_bytes(name, "file").decode() for name in folder.names()}


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
    with pytest.raises(ValueError, match="exists and is not a folder"):
        _io.write_folder(tmp_path / "out", _fill({"a": "1"}))
    with pytest.raises(ValueError, match=r"cannot create the folder .*/out/deeper: .*/out is a file"):
        _io.write_folder(tmp_path / "out" / "deeper" / "x", _fill({"a": "1"}))
    assert (tmp_path / "out").read_text() == "mine"


def test_reader_retries_when_the_folder_is_swapped_under_it(tmp_path: Path) -> None:
    target = tmp_path / "out"
    _io.write_folder(target, _fill({"a": "1", "b": "1"}))
    calls = []

    def read(folder: _io.Folder) -> dict[str, str]:
        first = folder.read_bytes("a", "file").decode()
        if not calls:  # a writer swaps the folder between this reader's two files
            calls.append(1)
            _io.write_folder(target, _fill({"a": "2", "b": "2"}))
        return {"a": first, "b": folder.read_bytes("b", "file").decode()}

    assert _io.open_folder(target, read, "thing") == {"a": "2", "b": "2"}  # never a mix


def test_writers_take_turns_under_the_lock(tmp_path: Path) -> None:
    target = tmp_path / "out"
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
    assert max(overlap) == 1  # never two writers filling at once
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_write_error_names_the_folder(tmp_path: Path) -> None:
    def full(folder: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write .*/out: No space left on device") as error:
        _io.write_folder(tmp_path / "out", full)
    assert error.value.errno == 28
    with pytest.raises(PermissionError, match="cannot write"):
        _io.write_folder(tmp_path / "out", lambda folder: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    assert sorted(os.listdir(tmp_path)) == []
