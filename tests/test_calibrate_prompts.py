"""`calibrate --prompts FILE --seeds ...`: one table averaged over prompts x seeds, with its spread."""
from __future__ import annotations

import json
import statistics

import pytest
from e2e_helpers import make_image

from launcher.cli import main

COMMON = ["--task", "t2v-A14B", "--size", "64*64", "--frame_num", "5", "--sample_steps", "5"]


def calibrate(ckpt, *args: str) -> int:
    return main(["calibrate", "--ckpt_dir", str(ckpt), *COMMON, *args])


def test_average_of_prompts_and_seeds_equals_the_single_runs(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("t2v-A14B")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red car at night"}) + "\n" + json.dumps({"prompt": "a cat"}) + "\n")
    assert calibrate(ckpt, "--prompts", str(prompts), "--seeds", "3,4", "--out", str(tmp_path / "avg.json")) == 0
    avg = json.loads((tmp_path / "avg.json").read_text())
    assert (tmp_path / "avg.png").read_bytes()[:4] == b"\x89PNG"
    meta = avg["meta"]
    assert [(r["prompt"], r["seed"]) for r in meta["runs"]] == [
        ("a red car at night", 3), ("a red car at night", 4), ("a cat", 3), ("a cat", 4)]
    assert meta["sample_solver"] == "unipc" and meta["loras"] == []
    singles = []
    for prompt in ("a red car at night", "a cat"):
        for seed in ("3", "4"):
            out = tmp_path / f"{prompt[:5]}-{seed}.json"
            assert calibrate(ckpt, "--prompt", prompt, "--base_seed", seed, "--out", str(out)) == 0
            singles.append(json.loads(out.read_text())["ratios"])
    assert len(avg["ratios"]) == 2 * 5 - 2
    for i, value in enumerate(avg["ratios"]):
        column = [s[i] for s in singles]
        assert value == pytest.approx(statistics.fmean(column), abs=2e-5)  # files round to 5 decimals
        assert meta["spread"][i] == pytest.approx(statistics.pstdev(column), abs=2e-5)
    assert max(meta["spread"]) > 0  # different prompts and seeds do give different curves
    assert set(meta["per_expert"]) == {"high", "low"}
    assert len(meta["per_branch"]["cond"]["ratio"]) == len(meta["per_branch"]["uncond"]["ratio"]) == 4


def test_the_averaged_table_drives_generate(tiny_ckpt, tmp_path, capsys):
    ckpt = tiny_ckpt("t2v-A14B")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red car at night\na cat\n")
    assert calibrate(ckpt, "--prompts", str(prompts), "--out", str(tmp_path / "t.json"), "--base_seed", "1") == 0
    capsys.readouterr()
    assert main(["plan", *COMMON, "--magcache_ratios", str(tmp_path / "t.json"), "--magcache_thresh", "0.5",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["ratio_table"]["source"] == str(tmp_path / "t.json") and plan["sample_steps"] == 5


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "x", "--seeds", "1,2"], "--seeds needs --prompts"),
    (["--prompt", "x", "--prompts", "{file}"], "not both"),
    (["--prompts", "{file}", "--seeds", "1,a"], "--seeds"),
    (["--prompts", "{missing}"], "not found"),
])
def test_bad_calibrate_input_exits_2(tiny_ckpt, tmp_path, capsys, args, needle):
    file = tmp_path / "p.txt"
    file.write_text("a cat\n")
    args = [a.replace("{file}", str(file)).replace("{missing}", str(tmp_path / "none.txt")) for a in args]
    assert calibrate(tiny_ckpt("t2v-A14B"), *args, "--out", str(tmp_path / "o.json")) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_ti2v_prompts_must_agree_on_image_mode(tiny_ckpt, tmp_path, capsys):
    image = make_image(tmp_path / "first.png")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "image": str(image)}) + "\n")
    code = main(["calibrate", "--task", "ti2v-5B", "--ckpt_dir", str(tiny_ckpt("ti2v-5B")), "--prompts", str(prompts),
                 "--out", str(tmp_path / "o.json")])
    assert code == 2 and "calibrate each mode with its own file" in capsys.readouterr().err
