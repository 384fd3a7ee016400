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

import codecs
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, overload

from ..errors import UserError, first_line
from ..fileio import require_file, write_json_atomic
from ..pipeline.generate import job_key
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


MAX_LINE_CHARS = 64 * 1024  # a job line is a few hundred characters; longer is a mistake (or an attack)
MAX_JSON_DEPTH = 4  # a job is a flat object; this bounds the nesting json.loads ever sees
MAX_REMEMBERED = 10_000  # distinct prompts (and input combinations) remembered as checked; more are checked per line
_DECODER = json.JSONDecoder()  # raw_decode: json.loads without its two whitespace scans (a line is stripped)


class _Inputs(NamedTuple):
    """What many lines share, checked together once: the files, the prompt, size and clip count."""

    image: Path
    audio: Path
    prompt: str
    size: str
    num_clip: int | None
    clips: int
    width: int
    height: int


class _Row(NamedTuple):
    """One checked line, compact: about 270 bytes with its entry in the outs index (BENCHMARKS.md, issue 25)."""

    line: int
    out: str  # absolute, its directory resolved (a Path's text): no two lines may name the same
    seed: int
    inputs: _Inputs


class Jobs(Sequence[FarmJob]):
    """The jobs of a batch file in line order; each `FarmJob` (and its out's `Path`) is made when read."""

    def __init__(self, rows: list[_Row]) -> None:
        self._rows = rows
        self._parents: dict[str, Path] = {}  # an out directory's text -> its Path (made once: a child is cheaper)

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, i: int) -> FarmJob: ...

    @overload
    def __getitem__(self, i: slice) -> list[FarmJob]: ...

    def __getitem__(self, i: int | slice) -> FarmJob | list[FarmJob]:
        if isinstance(i, slice):
            return [self._job(row) for row in self._rows[i]]
        return self._job(self._rows[i])

    def __iter__(self) -> Iterator[FarmJob]:
        return map(self._job, self._rows)

    def with_out_text(self) -> Iterator[tuple[FarmJob, str]]:
        """Each job with its out's text (what plan_batch splits, without making it from the Path again)."""
        for row in self._rows:
            yield self._job(row), row.out

    def _job(self, row: _Row) -> FarmJob:
        i = row.inputs
        directory, _, name = row.out.rpartition("/")  # (an absolute path: directory is "" only for "/")
        parent = self._parents.get(directory)
        if parent is None:
            parent = Path(directory or "/")
            if len(self._parents) < MAX_REMEMBERED:
                self._parents[directory] = parent
        return FarmJob(row.line, i.image, i.audio, i.prompt, parent / name, i.size, row.seed, i.num_clip, i.clips,
                       i.width, i.height)


def read_jobs(path: Path, defaults: JobDefaults) -> Jobs:
    """Every job of the batch file `path`, validated (photo framing, speech, output); UserError for the first bad line.

    Fast for big batches (docs/farm.md): each distinct photo (per size) and speech file is decoded
    once and each output directory checked once (`_Media`), and a line whose inputs an earlier line
    already had is checked only for what differs (`_parse_line`), so a million lines over a few
    inputs validate in seconds. An out that exists is looked at by `plan_batch` (which stats every
    out anyway).
    """
    require_file(path, "batch file", missing=f"{path}: no such batch file")  # a FIFO would block: refused
    rows: list[_Row] = []
    outs: dict[str, int] = {}  # out -> the line that names it first
    media = _Media(path.resolve().parent, defaults)
    number = 0
    try:
        with open(path, "rb") as f:
            # lines read at most MAX_LINE_CHARS (+1) bytes at a time: a 1 GB file without a newline costs
            # 64 KB, not 1 GB; each line decoded alone, so bad UTF-8 is reported with its line number
            for number, data in enumerate(iter(partial(f.readline, MAX_LINE_CHARS + 2), b""), start=1):
                if len(data) > MAX_LINE_CHARS and data[-1:] != b"\n":
                    raise UserError(f"{path}:{number}: the line is longer than {MAX_LINE_CHARS // 1024} KB")
                if number == 1 and data.startswith(codecs.BOM_UTF8):
                    data = data[3:]  # a byte-order mark, as Windows editors write: not part of the JSON
                try:
                    raw = data.decode()
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{number}: not UTF-8 text (byte {e.start + 1} of the line)") from None
                if len(raw) > MAX_LINE_CHARS:
                    raise UserError(f"{path}:{number}: the line is longer than {MAX_LINE_CHARS // 1024} KB")
                stripped = raw.strip()
                if not stripped or stripped[0] == "#":
                    continue
                row = _parse_line(stripped, number, media)
                first = outs.setdefault(row.out, number)
                if first != number:
                    raise UserError(f"{path}:{number}: out {row.out} is also the out of line {first}")
                rows.append(row)
    except UserError as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise UserError(f"{path}:{number}: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or first_line(e)}") from None
    if not rows:
        raise UserError(f"{path}: no jobs (one JSON object per line with image, audio, prompt, out)")
    return Jobs(rows)


