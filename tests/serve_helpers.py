"""Start real `serve` processes (one process or torchrun) on loopback and talk to them over HTTP."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import ROOT, cli_env

#: the tiny checkpoint's request defaults: small enough that a job takes about a second on one core
SERVE_FLAGS = ["--task", "t2v-A14B", "--size", "64*64", "--frame_num", "5", "--sample_steps", "4"]


class Server:
    """A `magcache-launch serve` subprocess; its URL is read from JOBS_DIR/server.json."""

    def __init__(self, ckpt: Path, jobs_dir: Path, *extra: str, nproc: int = 1, token: str | None = None,
                 log: Path | None = None) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.token = token
        (self.jobs_dir / "server.json").unlink(missing_ok=True)
        args = ["serve", "--ckpt_dir", str(ckpt), *SERVE_FLAGS, "--port", "0", "--jobs-dir", str(jobs_dir), *extra]
        if token:
            args += ["--token", token]
        if nproc == 1:
            cmd = [sys.executable, "-m", "launcher", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "launcher", *args]
        self.log = log or self.jobs_dir.parent / f"{self.jobs_dir.name}-server.log"
        self._log_file = open(self.log, "w")  # noqa: SIM115 - lives as long as the server process
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=cli_env(), cwd=ROOT,
                                     start_new_session=True)  # kill() takes torchrun's workers too
        self.url = self._wait_for_url()

    def _wait_for_url(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        info = self.jobs_dir / "server.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            if info.is_file():
                url = json.loads(info.read_text())["url"]
                self.url = url
                if self.call("GET", "/health")[1].get("state") == "ready":
                    return url
            time.sleep(0.2)
        raise AssertionError(f"server not ready within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text()

    def said(self) -> str:
        """The log as one line of words (a console may wrap long lines where it likes)."""
        return " ".join(self.output().split())

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             token: str | None = "default", content_type: str = "application/json") -> tuple[int, Any]:
        """(status, parsed JSON or bytes)."""
        token = self.token if token == "default" else token
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, payload, kind = resp.status, resp.read(), resp.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, payload, kind = e.code, e.read(), e.headers.get("content-type", "")
        return status, json.loads(payload) if "json" in kind else payload

    def submit(self, body: dict[str, Any]) -> str:
        status, reply = self.call("POST", "/jobs", body)
        assert status == 202, reply
        return reply["id"]

    def wait(self, job_id: str, states: tuple[str, ...] = ("done", "failed", "cancelled"), timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.call("GET", f"/jobs/{job_id}")
            assert status == 200, job
            if job["state"] in states:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s:\n{self.output()}")

    def wait_step(self, job_id: str, step: int, timeout: float = 60) -> None:
        """Until the running job has done `step` denoise steps."""
        deadline = time.monotonic() + timeout
        while self.call("GET", f"/jobs/{job_id}")[1]["progress"]["step"] < step:
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        """Cleanup: the whole process group (torchrun and its workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log_file.close()
