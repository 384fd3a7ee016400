"""The crash-safe state of one render on disk: finished clip segments, the latest resume state, a journal.

    check_output_path(out)                               # UserError before any work: a bad --out
    work = RenderWorkDir.open(out, job_key="...", resume=False)   # locks the work dir (flock)
    seg = work.begin_clip(0, VideoSpec(height=384, width=704)); seg.append(frames_uint8_thwc)
    work.commit_clip(seg, write_state=lambda f: torch.save(state, f))  # or write_state=None: no checkpoint
    work.restore(renderer)                               # resume: load the newest state into a renderer
    work.remove()                                        # after the mp4 exists; work.unlock() on any exit

Nothing read back from the journal leaves the work dir: segment and state names must be exactly
the names this module writes (`clip_00003.mp4`, `state_00002.pt`), so a damaged or hostile journal
is refused in one line instead of deleting or loading a file elsewhere.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..decode.video import ClipSegmentWriter, VideoSpec
from ..errors import UserError, first_line
from ..fileio import contained_path, durable_replace, file_kind, lock_dir, write_json_atomic

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "liveavatar-lite-render"
JOURNAL_VERSION = 1
_SEGMENT = "clip_{:05d}.mp4"
_STATE = re.compile(r"state_(\d{5})\.pt")


def check_output_path(out: Path, flag: str = "--out", suffix: str | None = ".mp4") -> None:
    """UserError (one line) unless `out` can be written as a new regular file; creates nothing.

    Refused: the wrong suffix, an existing directory / FIFO / device at `out`, a parent that is a
    file, and a nearest existing ancestor that is read-only or not writable.
        check_output_path(Path("renders/me.mp4"))
    """
    if suffix and out.suffix.lower() != suffix:
        raise UserError(f"{flag} {out} must end in {suffix}")
    try:
        mode = out.stat().st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        mode = None  # a parent is a file: named below
    except OSError as e:
        raise UserError(f"{flag} {out}: {e.strerror}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"{flag} {out} is {file_kind(mode)}; give a file path")
    parent = out.parent
    while True:  # the nearest ancestor that exists must be a writable directory
        try:
            pmode = parent.stat().st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            if parent == parent.parent:
                break
            parent = parent.parent
            continue
    if not stat.S_ISDIR(pmode):
        raise UserError(f"{flag} {out}: {parent} is {file_kind(pmode)}, not a directory")
    if _read_only(parent):
        raise UserError(f"{flag} {out}: cannot write in {parent} (read-only file system)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: cannot write in {parent} (permission denied)")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


class RenderWorkDir:
    """The crash-safe state of one render: finished clip segments, the latest resume state, a journal.

    Lives at `OUT.parent / ".OUT.work"`. The journal is rewritten (temp + rename) only after a clip's
    segment (and state, when one is written) is durable, so after a kill -9 it names complete files.
    The state (a checkpoint of everything the next clip depends on) need not follow every clip:
    `state_clips` says how many clips it covers, and a resume continues from there, re-rendering
    (identically) any later segments unless every clip is already done.

    The directory is locked (flock, released when the process ends, however it ends) from `open`
    until `remove` or `unlock`: a second render to the same output refuses in one line instead of
    deleting the first one's clips.

    A multi-process render (pipeline/multirank) checkpoints each rank into its own companion file
    `state_NNNNN.pt.rankR` (`rank_state_path`), written before the coordinator commits the state
    `state_NNNNN.pt` that names them; companions belong to their state: kept with it on resume,
    deleted with it.

    work = RenderWorkDir.open(Path("out.mp4"), job_key, resume=True); work.clips_done
    """

    def __init__(self, root: Path, journal: dict, lock_fd: int | None = None) -> None:
        self.root, self._journal, self._lock_fd = root, journal, lock_fd

    @staticmethod
    def path_for(out: Path) -> Path:
        """The work dir of a render to `out`: `out.parent / ".OUT.work"`."""
        return out.parent / f".{out.name}.work"

    @staticmethod
    def is_work_dir_name(name: str) -> bool:
        """Whether `name` is what `path_for` names a work dir: '.OUT.mp4.work'."""
        return name.startswith(".") and name.endswith(".mp4.work") and len(name) > len("..mp4.work")

    @staticmethod
    def state_name(clip: int) -> str:
        """The resume state written after clip `clip`: 'state_00003.pt'."""
        return f"state_{clip:05d}.pt"

    @classmethod
    def rank_state_path(cls, out: Path, clip: int, rank: int) -> Path:
        """Rank `rank`'s companion of the state after clip `clip` of the render to `out`."""
        return cls.path_for(out) / f"{cls.state_name(clip)}.rank{rank}"

    @classmethod
    def open(cls, out: Path, job_key: str, resume: bool) -> RenderWorkDir:
        """Lock the work dir, then continue its journal (resume) or start a fresh one, discarding old files."""
        root = cls.path_for(out)
        fd = _lock_work_dir(root, out)
        try:
            return cls._open_locked(root, fd, job_key, resume)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _open_locked(cls, root: Path, fd: int, job_key: str, resume: bool) -> RenderWorkDir:
        journal_path = root / "journal.json"
        if resume and journal_path.exists():
            journal = _read_journal(journal_path, root, job_key)
            work = cls(root, journal, fd)
            try:
                work._drop_uncommitted()
            except BaseException:
                work._lock_fd = None  # open() closes the descriptor: never twice (the number may be reused)
                raise
            work._drop_damaged()
            log.info("resuming after %d finished clips (%d frames)", work.clips_done, work.frames_done)
            return work
        if resume:
            log.info("nothing to resume at %s; starting from the first clip", root)
        elif journal_path.exists():
            log.info("discarding an earlier unfinished render in %s (pass --resume to continue it)", root)
        _clear(root)
        journal = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "job_key": job_key,
                   "segments": [], "state": None, "state_clips": 0}
        write_json_atomic(journal_path, journal)
        return cls(root, journal, fd)

    @property
    def clips_done(self) -> int:
        return len(self._journal["segments"])

    @property
    def frames_done(self) -> int:
        return sum(int(s["frames"]) for s in self._journal["segments"])

    @property
    def state_path(self) -> Path | None:
        """The newest resume state (None before the first checkpoint)."""
        name = self._journal["state"]
        return contained_path(self.root, name, "journal.json") if name else None

    @property
    def state_clips(self) -> int:
        """How many clips the newest resume state covers (0 without one)."""
        return int(self._journal["state_clips"])

    def rewind_to_state(self) -> None:
        """Forget segments after the newest checkpoint (a resume renders them again, identically)."""
        extra = self._journal["segments"][self.state_clips:]
        if not extra:
            return
        self._journal["segments"] = self._journal["segments"][: self.state_clips]
        write_json_atomic(self.root / "journal.json", self._journal)
        for s in extra:
            contained_path(self.root, s["name"], "journal.json").unlink(missing_ok=True)
        log.info("continuing from the checkpoint after clip %d (%d later clips are rendered again)",
                 self.state_clips, len(extra))

    def segment_frame_counts(self) -> list[int]:
        """Frames of each finished clip, in clip order."""
        return [int(s["frames"]) for s in self._journal["segments"]]

    def segment_paths(self) -> list[Path]:
        """The finished clips' segments, in clip order."""
        return [contained_path(self.root, s["name"], "journal.json") for s in self._journal["segments"]]

    def begin_clip(self, index: int, spec: VideoSpec) -> ClipSegmentWriter:
        """A writer for clip `index`, which must be the next unfinished clip."""
        if index != self.clips_done:
            raise ValueError(f"clip {index} started but {self.clips_done} clips are finished")
        final = self.root / _SEGMENT.format(index)
        return ClipSegmentWriter(index, final.with_name(final.name + ".part"), final, spec)

    def commit_clip(self, segment: ClipSegmentWriter, write_state: Callable[[IO[bytes]], None] | None) -> None:
        """Make a finished clip durable: segment, then (if given) its resume state, then the journal.

        `write_state(f)` writes the state to the open binary file `f` (e.g. `torch.save(state, f)`:
        through a Python file, a full disk is an OSError(ENOSPC), not an opaque RuntimeError).
        """
        segment.close()
        durable_replace(segment.path, segment.final_path)
        previous = self.state_path
        segments = [*self._journal["segments"], {"name": segment.final_path.name, "frames": segment.frames,
                                                 "sha256": _sha256(segment.final_path)}]
        journal = {**self._journal, "segments": segments}
        if write_state is not None:
            state_name = self.state_name(segment.index)
            tmp = self.root / (state_name + ".tmp")
            try:
                with open(tmp, "wb", buffering=0) as f:
                    out = _WholeWrites(f)
                    try:
                        write_state(out)  # type: ignore[arg-type]
                    except RuntimeError:
                        if out.error is not None:  # torch.save reports a failed write as an opaque RuntimeError
                            raise out.error from None
                        raise
                durable_replace(tmp, self.root / state_name)
            except OSError as e:
                tmp.unlink(missing_ok=True)  # a full disk: give the space back, the journal is unchanged
                if e.filename is None:  # a write through the file object names no file: name it
                    raise OSError(e.errno, e.strerror, str(tmp)) from None
                raise
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            journal["state"] = state_name
            journal["state_clips"] = len(segments)
        write_json_atomic(self.root / "journal.json", journal)
        self._journal = journal
        if previous is not None and previous != self.state_path:
            for p in [previous, *self._companions(previous.name)]:
                p.unlink(missing_ok=True)  # only the newest state is ever resumed from

    def _companions(self, state_name: str) -> list[Path]:
        """The rank companions of state `state_name` present in the work dir."""
        pattern = re.compile(re.escape(state_name) + r"\.rank\d+")
        return [p for p in self.root.iterdir() if pattern.fullmatch(p.name)]

    def restore(self, renderer: Any) -> None:
        """Load the newest resume state into `renderer` (`renderer.load_state`); one line if it is unusable."""
        import pickle

        import torch

        path = self.state_path
        assert path is not None
        try:
            # mmap: the tens of GB of KV state are paged in while copied into the caches, never held twice;
            # weights_only: a state file can hold tensors and plain containers, never code
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict):
                raise TypeError(f"holds a {type(state).__name__}, not a state dict")
            renderer.load_state(state)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, AttributeError, IndexError,
                pickle.UnpicklingError) as e:
            if (isinstance(e, OSError) and e.errno in (errno.ENOMEM, errno.EIO)) or "out of memory" in str(e).lower():
                raise  # not the file's fault
            raise UserError(f"cannot resume: {path} is damaged ({type(e).__name__}: {first_line(e)}); "
                            "run without --resume to start over") from None

    def remove(self) -> None:
        """Delete the work dir (once the final mp4 exists) and release the lock."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.unlock()

    def unlock(self) -> None:
        """Release the lock (idempotent); the files stay for a later --resume."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __del__(self) -> None:
        try:
            self.unlock()  # a dropped work dir lets go of its lock (as the process's end would)
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: the process's end releases it anyway
            pass

    def _drop_damaged(self) -> None:
        """Verify every finished segment against its journal checksum; from the first that differs
        on, the clips are rendered again (from the newest state if it precedes that clip, else from
        the first clip: the output is the same either way, a render being deterministic)."""
        segments = self._journal["segments"]
        bad = next((i for i, s in enumerate(segments) if "sha256" in s and _sha256(self.root / s["name"]) != s["sha256"]),
                   None)
        if bad is None:
            return
        journal = {**self._journal, "segments": segments[:bad]}
        dropped = [s["name"] for s in segments[bad:]]
        if self.state_clips > bad:  # the state is past the damaged clip: it cannot be continued from
            dropped += [self._journal["state"], *(p.name for p in self._companions(self._journal["state"]))]
            journal.update(segments=[], state=None, state_clips=0)
            dropped += [s["name"] for s in segments[:bad]]
        write_json_atomic(self.root / "journal.json", journal)
        self._journal = journal
        for name in dropped:
            (self.root / name).unlink(missing_ok=True)
        log.warning("%s: finished clip %d does not match its checksum; rendering %s again", self.root, bad,
                    "from the first clip" if not journal["segments"] else f"from clip {bad}")

    def _drop_uncommitted(self) -> None:
        """Delete files a killed run left behind that the journal does not name."""
        keep = {"journal.json", *(s["name"] for s in self._journal["segments"])}
        if self._journal["state"]:
            keep.add(self._journal["state"])
            keep.update(p.name for p in self._companions(self._journal["state"]))
        _clear(self.root, keep)
        # a missing segment with a checksum is damage like any other (_drop_damaged renders it again);
        # without one (an older journal) nothing says the rest is sound
        missing = [s["name"] for s in self._journal["segments"]
                   if "sha256" not in s and not (self.root / s["name"]).is_file()]
        if missing:
            raise UserError(f"cannot resume: {self.root} lacks {', '.join(missing)}; run without --resume")
        if self.state_path is not None and not self.state_path.is_file():
            # the state to continue from is gone: the clips are rendered again from the first (the same
            # frames, a render being deterministic)
            log.warning("%s lacks %s; rendering again from the first clip", self.root, self.state_path.name)
            journal = {**self._journal, "segments": [], "state": None, "state_clips": 0}
            write_json_atomic(self.root / "journal.json", journal)
            self._journal = journal
            _clear(self.root, {"journal.json"})


