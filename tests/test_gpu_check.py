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


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_renders_no_gpu_figures(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n")
    proc = _run("--rehearse", "--results-dir", str(tmp_path), "--markdown", str(markdown))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "gpu-rehearsal-cpu.json").read_text())
    assert record["flags"]["rehearse"] is True
    steps = record["figures"]
    assert list(steps) == ["S0", "S1", "S2", "S3", "S4", "S5", "S6", "S7"]
    assert all(s["status"] == "ok" for s in steps.values()), {k: v["status"] for k, v in steps.items()}
    assert steps["S1"]["figures"]["equal_to_official"] is True
    assert steps["S2"]["figures"]["worst_rel"] == 0.0  # CPU against CPU: the rehearsal compares like with like
    runs = steps["S3"]["figures"]["runs"]
    assert [r["task"] for r in runs] == ["t2v-A14B", "i2v-A14B", "ti2v-5B", "t2v-A14B", "t2v-A14B"]  # + --compile on GPU
    assert all(r["skipped"] == r["planned"] and r["skipped"] for r in runs)
    assert steps["S4"]["figures"]["compile"]["compiled_vs_eager_rel"] < 1e-2  # bf16 autocast, fused vs eager
    assert steps["S5"]["figures"]["fsdp_rel"] <= 1e-6
    quant = steps["S7"]["figures"]  # fp8 and int8 linears and one quantized block, close to float32
    assert set(quant["block"]) == {"bf16", "fp8", "int8"} and quant["linears"]["ffn_up"]["fp8"]["rel"] < 0.06
    # the rehearsal is not a GPU measurement: the section says no GPU has run it
    assert "No GPU has run" in markdown.read_text()
