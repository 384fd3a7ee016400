"""The crash-safe state of one render on disk: finished clip segments, the latest resume state, a journal.

    work = RenderWorkDir.open(out, job_key="...", resume=False)
    seg = work.begin_clip(0, VideoSpec(height=384, width=704)); seg.append(frames_uint8_thwc)
    work.commit_clip(seg, write_state=lambda p: torch.save(state, p))  # or write_state=None: no checkpoint
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ..decode.video import ClipSegmentWriter, VideoSpec
from ..errors import UserError, first_line
from ..fileio import durable_replace, write_json_atomic

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "liveavatar-lite-render"
JOURNAL_VERSION = 1


class RenderWorkDir:
    """The crash-safe state of one render: finished clip segments, the latest resume state, a journal.

    Lives at `OUT.parent / ".OUT.work"`. The journal is rewritten (temp + rename) only after a clip's
    segment (and state, when one is written) is durable, so after a kill -9 it names complete files.
    The state (a checkpoint of everything the next clip depends on) need not follow every clip:
    `state_clips` says how many clips it covers, and a resume continues from there, re-rendering
    (identically) any later segments unless every clip is already done.

    A multi-process render (pipeline/multirank) checkpoints each rank into its own companion file
    `state_NNNNN.pt.rankR` (`rank_state_path`), written before the coordinator commits the state
    `state_NNNNN.pt` that names them; companions belong to their state: kept with it on resume,
    deleted with it.

    work = RenderWorkDir.open(Path("out.mp4"), job_key, resume=True); work.clips_done
    """

    def __init__(self, root: Path, journal: dict) -> None:
        self.root, self._journal = root, journal

    @staticmethod
    def path_for(out: Path) -> Path:
        """The work dir of a render to `out`: `out.parent / ".OUT.work"`."""
        return out.parent / f".{out.name}.work"

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
        """Continue the journal in the work dir (resume) or start a fresh one, discarding old files."""
        root = cls.path_for(out)
        journal_path = root / "journal.json"
        if resume and journal_path.exists():
            try:
                journal = json.loads(journal_path.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"cannot resume: {journal_path} is unreadable ({first_line(e)}); "
                                "run without --resume") from None
            if journal.get("format") != JOURNAL_FORMAT or journal.get("version") != JOURNAL_VERSION:
                raise UserError(f"cannot resume: {journal_path} is from another version; run without --resume")
            if journal.get("job_key") != job_key:
                raise UserError(
                    f"cannot resume: {root} belongs to a render with other inputs, prompt, size or seed; "
                    "run without --resume to start over"
                )
            work = cls(root, journal)
            work._drop_uncommitted()
            log.info("resuming after %d finished clips (%d frames)", work.clips_done, work.frames_done)
            return work
        if resume:
            log.info("nothing to resume at %s; starting from the first clip", root)
        elif journal_path.exists():
            log.info("discarding an earlier unfinished render in %s (pass --resume to continue it)", root)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        journal = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "job_key": job_key,
                   "segments": [], "state": None, "state_clips": 0}
        write_json_atomic(journal_path, journal)
        return cls(root, journal)

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
        return self.root / name if name else None

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
            (self.root / s["name"]).unlink(missing_ok=True)
        log.info("continuing from the checkpoint after clip %d (%d later clips are rendered again)",
                 self.state_clips, len(extra))

    def segment_frame_counts(self) -> list[int]:
        """Frames of each finished clip, in clip order."""
        return [int(s["frames"]) for s in self._journal["segments"]]

    def segment_paths(self) -> list[Path]:
        """The finished clips' segments, in clip order."""
        return [self.root / s["name"] for s in self._journal["segments"]]

    def begin_clip(self, index: int, spec: VideoSpec) -> ClipSegmentWriter:
        """A writer for clip `index`, which must be the next unfinished clip."""
        if index != self.clips_done:
            raise ValueError(f"clip {index} started but {self.clips_done} clips are finished")
        final = self.root / f"clip_{index:05d}.mp4"
        return ClipSegmentWriter(index, final.with_name(final.name + ".part"), final, spec)

    def commit_clip(self, segment: ClipSegmentWriter, write_state: Callable[[Path], None] | None) -> None:
        """Make a finished clip durable: segment, then (if given) its resume state, then the journal."""
        segment.close()
        durable_replace(segment.path, segment.final_path)
        previous = self.state_path
        self._journal["segments"].append({"name": segment.final_path.name, "frames": segment.frames})
        if write_state is not None:
            state_name = self.state_name(segment.index)
            tmp = self.root / (state_name + ".tmp")
            write_state(tmp)
            durable_replace(tmp, self.root / state_name)
            self._journal["state"] = state_name
            self._journal["state_clips"] = len(self._journal["segments"])
        write_json_atomic(self.root / "journal.json", self._journal)
        if previous is not None and previous != self.state_path:
            for p in [previous, *self._companions(previous.name)]:
                p.unlink(missing_ok=True)  # only the newest state is ever resumed from

    def _companions(self, state_name: str) -> list[Path]:
        """The rank companions of state `state_name` present in the work dir."""
        pattern = re.compile(re.escape(state_name) + r"\.rank\d+")
        return [p for p in self.root.iterdir() if pattern.fullmatch(p.name)]

    def remove(self) -> None:
        """Delete the work dir (once the final mp4 exists)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def _drop_uncommitted(self) -> None:
        """Delete files a killed run left behind that the journal does not name."""
        keep = {"journal.json", *(s["name"] for s in self._journal["segments"])}
        if self._journal["state"]:
            keep.add(self._journal["state"])
            keep.update(p.name for p in self._companions(self._journal["state"]))
        for p in self.root.iterdir():
            if p.name not in keep:
                p.unlink()
        missing = [p.name for p in self.segment_paths() if not p.exists()]
        if self.state_path is not None and not self.state_path.exists():
            missing.append(self.state_path.name)
        if missing:
            raise UserError(f"cannot resume: {self.root} lacks {', '.join(missing)}; run without --resume")