class _WholeWrites:
    """A binary file for torch.save: each write() writes everything or raises, and the OSError (a full
    disk) is kept, because torch.save turns a failing write into "RuntimeError: unexpected pos"."""

    def __init__(self, f: IO[bytes]) -> None:
        self._fd, self.error = f.fileno(), None
        self._pos = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done:])
        except OSError as e:
            self.error = self.error or e
            raise
        self._pos += done
        return done

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass


def _lock_work_dir(root: Path, out: Path) -> int:
    """Create `root` if needed and take an exclusive, non-blocking flock on it; the descriptor.

    A symlink or a non-directory at `root` is refused (never followed, never deleted). After the
    lock is taken the path must still be the locked directory: a render that was just finishing
    may have removed it, and then a fresh one is made.
    """
    for _ in range(5):
        try:
            st = os.lstat(root)
        except FileNotFoundError:
            root.mkdir(exist_ok=True)
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else file_kind(st.st_mode)
            raise UserError(f"the work dir {root} of --out {out} is {kind}, not a directory; "
                            "move it away and re-run")
        fd = lock_dir(root, f"another render is writing {out} (its work dir {root} is locked); wait for it "
                            "to finish or choose another --out", nofollow=True)
        try:
            now = os.lstat(root)
        except FileNotFoundError:
            now = None
        held = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # the directory we locked was removed meanwhile: lock the new one
    raise UserError(f"could not lock the work dir {root}; is another render starting and finishing there?")


