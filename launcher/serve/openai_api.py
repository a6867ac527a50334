"""The OpenAI Videos API (`/v1/videos`) over the same job store, beside `/jobs`.

What an OpenAI SDK client sends (`client.videos.create(prompt=, model=, seconds=, size=,
input_reference=)`, always multipart; JSON is taken too) becomes the fields of a `/jobs` request
and is checked by the same code. `model` must name what this server runs: its task or the task's
Hub repository. `seconds` becomes the nearest valid frame count (4n+1) at the task's fps, and the
answer says which (`seconds` as made, `frame_num`, `fps`). This server's own fields (seed,
frame_num, sample_steps, negative_prompt, MagCache settings...) ride along as extra fields.
"""
from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from launcher.serve.jobs import TERMINAL, Job, JobStore, NotCancellable, is_job_id
from launcher.serve.requests import BadRequest, from_text, typed_fields

_STATUS = {"queued": "queued", "running": "in_progress", "done": "completed", "failed": "failed",
           "cancelled": "failed"}
#: the OpenAI fields; everything else is one of this server's request fields
_OPENAI_FIELDS = ("prompt", "model", "seconds", "size", "input_reference")
#: a form's fields and files beyond these are refused before anything is read into memory
_MAX_FORM_FIELDS = 64


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """The OpenAI error shape (the SDK raises it with `message`)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def _as_openai(response: Response) -> Response:
    """A refusal from the shared intake (`{"error": "..."}`) in the OpenAI error shape."""
    import json

    if response.status_code < 400:
        return response
    return error(response.status_code, json.loads(bytes(response.body))["error"])


def frames_for(seconds: float, fps: int) -> int:
    """The valid frame count (4n+1, at least 1) nearest `seconds` at `fps`."""
    return 4 * max(0, round((seconds * fps - 1) / 4)) + 1


def job_fields(given: dict[str, Any], task: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """OpenAI create parameters (plus this server's extra fields) -> `/jobs` request fields;
    `names`: what `model` may say (the task first)."""
    fields = {k: v for k, v in given.items() if k not in _OPENAI_FIELDS}
    fields["prompt"] = given.get("prompt")
    model = given.get("model")
    if model not in (None, "") and model not in names:
        raise BadRequest(f"model {model!r}: this server runs {names[0]} ({', '.join(names[1:])})")
    if given.get("size") not in (None, ""):
        size = str(given["size"])
        if size.count("x") != 1:
            raise BadRequest(f"size {size!r}: expected WIDTHxHEIGHT, e.g. 1280x720")
        fields["size"] = size.replace("x", "*")
    if given.get("seconds") not in (None, ""):
        if "frame_num" in fields:
            raise BadRequest("give seconds or frame_num, not both")
        try:
            seconds = float(given["seconds"])
        except (TypeError, ValueError):
            raise BadRequest(f"seconds {given['seconds']!r}: not a number") from None
        if not seconds > 0:
            raise BadRequest(f"seconds {seconds:g}: must be > 0")
        fields["frame_num"] = frames_for(seconds, task.sample_fps)
    reference = given.get("input_reference")
    if reference is not None:
        fields["image"] = reference if isinstance(reference, str) else base64.b64encode(reference).decode()
    return typed_fields(fields)


def video_object(job: Job, task: Any) -> dict[str, Any]:
    """A job as the OpenAI video object, plus what this server adds (seed, frame_num, fps)."""
    resolved = job.request.get("resolved") or {}
    frames, fps = resolved.get("frame_num", 0), resolved.get("fps", task.sample_fps)
    progress = 100 if job.state == "done" else int(100 * job.step / job.steps) if job.steps else 0
    failed = job.state in ("failed", "cancelled")
    return {
        "id": job.id, "object": "video", "model": job.request.get("model") or task.name,
        "status": _STATUS[job.state], "progress": progress, "created_at": int(job.created),
        "completed_at": int(job.finished) if job.finished and job.state in TERMINAL else None,
        "expires_at": None, "prompt": job.request.get("prompt"),
        "seconds": f"{frames / fps:.3g}" if fps else "0",
        "size": f"{resolved.get('width')}x{resolved.get('height')}",
        "error": {"code": job.state if failed else None, "message": job.error or job.state} if failed else None,
        "remixed_from_video_id": None,
        "seed": job.request.get("seed"), "frame_num": frames, "fps": fps, "state": job.state,
    }


async def _given(request: Request, body: bytes) -> dict[str, Any]:
    """The create parameters from a JSON or multipart/urlencoded body (already read under its cap)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, receive=replay).form(max_files=1, max_fields=_MAX_FORM_FIELDS)
        except Exception as e:  # noqa: BLE001 - python-multipart raises several kinds for a broken body
            raise BadRequest(f"malformed form body ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        given: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                given[key] = await value.read()
            else:
                given[key] = value if key in _OPENAI_FIELDS else from_text(key, value)
        await form.close()
        return given
    import json

    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("body is neither JSON nor a multipart form") from None
    if not isinstance(obj, dict):
        raise BadRequest('expected a JSON object like {"prompt": "..."}')
    return obj


def routes(store: JobStore, settings: Any, read: Callable[[Request], Awaitable[bytes | Response]],
           submit: Callable[[dict[str, Any], Request, dict[str, Any]], Awaitable[Job | Response]]) -> list[Route]:
    """`read`: the body under the server's limits (or the refusal); `submit`: queue typed fields
    (plus stored extras), or the refusal."""
    task, names = settings.task, settings.model_names

    def find(request: Request) -> Job | None:
        video_id = request.path_params["video_id"]
        return store.get(video_id) if is_job_id(video_id) else None

    async def create(request: Request) -> Response:
        body = await read(request)
        if isinstance(body, Response):
            return _as_openai(body)
        try:
            given = await _given(request, body)
            fields = job_fields(given, task, names)
        except BadRequest as e:
            return error(400, str(e))
        model = given.get("model") or None  # stored to be shown back as asked; not a run field
        job = await submit(fields, request, {"model": model} if model else {})
        if isinstance(job, Response):
            return _as_openai(job)
        return JSONResponse(video_object(job, task))

    async def retrieve(request: Request) -> Response:
        job = find(request)
        return error(404, "no such video", "video_id") if job is None else JSONResponse(video_object(job, task))

    async def listing(request: Request) -> Response:
        q = request.query_params
        jobs = store.list()
        if q.get("order", "desc") == "desc":
            jobs.reverse()
        if "after" in q:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(q["after"]) + 1:] if q["after"] in ids else []
        try:
            limit = max(1, min(100, int(q.get("limit", 20))))
        except ValueError:
            return error(400, f"limit {q.get('limit')!r}: not an integer", "limit")
        page = [video_object(j, task) for j in jobs[:limit]]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(jobs) > limit})

    async def content(request: Request) -> Response:
        job = find(request)
        if job is None:
            return error(404, "no such video", "video_id")
        if request.query_params.get("variant", "video") != "video":
            return error(400, "only variant=video exists here", "variant")
        if job.state != "done":
            return error(409, f"video {job.id} is {_STATUS[job.state]}; its content exists once it is completed")
        path = store.video_path(job.id)
        return FileResponse(path, media_type="video/mp4", filename=f"{job.id}{Path(path).suffix}")

    async def delete(request: Request) -> Response:
        """Queued or ended: removed (files too). Running: stops at its next step (`deleted` false until then)."""
        job = find(request)
        if job is None:
            return error(404, "no such video", "video_id")
        try:
            if job.state == "running":
                store.cancel(job.id)
                return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": False,
                                     "status": "in_progress"}, status_code=202)
            store.remove(job.id)
        except NotCancellable as e:  # it ended meanwhile: delete again
            return error(409, str(e))
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})

    return [
        Route("/v1/videos", create, methods=["POST"]), Route("/v1/videos", listing, methods=["GET"]),
        Route("/v1/videos/{video_id}", retrieve, methods=["GET"]),
        Route("/v1/videos/{video_id}", delete, methods=["DELETE"]),
        Route("/v1/videos/{video_id}/content", content, methods=["GET"]),
    ]
