"""A batch file (JSON lines) read into typed jobs, checked the way a render checks them, and the
marker that says which mp4s the farm wrote.

One JSON object per line: `image`, `audio`, `prompt`, `out`, optional `size`, `seed`, `num_clip`.
Relative paths are relative to the batch file's directory. Blank lines and lines starting with
`#` are skipped. Every problem is one line naming the file and line number:

    jobs = read_jobs(Path("jobs.jsonl"), defaults=JobDefaults(size="704*384"))   # UserError on bad input
    plan = plan_batch(jobs, identity=backend.identity())  # which are done, which (re)render, which resume

A job's mp4 gets a marker beside it, `.OUT.farm.json`, holding the job's key (the inputs' bytes,
prompt, size, seed, clip count and the artifact identity), written when its render starts. A re-run skips a job whose mp4
and marker agree, renders again one whose marker names other inputs (the farm wrote that mp4), and
refuses an `out` that exists without a marker: the farm never overwrites what it did not write.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, first_line
from ..fileio import write_json_atomic
from ..pipeline.generate import job_key, prepare_inputs
from ..pipeline.request import RenderRequest
from ..pipeline.workdir import RenderWorkDir
from ..serve.service import MAX_SEED

log = logging.getLogger(__name__)

FIELDS = {"image": str, "audio": str, "prompt": str, "out": str, "size": str, "seed": int, "num_clip": int}
REQUIRED = ("image", "audio", "prompt", "out")
MARKER_FORMAT = "liveavatar-lite-farm"


@dataclass(frozen=True)
class JobDefaults:
    """What a line that leaves out `size` or `seed` gets (the `farm run` flags)."""

    size: str = "704*384"
    seed: int = 42


@dataclass(frozen=True)
class FarmJob:
    """One line of the batch file, paths absolute (actors on other machines read them from shared storage)."""

    line: int
    image: Path
    audio: Path
    prompt: str
    out: Path
    size: str
    seed: int
    num_clip: int | None
    clips: int  # how many clips it renders (its speech's length, capped by num_clip)
    width: int  # the photo framed at `size`
    height: int

    def request(self) -> RenderRequest:
        return RenderRequest(image=self.image, audio=self.audio, prompt=self.prompt, out=self.out, size=self.size,
                             num_clip=self.num_clip, seed=self.seed, resume=True, progress=False)


def read_jobs(path: Path, defaults: JobDefaults) -> list[FarmJob]:
    """Every job of the batch file `path`, validated (photo framing, speech, output); UserError for the first bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such batch file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e.strerror if isinstance(e, OSError) else first_line(e)}") from None
    base = path.resolve().parent
    jobs: list[FarmJob] = []
    outs: dict[Path, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}:{number}"
        job = _parse_line(stripped, number, base, defaults, where)
        if job.out in outs:
            raise UserError(f"{where}: out {job.out} is also the out of line {outs[job.out]}")
        outs[job.out] = number
        jobs.append(job)
    if not jobs:
        raise UserError(f"{path}: no jobs (one JSON object per line with image, audio, prompt, out)")
    return jobs


def _parse_line(text: str, number: int, base: Path, defaults: JobDefaults, where: str) -> FarmJob:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise UserError(f"{where}: not JSON ({first_line(e)})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a JSON object with image, audio, prompt, out")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise UserError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    for key, value in doc.items():
        kind = FIELDS[key]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if key == "num_clip" and value is None:
            ok = True
        if not ok:
            raise UserError(f"{where}: {key!r} must be {'a string' if kind is str else 'an integer'}, got {value!r}")
    if "seed" in doc and not 0 <= doc["seed"] <= MAX_SEED:
        raise UserError(f"{where}: 'seed' must be from 0 to 2^63-1, got {doc['seed']}")
    if doc.get("num_clip") is not None and doc["num_clip"] < 1:
        raise UserError(f"{where}: 'num_clip' must be a positive integer, got {doc['num_clip']}")
    if not doc["prompt"].strip():
        raise UserError(f"{where}: 'prompt' is empty")
    image, audio, out = ((base / doc[k]).resolve() for k in ("image", "audio", "out"))
    for key, p in (("image", image), ("audio", audio)):
        if not p.is_file():
            raise UserError(f"{where}: {key} {p} is not a file")
    request = RenderRequest(image=image, audio=audio, prompt=doc["prompt"], out=out,
                            size=doc.get("size", defaults.size), num_clip=doc.get("num_clip"),
                            seed=doc.get("seed", defaults.seed), progress=False)
    quiet = logging.getLogger(prepare_inputs.__module__)
    level, quiet.level = quiet.level, logging.WARNING  # no "WxH, N s of speech" line per job here
    try:
        inputs = prepare_inputs(request)  # the checks a render makes: output name, photo framing, speech
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    finally:
        quiet.setLevel(level)
    return FarmJob(number, image, audio, request.prompt, out, request.size, request.seed, request.num_clip,
                   inputs.num_clips, inputs.width, inputs.height)


