"""`serve` end to end: real servers on loopback ports (one process, and torchrun/gloo with a dp
replica), driven over HTTP; every video is compared byte for byte with `generate`'s."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, cli_env
from PIL import Image
from serve_helpers import SERVE_FLAGS, Server

from launcher.cli import main

pytestmark = pytest.mark.slow

PROMPTS = [(f"a red car drives through a snowy city, take {i}", 10 + i) for i in range(5)]


@pytest.fixture(scope="module")
def reference_video(tiny_ckpt, tmp_path_factory):
    """`generate`'s mp4 bytes for (prompt, seed) with the server's flags (run in this process, cached)."""
    cache: dict[tuple[str, int], bytes] = {}
    base = tmp_path_factory.mktemp("serve_ref")

    def get(prompt: str, seed: int) -> bytes:
        if (prompt, seed) not in cache:
            out = base / f"{len(cache)}.mp4"
            args = ["generate", "--ckpt_dir", str(tiny_ckpt("t2v-A14B")), *SERVE_FLAGS, "--prompt", prompt,
                    "--base_seed", str(seed), "--save_file", str(out), "--overwrite"]
            assert main(args) == 0  # at one thread, as the server's ranks run (conftest.one_thread)
            cache[(prompt, seed)] = out.read_bytes()
        return cache[(prompt, seed)]

    return get


def _png_base64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BAD_REQUESTS = [
    (b'{"prompt": "a cat",', "malformed JSON"),
    (b'["a cat"]', "expected a JSON object"),
    (b'{"prompt": "a cat", "colour": "red"}', "unknown field(s) colour"),
    (b'{"prompt": ""}', "no \"prompt\""),
    (b'{"prompt": "a cat", "seed": "seven"}', "field 'seed' must be an integer"),
    (b'{"prompt": "a cat", "size": "wide"}', "size 'wide' is not WIDTH*HEIGHT"),
    (b'{"prompt": "a cat", "frame_num": 6}', "frame_num 6: must be 4n+1"),
    (b'{"prompt": "a cat", "sample_steps": 0}', "sample_steps 0: must be >= 1"),
    (b'{"prompt": "a cat", "image": "bm90IGFuIGltYWdl"}', "field 'image': not an image"),
    (b'{"prompt": "a cat", "image": "/etc/passwd.png"}', "paths are not accepted"),
]


def _submit_all(server: Server) -> list[str]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda ps: server.submit({"prompt": ps[0], "seed": ps[1]}), PROMPTS))


def _sse(server: Server, job_id: str) -> list[dict]:
    req = urllib.request.Request(f"{server.url}/jobs/{job_id}/events")
    events = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK's note on OpenAI's own service
def test_one_process_server(tiny_ckpt, tmp_path, reference_video):
    """5 concurrent jobs equal `generate`; 400s reach no rank; SSE progress; submit; SIGTERM exits 0."""
    server = Server(tiny_ckpt("t2v-A14B"), tmp_path / "jobs")
    try:
        status, health = server.call("GET", "/health")
        assert status == 200 and health["ok"] is True and health["world"] == 1 and health["dp"] == 1
        for raw, reason in BAD_REQUESTS:
            status, reply = server.call("POST", "/jobs", raw=raw)
            assert status == 400, (raw, reply)
            assert reason in reply["error"] and "\n" not in reply["error"], (raw, reply)
        assert server.call("GET", "/jobs")[1] == {"jobs": []}  # nothing was queued
        assert [p.name for p in (tmp_path / "jobs").iterdir() if not p.name.startswith((".", "server"))] == []

        ids = _submit_all(server)
        assert len(set(ids)) == 5
        jobs = [server.wait(i) for i in ids]
        assert [j["state"] for j in jobs] == ["done"] * 5
        assert all(j["progress"] == {"step": 4, "steps": 4} for j in jobs)
        assert {j["id"] for j in server.call("GET", "/jobs")[1]["jobs"]} == set(ids)
        for job_id, (prompt, seed) in zip(ids, PROMPTS):
            status, video = server.call("GET", f"/jobs/{job_id}/video")
            assert status == 200 and video == reference_video(prompt, seed)
        status, manifest = server.call("GET", f"/jobs/{ids[0]}/manifest")
        assert status == 200 and manifest["seed"] == PROMPTS[0][1] and manifest["serve"]["job"] == ids[0]

        # progress as server-sent events, on a job with more steps
        slow = server.submit({"prompt": "a slow boat", "seed": 3, "sample_steps": 40, "use_magcache": True})
        events = _sse(server, slow)
        assert events[-1]["state"] == "done" and events[-1]["progress"] == {"step": 40, "steps": 40}
        steps = [e["progress"]["step"] for e in events]
        assert steps == sorted(steps) and len(events) >= 2

        # the submit client: waits, downloads the same bytes
        out = tmp_path / "submitted.mp4"
        proc = subprocess.run([sys.executable, "-m", "launcher", "submit", "--server", server.url, "--prompt",
                               PROMPTS[1][0], "--seed", str(PROMPTS[1][1]), "--out", str(out)],
                              capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == reference_video(*PROMPTS[1])
        proc = subprocess.run([sys.executable, "-m", "launcher", "submit", "--server", server.url, "--prompt", "x",
                               "--frame-num", "6"], capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=60, check=False)
        assert proc.returncode == 2 and "frame_num 6: must be 4n+1" in proc.stderr

        # an uploaded image that ti2v would use is refused by this text-only task, with its reason
        status, reply = server.call("POST", "/jobs", {"prompt": "a cat", "image": _png_base64()})
        assert status == 400 and "image is not used by t2v-A14B" in reply["error"]

        assert server.call("DELETE", f"/jobs/{ids[0]}")[0] == 409  # done: not cancellable
        assert server.call("GET", "/jobs/20990101000000000000-deadbeef")[0] == 404
        assert server.call("GET", "/jobs/../../etc")[0] == 404
        _openai_videos_api(server, reference_video)
        assert server.stop(signal.SIGTERM) == 0
    finally:
        server.kill()


def _openai_videos_api(server: Server, reference_video) -> None:
    """The official `openai` package as the client of /v1/videos: the same bytes as `generate`."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    prompt, seed = PROMPTS[3]
    video = client.videos.create(prompt=prompt, model="t2v-A14B", size="64x64", extra_body={"seed": seed})
    assert video.status in ("queued", "in_progress") and video.size == "64x64" and video.model == "t2v-A14B"
    deadline = time.monotonic() + 120
    while video.status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
        video = client.videos.retrieve(video.id)
    assert video.status == "completed" and video.progress == 100 and video.completed_at >= video.created_at
    assert client.videos.download_content(video.id).read() == reference_video(prompt, seed)

    # the Hub name; seconds -> the nearest 4n+1 frames at the task's 16 fps, said in the answer
    short = client.videos.create(prompt="a short one", model="Wan-AI/Wan2.2-T2V-A14B", seconds="1",
                                 extra_body={"sample_steps": 1, "seed": 5})
    extra = short.model_extra
    assert (extra["frame_num"], extra["fps"], short.seconds) == (17, 16, "1.06") and extra["seed"] == 5
    assert short.model == "Wan-AI/Wan2.2-T2V-A14B"
    assert {v.id for v in client.videos.list()} >= {video.id, short.id}
    with pytest.raises(openai.BadRequestError, match="this server runs t2v-A14B"):
        client.videos.create(prompt="x", model="sora-2")
    with pytest.raises(openai.BadRequestError, match="image is not used by t2v-A14B"):  # the multipart upload arrived
        client.videos.create(prompt="x", input_reference=("first.png", base64.b64decode(_png_base64()), "image/png"))
    with pytest.raises(openai.BadRequestError, match="over this server's --max-steps"):
        client.videos.create(prompt="x", extra_body={"sample_steps": 100000})
    status, reply = server.call("POST", "/v1/videos", {"prompt": "json body", "size": "64x64", "frame_num": 6})
    assert status == 400 and "frame_num 6: must be 4n+1" in reply["error"]["message"]
    deadline = time.monotonic() + 120
    while client.videos.retrieve(short.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    deleted = client.videos.delete(short.id)
    assert deleted.deleted is True and deleted.id == short.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(short.id)


def test_restart_resumes_queue(tiny_ckpt, tmp_path, reference_video):
    """Token 401s, a full queue 429s, DELETE cancels; SIGTERM finishes the running job and exits 0;
    a new server on the same folder runs the queued job and serves the finished video."""
    ckpt, jobs_dir = tiny_ckpt("t2v-A14B"), tmp_path / "jobs"
    first = Server(ckpt, jobs_dir, "--max-queue", "2", "--max-queue-per-client", "10", "--stop-grace", "600",
                   token="s3cret")
    try:
        assert first.call("GET", "/health", token=None) == (200, {"ok": True})  # a liveness probe: nothing else
        assert first.call("GET", "/jobs", token="wrong")[0] == 401
        assert first.call("POST", "/jobs", {"prompt": "a cat"}, token=None)[0] == 401
        assert first.call("GET", "/jobs")[1] == {"jobs": []}  # the 401 POST queued nothing
        assert first.call("GET", "/?token=s3cret", token=None)[0] == 200  # the page passes it in the URL

        long_job = {"prompt": "a long ride", "seed": 1, "sample_steps": 150}
        running = first.submit(long_job)
        first.wait(running, states=("running",))
        replies = [first.call("POST", "/jobs", {"prompt": PROMPTS[i][0], "seed": PROMPTS[i][1]}) for i in range(3)]
        assert [r[0] for r in replies] == [202, 202, 429]
        assert "queue is full" in replies[2][1]["error"]
        queued, cancelled = replies[0][1]["id"], replies[1][1]["id"]
        assert first.call("DELETE", f"/jobs/{cancelled}")[1]["state"] == "cancelled"
        assert first.call("DELETE", f"/jobs/{cancelled}")[0] == 409
        assert first.stop(signal.SIGTERM) == 0
        log = first.said()
        assert f"stopping (SIGTERM): finishing job {running} (up to --stop-grace 600 s), 1 queued kept" in log
        assert "stopped: 1 queued job(s) kept" in log
    finally:
        first.kill()
    on_disk = {p.name: json.loads((p / "state.json").read_text())["state"] for p in jobs_dir.iterdir() if p.is_dir()
               and not p.name.startswith(".")}
    assert on_disk == {running: "done", queued: "queued", cancelled: "cancelled"}

    second = Server(ckpt, jobs_dir)
    try:
        assert f"resuming 1 queued job(s) from the last run: {queued} " in second.said()
        assert second.wait(queued)["state"] == "done"
        assert second.call("GET", f"/jobs/{queued}/video")[1] == reference_video(*PROMPTS[0])
        assert second.call("GET", f"/jobs/{running}/video")[1] == (jobs_dir / running / "video.mp4").read_bytes()
        assert second.call("GET", f"/jobs/{cancelled}")[1]["state"] == "cancelled"
        assert second.stop() == 0
    finally:
        second.kill()


def test_two_ranks_with_dp_replica(tiny_ckpt, tmp_path, reference_video):
    """torchrun, 2 ranks = 2 dp replicas: 5 concurrent jobs on both, videos equal `generate`'s;
    SIGKILL of rank 1 mid-job: /health unhealthy, the job fails, exit non-zero within --dist-timeout."""
    server = Server(tiny_ckpt("t2v-A14B"), tmp_path / "jobs", "--dist-timeout", "30", "--max-steps", "100000", nproc=2)
    try:
        health = server.call("GET", "/health")[1]
        assert health["world"] == 2 and health["dp"] == 2 and len(health["pids"]) == 2
        ids = _submit_all(server)
        jobs = [server.wait(i) for i in ids]
        assert [j["state"] for j in jobs] == ["done"] * 5
        assert {j["replica"] for j in jobs} == {0, 1}
        for job_id, (prompt, seed) in zip(ids, PROMPTS):
            assert server.call("GET", f"/jobs/{job_id}/video")[1] == reference_video(prompt, seed)

        doomed = server.submit({"prompt": "never ends", "seed": 5, "sample_steps": 100000})
        server.wait_step(doomed, 2)
        os.kill(health["pids"][1], signal.SIGKILL)
        killed = time.monotonic()
        unhealthy = None
        while server.proc.poll() is None and time.monotonic() - killed < 30:
            try:
                status, body = server.call("GET", "/health")
                if status == 503:
                    unhealthy = body
            except OSError:
                pass  # the server may already be gone
            time.sleep(0.1)
        assert server.proc.wait(timeout=max(1, 30 - (time.monotonic() - killed))) != 0
        assert unhealthy is not None and unhealthy["ok"] is False and "lost contact" in unhealthy["error"]
        state = json.loads((tmp_path / "jobs" / doomed / "state.json").read_text())
        assert state["state"] == "failed" and "lost contact with another rank" in state["error"]
    finally:
        server.kill()


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        for folder in os.environ.get("PATH", "").split(os.pathsep):
            if os.access(os.path.join(folder, name), os.X_OK):
                return os.path.join(folder, name)
    return None


def _chromium() -> str | None:
    """Chromium on PATH, else Debian's package installed as the Slurm tests install Slurm (root +
    apt-get; a clean CI machine has neither browser nor Slurm until then). None when that fails."""
    import shutil
    import subprocess

    found = _find_chromium()
    if found is not None or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, capture_output=True, env=env, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        subprocess.run(install, capture_output=True, env=env, timeout=600)
    return _find_chromium()


def test_page_in_headless_browser(tiny_ckpt, tmp_path, reference_video):
    """The page at / asks for the token, then submits a prompt with MagCache unchecked (the server's
    default is on), shows progress and plays the video (Debian's Chromium)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on PATH and apt-get could not install it (run: apt-get install chromium)")
    prompt, seed = PROMPTS[2]
    server = Server(tiny_ckpt("t2v-A14B"), tmp_path / "jobs", "--use-magcache", token="page-token")
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.url)  # no token: a page that asks for it, not raw JSON
            page.wait_for_selector("#token", state="visible")
            assert page.is_hidden("#job") and "server up" in page.text_content("#health")
            page.fill("#token", "page-token")
            page.click("#enter")
            page.wait_for_function("document.getElementById('health').textContent.includes('ready')")
            assert page.is_checked("#magcache")  # the server's default
            page.uncheck("#magcache")
            page.fill("#prompt", prompt)
            page.fill("#seed", str(seed))
            page.click("#submit")
            page.wait_for_selector("#status[data-state=done]", timeout=120_000)
            assert "step 4/4" in page.text_content("#status")
            page.wait_for_function("document.getElementById('video').readyState >= 1", timeout=30_000)
            duration = page.evaluate("document.getElementById('video').duration")
            src = page.get_attribute("#video", "src")
            browser.close()
        assert duration > 0
        job_id = src.split("/")[2]
        assert server.call("GET", f"/jobs/{job_id}/manifest")[1]["magcache"]["enabled"] is False
        assert server.call("GET", f"/jobs/{job_id}/video")[1] == reference_video(prompt, seed)
        assert server.stop() == 0
    finally:
        server.kill()


def _undecodable_png() -> str:
    """A PNG whose structure and checksums are valid (PIL's verify passes, so the request is
    accepted) but whose pixel data does not inflate: it fails on the ranks, when the job loads it."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="PNG")
    png = buf.getvalue()
    at = png.index(b"IDAT") - 4
    size = struct.unpack(">I", png[at:at + 4])[0]
    bad = b"\x78\x9c" + b"\xff" * (size - 2)
    chunk = struct.pack(">I", len(bad)) + b"IDAT" + bad + struct.pack(">I", zlib.crc32(b"IDAT" + bad))
    return base64.b64encode(png[:at] + chunk + png[at + 12 + size:]).decode()


def test_failed_job_leaves_server_running(tiny_ckpt, tmp_path):
    """A job that fails on the ranks is "failed" with its one-line reason; the next job still runs."""
    server = Server(tiny_ckpt("ti2v-5B"), tmp_path / "jobs", "--task", "ti2v-5B")
    try:
        broken = server.submit({"prompt": "a cat", "image": _undecodable_png(), "seed": 1})
        job = server.wait(broken)
        assert job["state"] == "failed" and "broken data stream" in job["error"] and "\n" not in job["error"]
        fine = server.submit({"prompt": "a cat", "seed": 1})
        assert server.wait(fine)["state"] == "done"
        assert server.call("GET", "/health")[1]["ok"] is True
        assert server.stop() == 0
    finally:
        server.kill()
