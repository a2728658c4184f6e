"""Durable, atomic file writes: never a half-written file under the real name, and a renamed
file that survives a power loss.

The sequence is the one SQLite documents: write a temporary file next to the target, fsync
it, rename it over the target, then fsync the directory (the rename lives in the directory's
data). A save that was killed leaves its temporary file behind; the next save into that
directory removes the stale ones of our own naming (``.<name>.<host>-<pid>.<random>.tmp``)
whose process is gone, or that are a day old.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Union

STALE_AFTER_S = 24 * 3600  # a temporary file of another host (or unparseable) this old is stale


def fsync_dir(path: Union[str, os.PathLike]) -> None:
    """fsync a directory, so that the renames and creations in it are on disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Union[str, os.PathLike]) -> None:
    """fsync every file and directory under `path` (files first, then their directories)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(directory: Path, name: str) -> list[Path]:
    """Remove the temporary files an earlier, killed save of `name` left in `directory`."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.)?[^/]*\.tmp$")
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now, host = time.time(), _host()
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if m.group("pid") and m.group("host") == host:
                stale = not _alive(int(m.group("pid")))
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # raced with its owner or another cleaner: leave it
    return removed


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call write(tmp) on a temporary file next to `path`, fsync it, give it the permissions a
    plain open() would (0666 less the umask; mkstemp makes 0600), rename it over `path` and
    fsync the directory. On any error the temporary file is removed and an existing `path` is
    left as it was."""
    path = Path(path)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    return atomic_write(path, write)
