"""What makes a checkpoint trustworthy: every file's size and checksum, recorded and verified.

`complete.json` lists every file of the checkpoint with its size in bytes and its SHA-256. The
ranks share the hashing, both when saving and when verifying: rank r hashes files r, r + world,
r + 2 world, ... of the sorted listing, so each byte is read once whatever the world size. Sizes
are cheap, and every rank checks all of them.

A checkpoint that fails verification is never deleted: `set_aside` renames it to
`step_N.damaged` (`.damaged-2`, ... if that exists), out of reach of resume and of pruning, where
it can be inspected or removed by hand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

MARKER = "complete.json"
HASH_BLOCK = 1 << 22
DAMAGED_SUFFIX = ".damaged"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Every file under `folder` except the marker, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def file_records(folder: Path, names: list[str], rank: int, world: int) -> dict[str, dict[str, Any]]:
    """{name: {"size", "sha256"}} for this rank's share of `names` (every world-th, from `rank`)."""
    return {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in names[rank::world]}


def read_marker(folder: Path) -> dict[str, Any]:
    """The parsed complete.json; ValueError saying why it cannot be used."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except OSError as error:
        raise ValueError(f"{MARKER} cannot be read ({error.strerror})") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{MARKER} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from error
    if not isinstance(marker, dict) or not {"step", "world"} <= marker.keys():
        raise ValueError(f"{MARKER} lacks the step and world it must record")
    return marker


def verify(folder: Path, rank: int, world: int) -> Optional[str]:
    """Why `folder` cannot be resumed from, as far as this rank's share of the checksums shows; None if sound.

    Checkpoints written before complete.json recorded its files are checked for their marker only.
    """
    try:
        marker = read_marker(folder)
    except ValueError as error:
        return str(error)
    files: dict[str, dict[str, Any]] = marker.get("files", {})
    for index, (name, record) in enumerate(sorted(files.items())):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record["size"]:
            return f"{name} is {size} bytes, {MARKER} records {record['size']}"
        if index % world == rank and file_sha256(path) != record["sha256"]:
            return f"{name} does not match the checksum in {MARKER}"
    return None


def damaged_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under `root` that were set aside as damaged, in name order."""
    return sorted(root.glob(f"step_*{DAMAGED_SUFFIX}*")) if root.is_dir() else []


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the way (never delete it); returns its new path."""
    target = folder.with_name(folder.name + DAMAGED_SUFFIX)
    count = 1
    while target.exists():
        count += 1
        target = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}-{count}")
    folder.rename(target)
    return target