def _depth(text: str) -> int:
    """The deepest bracket nesting of a JSON text (brackets inside strings counted too: an upper bound)."""
    depth = deepest = 0
    for c in text:
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


class _Media:
    """What the lines of one batch share, checked once: resolved directories, photos per size,
    speech lengths, output directories, prompts, whole input combinations. Files are looked at
    when first named."""

    def __init__(self, base: Path, defaults: JobDefaults) -> None:
        self.base, self.defaults = base, defaults
        self.dirs: dict[str, tuple[Path, str]] = {}  # the directory part of a name -> (resolved, its text)
        self.inputs: dict[tuple[str, str], Path] = {}  # (field, name) -> resolved existing file
        self.photos: dict[tuple[Path, str], tuple[int, int]] = {}
        self.speech: dict[Path, int] = {}
        self.out_dirs: set[str] = set()  # texts of the resolved directories whose first out passed
        self.prompts: set[str] = set()
        self.clips: dict[tuple[Path, int | None], int] = {}
        self.seen: dict[tuple[Any, ...], _Inputs] = {}  # (image, audio, prompt, size, num_clip) as written -> checked

    def directory(self, name: str) -> tuple[Path, str, str]:
        """(resolved directory, its text, the file name) of `name` relative to the batch file."""
        head, _, tail = name.rpartition("/")
        if not head and name.startswith("/"):
            head = "/"
        d = self.dirs.get(head)
        if d is None:
            resolved = (self.base / head).resolve() if head else self.base
            d = self.dirs[head] = (resolved, str(resolved).rstrip("/"))
        return d[0], d[1], tail

    def input(self, key: str, name: str) -> Path:
        """The resolved path of input `name` (UserError unless it is a file), looked at once."""
        found = self.inputs.get((key, name))
        if found is None:
            d, _, tail = self.directory(name)
            found = (d / tail).resolve()
            if not found.is_file():
                raise UserError(f"{key} {found} is not a file")
            self.inputs[(key, name)] = found
        return found

    def framed(self, image: Path, size: str) -> tuple[int, int]:
        """(width, height) of the photo framed at `size`, decoded once as a render does."""
        key = (image, size)
        if key not in self.photos:
            from ..conditioning.photo import load_reference

            ref = load_reference(image, size)
            self.photos[key] = (int(ref.shape[2]), int(ref.shape[1]))
        return self.photos[key]

    def samples(self, audio: Path) -> int:
        """Samples of the speech at 16 kHz, decoded once as a render does."""
        if audio not in self.speech:
            from ..conditioning.speech import SAMPLE_RATE, load_audio
            from ..pipeline.generate import MIN_SPEECH_SECONDS

            n = len(load_audio(audio))
            if n < MIN_SPEECH_SECONDS * SAMPLE_RATE:
                raise UserError(f"audio {audio} is {n / SAMPLE_RATE * 1000:.0f} ms long; at least "
                                f"{MIN_SPEECH_SECONDS * 1000:.0f} ms of speech is needed")
            self.speech[audio] = n
        return self.speech[audio]

    def out(self, name: str) -> str:
        """The resolved out path's text (a Path's str); the checks `check_output` makes, per directory once."""
        d, text, tail = self.directory(name)
        if tail in ("", ".", "..") or not tail.lower().endswith(".mp4"):
            raise UserError(f"--out {name} must end in .mp4")
        if text not in self.out_dirs:
            from ..pipeline.workdir import check_output_path

            check_output_path(d / tail)
            self.out_dirs.add(text)
        return f"{text}/{tail}"


_FIELD_SET = frozenset(FIELDS)


