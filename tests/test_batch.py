"""`magcache-launch batch` end to end on tiny checkpoints: failures, equality with `generate`,
resume (rerun, tampering, a killed run), --force, text files, --shard, malformed files, 4 ranks.

Batches run in-process through `launcher.cli.main`; the exit-code contract and the killed run use
real subprocesses.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, run_cli
from e2e_helpers import make_image

from launcher.cli import main
from launcher.outputs.atomic import sha256_of

TASK = "ti2v-5B"
FLAGS = ["--task", TASK, "--size", "64*64", "--frame_num", "5", "--sample_steps", "4",
         "--use_magcache", "--magcache_thresh", "0.5"]
ITEMS = [
    {"prompt": "a red car drives through a snowy city at night", "seed": 11},
    {"prompt": "a cat surfing a wave", "name": "cat", "seed": 12, "negative_prompt": "blurry"},
    {"prompt": "a size the model cannot use", "size": "70*64", "seed": 13},
    {"prompt": "a lighthouse in a storm", "image": "first.png", "seed": 14},
    {"prompt": "a seed drawn by rank 0", "name": "drawn"},
]
OK_STEMS = ["00000", "cat", "00003", "drawn"]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def batch(ckpt: Path, prompts: Path, out: Path, *extra: str) -> tuple[int, dict | None]:
    code = main(["batch", str(prompts), "--out-dir", str(out), "--ckpt_dir", str(ckpt), *FLAGS, *extra])
    summary = out / "summary.json"
    return code, json.loads(summary.read_text()) if summary.exists() else None


def by_name(summary: dict) -> dict[str, dict]:
    return {item["name"]: item for item in summary["items"]}


def snapshot(out: Path) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every video and manifest: proof that a file was or was not rewritten."""
    return {p.name: (p.stat().st_mtime_ns, sha256_of(p)) for p in sorted(out.iterdir())
            if p.suffix in (".mp4", ".json") and p.name != "summary.json"}


@pytest.fixture(scope="module")
def first_run(tiny_ckpt, tmp_path_factory):
    """Five items, one with an unusable size, on one process: the run the other tests start from."""
    work = tmp_path_factory.mktemp("batch")
    make_image(work / "first.png", size=(64, 64), seed=5)
    prompts = write_jsonl(work / "prompts.jsonl", ITEMS)
    ckpt = tiny_ckpt(TASK)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the console writes to whatever sys.stderr is when it prints
        code, summary = batch(ckpt, prompts, work / "out")
    return {"code": code, "summary": summary, "ckpt": ckpt, "prompts": prompts, "out": work / "out", "work": work,
            "stderr": err.getvalue()}


def test_each_warning_is_said_once_with_its_count(first_run):
    warnings = [ln for ln in first_run["stderr"].splitlines() if ln.startswith("warning:")]
    assert len(warnings) == len(set(warnings)) >= 2, first_run["stderr"]
    size = [w for w in warnings if "--size 64*64 is not one of" in w]
    assert len(size) == 1 and size[0].endswith("(4 of 4 items)"), warnings
    assert all(w.endswith("items)") for w in warnings), warnings


def test_one_invalid_item_fails_alone_and_the_batch_exits_3(first_run):
    out, summary = first_run["out"], first_run["summary"]
    assert first_run["code"] == 3
    assert sorted(p.stem for p in out.glob("*.mp4")) == sorted(OK_STEMS)
    assert summary["counts"] == {"ok": 4, "skipped": 0, "failed": 1}
    bad = by_name(summary)["00002"]
    assert bad["status"] == "failed" and bad["line"] == 3 and bad["seed"] == 13
    assert bad["error"].startswith("--size 70*64: width and height must be positive multiples of 32")
    assert not list(out.glob("00002*"))
    for stem in OK_STEMS:
        row, manifest = by_name(summary)[stem], json.loads((out / f"{stem}.json").read_text())
        assert row["status"] == "ok" and row["error"] is None
        assert row["sha256"] == manifest["sha256"] == sha256_of(out / f"{stem}.mp4")
        assert row["seed"] == manifest["seed"] == manifest["flags"]["base_seed"]
        assert row["skipped_forwards"] == manifest["magcache"]["skipped_count"]
        assert manifest["batch"]["name"] == stem and manifest["prompt"] == row["prompt"]
    assert by_name(summary)["00000"]["skipped_forwards"] == 4  # MagCache really ran per item
    assert by_name(summary)["drawn"]["seed"] >= 0
    assert json.loads((out / "cat.json").read_text())["flags"]["negative_prompt"] == "blurry"
    assert json.loads((out / "00003.json").read_text())["flags"]["image"] == str(first_run["work"] / "first.png")


