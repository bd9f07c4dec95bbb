"""The one way nm_hf writes files: atomically, with the permissions the user's umask asks for.

Every file nm_hf writes (histories, plots, results, cards, configs, compressed weights, tracker
state) goes through `atomic_write` or one of its wrappers: the content is written to a hidden
temporary file in the target's directory, flushed, given mode `0o666 & ~umask` (what `open()` would
have given; `tempfile.mkstemp` alone gives 0600) and renamed over the target. A crash or a kill
leaves either the old file or the new one, never a truncated one. Directories are staged the same
way with `atomic_directory`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_directory", "staged_files",
           "current_umask", "json_default"]


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class InterruptedAfterWrite(KeyboardInterrupt):
    """Ctrl-C that came after the output was renamed into place (while the replaced copy was removed): the
    output is complete. `args[0]`: the output's path."""


@contextmanager
def _parents_made(directory: Path) -> Iterator[None]:
    """Create `directory` (and its missing parents) for the block; on an exception inside it (KeyboardInterrupt
    included) remove the folders this created again, so a failed write leaves no empty folders behind.

    Only folders this call made itself are removed (one made by someone else first is not), and only while
    empty: one that something else has written into meanwhile stays. After success the folders made only to
    pass through them (`new` of "new/../out") are removed the same way.
    """
    missing: list[Path] = []  # deepest first
    folder = directory
    while not folder.exists() and not folder.is_symlink() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    made: list[Path] = []  # deepest first
    try:
        for folder in reversed(missing):  # one at a time, to know which ones this call made ("a/../b": not "a/..")
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    raise
                continue
            made.insert(0, folder)
        directory.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty
                break
        raise
    # done: a folder made only to pass through it ("new/../out" makes new) is not where anything went
    needed = directory.resolve()
    for folder in made:
        if folder.resolve() != needed and folder.resolve() not in needed.parents:
            try:
                folder.rmdir()
            except OSError:  # something else wrote into it meanwhile
                pass


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, fsync: bool = True) -> Path:
    """Call `write(handle)` on a temporary file beside `path`, then rename it over `path`.

    The file gets mode `0o666 & ~umask`. On any exception (KeyboardInterrupt included) the
    temporary file is removed, `path` is left as it was, and so are its parent folders (those the
    write had to create are removed again).
    """
    path = Path(path)
    if path.is_dir():  # else the rename fails naming the hidden temporary file
        raise IsADirectoryError(f"{path} is a directory; give a file name")
    with _parents_made(path.parent):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                if fsync:
                    os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))


def json_default(value: Any) -> Any:
    """JSON fallback for tensors, numpy scalars and paths (anything else is an error)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2,
                      sort_keys: bool = False) -> Path:
    """Write `data` as JSON (trailing newline) to `path` atomically; NaN/inf are refused."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside `target`; on success it becomes `target` by a rename.

    An exception inside the block (KeyboardInterrupt included) leaves `target` as it was and removes
    the staging directory, and the parent folders of `target` that had to be created for it (a kill
    leaves it under a hidden `.NAME.tmp-*` name that no loader looks at). A non-empty existing
    `target` is refused unless `overwrite`; it is then replaced as a whole. `target` may not be the
    current directory or one of its parents (it could not be renamed). A KeyboardInterrupt after the rename,
    while the replaced `target` is deleted, is raised as `InterruptedAfterWrite` (the new `target` is complete).
    """
    target = Path(target)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"{target}: cannot replace the current directory (or one above it); "
                         "choose a new directory")
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} exists and is not empty; pass --overwrite (overwrite=True) to "
                                  "replace it")
    old: Path | None = None  # where a replaced `target` waits to be removed
    with _parents_made(target.parent):
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield staging
            os.chmod(staging, 0o777 & ~current_umask())
            mode = 0o666 & ~current_umask()  # what open() gives; some writers (safetensors) leave 0600
            for path in staging.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
                    os.chmod(path, mode)
            if target.exists() and any(target.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, old / "replaced")
                try:
                    os.rename(staging, target)
                except BaseException:
                    os.rename(old / "replaced", target)  # put the original back
                    shutil.rmtree(old, ignore_errors=True)
                    raise
            else:
                os.replace(staging, target)  # onto a missing or empty directory: atomic
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    # `target` is the new directory now: an interrupt while the replaced copy is removed says so, and still
    # removes all of it (not a half-deleted hidden `.NAME.old-*` copy left behind)
    try:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    except KeyboardInterrupt as err:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise InterruptedAfterWrite(target) from err


@contextmanager
def staged_files(target: str | os.PathLike, *, last: Sequence[str] = (),
                 stale: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a staging directory; on success each staged file is renamed into `target`, one by one.

    For a directory that holds more than the files being written (a Trainer's output_dir keeps its
    checkpoint-* folders and logs, so `atomic_directory` cannot replace it whole): other entries are
    left alone, and each staged file replaces its namesake atomically, so a crash leaves every file
    whole (old or new), never truncated. Names in `last` are moved last (config.json: a directory
    only looks like a model once everything else is in). Afterwards, top-level files of `target`
    that were not staged and for which `stale(name)` is true are removed (a previous save's other
    weight files). Moved files get mode `0o666 & ~umask`, like every file nm_hf writes. The
    staging directory lives inside `target` (same file system) under a hidden
    `.nm_hf-staging-*` name; an exception inside the block removes it and leaves `target` as it was
    (a `target` this call had to create, and its new parents, are removed again while empty).
    """
    target = Path(target)
    with _parents_made(target):  # a failed first save leaves no empty output folders behind
        staging = Path(tempfile.mkdtemp(prefix=".nm_hf-staging-", dir=target))
        try:
            yield staging
            order = {name: i + 1 for i, name in enumerate(last)}  # 0: everything else, first

            def rank(path: Path) -> tuple[int, str]:
                relative = path.relative_to(staging).as_posix()
                return order.get(relative, 0), relative

            files = sorted((p for p in staging.rglob("*") if p.is_file() and not p.is_symlink()), key=rank)
            mode = 0o666 & ~current_umask()  # what open() gives; some writers (safetensors) leave 0600
            for path in files:
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
                os.chmod(path, mode)
            names = set()
            for path in files:
                relative = path.relative_to(staging)
                names.add(relative.parts[0])
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target / relative)
            _fsync_dir(target)
            if stale is not None:
                for old in target.iterdir():
                    if old.name not in names and old.is_file() and not old.name.startswith(".") and stale(old.name):
                        old.unlink()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
