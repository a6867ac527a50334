"""The server's job store and request checks, without a server: fast, pure Python + PIL."""
from __future__ import annotations

import base64
import io
import json
import re
import threading

import pytest
from PIL import Image

from launcher.serve.jobs import (
    ClientShareFull,
    JobStore,
    NotCancellable,
    QueueFull,
    interrupted,
    is_job_id,
    new_job_id,
)
from launcher.serve.limits import LimitExceeded, Limits, check_bind, read_body
from launcher.serve.requests import BadRequest, ServeSettings, relocate, validate


def _add(store: JobStore, prompt: str, client: str | None = None) -> str:
    job_id = new_job_id()
    store.add(job_id, {"prompt": prompt, "seed": 1, "sample_steps": 4}, store.stage(), client)
    return job_id


def test_store_persists_and_requeues_running_jobs(tmp_path):
    store = JobStore(tmp_path, max_queue=2)
    a, b = _add(store, "a"), _add(store, "b")
    with pytest.raises(QueueFull):
        _add(store, "c")
    taken = store.take(1, wait=0, stop=threading.Event())
    assert [j.id for j in taken] == [a] and taken[0].state == "running"
    assert json.loads((tmp_path / a / "state.json").read_text())["state"] == "running"
    assert store.cancel(b).state == "cancelled"
    with pytest.raises(NotCancellable):
        store.cancel(b)

    again = JobStore(tmp_path, max_queue=2)  # the server died while `a` ran
    assert again.requeued == 1 and again.resumed == [a] and again.was_running == {a}
    assert {j.id: j.state for j in again.list()} == {a: "queued", b: "cancelled"}
    again.finish(a, error=None)
    assert JobStore(tmp_path, max_queue=2).get(a).state == "done"
    assert is_job_id(a) and not is_job_id("../etc") and not is_job_id(a + "/x")


def test_running_job_stops_at_a_step(tmp_path):
    """DELETE of a running job asks its replica to stop (the interrupt file); the replica's report
    makes it cancelled. A stop that cannot wait puts running jobs back in the queue; a server that
    died with a cancel pending does not run that job again."""
    store = JobStore(tmp_path, max_queue=4)
    a, b = _add(store, "a"), _add(store, "b")
    store.take(2, wait=0)
    assert not interrupted(tmp_path / a)
    job = store.cancel(a)
    assert job.state == "running" and job.public()["cancelling"] and interrupted(tmp_path / a)
    assert store.interrupt_running() == [a, b] and interrupted(tmp_path / b)
    assert store.stopped(a) == "cancelled" and store.stopped(b) == "queued"
    assert not interrupted(tmp_path / a) and not interrupted(tmp_path / b)  # nothing lingers into a rerun
    assert store.get(b).step == 0 and store.take(1, wait=0)[0].id == b
    store.cancel(b)  # and then the server dies before the replica reports
    after = JobStore(tmp_path, max_queue=4)
    assert after.get(b).state == "cancelled" and after.resumed == [] and not interrupted(tmp_path / b)


def test_queue_share_per_client(tmp_path):
    store = JobStore(tmp_path, max_queue=10, max_per_client=2)
    _add(store, "a", "token:x")
    first = _add(store, "b", "token:x")
    with pytest.raises(ClientShareFull, match="--max-queue-per-client"):
        _add(store, "c", "token:x")
    _add(store, "d", "token:y")  # another client is not held back
    store.take(1, wait=0)  # running counts too
    with pytest.raises(ClientShareFull):
        _add(store, "c", "token:x")
    store.finish(store.take(1, wait=0)[0].id, error=None)
    assert store.get(first).state == "done"
    _add(store, "c", "token:x")  # one of x's ended: room again


