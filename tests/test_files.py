from __future__ import annotations

import os
from pathlib import Path

import pytest

import nm_hf._files as files
from nm_hf._files import atomic_directory, atomic_write


def fail(handle):
    raise OSError("disk full")


def test_a_failed_write_removes_the_folders_it_made(tmp_path):
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a" / "b" / "f.json", fail)
    assert not list(tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "c" / "d" / "out"):
        raise KeyboardInterrupt
    assert not list(tmp_path.iterdir())


def test_a_failed_write_through_dot_dot_removes_the_folders_it_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        atomic_write("new/../x/f.json", fail)  # makes new and x
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_a_folder_someone_else_made_first(tmp_path, monkeypatch):
    """Another process makes the missing folder between this write's look and its mkdir: it is not ours."""
    folder = tmp_path / "shared"
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == folder and not folder.exists():
            os.mkdir(folder)  # the other process, first
        return real(self, *args, **kwargs)

    monkeypatch.setattr(files.Path, "mkdir", mkdir)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(folder / "f.json", fail)
    assert folder.is_dir()
