"""Uploaded inputs stored once by content: `blobs/ab/abcdef...` named by the sha256 of their bytes.

Two jobs with the same photo share one file; a blob is written temp + fsync + rename, so a crash
never leaves half of one under its final name. Names from clients never reach the file system:
only a validated 64-hex digest becomes a path.

    digest = blobs.put(Path("tmp/upload-1"))   # moves the file in; returns its sha256
    blobs.path(digest)                         # Path("blobs/ab/ab...")
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from ..fileio import durable_replace

DIGEST = re.compile(r"^[0-9a-f]{64}$")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class BlobStore:
    """Content-addressed files under one directory.

    With `known` (the queue database's record of the blobs it put) and `on_put` (which records one),
    clean-up deletes only blobs the database knows: a database restored from an older copy, emptied
    or replaced never makes the service delete uploads it does not list.
    """

    def __init__(self, root: Path, known: Callable[[], set[str]] | None = None,
                 on_put: Callable[[str], None] | None = None, forget: Callable[[set[str]], None] | None = None) -> None:
        self.root, self.known, self.on_put, self.forget = root, known, on_put, forget

    def path(self, digest: str) -> Path:
        if not DIGEST.match(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest[:2] / digest

    def put(self, src: Path) -> str:
        """Move the file `src` in under its digest (dropping it if that blob exists); returns the digest."""
        digest = file_digest(src)
        final = self.path(digest)
        if final.exists():
            src.unlink()
            return digest
        if self.on_put is not None:
            self.on_put(digest)  # recorded first: a crash after the rename leaves a blob the database knows
        final.parent.mkdir(parents=True, exist_ok=True)
        durable_replace(src, final)  # same file system (state/tmp -> state/blobs): a rename
        return digest

    def digests(self) -> set[str]:
        return {p.name for p in self.root.glob("??/*") if DIGEST.match(p.name)}

    def remove_except(self, keep: Iterable[str]) -> int:
        """Delete every blob not in `keep` (and empty fan-out dirs); returns how many were deleted."""
        keep = set(keep)
        doomed = self.digests() - keep
        if self.known is not None:
            doomed &= self.known()  # never a blob the database does not list
        for digest in doomed:
            self.path(digest).unlink(missing_ok=True)
        removed = len(doomed)
        if self.forget is not None and doomed:
            self.forget(doomed)
        for d in self.root.glob("??"):
            if d.is_dir() and not any(d.iterdir()):
                os.rmdir(d)
        return removed
