"""The HTTP API (FastAPI): versioned JSON routes, bearer auth, one-line JSON errors, the page at `/`.

    POST   /v1/jobs                       multipart image|avatar, audio, prompt [, size, seed, num_clip] -> {"id"}
    GET    /v1/jobs[?state=&limit=]       newest first
    GET    /v1/jobs/{id}                  state, clips_done / clips_total, eta_s, timings, error
    DELETE /v1/jobs/{id}                  cancel (queued: at once; running: between two blocks)
    GET    /v1/jobs/{id}/video            the mp4 once done
    GET    /v1/jobs/{id}/live/index.m3u8  HLS while rendering (and after); segments beside it
    GET    /v1/jobs/{id}/clips/{n}        finished clip n as mp4 (the page's progressive playback)
    GET    /v1/jobs/{id}/events           progress as server-sent events, until the job ends
    POST   /v1/avatars                    multipart image [, size, prompt] -> {"id"}: pre-encode a photo
    GET    /v1/avatars/{id}
    POST   /v1/sessions                   multipart image|avatar, prompt [, size, seed, idle] -> {"id", "stream"}
    GET    /v1/sessions                   the latest session (at most one is waiting or open)
    GET    /v1/sessions/{id}              waiting | open | ended (and why)
    DELETE /v1/sessions/{id}              end it
    WS     /v1/sessions/{id}/stream       talk: PCM in, fragmented mp4 out (sessions.py; ?token= for browsers)
    POST   /v1/admin/drain                finish the running job, start nothing more, then exit 0
    GET    /healthz  /readyz  /metrics    liveness, ready for work (else why not), Prometheus

Every error is `{"error": "one line"}` with a 4xx (5xx only for our own bugs).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .layout import StateDir
from .metrics import ServeMetrics
from .service import JobService
from .store import TERMINAL
from .uploads import (
    AVATAR_FIELDS,
    DRAIN_BYTES,
    JOB_FIELDS,
    ApiError,
    drain,
    receive_form,
)

log = logging.getLogger(__name__)

STATIC = resources.files("liveavatar_lite.serve") / "static"
SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 15.0


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 (declared) or stops being read."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            if declared.isdigit() and int(declared) <= self.max_bytes + DRAIN_BYTES:
                await drain(receive)  # so the client finishes sending and reads the 413
            await _error(413, self._message())(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await drain(receive)
                    raise BodyTooLarge(self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than this server accepts ({self.max_bytes / 1e6:g} MB)"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    line = " ".join(str(message).split()) or "error"  # one line, always
    return JSONResponse({"error": line}, status_code=status, headers=headers)


def _disk_full(e: BaseException) -> bool:
    import errno
    import sqlite3

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, sqlite3.OperationalError) and "full" in str(e)


def create_app(service: JobService, layout: StateDir, metrics: ServeMetrics, executor_status: Any,
               token: str | None, drain: Any = None, sessions: Any = None) -> FastAPI:
    """The FastAPI app over a running service (server.py wires the parts)."""
    app = FastAPI(title="liveavatar-lite", docs_url=None, redoc_url=None, openapi_url=None)
    config = service.config
    # Uploads are decoded and checked one at a time on one thread: N concurrent uploads never decode
    # N photos and speeches at once, and that memory is reused by one thread (one malloc arena)
    # instead of spreading over the 40 threads of the request pool for a server that runs for days.
    validator = ThreadPoolExecutor(1, thread_name_prefix="serve-validate")

    async def validated(call: Any, form: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(validator, call, form)

    # ---- errors -----------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return _error(413, str(e), {"Connection": "close"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"not found: {request.method} {request.url.path[:100]}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:100]}"
        else:
            message = str(e.detail)
        return _error(e.status_code, message, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "path", "body"))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        if _disk_full(e):  # an upload, a blob or the queue database on a full state dir: not our bug
            log.warning("the state dir is full: %s", e)
            return _error(507, "the server's disk is full; try again later")
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(e).__name__}")

    # ---- auth -------------------------------------------------------------------------------------

    def authorize(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token (send `Authorization: Bearer TOKEN`)",
                           {"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    # ---- jobs -------------------------------------------------------------------------------------

    @v1.post("/jobs", status_code=201)
    async def create_job(request: Request) -> JSONResponse:
        service.check_accepting()  # draining (503) or a short disk (507): before the body is read
        form = await receive_form(request, JOB_FIELDS, layout.tmp, config.limits)
        try:
            job = await validated(service.submit, form)
        finally:
            form.cleanup()
        return JSONResponse({"id": job.id, "state": job.state, "clips_total": job.clips_total}, status_code=201,
                            headers={"Location": f"/v1/jobs/{job.id}"})

    @v1.get("/jobs")
    def list_jobs(state: str | None = None, limit: int = 100) -> dict:
        return {"jobs": service.list_views(state, limit)}

    @v1.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return service.view(service.job(job_id))

    @v1.delete("/jobs/{job_id}")
    def cancel_job(job_id: str) -> JSONResponse:
        job = service.cancel(job_id)
        # a queued job is cancelled now (200); a running one stops between two blocks (202)
        return JSONResponse(service.view(job), status_code=200 if job.state == "cancelled" else 202)

    @v1.get("/jobs/{job_id}/video")
    def video(job_id: str) -> FileResponse:
        return FileResponse(service.video(job_id), media_type="video/mp4", filename=f"{job_id}.mp4")

    @v1.get("/jobs/{job_id}/live/{name}")
    def live(job_id: str, name: str) -> FileResponse:
        path = service.live_file(job_id, name)
        kind = "application/vnd.apple.mpegurl" if name.endswith(".m3u8") else "video/mp2t"
        return FileResponse(path, media_type=kind, headers={"Cache-Control": "no-cache"})

    @v1.get("/jobs/{job_id}/clips/{index}")
    def clip(job_id: str, index: int) -> Response:
        return Response(service.clip_mp4(job_id, index), media_type="video/mp4", headers={"Cache-Control": "no-cache"})

    @v1.get("/jobs/{job_id}/events")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        await run_in_threadpool(service.job, job_id)  # 404 before the stream starts

        async def stream():
            last, quiet_since = None, time.monotonic()
            while True:
                view = await run_in_threadpool(service.current_view, job_id)
                if view is None:
                    return
                if view != last:
                    yield f"event: job\ndata: {json.dumps(view)}\n\n"
                    last, quiet_since = view, time.monotonic()
                if view["state"] in TERMINAL or await request.is_disconnected():
                    return
                if time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                    yield ": keepalive\n\n"
                    quiet_since = time.monotonic()
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- avatars ----------------------------------------------------------------------------------

    @v1.post("/avatars", status_code=201)
    async def create_avatar(request: Request) -> JSONResponse:
        service.check_accepting()
        form = await receive_form(request, AVATAR_FIELDS, layout.tmp, config.limits)
        try:
            row, created = await validated(service.create_avatar, form)
        finally:
            form.cleanup()
        return JSONResponse(service.avatar_view(row), status_code=201 if created else 200,
                            headers={"Location": f"/v1/avatars/{row.id}"})

    @v1.get("/avatars/{avatar_id}")
    def get_avatar(avatar_id: str) -> dict:
        return service.avatar_view(service.avatar(avatar_id))

    # ---- talk sessions (sessions.py) ------------------------------------------------------------

    def broker() -> Any:
        if sessions is None:
            raise ApiError(501, "talk sessions need the local worker (serve --backend local)")
        return sessions

    @v1.post("/sessions", status_code=201)
    async def create_session(request: Request) -> JSONResponse:
        from .sessions import SESSION_FIELDS, create_session

        b = broker()
        service.check_accepting()
        form = await receive_form(request, SESSION_FIELDS, layout.tmp, config.limits)
        try:
            slot = await validated(lambda f: create_session(service, b, f), form)
        finally:
            form.cleanup()
        return JSONResponse(b.view(slot), status_code=201, headers={"Location": f"/v1/sessions/{slot.id}"})

    def session_slot(session_id: str) -> Any:
        slot = broker().get(session_id)
        if slot is None:
            raise ApiError(404, f"no session {session_id[:80]!r} (only the latest one is known)")
        return slot

    @v1.get("/sessions")
    def list_sessions() -> dict:
        slot = broker().current
        return {"sessions": [broker().view(slot)] if slot is not None else []}

    @v1.get("/sessions/{session_id}")
    def get_session(session_id: str) -> dict:
        return broker().view(session_slot(session_id))

    @v1.delete("/sessions/{session_id}")
    def end_session(session_id: str) -> dict:
        slot = session_slot(session_id)
        broker().close(slot.id, "closed")
        return broker().view(slot)

    @app.websocket("/v1/sessions/{session_id}/stream")
    async def session_stream(websocket: WebSocket, session_id: str) -> None:
        from .sessions import bridge

        if sessions is None:
            await websocket.accept()
            await websocket.send_text(json.dumps({"error": "talk sessions need the local worker"}))
            await websocket.close(1008)
            return
        await bridge(websocket, sessions, session_id, token, metrics)

    @v1.post("/admin/drain", status_code=202)
    def drain_now() -> JSONResponse:
        if drain is None:
            raise ApiError(404, "this server cannot drain")
        drain()
        return JSONResponse({"draining": True}, status_code=202)

    app.include_router(v1)

    # ---- health, metrics, the page ----------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        status = executor_status()
        return JSONResponse({"ready": bool(status.get("ready")), "reason": status.get("reason"), "worker": status},
                            status_code=200 if status.get("ready") else 503)

    @app.get("/metrics", dependencies=[Depends(authorize)])
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(Path(str(STATIC / "index.html")), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
