"""The job operations the HTTP routes call: the only layer between api.py and the queue and state dir.

Submit a job, cancel it, list and look jobs up, find a job's result and live files, pre-encode an
avatar, and the JSON views of both. The routes (api.py) only parse HTTP and call one of these;
these never see a request. Everything here is synchronous (the API runs it in its thread pool).

Inputs are validated with the same functions a render uses (photo framing, speech decoding, clip
count), so a job the queue accepts is one the worker can render; the uploads then move into the
blob store and the job row is inserted under one lock, which blob clean-up also takes. Ids and
file names from clients become paths only after they match the layout's patterns (layout.py).

    service.submit(form)            # JobRow, or ApiError(400/404/413/429) with one line
    service.video(job_id)           # Path of the mp4, or ApiError(404/409/410)
"""
from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..pipeline.request import RenderRequest
from .blobs import BlobStore
from .config import ServeConfig
from .joblog import job_state
from .layout import LIVE_FILE, StateDir, is_avatar_id, is_job_id, new_job_id
from .store import (
    CANCELLED,
    DONE,
    FAILED,
    PENDING,
    QUEUED,
    RUNNING,
    STATES,
    WAITING_FOR_DISK,
    AvatarRow,
    JobRow,
    JobStore,
    QueueFull,
)
from .uploads import ApiError, ReceivedForm

MAX_SEED = 2**63 - 1  # as the CLI's --seed (commands/flags.py)
MAX_CLIPS = 100_000


