"""What a run leaves for people who were not at the terminal: progress lines in a log file (issue 27
item 1) and outputs others may read, with the mode a plain open() gives under the umask (item 2)."""
from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_env
from rich.console import Console

from launcher.outputs import report
from launcher.outputs.atomic import atomic_path, write_json
from launcher.outputs.media import write_frames, write_latents, write_mp4
from magcache.calibrate import write_ratio_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_atomic_output_gets_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what any other program writes
        f.write("x")
    expected = _mode(tmp_path / "plain.txt")
    assert expected == 0o666 & ~mask
    video = torch.rand(3, 3, 16, 16) * 2 - 1
    write_mp4(tmp_path / "v.mp4", video, fps=8)
    write_json(tmp_path / "v.json", {"a": 1})
    write_latents(tmp_path / "l.safetensors", torch.zeros(2, 2))
    frames = write_frames(tmp_path / "frames", video)
    ratios = write_ratio_file(tmp_path / "r.json", "ti2v-5B", 3, 5.0, [1.0, 1.0, 1.0, 1.0])
    with atomic_path(tmp_path / "report.md", suffix=".md") as tmp:
        tmp.write_text("# r\n")
    outputs = [tmp_path / "v.mp4", tmp_path / "v.json", tmp_path / "l.safetensors", frames[0], ratios,
               tmp_path / "report.md"]
    assert {p.name: oct(_mode(p)) for p in outputs} == {p.name: oct(expected) for p in outputs}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_progress_lines_are_plain_short_and_counted(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(report, "console", Console(file=out, width=80, highlight=False))

    class D:
        def __init__(self, skip):
            self.skip = skip

    decisions: list[D] = []
    with report.progress_bar(200, enabled=True, forwards=lambda: decisions, every_s=0.0) as on_step:
        for i in range(1, 201):
            decisions.extend([D(False), D(i % 2 == 0)])
            on_step(i, 200)
    lines = out.getvalue().splitlines()
    assert len(lines) == 200 and all(len(ln) < 80 for ln in lines)
    assert lines[0] == "step 1/200  skipped 0 of 2 forwards"
    assert re.fullmatch(r"step 200/200  \d+\.\d\d s/step  ETA 0:00:00  skipped 100 of 400 forwards", lines[-1])
    long = report.progress_line(1999, 2000, 1998 * 123.45, 3000, 999)  # widest plausible figures still fit
    assert len(long) < 80 and "ETA 0:02:03" in long


def test_progress_lines_are_throttled_but_keep_first_and_last(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(report, "console", Console(file=out, width=80, highlight=False))
    with report.progress_bar(50, enabled=True, every_s=3600.0) as on_step:
        for i in range(1, 51):
            on_step(i, 50)
    assert [ln.split()[1] for ln in out.getvalue().splitlines()] == ["1/50", "50/50"]


@pytest.mark.slow
def test_a_log_file_gets_progress_lines_and_readable_outputs(tiny_ckpt, tmp_path):
    """A real run with stderr to a file (as under sbatch or nohup), umask 027."""
    log = tmp_path / "run.log"
    out = tmp_path / "out" / "v.mp4"
    with open(log, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "launcher", "generate", "--task", "ti2v-5B", "--size", "64*64", "--frame_num", "5",
             "--ckpt_dir", str(tiny_ckpt("ti2v-5B")), "--prompt", "a cat", "--base_seed", "1", "--sample_steps", "4",
             "--use_magcache", "--magcache_thresh", "0.5", "--magcache_K", "4", "--retention_ratio", "0",
             "--save_file", str(out)],
            stdout=subprocess.DEVNULL, stderr=err, env=cli_env(COLUMNS="80"), cwd=ROOT, timeout=600,
            preexec_fn=lambda: os.umask(0o027))
    text = log.read_text()
    assert proc.returncode == 0, text
    steps = [ln for ln in text.splitlines() if ln.startswith("step ")]
    assert steps[0] == "step 1/4  skipped 0 of 2 forwards", text
    assert re.fullmatch(r"step 4/4  \d+\.\d\d s/step  ETA 0:00:00  skipped [1-9] of 8 forwards", steps[-1])
    assert "\x1b[" not in text  # no bar, no colour codes in a file
    # every warning and status line whole: nothing wrapped onto a line of its own
    assert all(ln.startswith(("[magcache-launch]", "warning:", "step ", "video ", "timings:", "magcache:", "  ", "["))
               for ln in text.splitlines()), text
    assert {_mode(p) for p in out.parent.iterdir()} == {0o640}