# ------------------------------------------------------------------------------------------ ownership

def marker_path(out: Path) -> Path:
    """The farm's marker beside a finished mp4: `.OUT.farm.json`."""
    return out.parent / f".{out.name}.farm.json"


def farm_key(job: FarmJob, identity: str) -> str:
    """What a job's frames depend on: the render's job key (inputs, prompt, size, seed, artifact) and the clip count."""
    h = hashlib.sha256(job_key(job.request(), identity).encode())
    h.update(f":{job.clips}".encode())
    return h.hexdigest()


def write_marker(job: FarmJob, key: str, frames: int | None = None) -> None:
    """Claim `job.out` for `key` before its render starts (frames None), and record the result after.

    The claim comes first so that a driver killed between the mp4's rename and the final record
    still finds the mp4 its own: the mp4 only ever appears complete, so a claim that matches is done.
    """
    job.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker_path(job.out), {"format": MARKER_FORMAT, "key": key, "line": job.line,
                                             "clips": job.clips, "frames": frames,
                                             "state": "rendering" if frames is None else "done"})


def drop_claim(job: FarmJob) -> None:
    """Forget a claim whose render failed and left no mp4 (an earlier mp4 of ours keeps its marker)."""
    if not job.out.exists():
        marker_path(job.out).unlink(missing_ok=True)


def _marker_key(out: Path) -> str | None:
    try:
        doc = json.loads(marker_path(out).read_text())
    except (OSError, ValueError):
        return None
    return doc.get("key") if isinstance(doc, dict) and doc.get("format") == MARKER_FORMAT else None


def _check_writable(directory: Path, where: str) -> None:
    """UserError unless `directory` exists as a writable directory or can be made in one."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{where}: cannot make the directory {directory}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{where}: cannot write to {existing} (permission denied)")


@dataclass(frozen=True)
class BatchPlan:
    """The batch split by what a run must do: `todo` (render or resume) and `done` (skipped)."""

    todo: list[FarmJob]
    done: list[FarmJob]
    keys: dict[int, str]  # line -> farm key
    resuming: dict[int, int]  # line -> clips already on disk (an earlier run's checkpoint)


def plan_batch(jobs: list[FarmJob], identity: str, source: Path) -> BatchPlan:
    """Which jobs are finished (mp4 + matching marker), which start or resume; UserError for an `out`
    the farm would overwrite without having written it, or a work dir of another render."""
    todo, done, keys, resuming = [], [], {}, {}
    for job in jobs:
        where = f"{source}:{job.line}"
        key = keys[job.line] = farm_key(job, identity)
        _check_writable(job.out.parent, where)
        marker = _marker_key(job.out)
        if job.out.exists():
            if marker is None:
                raise UserError(f"{where}: out {job.out} exists and was not written by `farm run` (no "
                                f"{marker_path(job.out).name} beside it); move it away or choose another out")
            if marker == key:
                done.append(job)
                continue
            log.info("line %d: %s was rendered from other inputs; rendering it again", job.line, job.out)
        work = RenderWorkDir.path_for(job.out)
        journal = work / "journal.json"
        if journal.exists():
            try:
                doc = json.loads(journal.read_text())
            except (OSError, ValueError):
                doc = {}
            if doc.get("job_key") != job_key(job.request(), identity):
                raise UserError(f"{where}: {work} holds an unfinished render of other inputs; remove it or "
                                "choose another out")
            resuming[job.line] = int(doc.get("state_clips") or 0)
        todo.append(job)
    return BatchPlan(todo, done, keys, resuming)
