"""The server's job store and request checks, without a server: fast, pure Python + PIL."""
from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from PIL import Image

from launcher.serve.jobs import (
    JobStore,
    NotCancellable,
    QueueFull,
    is_job_id,
    new_job_id,
)
from launcher.serve.requests import BadRequest, ServeSettings, relocate, validate


def _add(store: JobStore, prompt: str) -> str:
    job_id = new_job_id()
    store.add(job_id, {"prompt": prompt, "seed": 1, "sample_steps": 4}, store.stage())
    return job_id


def test_store_persists_and_requeues_running_jobs(tmp_path):
    store = JobStore(tmp_path, max_queue=2)
    a, b = _add(store, "a"), _add(store, "b")
    with pytest.raises(QueueFull):
        _add(store, "c")
    taken = store.take(1, wait=0, stop=threading.Event())
    assert [j.id for j in taken] == [a] and taken[0].state == "running"
    assert json.loads((tmp_path / a / "state.json").read_text())["state"] == "running"
    with pytest.raises(NotCancellable):
        store.cancel(a)
    assert store.cancel(b).state == "cancelled"

    again = JobStore(tmp_path, max_queue=2)  # the server died while `a` ran
    assert again.requeued == 1
    assert {j.id: j.state for j in again.list()} == {a: "queued", b: "cancelled"}
    again.finish(a, error=None)
    assert JobStore(tmp_path, max_queue=2).get(a).state == "done"
    assert is_job_id(a) and not is_job_id("../etc") and not is_job_id(a + "/x")


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
