"""What the README tells a new user to run names things that exist (issue 27 item 9)."""
from __future__ import annotations

import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_repository_file_the_readme_names_exists():
    named = set(re.findall(r"(?<![\w/<-])((?:benchmarks|scripts|tests|docs|launcher|magcache|parallel)/[\w./-]+\.\w+)",
                           README))
    assert len(named) > 10
    missing = sorted(p for p in named if not (ROOT / p.rstrip(".")).exists())
    assert missing == [], missing


def test_the_readme_says_where_the_real_weights_are_and_the_demo_what_it_draws():
    for task in ("T2V-A14B", "I2V-A14B", "TI2V-5B"):
        assert f"`Wan-AI/Wan2.2-{task}`" in README and f"`Wan-AI/Wan2.2-{task}-Diffusers`" in README
    assert "hf download Wan-AI/Wan2.2-T2V-A14B --local-dir" in README
    assert re.search(r"\| `t2v-A14B` \|.*\| ~\d+ GB \|", README)
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    # the demo's model is the tiny one trained here; the demo says where its measured quality is, the README
    # shows its frames (the screenshot the issue asks for)
    assert "models/tiny-shapes" in demo and 'BENCHMARKS.md \\"tiny-shapes\\"' in demo
    assert "![" in README and "(docs/tiny_shapes_frames.png)" in README