def _png(color=(0, 128, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def settings(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    images = tmp_path / "images"
    images.mkdir()
    (images / "first.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    flags = {"task": "ti2v-5B", "ckpt_dir": ckpt, "frame_num": 5, "base_seed": -1}
    return ServeSettings(flags=flags, image_dir=images)


def test_request_images(settings, tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    data_url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    request = validate(json.dumps({"prompt": "a cat", "image": data_url}).encode(), settings, staged)
    assert (staged / "image.png").read_bytes() == _png() and request["seed"] >= 0  # drawn once, stored
    assert relocate(request, staged, tmp_path / "job")["image"] == str(tmp_path / "job" / "image.png")
    allowed = validate(b'{"prompt": "a cat", "image": "first.png", "seed": 4}', settings, staged)
    assert allowed["image"] == str(settings.image_dir / "first.png") and allowed["seed"] == 4
    for image, reason in (("../secret.png", "outside --image-dir"), (str(tmp_path / "secret.png"), "outside"),
                          ("missing.png", "not found"), ("data:image/png;base64,@@@", "not base64"),
                          ("/srv/in/cat.gif", "not base64 .* path .*--image-dir"),
                          (base64.b64encode(b"GIF89a not really").decode(), "not an image")):
        with pytest.raises(BadRequest, match=reason):
            validate(json.dumps({"prompt": "a cat", "image": image}).encode(), settings, staged)
    with pytest.raises(BadRequest, match="must be true or false"):
        validate(b'{"prompt": "a cat", "use_magcache": 1}', settings, staged)
    with pytest.raises(BadRequest, match="magcache_thresh"):
        validate(b'{"prompt": "a cat", "use_magcache": true, "magcache_thresh": -1}', settings, staged)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries a few bytes of pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_request_limits(settings, tmp_path):
    """--max-frames/--max-steps/--max-pixels are checked on the config the ranks would run;
    an image's size on its header, before decoding (PIL's own bomb check included)."""
    from dataclasses import replace

    staged = tmp_path / "staged"
    staged.mkdir()
    tight = replace(settings, limits=Limits(max_frames=9, max_steps=10, max_pixels=64 * 64, max_image_pixels=200))
    validate(b'{"prompt": "a cat", "frame_num": 9, "sample_steps": 10, "size": "64*64"}', tight, staged)
    for body, reason in ((b'{"prompt": "a cat", "frame_num": 13, "sample_steps": 4}', "frame_num 13: over this server's --max-frames 9"),
                         (b'{"prompt": "a cat", "sample_steps": 100000}', "sample_steps 100000: over this server's --max-steps 10"),
                         (b'{"prompt": "a cat", "size": "1280*704", "sample_steps": 4}', "over this server's --max-pixels 4096")):
        with pytest.raises(BadRequest, match=reason):
            validate(body, tight, staged)
    with pytest.raises(BadRequest, match="--max-steps"):  # the server's own default steps count as asked
        validate(b'{"prompt": "a cat"}', replace(settings, limits=Limits(max_steps=10)), staged)
    small = "data:image/png;base64," + base64.b64encode(_png()).decode()  # 16x16 = 256 pixels
    with pytest.raises(BadRequest, match="16x16 is over this server's --max-image-pixels 200"):
        validate(json.dumps({"prompt": "a cat", "image": small}).encode(), tight, staged)
    for width, height in ((5000, 5000), (100_000, 100_000)):  # ours, then PIL's own (far larger) bomb check
        bomb = base64.b64encode(_png_header_only(width, height)).decode()
        with pytest.raises(BadRequest, match="over this server's --max-image-pixels 16777216"):
            validate(json.dumps({"prompt": "a cat", "image": bomb}).encode(), settings, staged)


def test_body_reader_and_bind_check():
    import asyncio

    limits = Limits(max_body_mb=1, body_timeout_s=0.3)

    async def chunks(n: int, size: int = 64 << 10, pause: float = 0.0):
        for _ in range(n):
            if pause:
                await asyncio.sleep(pause)
            yield b"x" * size

    def read(source, declared=None):
        return asyncio.run(read_body(source, declared, limits))

    assert len(read(chunks(16))) == 1 << 20  # exactly the cap
    consumed = []

    async def counted():
        async for c in chunks(10_000):
            consumed.append(len(c))
            yield c

    with pytest.raises(LimitExceeded, match="over this server's --max-body-mb 1") as e:
        read(counted())
    assert e.value.status == 413 and sum(consumed) <= (1 << 20) + (64 << 10)  # stopped at the cap, not at 625 MiB
    with pytest.raises(LimitExceeded) as e:
        read(chunks(0), declared=str(200 << 20))  # a declared length over the cap: not a byte read
    assert e.value.status == 413
    with pytest.raises(LimitExceeded, match="not received within 0.3 s") as e:
        read(chunks(100, size=1, pause=0.1))  # a byte every 0.1 s
    assert e.value.status == 408

    assert check_bind("127.0.0.1", (), False) is None and check_bind("::1", (), False) is None
    assert check_bind("localhost", (), False) is None
    refusal = check_bind("0.0.0.0", (), False)
    assert refusal is not None and "--token" in refusal and "--insecure" in refusal and "\n" not in refusal
    assert check_bind("0.0.0.0", ("t",), False) is None and check_bind("10.1.2.3", (), True) is None


def test_openai_fields():
    """seconds -> the nearest 4n+1 frames at the task's fps; size WxH; model is the task, its Hub
    repositories, or the Hub repository the server was started from."""
    from launcher.serve.openai_api import frames_for, job_fields

    assert [frames_for(s, 16) for s in (5, 4, 0.01, 1)] == [81, 65, 1, 17]
    assert frames_for(5, 24) == 121  # ti2v-5B's 5 s
    served = ServeSettings(flags={"task": "ti2v-5B", "ckpt_dir": "me/wan-finetune"})
    fields = job_fields({"prompt": "a cat", "model": "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "seconds": "2",
                         "size": "1280x704", "seed": 7}, served.task, served.model_names)
    assert fields == {"prompt": "a cat", "frame_num": 49, "size": "1280*704", "seed": 7}
    assert job_fields({"prompt": "x", "model": "me/wan-finetune"}, served.task, served.model_names)["prompt"] == "x"
    for given, reason in (({"model": "sora-2"}, "this server runs ti2v-5B (Wan-AI/Wan2.2-TI2V-5B, "),
                          ({"seconds": "4", "frame_num": 5}, "seconds or frame_num, not both"),
                          ({"seconds": "soon"}, "not a number"), ({"seconds": "-1"}, "must be > 0"),
                          ({"size": "1280*704"}, "expected WIDTHxHEIGHT"), ({"colour": "red"}, "unknown field")):
        with pytest.raises(BadRequest, match=re.escape(reason)):
            job_fields({"prompt": "a cat", **given}, served.task, served.model_names)


@pytest.mark.slow
def test_open_address_without_token_refuses_to_start(tmp_path):
    """`serve --host 0.0.0.0` without --token: exit 2 with one line, before any checkpoint is read."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    args = [sys.executable, "-m", "launcher", "serve", "--ckpt_dir", str(tmp_path / "none"), "--host", "0.0.0.0",
            "--jobs-dir", str(tmp_path / "jobs")]
    proc = subprocess.run(args, capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --host 0.0.0.0: other machines can reach this address and there is no --token; give --token "
        "(or MAGCACHE_TOKEN), or --insecure to serve it open anyway"]  # --insecure: test_body_reader_and_bind_check
