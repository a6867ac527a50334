"""Shared fixtures: tiny checkpoints (built once per session) and CLI runners."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# machine load must not fail a property test: no per-example deadline, no "too slow" health check
# (generating from a regex is slow on a loaded 2-core box; the properties are what is tested)
settings.register_profile("any-load", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("any-load")

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def one_thread():
    """Torch at one thread inside, as every rank of the tests' torchrun/srun jobs runs (OMP_NUM_THREADS=1):
    references made in this process then equal the ranks' output (2 threads round differently, and int8
    magnifies it); the thread count before is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def one_thread_for_shared_fixtures():
    """Module- and session-scoped fixtures (a batch's first run, a sweep, reference videos) are set up
    before any function-scoped fixture runs, so the rule must already hold when the session starts."""
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def one_thread_like_the_ranks():
    """Every test starts at one thread, whatever an earlier test left."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """`tiny_ckpt(task, layout="official", seed=0) -> Path`, cached for the whole session."""
    from launcher.checkpoint.tiny import make_tiny_checkpoint

    cache: dict[tuple[str, str, int], Path] = {}
    base = tmp_path_factory.mktemp("tiny_ckpts")

    def get(task: str, layout: str = "official", seed: int = 0) -> Path:
        key = (task, layout, seed)
        if key not in cache:
            out = base / f"{task}-{layout}-{seed}"
            make_tiny_checkpoint(task, layout, out, seed=seed)
            cache[key] = out
        return cache[key]

    return get


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: one thread each (2 shared cores), no rank variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID",
                                                            "SLURM_NTASKS", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run `python -m launcher ARGS` in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], capture_output=True, text=True, timeout=timeout,
        env=env or cli_env(), cwd=cwd or ROOT,
    )
