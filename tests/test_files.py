from __future__ import annotations

import os
from pathlib import Path

import pytest

import nm_hf._files as files
from nm_hf._files import atomic_directory, atomic_write, staged_files


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


def test_a_write_through_dot_dot_leaves_no_folder_it_only_passed_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_write("new/../x/f.json", lambda handle: handle.write(b"{}"))  # makes new, to pass through it
    with atomic_directory("other/../out") as stage:
        (stage / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x"]
    assert (tmp_path / "x" / "f.json").read_bytes() == b"{}" and (tmp_path / "out" / "config.json").is_file()


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


def test_a_failed_staged_save_removes_only_the_folders_it_made(tmp_path):
    with pytest.raises(OSError, match="disk full"), staged_files(tmp_path / "runs" / "out") as staging:
        (staging / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")
    assert not list(tmp_path.iterdir())
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "trainer_state.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"), staged_files(kept) as staging:
        (staging / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")
    assert [p.name for p in kept.iterdir()] == ["trainer_state.json"]