def test_each_video_equals_generate_of_that_item(first_run, tmp_path):
    ckpt, summary, work = first_run["ckpt"], first_run["summary"], first_run["work"]
    extra = {"00000": [], "cat": ["--negative_prompt", "blurry"], "00003": ["--image", str(work / "first.png")],
             "drawn": []}
    for stem in OK_STEMS:
        row = by_name(summary)[stem]
        video = tmp_path / f"{stem}.mp4"
        assert main(["generate", "--ckpt_dir", str(ckpt), *FLAGS, "--prompt", row["prompt"], "--base_seed",
                     str(row["seed"]), "--save_file", str(video), *extra[stem]]) == 0
        assert sha256_of(video) == row["sha256"], stem


def test_rerun_skips_every_verified_item(first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)  # copy2 keeps mtimes; a moved out dir still verifies
    before = snapshot(out)
    code, summary = batch(first_run["ckpt"], first_run["prompts"], out)
    assert code == 3  # the invalid item is still invalid
    assert summary["counts"] == {"ok": 0, "skipped": 4, "failed": 1}
    assert snapshot(out) == before
    for stem in OK_STEMS:
        assert by_name(summary)[stem]["status"] == "skipped"
        assert by_name(summary)[stem]["seed"] == by_name(first_run["summary"])[stem]["seed"]