def _parse_line(text: str, number: int, media: _Media) -> _Row:
    """One job line -> its row; UserError (the caller adds the file and line).

    The quick check: a line whose image, audio, prompt, size and num_clip were checked together on
    an earlier line (`media.seen`) needs only its field names, seed and out checked. It says
    nothing itself: any doubt goes to `_check_line`, which checks everything in order and names
    the first problem, so a line gets the same message whichever check reads it. (`media.out`
    may speak, but only after every check `_check_line` makes before it has passed.)
    """
    if text.count("[") + text.count("{") > 2 * MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
        raise UserError("not JSON (nested too deeply for a job)")
    try:
        doc, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        doc, end = None, -1
    if end != len(text):  # not JSON, or more after it: json.loads says what
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise UserError(f"not JSON ({first_line(e)})") from None
    if type(doc) is dict:
        out, seed, num_clip = doc.get("out"), doc.get("seed", media.defaults.seed), doc.get("num_clip")
        if (type(out) is str and out and "\0" not in out and type(seed) is int and 0 <= seed <= MAX_SEED
                and (num_clip is None or type(num_clip) is int) and _FIELD_SET.issuperset(doc)):
            try:  # a list or an object as a value cannot be a key: never seen
                inputs = media.seen.get((doc.get("image"), doc.get("audio"), doc.get("prompt"),
                                         doc.get("size", media.defaults.size), num_clip))
            except TypeError:
                inputs = None
            if inputs is not None:
                return _Row(number, media.out(out), seed, inputs)
    return _check_line(doc, number, media)


def _check_line(doc: Any, number: int, media: _Media) -> _Row:
    """Every check of a job line, in order; remembers its inputs in `media.seen` for `_parse_line`."""
    if type(doc) is not dict:
        raise UserError("expected a JSON object with image, audio, prompt, out")
    if not _FIELD_SET.issuperset(doc):
        raise UserError(f"unknown field {sorted(set(doc) - _FIELD_SET)[0]!r} (fields: {', '.join(FIELDS)})")
    if "image" not in doc or "audio" not in doc or "prompt" not in doc or "out" not in doc:
        raise UserError(f"missing {', '.join(repr(k) for k in REQUIRED if k not in doc)}")
    for key, value in doc.items():
        kind = FIELDS[key]
        if type(value) is not kind and not (key == "num_clip" and value is None):
            raise UserError(f"{key!r} must be {'a string' if kind is str else 'an integer'}, got {value!r}")
    seed, num_clip = doc.get("seed", media.defaults.seed), doc.get("num_clip")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"'seed' must be from 0 to 2^63-1, got {seed}")
    if num_clip is not None and num_clip < 1:
        raise UserError(f"'num_clip' must be a positive integer, got {num_clip}")
    prompt = doc["prompt"]
    if prompt not in media.prompts:
        from ..conditioning.text_tokenizer import check_prompt

        if not prompt.strip():
            raise UserError("'prompt' is empty")
        check_prompt(prompt)
        if len(media.prompts) < MAX_REMEMBERED:
            media.prompts.add(prompt)
    for key in ("image", "audio", "out"):
        if not doc[key] or "\0" in doc[key]:
            raise UserError(f"{key!r} is not a path")
    image = media.input("image", doc["image"])
    audio = media.input("audio", doc["audio"])
    out = media.out(doc["out"])
    size = doc.get("size", media.defaults.size)
    width, height = media.framed(image, size)
    clips = media.clips.get((audio, num_clip))
    if clips is None:
        from ..pipeline.generate import num_clips_for

        clips = media.clips[(audio, num_clip)] = num_clips_for(media.samples(audio), num_clip)
    inputs = _Inputs(image, audio, prompt, size, num_clip, clips, width, height)
    if len(media.seen) < MAX_REMEMBERED:
        media.seen[(doc["image"], doc["audio"], prompt, size, num_clip)] = inputs
    return _Row(number, out, seed, inputs)


# ------------------------------------------------------------------------------------------ ownership

def marker_path(out: Path) -> Path:
    """The farm's marker beside a finished mp4: `.OUT.farm.json`."""
    return out.parent / f".{out.name}.farm.json"


