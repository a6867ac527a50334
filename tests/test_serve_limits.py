"""`serve` against careless and hostile clients, and stopping it: real servers on loopback.

One server takes a bounded hostile client (slow body, oversized bodies, malformed multipart, 1,000
rapid submissions), cancels a running job, then is stopped with two Ctrl-C; a second one on the
same folder resumes the queue and is stopped by SIGTERM after --stop-grace.
"""
from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from pathlib import Path

import pytest
from serve_helpers import Server

pytestmark = pytest.mark.slow

TOKEN = "hostile-test"
LONG = {"prompt": "a ride that never ends", "seed": 1, "sample_steps": 100000}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _raw(server: Server, head: str, body_parts, *, timeout: float = 10) -> tuple[int, float]:
    """Send a request by hand (headers, then body parts as a generator); (status, seconds to the answer).
    Stops sending as soon as the server answers or closes."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode())
        sock.setblocking(False)
        reply = b""
        for part in body_parts:
            try:
                reply += sock.recv(65536)
            except BlockingIOError:
                pass
            if reply:
                break
            try:
                sock.sendall(part)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(timeout)
        while b"\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ", 2)[1]), time.monotonic() - t0


def _head(length: str | None, content_type: str = "application/json") -> str:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: {content_type}\r\n"
            f"{size}\r\n")


def _slowly(n: int, pause: float):
    for _ in range(n):
        time.sleep(pause)
        yield b" "


def _megabytes(n: int, *, chunked: bool):
    block = b"x" * (1 << 20)
    for _ in range(n):
        yield (b"100000\r\n" + block + b"\r\n") if chunked else block


def _check_metrics(server: Server, *, done: int, cancelled: int) -> None:
    """/metrics as Prometheus's own parser reads it: the jobs, the queue, what the finished jobs measured."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = server.call("GET", "/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    assert samples[("magcache_queue_length", ())] == 0
    assert samples[("magcache_jobs", (("state", "done"),))] == done
    assert samples[("magcache_jobs", (("state", "cancelled"),))] == cancelled
    assert samples[("magcache_denoise_seconds_count", ())] == done
    assert samples[("magcache_denoise_seconds_sum", ())] > 0
    assert samples[("magcache_forwards_total", (("kind", "computed"),))] > 0
    assert samples[("magcache_job_peak_memory_mb_count", (("memory", "host"),))] == done
    assert 0 < samples[("magcache_replica_busy_fraction", (("replica", "0"),))] <= 1
    assert server.call("GET", "/metrics", token=None)[0] == 401