class JobService:
    def __init__(self, config: ServeConfig, layout: StateDir, store: JobStore, blobs: BlobStore,
                 blob_lock: threading.Lock, wake: threading.Event, *,
                 refusal: Callable[[], ApiError | None] = lambda: None,
                 progress: dict[str, float] | None = None,
                 predicted_clip_s: Callable[[], float | None] = lambda: None) -> None:
        """`refusal`: why new work is refused now (draining: 503, disk short: 507), or None;
        `progress`: running job id -> fraction of blocks done; `predicted_clip_s`: the plan's seconds per
        clip (the ETA before any clip has been timed)."""
        self.config, self.layout, self.store, self.blobs = config, layout, store, blobs
        self.blob_lock, self.wake = blob_lock, wake
        self.refusal, self.progress, self.predicted_clip_s = refusal, progress if progress is not None else {}, \
            predicted_clip_s

    # ---- jobs -------------------------------------------------------------------------------------

    def check_accepting(self) -> None:
        """ApiError 503 (draining) or 507 (the disk is short) before an upload is even read."""
        error = self.refusal()
        if error is not None:
            raise error

    def submit(self, form: ReceivedForm) -> JobRow:
        self.check_accepting()
        limits = self.config.limits
        if self.store.count(QUEUED) >= limits.max_queue:  # cheap check before any decoding
            raise self._queue_full()
        prompt = _prompt(form.text.get("prompt"), limits.max_prompt_chars)
        seed = _int_field(form.text, "seed", 42, 0, MAX_SEED)
        num_clip = _int_field(form.text, "num_clip", None, 1, MAX_CLIPS)
        avatar = self._avatar_for(form)
        size = form.text.get("size") or (avatar.size if avatar else self.config.size)
        if "audio" not in form.files:
            raise ApiError(400, "missing field 'audio' (the speech to animate)")
        image = form.files.get("image") or self.blobs.path(avatar.image)  # type: ignore[union-attr]
        inputs = self._validate(image, form.files["audio"], prompt, size, seed, num_clip)
        seconds = len(inputs.wave) / inputs.request.sample.audio_rate
        if seconds > limits.max_audio_seconds:
            raise ApiError(413, f"the audio is {seconds:.1f} s long; this server takes at most "
                                f"{limits.max_audio_seconds:g} s")
        with self.blob_lock:
            image_digest = avatar.image if avatar else self.blobs.put(form.files.pop("image"))
            audio_digest = self.blobs.put(form.files.pop("audio"))
            job = JobRow(id=new_job_id(), state=QUEUED, created=time.time(), image=image_digest, audio=audio_digest,
                         prompt=prompt, size=size, seed=seed, num_clip=num_clip, clips_total=inputs.num_clips,
                         avatar=avatar.id if avatar else None)
            try:
                self.store.add(job, limits.max_queue)
            except QueueFull:
                self.blobs.remove_except(self.store.blob_refs())  # the two blobs, unless another job holds them
                raise self._queue_full() from None
        job_state(job.id, QUEUED, job.created)
        self.wake.set()
        return job

    def cancel(self, job_id: str) -> JobRow:
        self.job(job_id)
        try:
            job = self.store.request_cancel(job_id)
        except LookupError:
            raise ApiError(404, f"no job {job_id}") from None
        except ValueError as e:
            raise ApiError(409, str(e)) from None
        if job.state == CANCELLED:  # it was queued or waiting for disk: what it had rendered goes
            shutil.rmtree(self.layout.job_dir(job_id), ignore_errors=True)
            job_state(job_id, CANCELLED, job.created, "cancelled while waiting")
        self.wake.set()
        return job

    def job(self, job_id: str) -> JobRow:
        job = self.store.get(job_id) if is_job_id(job_id) else None
        if job is None:
            raise ApiError(404, f"no job {job_id[:80]!r}")
        return job

    def list_views(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        """The views of the newest `limit` jobs (in `state` if given); ApiError 400 for a bad filter."""
        if state is not None and state not in STATES:
            raise ApiError(400, f"state must be one of {', '.join(STATES)}")
        if not 1 <= limit <= self.config.limits.max_jobs_listed:
            raise ApiError(400, f"limit must be between 1 and {self.config.limits.max_jobs_listed}")
        etas = self.etas()
        return [self.view(j, etas) for j in self.store.list(state, limit)]

    def current_view(self, job_id: str) -> dict[str, Any] | None:
        """The view of a job now, None once it is gone (pruned): what the progress stream polls."""
        job = self.store.get(job_id)
        return None if job is None else self.view(job)

    # ---- a job's files ----------------------------------------------------------------------------

    def video(self, job_id: str) -> Path:
        """The finished mp4 of a done job (409 before it is done, 410 if its file was removed)."""
        job = self.job(job_id)
        if job.state != DONE:
            raise ApiError(409, f"job {job_id} is {job.state}; its video exists once it is done")
        path = self.layout.video(job_id)
        if not path.is_file():
            raise ApiError(410, f"the video of job {job_id} is gone from the server")
        return path

    def live_file(self, job_id: str, name: str) -> Path:
        """`index.m3u8` or a `seg_NNNNN.ts` of the job's live HLS output; nothing else is served."""
        self.job(job_id)
        if not LIVE_FILE.match(name):
            raise ApiError(404, "the live output has only index.m3u8 and seg_NNNNN.ts")
        path = self.layout.live(job_id) / name
        if not path.is_file():
            raise ApiError(404, f"{name} is not there (yet)")
        return path

    def clip_mp4(self, job_id: str, index: int) -> bytes:
        """Finished clip `index` as a small mp4 (its live segment stream-copied; playback.py)."""
        from .playback import segment_mp4

        if not 0 <= index < MAX_CLIPS:
            raise ApiError(404, f"no clip {index}")
        return segment_mp4(self.live_file(job_id, f"seg_{index:05d}.ts"))

    def view(self, job: JobRow, etas: dict[str, float | None] | None = None) -> dict[str, Any]:
        """The JSON of a job (what GET /v1/jobs/{id} returns)."""
        etas = self.etas() if etas is None else etas
        base = f"/v1/jobs/{job.id}"
        return {
            "id": job.id, "state": job.state, "created": job.created, "started": job.started,
            "finished": job.finished, "prompt": job.prompt, "size": job.size, "seed": job.seed,
            "num_clip": job.num_clip, "avatar": job.avatar, "clips_total": job.clips_total,
            "clips_done": job.clips_done, "progress": self._progress(job), "eta_s": etas.get(job.id),
            "first_frame_s": job.first_frame_s,
            "render_s": job.render_s, "cancel_requested": job.cancel_requested, "error": job.error,
            "error_kind": job.error_kind, "resumed": job.resume, "worker_deaths": job.worker_deaths,
            "video": f"{base}/video" if job.state == DONE else None,
            "live": f"{base}/live/index.m3u8" if job.state in (RUNNING, DONE) else None,
            "events": f"{base}/events",
        }

    def _progress(self, job: JobRow) -> float:
        """Fraction of the job's blocks rendered (per block while it runs; never less than its clips)."""
        if job.state == DONE:
            return 1.0
        by_clips = job.clips_done / job.clips_total if job.clips_total else 0.0
        return round(max(by_clips, self.progress.get(job.id, 0.0)), 4)

    def etas(self) -> dict[str, float | None]:
        """Seconds until each unfinished job is done, from the mean seconds per clip of recent jobs
        (before any job has finished: the plan's predicted seconds per clip)."""
        per_clip = self.store.mean_clip_seconds() or self.predicted_clip_s()
        running = self.store.list(RUNNING, limit=100)
        queued = list(reversed(self.store.list(QUEUED, limit=self.config.limits.max_queue + 100)))
        queued += list(reversed(self.store.list(WAITING_FOR_DISK, limit=100)))
        queued.sort(key=lambda j: not j.resume)  # claim order: interrupted first, then oldest (stable)
        if per_clip is None:
            return {j.id: None for j in running + queued}
        etas: dict[str, float | None] = {}
        ahead = 0.0
        for j in running:
            etas[j.id] = (1.0 - self._progress(j)) * j.clips_total * per_clip
            ahead = max(ahead, etas[j.id] or 0.0)
        for j in queued:
            ahead += j.clips_total * per_clip
            etas[j.id] = ahead
        return etas

    def retry_after(self) -> int:
        """Seconds a client should wait when the queue is full: until the next job is likely done."""
        per_clip = self.store.mean_clip_seconds() or 10.0
        running = self.store.list(RUNNING, limit=1)
        left = (running[0].clips_total - running[0].clips_done) if running else 1
        return max(1, round(left * per_clip))

    def _queue_full(self) -> ApiError:
        return ApiError(429, f"the queue is full ({self.config.limits.max_queue} jobs waiting); try again later",
                        {"Retry-After": str(self.retry_after())})

    # ---- avatars ----------------------------------------------------------------------------------

    def create_avatar(self, form: ReceivedForm) -> tuple[AvatarRow, bool]:
        """(avatar, created): validate the photo at its size and queue its encoding (first in line)."""
        from ..conditioning.photo import load_reference

        if "image" not in form.files:
            raise ApiError(400, "missing field 'image' (the photo to pre-encode)")
        size = form.text.get("size") or self.config.size
        prompt = _prompt(form.text["prompt"], self.config.limits.max_prompt_chars) if "prompt" in form.text else None
        image = form.files["image"]
        _user_errors(lambda: load_reference(image, size), {image: "the uploaded image"})
        with self.blob_lock:
            digest = self.blobs.put(form.files.pop("image"))
            key = hashlib.sha256(f"{digest}\0{size}\0{prompt}".encode()).hexdigest()[:32]
            row = AvatarRow(id=f"av_{key}", state=PENDING, created=time.time(), image=digest, size=size,
                            prompt=prompt)
            stored = self.store.add_avatar(row)
        self.wake.set()
        return stored, stored is row

    def avatar(self, avatar_id: str) -> AvatarRow:
        row = self.store.get_avatar(avatar_id) if is_avatar_id(avatar_id) else None
        if row is None:
            raise ApiError(404, f"no avatar {avatar_id[:80]!r}")
        return row

    @staticmethod
    def avatar_view(row: AvatarRow) -> dict[str, Any]:
        return {"id": row.id, "state": row.state, "size": row.size, "prompt": row.prompt, "error": row.error}

    def _avatar_for(self, form: ReceivedForm) -> AvatarRow | None:
        if "avatar" in form.text and "image" in form.files:
            raise ApiError(400, "send either 'image' or 'avatar', not both")
        if "avatar" not in form.text:
            if "image" not in form.files:
                raise ApiError(400, "missing field 'image' (the photo) or 'avatar' (a pre-encoded photo's id)")
            return None
        row = self.avatar(form.text["avatar"])
        if row.state == FAILED:
            raise ApiError(409, f"avatar {row.id} failed to encode: {row.error}")
        return row

    def _validate(self, image: Path, audio: Path, prompt: str, size: str, seed: int, num_clip: int | None) -> Any:
        from ..pipeline.generate import prepare_inputs

        request = RenderRequest(image=image, audio=audio, prompt=prompt, size=size, seed=seed, num_clip=num_clip,
                                progress=False)
        from ..conditioning.speech import SpeechTooLong

        limit = self.config.limits.max_audio_seconds
        try:  # the speech's length is checked from its header first, its decode bounded by the limit
            return _user_errors(lambda: prepare_inputs(request, limit),
                                {image: "the uploaded image", audio: "the uploaded audio"}, SpeechTooLong)
        except SpeechTooLong:
            raise ApiError(413, f"the audio is longer than this server takes (at most {limit:g} s)") from None


def _user_errors(call: Any, names: dict[Path, str], passed: type[Exception] | tuple = ()) -> Any:
    """call(); a UserError (other than `passed` ones) becomes a 400 whose message names the upload, not its temp path."""
    try:
        return call()
    except passed:
        raise
    except UserError as e:
        message = str(e)
        for path, name in names.items():
            message = message.replace(f"file {path}", name).replace(str(path), name)
        raise ApiError(400, message.replace("--size", "size")) from None


def _prompt(text: str | None, max_chars: int) -> str:
    prompt = (text or "").strip()
    if not prompt:
        raise ApiError(400, "missing field 'prompt' (what the video shows, e.g. 'a person talking to the camera')")
    if len(prompt) > max_chars:
        raise ApiError(400, f"the prompt has {len(prompt)} characters; at most {max_chars} are allowed")
    from ..conditioning.text_tokenizer import check_prompt

    try:  # the rules a render applies (no NUL, ...), for every endpoint that takes a prompt
        check_prompt(prompt)
    except UserError as e:
        raise ApiError(400, str(e).replace("--prompt", "prompt")) from None
    return prompt


def _int_field(text: dict[str, str], name: str, default: int | None, low: int, high: int) -> int | None:
    if name not in text or text[name].strip() == "":
        return default
    try:
        value = int(text[name].strip())
    except ValueError:
        raise ApiError(400, f"field {name!r} must be an integer, got {text[name][:40]!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"field {name!r} must be between {low} and {high}, got {value}")
    return value
