"""Small file helpers every stage shares: JSON read with one-line errors, crash-safe writes.

    doc = read_json(path, ArtifactError, missing=f"{path}: no manifest (not an artifact?)")
    write_json_atomic(work / "journal.json", {"segments": []})   # temp file, fsync, rename, fsync dir
    durable_replace(Path("clip_00000.mp4.part"), Path("clip_00000.mp4"))
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError


def read_json(path: str | os.PathLike[str], error: type[UserError], missing: str) -> Any:
    """Parsed JSON; `error(missing)` when the file is absent, `error("...: corrupt (not valid JSON)")` otherwise."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise error(f"{path}: corrupt (not valid JSON)") from None


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it over `final`, fsync the directory: after return it survives a crash.

    durable_replace(Path("clip_00000.mp4.part"), Path("clip_00000.mp4"))
    """
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_bytes_atomic(path: Path, data: bytes, tmp: Path | None = None) -> Path:
    """Write `data` to `tmp` (default `PATH.tmp`), then `durable_replace` it onto `path`; never half-written."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        durable_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, obj: object) -> None:
    """Write `obj` as JSON to `path` via a temp file and a durable rename (never half-written).

    write_json_atomic(work / "journal.json", {"segments": []})
    """
    write_bytes_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())