def test_hostile_client_cancel_and_stop(tiny_ckpt, tmp_path):
    ckpt, jobs_dir = tiny_ckpt("t2v-A14B"), tmp_path / "jobs"
    server = Server(ckpt, jobs_dir, "--max-steps", "100000", "--max-body-mb", "2", "--body-timeout", "2",
                    "--max-queue-per-client", "3", "--log-format", "json", token=TOKEN)
    try:
        http_pid = json.loads((jobs_dir / "server.json").read_text())["http_pid"]
        rss_before = _rss_mb(http_pid)

        # -- cancel a running job: it stops at a step, leaves no file, the replica takes the next job
        long_id = server.submit(LONG)
        after = server.submit({"prompt": "next in line", "seed": 2})
        server.wait_step(long_id, 2)
        status, reply = server.call("DELETE", f"/jobs/{long_id}")
        assert status == 202 and reply["state"] == "running" and reply["cancelling"] is True
        cancelled = server.wait(long_id, timeout=60)
        assert cancelled["state"] == "cancelled" and 2 <= cancelled["progress"]["step"] < 100000
        assert sorted(p.name for p in (jobs_dir / long_id).iterdir()) == ["request.json", "state.json"]
        assert server.wait(after)["state"] == "done"
        assert f"job {long_id} cancelled after step" in server.said()

        # -- a body that trickles in: 408 once --body-timeout has passed, not when the client likes
        status, seconds = _raw(server, _head("100"), _slowly(40, 0.25))
        assert status == 408 and seconds < 8
        # -- oversized: a declared 200 MiB is refused before reading; an undeclared (chunked) one at the cap
        status, _ = _raw(server, _head(str(200 << 20)), _megabytes(200, chunked=False))
        assert status == 413
        status, _ = _raw(server, _head(None), _megabytes(64, chunked=True))
        assert status == 413
        # -- malformed multipart (to the OpenAI API, which takes forms) and a form body to /jobs: one-line 400s
        broken = b"--xx\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na cat"  # never closed
        for path in ("/v1/videos", "/jobs"):
            status, reply = server.call("POST", path, raw=broken, content_type="multipart/form-data; boundary=xx")
            message = reply["error"]["message"] if path == "/v1/videos" else reply["error"]
            assert status == 400 and "\n" not in message, reply

        # -- 1,000 rapid submissions on one connection: this client's share is accepted, the rest 429
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        statuses: dict[int, int] = {}
        accepted = []
        deadline = time.monotonic() + 120
        for i in range(1000):
            assert time.monotonic() < deadline, statuses
            body = json.dumps({"prompt": f"burst {i}", "seed": i, "sample_steps": 1, "frame_num": 1})
            conn.request("POST", "/jobs", body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            if resp.status == 202:
                accepted.append(payload["id"])
            else:
                assert resp.status == 429 and "--max-queue-per-client" in payload["error"]
        conn.close()
        assert set(statuses) == {202, 429} and statuses[202] >= 3 and statuses[429] >= 900, statuses
        for job_id in accepted:  # every accepted job intact
            assert server.wait(job_id)["state"] == "done"
            assert (jobs_dir / job_id / "video.mp4").stat().st_size > 0
        status, health = server.call("GET", "/health")
        assert status == 200 and health["state"] == "ready"
        assert _rss_mb(http_pid) - rss_before < 64  # the 200 MiB bodies never sat in memory
        _check_metrics(server, done=len(accepted) + 1, cancelled=1)

        # -- stop with Ctrl-C twice: the running job stops at a step and stays queued with the rest
        running = server.submit(LONG)
        server.wait(running, states=("running",))
        waiting = server.submit({"prompt": "waits for the next start", "seed": 3})
        server.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while "Ctrl-C again to stop now" not in server.said():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert server.call("POST", "/jobs", {"prompt": "late"})[0] == 503
        assert server.stop(signal.SIGINT, timeout=60) == 0
        said = server.said()
        assert f"stopping (SIGINT): finishing job {running} (up to --stop-grace 60 s), 1 queued kept" in said
        assert f"stopping now (SIGINT): job {running} stops at its next step and stays queued" in said
        assert f"job {running} stopped; queued again (no file written)" in said
        assert "stopped: 2 queued job(s) kept" in said
        records = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"time"')]
        assert "[magcache-launch]" not in server.output()  # --log-format json: every log line is JSON
        assert any(r["message"].startswith("serving on http://127.0.0.1:") for r in records)
        assert any(r.get("step") == 1 and r.get("steps") == 1 for r in records)  # the denoise progress
    finally:
        server.kill()
    for job_id in (running, waiting):
        assert json.loads((jobs_dir / job_id / "state.json").read_text())["state"] == "queued"
    assert not (jobs_dir / running / "video.mp4").exists()

    # -- a restart says what it resumes; SIGTERM after --stop-grace stops the job at a step, kept queued
    again = Server(ckpt, jobs_dir, "--max-steps", "100000", "--stop-grace", "1", token=TOKEN)
    try:
        assert f"resuming 2 queued job(s) from the last run: {running}, {waiting}" in again.said()
        again.wait(running, states=("running",))
        assert again.stop(signal.SIGTERM, timeout=60) == 0
        said = again.said()
        assert f"stopping now (--stop-grace 1 s passed): job {running} stops at its next step" in said
    finally:
        again.kill()
    assert json.loads((jobs_dir / running / "state.json").read_text())["state"] == "queued"


def test_cancel_stops_every_rank_of_a_replica(tiny_ckpt, tmp_path):
    """torchrun, 2 ranks = one replica with Ulysses 2 (a collective each step): DELETE stops both
    ranks at the same step (else the next collective would hang), and the replica takes the next job."""
    jobs_dir = tmp_path / "jobs"
    server = Server(tiny_ckpt("t2v-A14B"), jobs_dir, "--ulysses_size", "2", "--max-steps", "100000",
                    "--dist-timeout", "60", nproc=2)
    try:
        long_id = server.submit(LONG)
        after = server.submit({"prompt": "next in line", "seed": 2})
        server.wait_step(long_id, 2)
        assert server.call("DELETE", f"/jobs/{long_id}")[0] == 202
        assert server.wait(long_id, timeout=60)["state"] == "cancelled"
        assert sorted(p.name for p in (jobs_dir / long_id).iterdir()) == ["request.json", "state.json"]
        assert server.wait(after)["state"] == "done"
        assert server.call("GET", "/health")[1]["state"] == "ready"
        server.stop(signal.SIGTERM, timeout=60)  # torchrun reports the SIGTERM it got (exit 1); the ranks end cleanly
        assert "stopped: 0 queued job(s) kept" in server.said()
    finally:
        server.kill()
