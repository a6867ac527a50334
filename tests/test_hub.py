"""`--ckpt_dir Wan-AI/...`: Hub repository names resolve in a local Hub cache (built here, holding the
tiny checkpoints), offline; `--download` fetches only the task's files, through huggingface_hub
with only its HTTP transport mocked (there is no network here)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2 as httpx  # huggingface_hub's HTTP client
import pytest
from conftest import ROOT, cli_env

from launcher.errors import InputError
from launcher.hub import is_repo_id, needed_files, resolve_ckpt_dir
from launcher.wan.tasks import TASKS

REV = "0123456789abcdef0123456789abcdef01234567"


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _oid(data: bytes) -> str:
    """A file's id as the Hub gives it for a non-LFS file: its git blob hash."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _hub_cache(cache: Path, repo: str, source: Path, rev: str = REV) -> Path:
    """The layout huggingface_hub keeps: refs/main -> snapshots/<rev>/ whose files link into blobs/."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    for rel, path in _files(source).items():
        blob = base / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = base / "snapshots" / rev / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return base / "snapshots" / rev


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_offline_resolution(hub, tiny_ckpt, tmp_path, monkeypatch):
    from launcher.checkpoint import inspect_checkpoint

    task = TASKS["t2v-A14B"]
    snapshot = _hub_cache(hub, "Wan-AI/Wan2.2-T2V-A14B", tiny_ckpt("t2v-A14B"))
    found = resolve_ckpt_dir("Wan-AI/Wan2.2-T2V-A14B", task)
    assert found == snapshot
    assert inspect_checkpoint(found, task).root == snapshot
    with pytest.raises(InputError) as e:
        resolve_ckpt_dir("Wan-AI/Wan2.2-T2V-A14B", task, revision="v2")
    message = str(e.value)
    assert "Wan-AI/Wan2.2-T2V-A14B@v2" in message and str(hub) in message and "--download" in message
    assert "\n" not in message
    with pytest.raises(InputError, match="network is off"):  # --download while HF_HUB_OFFLINE
        resolve_ckpt_dir("Wan-AI/Wan2.2-I2V-A14B", TASKS["i2v-A14B"], download=True)
    local = tmp_path / "Wan-AI" / "here"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_repo_id("Wan-AI/here") and resolve_ckpt_dir("Wan-AI/here", task) == Path("Wan-AI/here")


def test_download_fetches_only_the_task_files(hub, monkeypatch, tiny_ckpt):
    """--download through huggingface_hub; only the transport is mocked. The repo also holds a file
    the task never reads: it is not requested."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repo, task = "Wan-AI/Wan2.2-TI2V-5B", TASKS["ti2v-5B"]
    files = {rel: p.read_bytes() for rel, p in _files(tiny_ckpt("ti2v-5B")).items()}
    files["assets/demo.mp4"] = b"not needed" * 1000
    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "huggingface.co", request.url  # nothing else is reached
        path = request.url.path
        requested.append(f"{request.method} {path}")
        if path.startswith(f"/api/models/{repo}/tree/"):
            return httpx.Response(200, json=[{"type": "file", "path": f, "size": len(b), "oid": _oid(b)}
                                             for f, b in files.items()])
        if path.startswith(f"/api/models/{repo}"):
            return httpx.Response(200, json={"id": repo, "sha": REV,
                                             "siblings": [{"rfilename": f} for f in files]})
        prefix = f"/{repo}/resolve/"
        assert path.startswith(prefix), path
        rel = path[len(prefix):].split("/", 1)[1]
        body = files[rel]
        headers = {"x-repo-commit": REV, "etag": f'"{_oid(body)}"',
                   "content-length": str(len(body))}
        return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else body)

    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handler)))
    try:
        found = resolve_ckpt_dir(repo, task, download=True)
    finally:
        huggingface_hub.set_client_factory(httpx.Client)
    assert found == hub / "models--Wan-AI--Wan2.2-TI2V-5B" / "snapshots" / REV
    assert {rel: p.read_bytes() for rel, p in _files(found).items()} == {k: v for k, v in files.items()
                                                                         if not k.startswith("assets/")}
    assert not any("demo.mp4" in r for r in requested)
    assert "assets/*" not in needed_files(task, repo)


@pytest.mark.slow
def test_cli_generate_from_the_hub_cache(tiny_ckpt, tmp_path):
    """HF_HUB_CACHE + HF_HUB_OFFLINE=1 in the environment: `generate --ckpt_dir Wan-AI/...` runs."""
    cache = tmp_path / "hub"
    snapshot = _hub_cache(cache, "Wan-AI/Wan2.2-T2V-A14B", tiny_ckpt("t2v-A14B"))
    out = tmp_path / "v.mp4"
    args = [sys.executable, "-m", "launcher", "generate", "--ckpt_dir", "Wan-AI/Wan2.2-T2V-A14B", "--task", "t2v-A14B",
            "--size", "64*64", "--frame_num", "1", "--sample_steps", "1", "--prompt", "a cat", "--base_seed", "1",
            "--save_file", str(out)]
    env = cli_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.with_suffix(".json").read_text())["checkpoint"]["dir"] == str(snapshot)
    proc = subprocess.run([*args[:5], "Wan-AI/Wan2.2-I2V-A14B", *args[6:]], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 2 and f"not in the Hub cache {cache}" in proc.stderr


def test_quantize_from_the_hub_cache(hub, tiny_ckpt, tmp_path):
    """`quantize --ckpt_dir Wan-AI/...` reads the snapshot in the Hub cache, as generate and serve do."""
    from launcher.cli import main

    _hub_cache(hub, "Wan-AI/Wan2.2-TI2V-5B", tiny_ckpt("ti2v-5B"))
    out = tmp_path / "q"
    assert main(["quantize", "--task", "ti2v-5B", "--ckpt_dir", "Wan-AI/Wan2.2-TI2V-5B", "--quantize", "int8",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["quantize"] == "int8" and manifest["task"] == "ti2v-5B"
    assert main(["quantize", "--task", "ti2v-5B", "--ckpt_dir", "Wan-AI/Wan2.2-TI2V-5B", "--revision", "v2",
                 "--quantize", "int8", "--out", str(tmp_path / "q2")]) == 2  # not in the cache: one line, exit 2
