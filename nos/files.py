"""Writing an output file whole or not at all: `nos plot`, `nos report` and `nos export` share it."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all: into a new file in the same folder, then renamed over it.

    Written in place, a full disk, a file size limit or Ctrl-C left a cut-off file where the earlier good
    one was. A link is followed (the file it names is replaced, the link stays); a device or pipe
    (/dev/stdout) is written directly, as there is no file to keep.
    """
    path = Path(path)
    try:
        kept = os.stat(path)   # through links: /dev/stdout is a pipe or a terminal, whatever its link says
    except FileNotFoundError:
        kept = None
    if kept is not None and not stat.S_ISREG(kept.st_mode):
        with open(path, "wb") as file:
            file.write(data)
        return path
    target = Path(os.path.realpath(path))
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".nos-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        # mkstemp makes the file 0600: give it the mode a plain open() would, or the replaced file's own.
        os.chmod(temporary, stat.S_IMODE(kept.st_mode) if kept else 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)   # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


__all__ = ["write_atomically"]
