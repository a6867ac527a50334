"""scripts/gpu_wheels.sh: the folder it gathers is enough for the documented offline install.

A fresh venv that sees torch and the distributions torch needs, and nothing else of this venv (linked
through a .pth file: a GPU box with torch has exactly that; installing the 800 MB wheel again only cost
half a minute), then
`pip install --no-index --find-links DIR -e .` (build isolation included: setuptools and wheel must
be in DIR), then the proof script's first step from that venv. Nothing else is visible to it: no
--system-site-packages, no index. Network-free where pip's cache or a local index holds the wheels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def torch_alone(folder: Path) -> Path:
    """`folder` with links to the files of torch and of every distribution it requires (recursively,
    markers evaluated for this interpreter), dist-info included, so pip sees them installed."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    folder.mkdir()
    todo, seen = ["torch"], set()
    while todo:
        name = todo.pop()
        if canonicalize_name(name) in seen:
            continue
        seen.add(canonicalize_name(name))
        dist = distribution(name)
        todo += [r.name for r in map(Requirement, dist.requires or []) if r.marker is None or r.marker.evaluate()]
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not (folder / top).exists():
                (folder / top).symlink_to(Path(str(dist.locate_file(top))))
    return folder


@pytest.mark.slow
def test_offline_install_from_the_gathered_wheels_runs_the_proof(tmp_path):
    import torch

    wheels = tmp_path / "wheels"
    _run(["bash", str(ROOT / "scripts" / "gpu_wheels.sh"), str(wheels)], 900,
         env={**os.environ, "MAGCACHE_VENV": str(Path(sys.executable).parents[1])})
    names = {p.name.split("-")[0].lower() for p in wheels.glob("*.whl")}
    assert {"setuptools", "wheel", "diffusers", "transformers", "yunchang"} <= names
    assert not any(n.startswith(("torch", "nvidia", "triton")) for n in names)  # the GPU box has those

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # no system site-packages: only what is installed below
    py = str(env_dir / "bin" / "python")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    version = torch.__version__.split("+")[0]
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    (site / "torch-alone.pth").write_text(str(torch_alone(tmp_path / "torch-alone")) + "\n")
    assert _run([py, "-m", "pip", "show", "-q", "torch"], 60, env=clean).returncode == 0  # pip sees it installed
    _run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "-e", str(ROOT)], 600,
         env=clean, cwd=tmp_path)
    _run([py, "-c", "import launcher.cli, diffusers, transformers, yunchang, parallel.attention"], 120, env=clean,
         cwd=tmp_path)
    out = tmp_path / "results"
    _run([py, str(ROOT / "scripts" / "gpu_check.py"), "--rehearse", "--only", "S0", "--results-dir", str(out)], 300,
         env=clean, cwd=tmp_path)
    s0 = json.loads((out / "S0.json").read_text())
    assert s0["status"] == "ok" and s0["figures"]["torch"].startswith(version)
