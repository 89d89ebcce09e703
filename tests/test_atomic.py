"""atomic_write/atomic_path: all or nothing, and errors name the user's path, not the temp file
(the tests run as root, where permission bits stop nothing: a directory in the way fails the
write instead)."""

from __future__ import annotations

import os

import pytest

from llama2nb.atomic import atomic_path, atomic_write


def temp_name(target) -> str:
    return f".{target.name}.tmp-{os.getpid()}{target.suffix}"


def test_writes_whole_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "out" / "x.bin"
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(KeyError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise KeyError("killed")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["x.bin"]


def test_a_failing_temp_file_is_reported_as_the_target(tmp_path):
    target = tmp_path / "x.bin"
    (tmp_path / temp_name(target)).mkdir()  # the temp file cannot be opened for writing
    with pytest.raises(IsADirectoryError) as info:
        with atomic_write(target) as f:
            f.write(b"never")
    assert info.value.filename == str(target) and info.value.strerror
    assert temp_name(target) not in str(info.value) and str(target) in str(info.value)


def test_a_failing_rename_is_reported_as_the_target(tmp_path):
    target = tmp_path / "x.bin"
    (target / "child").mkdir(parents=True)  # a folder where the file should go
    with pytest.raises(OSError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"data")
    assert info.value.filename == str(target) and temp_name(target) not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]  # the temp file is gone


def test_other_errors_pass_unchanged(tmp_path):
    other = tmp_path / "elsewhere.txt"
    with pytest.raises(FileNotFoundError) as info:
        with atomic_path(tmp_path / "x.bin"):
            open(other / "missing")
    assert info.value.filename == str(other / "missing")