def test_rerun_regenerates_items_that_do_not_verify(first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    with open(out / "cat.mp4", "ab") as f:  # the video no longer matches its manifest's sha256
        f.write(b"\0")
    manifest = json.loads((out / "00000.json").read_text())
    manifest["seed"] = 99  # a manifest from another seed
    (out / "00000.json").write_text(json.dumps(manifest))
    (out / "00003.json").unlink()  # a video without manifest (killed between the two renames)
    stale = [out / ".00003.mp4.k1ll3d.tmp.mp4", out / ".00003.json.k1ll3d.tmp.json"]  # a SIGKILLed write's temps
    for path in stale:
        path.write_bytes(b"partial")
    before = snapshot(out)
    code, summary = batch(first_run["ckpt"], first_run["prompts"], out)
    assert code == 3
    status = {stem: by_name(summary)[stem]["status"] for stem in OK_STEMS}
    assert status == {"00000": "ok", "cat": "ok", "00003": "ok", "drawn": "skipped"}
    after = snapshot(out)
    assert after["drawn.mp4"] == before["drawn.mp4"]
    for stem in ("00000", "cat", "00003"):
        assert sha256_of(out / f"{stem}.mp4") == by_name(first_run["summary"])[stem]["sha256"]
    assert not [p for p in stale if p.exists()]


def test_a_changed_flag_does_not_count_as_done(first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    one = write_jsonl(tmp_path / "one.jsonl", [ITEMS[0]])
    code, summary = batch(first_run["ckpt"], one, out, "--sample_shift", "3.0")
    assert code == 0 and summary["items"][0]["status"] == "ok"
    assert json.loads((out / "00000.json").read_text())["flags"]["sample_shift"] == 3.0


def test_force_regenerates_everything(first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    before = snapshot(out)
    code, summary = batch(first_run["ckpt"], first_run["prompts"], out, "--force")
    assert code == 3 and summary["counts"] == {"ok": 4, "skipped": 0, "failed": 1}
    after = snapshot(out)
    for stem in OK_STEMS:
        assert after[f"{stem}.mp4"][0] != before[f"{stem}.mp4"][0], stem  # rewritten
    for stem in ("00000", "cat", "00003"):  # fixed seeds: the same bytes again
        assert after[f"{stem}.mp4"][1] == before[f"{stem}.mp4"][1], stem


def test_plain_text_file_one_prompt_per_line(tiny_ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("  a red car at night  \n\n   \na cat surfing\n")
    code, summary = batch(tiny_ckpt(TASK), prompts, tmp_path / "out", "--base_seed", "5")
    assert code == 0
    assert [(i["name"], i["line"], i["prompt"], i["seed"], i["status"]) for i in summary["items"]] == [
        ("00000", 1, "a red car at night", 5, "ok"), ("00001", 4, "a cat surfing", 5, "ok")]
    assert json.loads((tmp_path / "out" / "00001.json").read_text())["prompt"] == "a cat surfing"


def test_shards_split_the_file_and_together_cover_it(tiny_ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\na cat surfing\na lighthouse\n")
    out, ckpt = tmp_path / "out", tiny_ckpt(TASK)
    assert batch(ckpt, prompts, out, "--base_seed", "3", "--shard", "1/2")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["00001.json", "00001.mp4", "summary-shard-1-of-2.json"]
    assert batch(ckpt, prompts, out, "--base_seed", "3", "--shard", "0/2")[0] == 0
    s0 = json.loads((out / "summary-shard-0-of-2.json").read_text())
    assert s0["shard"] == "0/2" and [i["name"] for i in s0["items"]] == ["00000", "00002"]
    code, whole = batch(ckpt, prompts, out, "--base_seed", "3")  # unsharded rerun: all done already
    assert code == 0 and [i["status"] for i in whole["items"]] == ["skipped"] * 3


def test_invalid_items_are_recorded_without_loading_a_model(tiny_ckpt, tmp_path):
    make_image(tmp_path / "first.png")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "no image"}, {"prompt": "gone", "image": "nope.png"}])
    code, summary = batch(tiny_ckpt("i2v-A14B"), prompts, tmp_path / "i2v", "--task", "i2v-A14B")
    assert code == 3
    assert [i["error"] for i in summary["items"]] == [
        "i2v-A14B needs --image (the first frame)", f"--image {tmp_path / 'nope.png'}: file not found"]
    assert summary["world"]["size"] == 1 and not list((tmp_path / "i2v").glob("*.mp4"))
    text_only = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "an image on t2v", "image": "first.png"}])
    code, summary = batch(tiny_ckpt("t2v-A14B"), text_only, tmp_path / "t2v", "--task", "t2v-A14B")
    assert code == 3 and summary["items"][0]["error"].startswith("--image is not used by t2v-A14B")


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "a"}', '{"prompt": "b",}'], "prompts.jsonl line 2: not valid JSON"),
    (['{"name": "x"}'], 'prompts.jsonl line 1: no "prompt"'),
    (['{"prompt": ""}'], 'prompts.jsonl line 1: no "prompt"'),
    (['{"prompt": "a", "frames": 5}'], "prompts.jsonl line 1: unknown field(s) frames"),
    (['{"prompt": "a", "seed": "7"}'], "prompts.jsonl line 1: field 'seed' must be a int"),
    (['{"prompt": "a", "lora_high": "style.safetensors"}'],
     "prompts.jsonl line 1: field 'lora_high': one LoRA set per batch"),
    (['["a"]'], "prompts.jsonl line 1: expected a JSON object"),
    (['{"prompt": "a", "name": "x"}', "", '{"prompt": "b", "name": "X"}'],
     "prompts.jsonl line 3: name 'X' is already used by line 1"),
    (['{"prompt": "a"}', '{"prompt": "b", "name": "00000"}'], "prompts.jsonl line 2: name '00000' is already used"),
    (['{"prompt": "a", "name": "../evil"}'], "prompts.jsonl line 1: name '../evil' is not a safe file name"),
    (['{"prompt": "a", "name": ".hidden"}'], "prompts.jsonl line 1: name '.hidden' is not a safe file name"),
    (['{"prompt": "a", "name": "summary"}'], "prompts.jsonl line 1: name 'summary' is reserved"),
    (['{"prompt": "a", "name": "clip.mp4"}'], "prompts.jsonl line 1: name 'clip.mp4': give it without .mp4"),
    (["", "  "], "prompts.jsonl: no prompts in it"),
])
def test_malformed_file_exits_2_naming_the_line_before_loading(tmp_path, capsys, lines, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    missing_ckpt = tmp_path / "no-checkpoint-here"  # never reached: the file is checked first
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out-dir", str(out), "--ckpt_dir", str(missing_ckpt), *FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("shard", ["2/2", "1", "-1/2", "a/b", "0/0"])
def test_bad_shard_syntax_exits_2(tmp_path, capsys, shard):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["batch", str(prompts), "--out-dir", str(tmp_path / "out"), "--shard", shard, *FLAGS]) == 2
    assert f"--shard {shard!r}: expected I/N with 0 <= I < N" in capsys.readouterr().err


