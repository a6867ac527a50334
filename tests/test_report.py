"""The end-of-run summary: whole lines, nothing wrapped mid-clause, no dangling separators."""
from __future__ import annotations

import io

from rich.console import Console

from launcher.outputs import report

MANIFEST = {
    "video": "/very/long/output/folder/that/goes/on/t2v-A14B_1280x720_8_a_cat_20261129_101010.mp4", "seed": 42,
    "timings_s": {"load": 61.2, "text": 0.8, "denoise": 812.4, "decode": 40.1},
    "magcache": {"enabled": True, "skipped_count": 26, "total_forwards": 80, "forward_speedup": 80 / 54,
                 "skipped_by_branch": {"cond": 13, "uncond": 13}, "skipped_by_expert": {"high": 10, "low": 16}},
}


def test_summary_lines_say_everything_once():
    lines = report.summary_lines(MANIFEST)
    assert lines[2] == "magcache: skipped 26 of 80 forwards, forward-count speedup 1.48x"
    assert lines[3] == "  skipped by branch: cond 13, uncond 13; by expert: high 10, low 16"
    assert all(not ln.rstrip().endswith((",", ";", "(")) for ln in lines)


def test_a_narrow_terminal_does_not_break_lines(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(report, "console", Console(file=out, width=40, highlight=False))
    report.print_summary(MANIFEST)
    assert out.getvalue().splitlines() == report.summary_lines(MANIFEST)


def test_no_magcache_section_without_magcache():
    lines = report.summary_lines({**MANIFEST, "magcache": {"enabled": False}})
    assert len(lines) == 2 and lines[1].startswith("timings: load 61.2s")
