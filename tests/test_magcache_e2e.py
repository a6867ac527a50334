"""MagCache wired into real generations on tiny checkpoints: plan == executed, exactness, calibration."""
from __future__ import annotations

import json

import pytest
import torch

from launcher.cli import main
from e2e_helpers import generate, make_image


def plan_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_thresh_zero_skips_nothing_and_equals_uncached_bit_for_bit(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("t2v-A14B")
    plain = generate(ckpt, tmp_path / "plain", "t2v-A14B", steps=6)
    cached = generate(ckpt, tmp_path / "cached", "t2v-A14B", "--use_magcache", "--magcache_thresh", "0", steps=6)
    assert cached["magcache"]["enabled"] and cached["magcache"]["skipped_count"] == 0
    assert torch.equal(plain["_latents"], cached["_latents"])
    # few-step guard: the run says what to expect and how to calibrate
    assert any("only 6 steps" in w for w in cached["warnings"])
    assert not any("steps" in w for w in plain["warnings"])  # no MagCache, no MagCache warning


def test_one_magcache_setup_per_request_reads_the_ratio_table_once(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """Target search, runner, manifest and warnings all take the one set-up of the request: one
    table read and one timestep computation, and `plan` for the same flags is that set-up's plan."""
    from launcher.planner import schedule as planning

    calls = {"table": 0, "timesteps": 0}

    def counted(name, fn):
        def call(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return call

    monkeypatch.setattr(planning, "ratio_table", counted("table", planning.ratio_table))
    monkeypatch.setattr(planning, "scheduler_timesteps", counted("timesteps", planning.scheduler_timesteps))
    planning.magcache_setup.cache_clear()
    flags = ["--use_magcache", "--magcache-target-speedup", "1.0", "--retention_ratio", "0.1"]
    m = generate(tiny_ckpt("t2v-A14B"), tmp_path, "t2v-A14B", *flags, steps=7)
    assert calls == {"table": 1, "timesteps": 1}
    assert m["magcache"]["thresh_from"] == "target" and m["magcache"]["ratio_table"]["key"] == "t2v-A14B"
    p = plan_json(capsys, "--task", "t2v-A14B", "--sample_steps", "7", *flags)
    assert calls == {"table": 1, "timesteps": 1}  # the same request: the same set-up
    assert p["forwards"] == m["magcache"]["decisions"] and p["thresh"] == m["magcache"]["thresh"]
    planning.magcache_setup.cache_clear()


@pytest.mark.parametrize(
    "task,flags",
    [
        ("t2v-A14B", ["--magcache_thresh", "0.3", "--retention_ratio", "0.2", "--magcache_K", "2"]),
        ("t2v-A14B", ["--magcache_thresh", "0.3", "--retention_ratio", "0.1", "--magcache-split", "scheduler",
                      "--magcache-reset-at-switch"]),
        ("i2v-A14B", ["--magcache_thresh", "0.5", "--retention_ratio", "0.1", "--magcache_K", "3"]),
        ("ti2v-5B", ["--magcache_thresh", "0.5", "--retention_ratio", "0.2"]),
    ],
)
def test_generate_skips_exactly_where_plan_says(tiny_ckpt, tmp_path, capsys, task, flags):
    steps = 10
    extra = list(flags)
    if task == "i2v-A14B":
        extra += ["--image", str(make_image(tmp_path / "in.png"))]
    m = generate(tiny_ckpt(task), tmp_path / "run", task, "--use_magcache", *extra, steps=steps)
    p = plan_json(capsys, "--task", task, "--sample_steps", str(steps), *flags,
                  *(["--image", str(tmp_path / "in.png")] if task == "i2v-A14B" else []))
    mc = m["magcache"]
    assert p["skipped_forwards"], "the flags must make the plan skip something"
    assert mc["skipped_forwards"] == p["skipped_forwards"]
    assert [(d["index"], d["step"], d["branch"], d["expert"], d["retained"], d["skip"]) for d in mc["decisions"]] == [
        (f["index"], f["step"], f["branch"], f["expert"], f["retained"], f["skip"]) for f in p["forwards"]
    ]
    assert mc["forward_speedup"] == pytest.approx(p["forward_speedup"], abs=1e-4)


def test_skipping_changes_the_result_but_stays_close(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("ti2v-5B")
    plain = generate(ckpt, tmp_path / "plain", "ti2v-5B", steps=10)
    cached = generate(ckpt, tmp_path / "cached", "ti2v-5B", "--use_magcache", "--magcache_thresh", "0.5", steps=10)
    assert cached["magcache"]["skipped_count"] > 0
    diff = (plain["_latents"] - cached["_latents"]).norm() / plain["_latents"].norm()
    assert 0 < diff < 0.5


def test_residual_reuse_matches_a_hand_computed_forward(tiny_ckpt):
    """A skipped forward = head(embed(x_t) + residual of the branch's last computed forward)."""
    from launcher.checkpoint import inspect_checkpoint
    from launcher.checkpoint.load import load_transformer
    from launcher.wan.dit import WanDiT, pad_context
    from launcher.wan.tasks import TASKS
    from magcache.controller import MagCacheController
    from magcache.schedule import MagCacheParams, MagCacheSchedule

    info = inspect_checkpoint(tiny_ckpt("ti2v-5B"), TASKS["ti2v-5B"])
    dit = WanDiT(load_transformer(info, "single", dtype=torch.float32, device="cpu"))
    steps = 3
    # forwards 0,1 retained (computed); forward 2 (cond, step 1) may skip: mag 1.0 keeps err 0
    sched = MagCacheSchedule(mode="ti2v", steps=steps, split=0, mag=[1.0] * (2 * steps),
                             params=MagCacheParams(thresh=0.1, K=2, retention_ratio=1 / 3))
    ctrl = MagCacheController(sched)
    g = torch.Generator().manual_seed(0)
    ctx = dit.embed_text(pad_context(torch.randn(5, 32, generator=g), 512))
    x0, x1 = torch.randn(48, 2, 4, 4, generator=g), torch.randn(48, 2, 4, 4, generator=g)
    t0, t1 = torch.tensor([900]), torch.tensor([700])
    dit.forward(x0, t0, ctx, runner=ctrl, index=0)
    dit.forward(x0, t0, ctx, runner=ctrl, index=1)
    skipped = dit.forward(x1, t1, ctx, runner=ctrl, index=2)
    assert [d.skip for d in ctrl.decisions] == [False, False, True]

    class Hand:
        """Runs the blocks for x0, then replays: embedding of x1 plus that residual."""

        residual = None

        def forward(self, index, x, run_blocks, expert="single", valid=None):
            if index == 0:
                out = run_blocks(x)
                Hand.residual = out - x
                return out
            return x + Hand.residual

    hand = Hand()
    dit.forward(x0, t0, ctx, runner=hand, index=0)
    expected = dit.forward(x1, t1, ctx, runner=hand, index=2)
    assert torch.equal(skipped, expected)
    computed = dit.forward(x1, t1, ctx, runner=type("All", (), {"forward": lambda s, i, x, rb, **k: rb(x)})(), index=2)
    assert not torch.equal(skipped, computed)


def test_calibration_round_trips_into_generate(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("t2v-A14B")
    ratios = tmp_path / "cal" / "ratios.json"
    assert main(["calibrate", "--task", "t2v-A14B", "--size", "64*64", "--frame_num", "5", "--ckpt_dir", str(ckpt),
                 "--prompt", "a cat", "--base_seed", "3", "--sample_steps", "8", "--out", str(ratios)]) == 0
    data = json.loads(ratios.read_text())
    assert data["task"] == "t2v-A14B" and data["sample_steps"] == 8 and len(data["ratios"]) == 14
    assert all(r > 0 for r in data["ratios"]) and len(data["stds"]) == len(data["cos_dists"]) == 14
    png = ratios.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    m = generate(ckpt, tmp_path / "use", "t2v-A14B", "--use_magcache", "--magcache_ratios", str(ratios),
                 "--magcache_thresh", "0.5", "--retention_ratio", "0.1", steps=8)
    assert m["magcache"]["ratio_table"]["source"] == str(ratios)
    from magcache.ratios import load_ratio_file
    from launcher.planner.schedule import Sampling, magcache_setup

    p = magcache_setup(Sampling.from_flags({"task": "t2v-A14B", "sample_steps": 8, "sample_shift": 12.0,
                                            "magcache_thresh": 0.5, "retention_ratio": 0.1,
                                            "magcache_ratios": ratios})).plan
    assert m["magcache"]["skipped_forwards"] == list(p.skipped_forwards)
    assert load_ratio_file(ratios).sample_steps == 8


def test_generate_with_calibration_flag_writes_ratio_file(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generate(tiny_ckpt("ti2v-5B"), tmp_path / "run", "ti2v-5B", "--magcache_calibration", steps=4)
    data = json.loads((tmp_path / "magcache_ratios_ti2v-5B.json").read_text())
    assert data["task"] == "ti2v-5B/t2v" and len(data["ratios"]) == 6


@pytest.mark.parametrize("task,flags,speedup", [
    ("ti2v-5B", ["--magcache_thresh", "0.06", "--magcache_K", "2", "--retention_ratio", "0.2"], 2.00),
    ("t2v-A14B", ["--magcache_thresh", "0.06", "--magcache_K", "2", "--retention_ratio", "0.4"], 1.54),
    ("i2v-A14B", ["--magcache_thresh", "0.06", "--magcache_K", "2", "--retention_ratio", "0.1"], 1.36),
])
def test_plan_json_reproduces_the_seed_speedups(capsys, task, flags, speedup):
    p = plan_json(capsys, "--task", task, *flags)
    for key in ("task", "sample_steps", "split_forwards", "forwards", "skipped_forwards", "forward_speedup"):
        assert key in p, key
    assert p["task"] == task and p["sample_steps"] == {"ti2v-5B": 50}.get(task, 40)
    assert round(p["forward_speedup"], 2) == speedup
    assert len(p["forwards"]) == 2 * p["sample_steps"]
    assert set(p["forwards"][0]) >= {"index", "step", "branch", "expert", "retained", "skip"}
    assert p["skipped_forwards"] == [f["index"] for f in p["forwards"] if f["skip"]]
    # no FlashAttention package here: auto chooses between torch's own kernels (cuDNN on a CUDA GPU, else SDPA)
    assert p["attention"] == {"requested": "auto", "candidates": ["cudnn", "sdpa"]}


GENERATE_FLAGS = ["--ckpt_dir", "/nowhere", "--prompt", "a cat", "--size", "832*480", "--frame_num", "81",
                  "--offload_model", "True", "--convert_model_dtype", "--t5_cpu", "--base_seed", "42",
                  "--ulysses_size", "8", "--dit_fsdp", "--save_file", "/proc/nope/x.mp4", "--negative-prompt", "blur",
                  "--sample_guide_scale", "3,4", "--dist-timeout", "60"]


def test_plan_takes_a_generate_command_line_unchanged(capsys):
    """Swap the verb: `plan` accepts every flag of `generate`; only the schedule flags matter."""
    schedule = ["--task", "t2v-A14B", "--sample_steps", "30", "--use_magcache", "--magcache_thresh", "0.06",
                "--retention_ratio", "0.4"]
    alone = plan_json(capsys, *schedule)
    with_rest = plan_json(capsys, *schedule, *GENERATE_FLAGS)
    assert with_rest == alone
    # the cached schedule is shown whether or not --use_magcache is given
    assert plan_json(capsys, *[f for f in schedule if f != "--use_magcache"]) == alone


def test_plan_verbose_names_the_ignored_flags(capsys):
    assert main(["plan", "--task", "t2v-A14B", *GENERATE_FLAGS, "--verbose"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "ignored (no effect on the schedule):" in err
    for flag in ("--ckpt-dir", "--prompt", "--size", "--ulysses-size", "--dit-fsdp", "--save-file", "--t5-cpu"):
        assert flag in err, flag
    assert "--task" not in err.split("ignored", 1)[1]
    capsys.readouterr()
    assert main(["plan", "--task", "t2v-A14B", "--magcache-target-speedup", "1.3", "--ckpt_dir", "/x", "--verbose"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "ignored (no effect on the schedule): --ckpt-dir" in err and "target-speedup" not in err


def test_plan_image_picks_the_image_mode_table(capsys, tmp_path):
    text = plan_json(capsys, "--task", "ti2v-5B")
    image = plan_json(capsys, "--task", "ti2v-5B", "--image", str(tmp_path / "first.png"))
    assert text["ratio_table"]["key"] == "ti2v-5B/t2v" and image["ratio_table"]["key"] == "ti2v-5B/i2v"


def test_plan_rejects_bad_schedule_flags_like_generate(capsys):
    assert main(["plan", "--task", "t2v-A14B", "--sample_steps", "0"]) == 2
    assert "--sample_steps 0" in capsys.readouterr().err
