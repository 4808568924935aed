"""Files a node or the CLI writes are private whatever the umask: 0600, folders 0700.

The mode is given when a file is created (never chmod after: no moment of being
world-readable), and folders this code creates are 0700. `check_private` is the
check a node runs at start on its store and key files.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ispf.errors import KeyFileError

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Make `path` (and missing parents) as 0700 folders; existing ones are left as they are."""
    if path.is_dir():
        return
    private_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE)
        os.chmod(path, DIR_MODE)  # (mkdir's mode is masked by the umask)


def private_new_file(path: Path) -> None:
    """Create an empty 0600 file unless it exists already."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))


@contextlib.contextmanager
def private_writer(path: Path, *, text: bool = True, newline: str | None = None) -> Iterator[IO]:  # type: ignore[type-arg]
    """Write `path` through a 0600 temporary file beside it, replaced into place on success."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        if text:
            fh: IO = os.fdopen(fd, "w", encoding="utf-8", newline=newline)  # type: ignore[type-arg]
        else:
            fh = os.fdopen(fd, "wb")
        with fh:
            yield fh
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private_text(path: Path, text: str) -> None:
    with private_writer(path) as fh:
        fh.write(text)


def write_private_bytes(path: Path, data: bytes) -> None:
    with private_writer(path, text=False) as fh:
        fh.write(data)


def check_private(path: Path, what: str = "file") -> None:
    """Refuse a file others can read or write, in one line naming it and the fix."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{what} {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
