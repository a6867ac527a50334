"""scripts/gpu_check.py: the prepared GPU proof runs end to end on CPU (`--rehearse`), so the
script is known to work the first time a GPU is at hand; rehearsals never appear as GPU figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _run(*args: str, timeout: float = 2400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_bad_step_and_no_gpu_exit_2(tmp_path):
    bad = _run("--rehearse", "--steps", "S9", "--results-dir", str(tmp_path))
    assert bad.returncode == 2 and "unknown step" in bad.stderr
    import torch

    if not torch.cuda.is_available():
        no_gpu = _run("--results-dir", str(tmp_path))
        assert no_gpu.returncode == 2 and "--rehearse" in no_gpu.stderr
    assert not list(tmp_path.iterdir())


def test_gpu_budgets_add_up_to_seven_minutes_and_are_printed(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    assert sum(s.gpu_s for s in gpu_check.STEPS.values()) <= gpu_check.GPU_BUDGET_S == 420
    assert {"S3c", "S4c"} <= set(gpu_check.STEPS)  # compile runs are steps of their own
    proc = _run("--rehearse", "--only", "S0", "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[gpu_check] budget S0" in proc.stdout and "all steps on a GPU: 420 s of 420 s" in proc.stdout
    assert json.loads((tmp_path / "S0.json").read_text())["status"] == "ok"


def _repo_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--", "benchmarks", "BENCHMARKS.md"], capture_output=True,
                          text=True, cwd=ROOT).stdout


def test_a_killed_run_keeps_every_finished_step_and_writes_nothing_into_the_repo(tmp_path):
    import os
    import signal
    import time

    before = _repo_state()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--rehearse", "--only", "S0,S2", "--results-dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "S0.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run, S2's child included, mid-step
        proc.wait()
    s0 = json.loads((tmp_path / "S0.json").read_text())
    assert s0["status"] == "ok" and s0["rehearse"] is True and s0["figures"]["torch"]
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == ["S0"]
    assert not (tmp_path / "S2.json").exists()
    assert _repo_state() == before


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_renders_no_gpu_figures(tmp_path):
    """Every step but S3c (a CPU inductor build of the CLI run costs minutes; test_compile covers compile)."""
    before = _repo_state()
    steps = [s for s in ("S0", "S1", "S2", "S3", "S4", "S4c", "S5", "S6", "S7")]
    proc = _run("--rehearse", "--only", ",".join(steps), "--results-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _repo_state() == before  # nothing written into the repository without --save
    got = {s: json.loads((tmp_path / "out" / f"{s}.json").read_text()) for s in steps}
    assert all(r["status"] == "ok" and r["rehearse"] for r in got.values()), {k: v["status"] for k, v in got.items()}
    steps = {k: v["figures"] for k, v in got.items()}
    assert steps["S1"]["equal_to_official"] is True
    assert steps["S2"]["worst_rel"] == 0.0  # CPU against CPU: the rehearsal compares like with like
    runs = steps["S3"]["runs"]
    assert [r["task"] for r in runs] == ["t2v-A14B", "i2v-A14B", "ti2v-5B", "t2v-A14B", "t2v-A14B"]
    assert all(r["skipped"] == r["planned"] and r["skipped"] and r["attention"] == "sdpa" for r in runs)
    assert steps["S4"]["attention"] == {"ours": "sdpa", "diffusers": "native"}
    host = steps["S4"]["host"]
    assert host["pinned_bytes"] == 0 and host["pin_memory_rule_bytes"] > host["weight_bytes"] > 0  # no pinning on CPU
    assert steps["S4c"]["tiny"]["compiled_vs_eager_rel"] < 1e-2  # bf16 autocast, fused vs eager
    assert steps["S5"]["fsdp_rel"] <= 1e-6 and steps["S5"]["sp_backend"] == "gloo"
    quant = steps["S7"]  # fp8 and int8 linears and one quantized block, close to float32
    assert set(quant["block"]) == {"bf16", "fp8", "int8"} and quant["linears"]["ffn_up"]["fp8"]["rel"] < 0.06
    # the rehearsal is not a GPU measurement: the section says no GPU has run it
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n")
    assert _run("--render-only", "--markdown", str(markdown)).returncode == 0
    assert "No GPU has run" in markdown.read_text()