def _sha256(path: Path) -> str:
    """sha256 hex of a file ("" if it cannot be read: then it matches no checksum)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def _clear(root: Path, keep: frozenset[str] | set[str] = frozenset()) -> None:
    """Delete everything inside `root` except the names in `keep` (symlinks removed, never followed)."""
    for p in root.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _read_journal(path: Path, root: Path, job_key: str) -> dict:
    """The journal, validated: every name one this module writes, every count consistent; else UserError."""
    def damaged(what: str) -> UserError:
        return UserError(f"cannot resume: {path} is damaged ({what}); run without --resume to start over")

    try:
        journal = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot resume: {path} is unreadable ({first_line(e)}); run without --resume") from None
    if not isinstance(journal, dict):
        raise damaged("not a JSON object")
    if journal.get("format") != JOURNAL_FORMAT or journal.get("version") != JOURNAL_VERSION:
        raise UserError(f"cannot resume: {path} is from another version; run without --resume")
    if journal.get("job_key") != job_key:
        raise UserError(
            f"cannot resume: {root} belongs to a render with other inputs, prompt, size or seed; "
            "run without --resume to start over"
        )
    segments = journal.get("segments")
    if not isinstance(segments, list):
        raise damaged("no segment list")
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise damaged(f"segment {i} is not an object")
        contained_path(root, seg.get("name"), str(path))  # a name that leaves the work dir: refused first
        if seg.get("name") != _SEGMENT.format(i):
            raise damaged(f"segment {i} is named {seg.get('name')!r}, expected {_SEGMENT.format(i)!r}")
        frames = seg.get("frames")
        if not isinstance(frames, int) or isinstance(frames, bool) or not 0 < frames <= 10_000:
            raise damaged(f"segment {i} has {frames!r} frames")
        digest = seg.get("sha256", "0" * 64)  # (journals written before checksums have none)
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise damaged(f"segment {i} has a malformed checksum")
    state, clips = journal.get("state"), journal.get("state_clips")
    if not isinstance(clips, int) or isinstance(clips, bool) or not 0 <= clips <= len(segments):
        raise damaged(f"state_clips {clips!r} with {len(segments)} segments")
    if state is None:
        if clips:
            raise damaged("state_clips without a state")
    else:
        contained_path(root, state, str(path))
        m = _STATE.fullmatch(state) if isinstance(state, str) else None
        if m is None or int(m.group(1)) != clips - 1:
            raise damaged(f"state {state!r} does not follow clip {clips - 1}")
    return journal