def farm_key(job: FarmJob, identity: str, digest: Any = None) -> str:
    """What a job's frames depend on: the render's job key (inputs, prompt, size, seed, artifact) and the clip count.

    `digest(path)`: a file's sha256 (default: read it; plan_batch passes a cache)."""
    h = hashlib.sha256((job_key(job.request(), identity, digest) if digest else job_key(job.request(), identity)).encode())
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


class _Keys:
    """`job_key` and `farm_key` of many jobs, fast: the hash of what lines share (identity, prompt,
    size) is computed once per input combination and copied, and each input file hashed once.
    The same bytes as `job_key` hashes (tests/test_farm_jobs.py checks they agree)."""

    def __init__(self, identity: str) -> None:
        from ..artifact.format import file_sha256

        self.identity, self._sha = identity, file_sha256
        self._digests: dict[Path, bytes] = {}
        self._prefixes: dict[tuple[str, str, Path, Path], Any] = {}

    def _digest(self, path: Path) -> bytes:
        found = self._digests.get(path)
        if found is None:
            found = self._digests[path] = bytes.fromhex(self._sha(path))
        return found

    def digest_hex(self, path: Path) -> str:
        return self._digest(path).hex()

    def job_and_farm(self, job: FarmJob) -> tuple[str, str]:
        """(job_key(job.request(), identity), farm_key(job, identity))."""
        shared = (job.prompt, job.size, job.image, job.audio)
        prefix = self._prefixes.get(shared)
        if prefix is None:
            prefix = hashlib.sha256()
            for part in (self.identity, job.prompt, job.size):
                data = part.encode()
                prefix.update(len(data).to_bytes(8, "little") + data)
            if len(self._prefixes) < MAX_REMEMBERED:
                self._prefixes[shared] = prefix
        h = prefix.copy()
        seed = str(job.seed).encode()
        h.update(len(seed).to_bytes(8, "little") + seed)
        h.update(self._digest(job.image))
        h.update(self._digest(job.audio))
        key = h.hexdigest()
        farm = hashlib.sha256(key.encode())
        farm.update(f":{job.clips}".encode())
        return key, farm.hexdigest()


def plan_batch(jobs: Sequence[FarmJob], identity: str, source: Path) -> BatchPlan:
    """Which jobs are finished (mp4 + matching marker), which start or resume; UserError for an `out`
    the farm would overwrite without having written it, or a work dir of another render.

    Each out directory is listed once (the names in it), so a job whose mp4 and work dir are not
    there costs no file-system call; a name that is listed is looked at as before."""
    todo, done, keys, resuming = [], [], {}, {}
    maker = _Keys(identity)
    listed: dict[str, frozenset[str]] = {}  # an out directory (text) -> the names in it (checked writable first)

    pairs = jobs.with_out_text() if isinstance(jobs, Jobs) else ((job, str(job.out)) for job in jobs)
    for job, out_text in pairs:
        job_k, key = maker.job_and_farm(job)
        keys[job.line] = key
        directory, _, name = out_text.rpartition("/")
        names = listed.get(directory)
        if names is None:
            _check_writable(job.out.parent, f"{source}:{job.line}")
            try:
                with os.scandir(job.out.parent) as entries:
                    names = listed[directory] = frozenset(e.name for e in entries)
            except (FileNotFoundError, NotADirectoryError):
                names = listed[directory] = frozenset()
        if name in names and job.out.exists():
            marker = _marker_key(job.out)  # read only beside an mp4: most outs of a new batch do not exist
            if marker is None:
                raise UserError(f"{source}:{job.line}: out {job.out} exists and was not written by `farm run` (no "
                                f"{marker_path(job.out).name} beside it); move it away or choose another out")
            if marker == key:
                done.append(job)
                continue
            log.info("line %d: %s was rendered from other inputs; rendering it again", job.line, job.out)
        if f".{name}.work" in names:  # (RenderWorkDir.path_for's name)
            work = RenderWorkDir.path_for(job.out)
            if (work / "journal.json").exists():
                try:
                    doc = json.loads((work / "journal.json").read_text())
                except (OSError, ValueError):
                    doc = {}
                if doc.get("job_key") != job_k:
                    raise UserError(f"{source}:{job.line}: {work} holds an unfinished render of other inputs; "
                                    "remove it or choose another out")
                resuming[job.line] = int(doc.get("state_clips") or 0)
        todo.append(job)
    return BatchPlan(todo, done, keys, resuming)
