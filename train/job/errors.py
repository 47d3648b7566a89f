"""The expected failures of a run, and how an operating-system error is told to the user.

`RunError` is a failure the run anticipated (a damaged checkpoint, a full disk, a run directory in
use): its message names the file, key or path and says what to do. When it is raised after the
ranks agreed on a failure (train/distributed.py `agree_on_failure`), every rank raises it with the
same message, so the command line prints it once, from rank 0.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional

OS_ERROR_FIXES = {
    errno.ENOSPC: "free space on that filesystem or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EACCES: "make it writable (or readable) for this user, or use another path",
    errno.EPERM: "make it writable (or readable) for this user, or use another path",
    errno.EROFS: "that filesystem is read-only: use another path",
    errno.ENOENT: "check the path",
}


class RunError(RuntimeError):
    """An anticipated failure of a run; the message names what failed and the fix."""


def describe_os_error(error: OSError, path: Optional[Path | str] = None) -> str:
    """`<path>: <reason>; <fix>` for an OSError, the path taken from the error when it names one.

    The fix is added to the system's own reasons only; a reason written here already says what to do.
    """
    where = error.filename if error.filename is not None else path
    reason = error.strerror or str(error)
    system_reason = error.errno is not None and reason == os.strerror(error.errno)
    fix = OS_ERROR_FIXES.get(error.errno or 0) if system_reason else None
    return f"{where}: {reason}" + (f"; {fix}" if fix else "")


def free_space(path: Path) -> str:
    """The free space of the filesystem holding `path` (or its nearest existing parent), e.g. `1.5 GiB`."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return "unknown"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    index = 0
    value = float(free)
    while value >= 1024 and index < len(units) - 1:
        value, index = value / 1024, index + 1
    return f"{value:.1f} {units[index]}" if index else f"{free} B"
