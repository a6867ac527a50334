"""The HTTP API (Starlette), served by uvicorn in the HTTP process beside rank 0 (`front.py`).

Starlette rather than FastAPI: requests are validated by the same code as batch lines (one-line
reasons), so pydantic models would only duplicate them; Starlette is FastAPI's own core, small,
and has what we need (routing, streaming for server-sent events, file responses).
Handlers are plain functions (Starlette runs them in its thread pool) that read or write the
JobStore; none of them waits for the ranks, and none runs in a rank's interpreter.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from launcher.serve.jobs import (
    TERMINAL,
    Job,
    JobStore,
    NotCancellable,
    QueueFull,
    is_job_id,
    new_job_id,
)
from launcher.serve.limits import LimitExceeded, read_body
from launcher.serve.openai_api import routes as openai_routes
from launcher.serve.requests import BadRequest, ServeSettings, parse_body, relocate, validate_fields

#: answered without the token: the page (it asks for the token) and /health's up/down
OPEN_PATHS = frozenset({"/", "/health"})
PAGE = Path(__file__).with_name("page.html")


@dataclass
class Health:
    """What `/health` reports; rank 0's loop updates it, the HTTP thread reads it."""

    world: int = 1
    dp: int = 1
    state: str = "loading"  # loading | ready | stopping | unhealthy
    error: str | None = None
    pids: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.state != "unhealthy"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(store: JobStore, settings: ServeSettings, health: Health, *, tokens: tuple[str, ...] = (),
               metrics: Any = None) -> Any:
    def token_of(request: Request) -> str | None:
        """The server token this request carries (None: none of them)."""
        given = request.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else request.query_params.get("token", "")
        found = None
        for token in tokens:  # every one compared: the time taken says nothing about which matched
            if hmac.compare_digest(given.encode(), token.encode()):
                found = token
        return found

    def authorized(request: Request) -> bool:
        return not tokens or token_of(request) is not None

    def client_of(request: Request) -> str:
        """Whose share of the queue a job counts against: its token (hashed: state.json is on disk),
        or the peer address when the server has no tokens."""
        token = token_of(request) if tokens else None
        if token is not None:
            return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]
        return "addr:" + (request.client.host if request.client else "unknown")

    def job_or_404(request: Request):
        job_id = request.path_params["job_id"]
        job = store.get(job_id) if is_job_id(job_id) else None
        return job

    async def page(request: Request) -> Response:
        return Response(PAGE.read_text(encoding="utf-8"), media_type="text/html; charset=utf-8")

    async def get_health(request: Request) -> JSONResponse:
        if not authorized(request):  # a liveness probe: up or down, nothing else
            return JSONResponse({"ok": health.ok}, status_code=200 if health.ok else 503)
        body = {"ok": health.ok, "world": health.world, "dp": health.dp, "state": health.state,
                "error": health.error, "jobs": store.counts(), "pids": health.pids,
                "defaults": {"use_magcache": bool(settings.flags.get("use_magcache"))},
                "uptime_s": round(time.time() - health.started, 1)}
        return JSONResponse(body, status_code=200 if health.ok else 503)

    async def read(request: Request) -> bytes | Response:
        """The body under --max-body-mb and --body-timeout, or the refusal (also while stopping)."""
        if health.state in ("stopping", "unhealthy"):
            return _error(503, f"the server is {health.state}; not accepting jobs")
        try:
            return await read_body(request.stream(), request.headers.get("content-length"), settings.limits)
        except LimitExceeded as e:
            return _error(e.status, str(e))

    async def submit(fields: dict[str, Any], request: Request, extra: dict[str, Any] | None = None) -> Job | Response:
        """Typed request fields -> a queued job, or the refusal (400 invalid, 429 no room)."""
        return await asyncio.to_thread(_submit, fields, client_of(request), extra or {})

    def _submit(fields: dict[str, Any], client: str, extra: dict[str, Any]) -> Job | Response:
        try:
            store.check_room(client)
        except QueueFull as e:
            return _error(429, str(e))
        staged = store.stage()
        try:
            request = dict(validate_fields(fields, settings, staged), **extra)
            job_id = new_job_id()
            return store.add(job_id, relocate(request, staged, store.job_dir(job_id)), staged, client)
        except BadRequest as e:
            return _error(400, str(e))
        except QueueFull as e:
            return _error(429, str(e))
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    async def post_job(request: Request) -> Response:
        body = await read(request)
        if isinstance(body, Response):
            return body
        try:
            fields = parse_body(body)
        except BadRequest as e:
            return _error(400, str(e))
        job = await submit(fields, request)
        if isinstance(job, Response):
            return job
        return JSONResponse({"id": job.id, "state": job.state, "seed": job.request["seed"]}, status_code=202,
                            headers={"Location": f"/jobs/{job.id}"})

    async def list_jobs(request: Request) -> JSONResponse:
        return JSONResponse({"jobs": [j.public() for j in store.list()]})

    async def get_job(request: Request) -> JSONResponse:
        job = job_or_404(request)
        return _error(404, "no such job") if job is None else JSONResponse(job.public())

    async def delete_job(request: Request) -> JSONResponse:
        job = job_or_404(request)
        if job is None:
            return _error(404, "no such job")
        try:
            job = store.cancel(job.id)  # a running job stops at its next step: 202 until it has
            return JSONResponse(job.public(), status_code=202 if job.state == "running" else 200)
        except NotCancellable as e:
            return _error(409, str(e))

    def _file(request: Request, name: str, media_type: str) -> Response:
        job = job_or_404(request)
        if job is None:
            return _error(404, "no such job")
        if job.state != "done":
            return _error(409, f"job {job.id} is {job.state}; its {name} exists once it is done")
        path = store.job_dir(job.id) / name
        return FileResponse(path, media_type=media_type, filename=f"{job.id}{Path(name).suffix}")

    def get_video(request: Request) -> Response:
        return _file(request, "video.mp4", "video/mp4")

    def get_manifest(request: Request) -> Response:
        return _file(request, "video.json", "application/json")

    async def events(request: Request) -> Response:
        """Server-sent events: the job's status each time it changes, until it ends."""
        job = job_or_404(request)
        if job is None:
            return _error(404, "no such job")

        async def stream():
            last = None
            while True:
                current = store.get(job.id)
                assert current is not None
                status = current.public()
                text = json.dumps(status)
                if text != last:
                    last = text
                    yield f"event: status\ndata: {text}\n\n"
                if status["state"] in TERMINAL or await request.is_disconnected():
                    return
                await asyncio.sleep(0.2)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def get_metrics(request: Request) -> Response:
        from launcher.serve.metrics import CONTENT_TYPE

        if metrics is None:
            return _error(404, "no metrics here")
        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE)

    routes = [
        Route("/metrics", get_metrics),
        Route("/", page), Route("/health", get_health),
        Route("/jobs", post_job, methods=["POST"]), Route("/jobs", list_jobs, methods=["GET"]),
        Route("/jobs/{job_id}", get_job, methods=["GET"]), Route("/jobs/{job_id}", delete_job, methods=["DELETE"]),
        Route("/jobs/{job_id}/video", get_video), Route("/jobs/{job_id}/manifest", get_manifest),
        Route("/jobs/{job_id}/events", events),
        *openai_routes(store, settings, read, submit),
    ]
    return _BearerToken(Starlette(routes=routes), authorized)


class _BearerToken:
    """401 for any request without the token. Plain ASGI (not BaseHTTPMiddleware): a status poll
    costs one header check, not an extra task and stream per request."""

    def __init__(self, app: Any, authorized: Any) -> None:
        self.app = app
        self.authorized = authorized

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self.authorized(Request(scope)):
            response = JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer T)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
