"""Small file helpers every stage shares: JSON read with one-line errors, crash-safe writes.

    doc = read_json(path, ArtifactError, missing=f"{path}: no manifest (not an artifact?)")
    write_json_atomic(work / "journal.json", {"segments": []})   # temp file, fsync, rename, fsync dir
    durable_replace(Path("clip_00000.mp4.part"), Path("clip_00000.mp4"))
    path = require_file(args.audio, "--audio")         # UserError for missing, a directory, a FIFO, a device
    seg = contained_path(work_root, name, "journal.json")  # UserError if `name` would leave work_root
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import UserError


def file_kind(mode: int) -> str:
    """What a st_mode is, in words ("a directory", "a FIFO", ...), for one-line errors."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def require_file(path: str | os.PathLike[str], what: str, error: type[UserError] = UserError,
                 missing: str | None = None) -> Path:
    """`path` if it is a regular file (symlinks followed); else `error` naming what it is instead.

    Checked with stat before any open: opening a FIFO blocks until a writer appears, a device can
    stream forever. require_file("speech.wav", "--audio")
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(missing or f"{what} {path} does not exist") from None
    except NotADirectoryError:
        raise error(f"{what} {path} does not exist (a parent of it is a file)") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is {file_kind(mode)}, not a regular file")
    return path


def contained_path(root: Path, name: object, source: str, error: type[UserError] = UserError) -> Path:
    """`root / name` for a relative name read back from a data file (journal, manifest, index), or `error`.

    The name must be a non-empty relative POSIX path without `..`, so whatever the file says, the
    result stays inside `root` (lexically: symlinks a user placed inside `root` are followed later,
    as for any file the user owns). contained_path(work, "clip_00000.mp4", "journal.json")
    """
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise error(f"{source}: names {name!r}, which is not a file name")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", "") for part in name.split("/")) or name.startswith("~"):
        raise error(f"{source}: names {name!r}, which leaves {root} (refused: names in it must stay inside)")
    return root / p


def read_json(path: str | os.PathLike[str], error: type[UserError], missing: str) -> Any:
    """Parsed JSON; `error(missing)` when the file is absent, `error("...: corrupt (not valid JSON)")` otherwise."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise error(missing) from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: is {file_kind(mode)}, not a JSON file")
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise error(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise error(f"{path}: corrupt (not valid JSON)") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None


def lock_dir(directory: Path, busy: str, nofollow: bool = False) -> int:
    """An exclusive flock on `directory`, not waiting: the open descriptor (the caller closes it, which
    releases the lock). UserError(`busy`) if another process holds it; `nofollow` refuses a symlink."""
    import fcntl  # POSIX only: imported here so that the rest of this module imports anywhere

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | (getattr(os, "O_NOFOLLOW", 0) if nofollow else 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(busy) from None
    return fd


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
