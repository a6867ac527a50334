"""`magcache-launch sweep` on a tiny checkpoint: one load, reference + settings, report, resume."""
from __future__ import annotations

import json

import pytest

from launcher.cli import main

COMMON = ["--task", "t2v-A14B", "--size", "64*64", "--frame_num", "5", "--sample_steps", "8",
          "--retention_ratio", "0.2"]


def sweep(ckpt, prompts, out, *args: str) -> int:
    return main(["sweep", "--ckpt_dir", str(ckpt), "--prompts", str(prompts), "--out-dir", str(out), *COMMON, *args])


@pytest.fixture(scope="module")
def swept(tiny_ckpt, tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    prompts = work / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red car at night", "name": "car"}) + "\n"
                       + json.dumps({"prompt": "a cat on a roof", "name": "cat", "seed": 9}) + "\n")
    out = work / "out"
    code = sweep(tiny_ckpt("t2v-A14B"), prompts, out, "--thresholds", "0,0.1,0.3,1.0", "--speedups", "1.5")
    return {"code": code, "out": out, "prompts": prompts, "ckpt": tiny_ckpt("t2v-A14B"),
            "report": json.loads((out / "sweep.json").read_text())}


def test_every_prompt_gets_a_reference_and_one_video_per_threshold(swept):
    assert swept["code"] == 0
    out = swept["out"]
    for stem in ("car", "cat"):
        for label in ("reference", "thresh-0", "thresh-0.1", "thresh-0.3", "thresh-1", "speedup-1.5"):
            assert (out / stem / f"{label}.mp4").is_file() and (out / stem / f"{label}.json").is_file()
    seeds = {json.loads((out / stem / f"{label}.json").read_text())["seed"]
             for stem in ("cat",) for label in ("reference", "thresh-0.3")}
    assert seeds == {9}  # one seed per prompt: the line's
    assert json.loads((out / "car" / "thresh-0.1.json").read_text())["seed"] == 0  # no seed anywhere: 0


def test_report_rows_and_monotone_forward_counts(swept):
    report = swept["report"]
    assert report["prompts"] == ["car", "cat"] and len(report["rows"]) == 10
    for stem in ("car", "cat"):
        target = next(r for r in report["rows"] if r["prompt"] == stem and r["setting"] == "speedup-1.5")
        assert target["forward_speedup"] >= 1.5 and target["thresh"] > 0 and target["target_speedup"] == 1.5
        rows = [r for r in report["rows"] if r["prompt"] == stem and r["setting"].startswith("thresh-")]
        speedups = [r["forward_speedup"] for r in sorted(rows, key=lambda r: r["thresh"])]
        assert speedups == sorted(speedups) and speedups[-1] > 1.0
        zero = next(r for r in rows if r["thresh"] == 0)
        # threshold 0 skips nothing and equals the uncached video bit for bit
        assert zero["forward_speedup"] == 1.0 and zero["quality"]["identical"] is True
    settings = {s["setting"]: s for s in report["settings"]}
    assert settings["thresh-1"]["forward_speedup"]["n"] == 2
    assert settings["thresh-1"]["psnr"]["mean"] is not None


def test_report_files_and_the_verdict(swept):
    out = swept["out"]
    md = (out / "report.md").read_text()
    assert "| setting | thresh | forward speedup |" in md and "thresh-0.3" in md
    assert "To reach 1.5x at the smallest quality cost" in md
    thresh = next(s["thresh"]["mean"] for s in swept["report"]["settings"] if s["setting"] == "speedup-1.5")
    assert f"| speedup-1.5 | {thresh:.6g} |" in md and len(f"{thresh:.6g}") > 4  # the digits it was chosen with
    from launcher.batch.sweep import pareto_figure

    for ax in pareto_figure(swept["report"]).axes:  # every point labelled, the hollow wall-time ones too
        labels = [t.get_text() for t in ax.texts]
        assert "thresh-0.3" in labels and "thresh-0.3 (wall)" in labels
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 12, "skipped": 0, "failed": 0}


def test_a_rerun_generates_nothing_and_reports_the_same(swept):
    before = {(r["prompt"], r["setting"]): (r["forward_speedup"], r["quality"]) for r in swept["report"]["rows"]}
    assert sweep(swept["ckpt"], swept["prompts"], swept["out"], "--thresholds", "0,0.1,0.3,1.0", "--speedups", "1.5") == 0
    summary = json.loads((swept["out"] / "summary.json").read_text())
    assert summary["counts"] == {"ok": 0, "skipped": 12, "failed": 0}
    after = json.loads((swept["out"] / "sweep.json").read_text())
    assert {(r["prompt"], r["setting"]): (r["forward_speedup"], r["quality"]) for r in after["rows"]} == before


@pytest.mark.parametrize("args,needle", [
    ([], "give --thresholds"),
    (["--thresholds", "0.1,x"], "not a number"),
    (["--thresholds", "-0.1"], "must be >= 0"),
    (["--thresholds", "0.1,0.1"], "given twice"),
    (["--speedups", "0.5"], "must be >= 1"),
    (["--speedups", "9"], "out of reach"),
])
def test_bad_sweep_input_exits_2_before_loading(tiny_ckpt, tmp_path, capsys, args, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert sweep(tiny_ckpt("t2v-A14B"), prompts, tmp_path / "out", *args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_dp_replicas_under_torchrun_report_what_one_process_does(swept, tmp_path):
    """Two ranks (dp 2): the prompts' videos spread over both replicas; rank 0 reports. Each replica
    computes alone, like the single process, so forward counts and quality must be identical."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "launcher",
         "sweep", "--prompts", str(swept["prompts"]), "--out-dir", str(out), "--ckpt_dir", str(swept["ckpt"]), *COMMON,
         "--thresholds", "0,0.1,0.3,1.0", "--speedups", "1.5", "--dist-timeout", "120"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=cli_env())
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"]["mesh"] == {"dp": 2, "cfg": 1, "sp": 1}
    assert {i["dp_group"] for i in summary["items"]} == {0, 1}
    mine = json.loads((out / "sweep.json").read_text())
    key = lambda rows: {(r["prompt"], r["setting"]): (r["forward_speedup"], r["thresh"], r["quality"]) for r in rows}
    assert key(mine["rows"]) == key(swept["report"]["rows"])
