"""`magcache-launch submit`: post one job to a server, follow it, download the video (stdlib only).

Progress comes from the job's server-sent events; if the stream breaks, the client falls back
to polling `GET /jobs/{id}`. Exit 0 when the video is saved, 1 when the job failed or was
cancelled, 2 for a request the server rejected (its one-line reason is printed).
"""
from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from launcher.errors import InputError, RunFailed


class Client:
    def __init__(self, server: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> urllib.request.Request:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return urllib.request.Request(self.server + path, data=data, method=method, headers=headers)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) for any status; connection problems raise RunFailed."""
        try:
            with urllib.request.urlopen(self._request(method, path, body), timeout=self.timeout) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                payload = json.loads(e.read() or b"{}")
            except ValueError:
                payload = {"error": e.reason}
            return e.code, payload
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RunFailed(f"cannot reach the server at {self.server} ({reason})") from None

    def submit(self, fields: dict[str, Any]) -> str:
        status, body = self.call("POST", "/jobs", fields)
        if status == 202:
            return str(body["id"])
        message = body.get("error", f"HTTP {status}")
        if status in (400, 401, 413):
            raise InputError(f"the server rejected the job: {message}")
        raise RunFailed(f"the server did not take the job (HTTP {status}): {message}")

    def events(self, job_id: str):
        """Each status the server streams for the job (ends when the job ends or the stream breaks)."""
        req = self._request("GET", f"/jobs/{job_id}/events")
        with urllib.request.urlopen(req, timeout=max(self.timeout, 60)) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    yield json.loads(line[5:])

    def wait(self, job_id: str, *, on_status: Any = None, poll_s: float = 1.0) -> dict[str, Any]:
        status: dict[str, Any] = {}
        try:
            for status in self.events(job_id):
                if on_status:
                    on_status(status)
                if status["state"] in ("done", "failed", "cancelled"):
                    return status
        except (urllib.error.URLError, OSError, ValueError):
            pass  # fall back to polling
        while True:
            code, status = self.call("GET", f"/jobs/{job_id}")
            if code != 200:
                raise RunFailed(f"job {job_id}: HTTP {code}: {status.get('error')}")
            if on_status:
                on_status(status)
            if status["state"] in ("done", "failed", "cancelled"):
                return status
            time.sleep(poll_s)

    def download(self, job_id: str, out: Path) -> Path:
        from launcher.outputs.atomic import atomic_path

        req = self._request("GET", f"/jobs/{job_id}/video")
        with (urllib.request.urlopen(req, timeout=max(self.timeout, 300)) as resp, atomic_path(out, ".mp4") as tmp,
              open(tmp, "wb") as f):
            while chunk := resp.read(1 << 20):
                f.write(chunk)
        return out


def image_field(path: Path) -> str:
    """A local image as the data: URL the server accepts."""
    if not path.is_file():
        raise InputError(f"--image {path}: file not found")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def run_submit(server: str, fields: dict[str, Any], *, token: str | None, out: Path | None, wait: bool) -> int:
    client = Client(server, token)
    job_id = client.submit({k: v for k, v in fields.items() if v is not None})
    print(json.dumps({"id": job_id}), flush=True)
    if not wait:
        return 0
    last = [None]

    def show(status: dict[str, Any]) -> None:
        p = status.get("progress") or {}
        line = f"{job_id}: {status['state']} {p.get('step', 0)}/{p.get('steps', 0)}"
        if line != last[0]:
            print(line, file=sys.stderr, flush=True)
            last[0] = line

    final = client.wait(job_id, on_status=show)
    if final["state"] != "done":
        raise RunFailed(f"job {job_id} {final['state']}: {final.get('error') or 'no error given'}")
    target = client.download(job_id, out if out is not None else Path(f"{job_id}.mp4"))
    print(json.dumps({"id": job_id, "video": str(target)}), flush=True)
    return 0