def test_bad_line_is_one_line_and_exit_2_in_a_real_process(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    r = run_cli("batch", str(prompts), "--out-dir", str(tmp_path / "out"), *FLAGS, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: p.jsonl line 2: field 'prompt' must be a str, got 3"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_batch_resumes_without_redoing_finished_items(tiny_ckpt, tmp_path, sig):
    # Item 0 is tiny; items 1-2 are larger (seconds each), so the kill lands while item 1 runs.
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a red car", "seed": 1},
        {"prompt": "a cat surfing", "seed": 2, "size": "192*192", "frame_num": 9},
        {"prompt": "a lighthouse", "seed": 3, "size": "192*192", "frame_num": 9},
    ])
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--out-dir", str(out), "--ckpt_dir", str(tiny_ckpt(TASK)), *FLAGS]
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "00000.json").exists():
            assert proc.poll() is None, "the batch ended before its first manifest appeared"
            assert time.monotonic() < deadline, "no manifest for item 0 after 300 s"
            time.sleep(0.01)
        os.kill(proc.pid, sig)  # the launcher itself, as a scheduler or `kill` would
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    # SIGKILL: no chance to clean up; SIGTERM (scancel, preemption): unwinds and exits 128 + 15
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM)
    assert sorted(p.name for p in out.glob("*.mp4")) == ["00000.mp4"]  # nothing half-written under a real name
    assert not (out / "summary.json").exists()
    if sig == signal.SIGTERM:
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    first = snapshot(out)["00000.mp4"]
    code, summary = batch(tiny_ckpt(TASK), prompts, out)
    assert code == 0
    assert [i["status"] for i in summary["items"]] == ["skipped", "ok", "ok"]
    assert snapshot(out)["00000.mp4"] == first
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the killed run's temp files are gone


def _multi_rank_refused(stderr: str) -> bool:
    return "need several ranks: launch with torchrun or srun" in stderr


@pytest.mark.slow
def test_a_batch_resumed_under_torchrun_with_ring_size_2_keeps_its_videos(first_run, tmp_path):
    """The placement flags do not change a video (tests/test_flag_roles.py checks each against the
    resume key); this is one of them end to end: two ranks, a ring of 2, nothing regenerated."""
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    shutil.copy(first_run["work"] / "first.png", tmp_path / "first.png")
    before = snapshot(out)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "launcher",
         "batch", str(first_run["prompts"]), "--out-dir", str(out), "--ckpt_dir", str(first_run["ckpt"]), *FLAGS,
         "--ring_size", "2", "--dist-timeout", "120"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=cli_env())
    assert r.returncode == 1, r.stderr[-4000:]  # torchrun's code when ranks exit 3: the invalid item
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"]["size"] == 2
    assert summary["counts"] == {"ok": 0, "skipped": 4, "failed": 1}
    assert snapshot(out) == before


@pytest.mark.slow
def test_four_ranks_two_dp_groups_of_ulysses_two_match_one_process(first_run, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [ITEMS[0], ITEMS[1], ITEMS[3], {**ITEMS[4], "seed": 15}])
    shutil.copy(first_run["work"] / "first.png", tmp_path / "first.png")
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m", "launcher",
         "batch", str(prompts), "--out-dir", str(out), "--ckpt_dir", str(first_run["ckpt"]), *FLAGS,
         "--ulysses_size", "2", "--dist-timeout", "120"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=cli_env())
    if r.returncode != 0 and _multi_rank_refused(r.stderr):  # torchrun exits 1 when ranks exit 2
        pytest.skip("launcher.engine.world.start_world does not start multi-rank runs yet (lead enables it)")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"]["size"] == 4 and summary["world"]["mesh"] == {"dp": 2, "cfg": 1, "sp": 2}
    assert [i["dp_group"] for i in summary["items"]] == [0, 1, 0, 1]
    assert [i["status"] for i in summary["items"]] == ["ok"] * 4
    reference = by_name(first_run["summary"])
    import numpy as np
    import imageio_ffmpeg

    def frames(path: Path) -> np.ndarray:
        reader = imageio_ffmpeg.read_frames(str(path))
        next(reader)
        return np.stack([np.frombuffer(f, np.uint8) for f in reader]).astype(np.int16)

    for stem in ("00000", "cat", "00002"):  # 00002 here is the image item (00003 in the reference)
        ref_stem = "00003" if stem == "00002" else stem
        mine, theirs = json.loads((out / f"{stem}.json").read_text()), json.loads(
            (first_run["out"] / f"{ref_stem}.json").read_text())
        assert mine["magcache"]["skipped_forwards"] == theirs["magcache"]["skipped_forwards"]
        # each dp replica split its decode over its own two ranks (--vae-parallel auto), never the other's
        group = {"00000": 0, "cat": 1, "00002": 0}[stem]
        assert mine["vae_decode"]["parallel"] and mine["vae_decode"]["ranks"] == 2
        assert [r["rank"] for r in mine["vae_decode"]["per_rank"]] == [2 * group, 2 * group + 1]
        assert mine["seed"] == reference[ref_stem]["seed"]
        # same video up to float reduction order (sp 2 vs 1: latents differ by ~1e-6 relative); the
        # 8-bit truncation and H.264 can turn that into a few changed pixels, never a different video
        diff = np.abs(frames(out / f"{stem}.mp4") - frames(first_run["out"] / f"{ref_stem}.mp4"))
        assert diff.mean() < 0.5 and (diff > 8).mean() < 0.01, (diff.mean(), diff.max())
