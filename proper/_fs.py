"""Atomic file writes: never a half-written file under the real name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call write(tmp) on a temporary file next to `path`, fsync it, give it the permissions a
    plain open() would (0666 less the umask; mkstemp makes 0600), and rename it over `path`.
    On any error the temporary file is removed and an existing `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    return path


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    return atomic_write(path, write)
