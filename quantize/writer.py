"""Crash-safe file output: every file goes to a temp name, is fsync'ed, then renamed into place.

Byte layout comes from `liveavatar_lite.artifact.format.layout_file`; this module only moves bytes, hashes
them on the way out (sha256 and xxh3-128 of the whole file, no re-read) and turns a full disk into one clear
error. `write_chunk` is the single low-level write: the ENOSPC test replaces it.

    with UnitFileWriter() as w: w.write(path, layout, produce, on_done=record_digests)
"""
from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from liveavatar_lite.artifact.format import FileLayout, TensorEntry, fast_hasher
from liveavatar_lite.errors import ArtifactError, UserError

_ZEROS = bytes(64)  # pads are < 64 bytes (format.ALIGN)


class DiskFullError(UserError):
    """No space left while writing the artifact."""


def write_chunk(f, data) -> None:  # type: ignore[no-untyped-def]
    """Write all of `data` (bytes or memoryview) to the open binary file `f`."""
    f.write(data)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")


def _io_error(e: OSError, path: Path) -> UserError:
    if e.errno == errno.ENOSPC:
        return DiskFullError(f"disk full while writing {path} (free some space and re-run to resume)")
    return ArtifactError(f"cannot write {path}: {e.strerror or e}")


class UnitFileWriter:
    """Writes unit files on a background thread, so disk writes, sha256 and fsync overlap quantization.

    The caller (one thread) calls `write(...)` per file; the parts it produces are queued (at most
    `max_pending_bytes` in flight, which bounds RSS) and a writer thread appends them to
    `.<name>.tmp`, hashes them, and at the end of the file fsyncs, renames and calls
    `on_done(sha256, xxh3_128)`. A failure on either side removes the temp file; the writer's error (e.g.
    DiskFullError) is raised in the caller at its next call or at `close()`.

        with UnitFileWriter() as w: w.write(path, layout, produce, on_done=lambda sha, xxh3: ...)
    """

    def __init__(self, max_pending_bytes: int = 256 << 20) -> None:
        self._queue: queue.Queue[tuple] = queue.Queue()
        self._cv = threading.Condition()
        self._pending = 0
        self._limit = max_pending_bytes
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="unit-writer", daemon=True)
        self._thread.start()

    # -- caller side

    def write(
        self,
        path: Path,
        layout: FileLayout,
        produce: Callable[[TensorEntry], dict[str, torch.Tensor]],
        on_tensor: Callable[[TensorEntry], None] | None = None,
        on_done: Callable[[str, str], None] | None = None,
    ) -> None:
        """Queue one file: header, then every part in file order (`produce` is called once per tensor).

        `on_done(sha256, xxh3_128)` runs on the writer thread once the file is renamed into place."""
        self._raise_if_failed()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._queue.put(("open", temp_name(path)))
        try:
            self._put_data(layout.header, None)
            current: tuple[TensorEntry, dict[str, torch.Tensor]] | None = None
            for kind, entry, part, nbytes in layout.writes():
                if kind == "pad":
                    self._put_data(_ZEROS[:nbytes], None)
                    continue
                assert entry is not None and part is not None
                if current is None or current[0].name != entry.name:
                    if current is not None and on_tensor is not None:
                        on_tensor(current[0])
                    current = (entry, produce(entry))
                t = current[1][part.role]
                if t.dtype != part.torch_dtype or tuple(t.shape) != part.shape:
                    raise AssertionError(f"{part.name}: produced {t.dtype}{list(t.shape)}, layout wants "
                                         f"{part.torch_dtype}{list(part.shape)}")
                t = t.contiguous()
                self._put_data(_tensor_bytes(t), t)
            if current is not None and on_tensor is not None:
                on_tensor(current[0])
        except BaseException:
            self._queue.put(("abort",))
            raise
        self._queue.put(("close", path, on_done))

    def close(self) -> None:
        """Wait until every queued file is on disk (or failed); stop the thread; raise its error."""
        if self._thread.is_alive():
            self._queue.put(("stop",))
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> UnitFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            self.close()
        else:  # already failing: finish cleaning up, keep the original error
            if self._thread.is_alive():
                self._queue.put(("stop",))
                self._thread.join()

    def _put_data(self, data, keep: torch.Tensor | None) -> None:  # type: ignore[no-untyped-def]
        n = len(data)
        with self._cv:  # back-pressure: at most `limit` bytes queued (a larger single part goes alone)
            while self._pending and self._pending + n > self._limit and self._error is None:
                self._cv.wait()
            self._pending += n
        self._raise_if_failed()
        self._queue.put(("data", data, keep, n))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- writer thread

    def _run(self) -> None:
        f = None
        tmp: Path | None = None
        digest, fast = hashlib.sha256(), fast_hasher()
        while True:
            item = self._queue.get()
            kind = item[0]
            try:
                if kind == "data":
                    try:
                        if f is not None and self._error is None:
                            write_chunk(f, item[1])
                            digest.update(item[1])
                            fast.update(item[1])
                    finally:
                        with self._cv:
                            self._pending -= item[3]
                            self._cv.notify_all()
                elif kind == "open":
                    tmp, digest, fast = item[1], hashlib.sha256(), fast_hasher()
                    f = open(tmp, "wb") if self._error is None else None
                elif kind == "close" and f is not None:
                    path, on_done = item[1], item[2]
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
                    f = None
                    os.replace(tmp, path)  # type: ignore[arg-type]
                    tmp = None
                    if on_done is not None:
                        on_done(digest.hexdigest(), fast.hexdigest())
                elif kind in ("abort", "close", "stop"):
                    if f is not None:
                        f.close()
                        f = None
                    if tmp is not None:
                        tmp.unlink(missing_ok=True)
                        tmp = None
                    if kind == "stop":
                        return
            except BaseException as e:  # surfaced in the caller's thread
                if self._error is None:
                    self._error = _io_error(e, tmp or Path("?")) if isinstance(e, OSError) else e
                if f is not None:
                    f.close()
                    f = None
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
                with self._cv:
                    self._cv.notify_all()


def write_unit_file(
    path: Path,
    layout: FileLayout,
    produce: Callable[[TensorEntry], dict[str, torch.Tensor]],
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> str:
    """Write one unit file synchronously (temp + fsync + rename); return its sha256.

        sha = write_unit_file(out / "units/block_000.safetensors", layout, produce=lambda entry: parts)
    """
    shas: list[str] = []
    with UnitFileWriter() as w:
        w.write(path, layout, produce, on_tensor, on_done=lambda sha, _fast: shas.append(sha))
    return shas[0]


def write_bytes_file(path: Path, data: bytes) -> None:
    """Small file (job state, copied configs): temp + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write_chunk(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while writing {path} (free some space and re-run to resume)") from None
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None


def tree_digest(root: Path) -> str:
    """sha256 over (relative path, size, content) of every file under `root`, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        rel = p.relative_to(root).as_posix()
        h.update(f"{rel}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def copy_tree(src: Path, dst: Path) -> str:
    """Copy a folder to `dst` via a temp folder + rename; return its `tree_digest`.

    Only regular files (and folders) are copied: a FIFO or device inside `src` is refused before
    anything is opened (copying one would block or never end)."""
    import stat

    from liveavatar_lite.fileio import file_kind

    for p in sorted(src.rglob("*")):
        mode = p.stat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ArtifactError(f"{p} is {file_kind(mode)}, not a regular file; remove it from {src}")
    tmp = temp_name(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while copying {src} (free some space and re-run to resume)") from None
        raise ArtifactError(f"cannot copy {src} to {dst}: {e.strerror or e}") from None
    return tree_digest(dst)
