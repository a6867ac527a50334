"""--magcache-target-speedup: the smallest threshold reaching a forward-count speedup, exactly."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from conftest import run_cli
from launcher.cli import main
from launcher.config import MagCacheOptions, run_config_from_flags
from launcher.errors import UsageError
from launcher.planner.schedule import Sampling, magcache_setup
from launcher.wan.tasks import TASKS
from magcache.plan import plan
from magcache.schedule import MagCacheParams
from magcache.target import (
    READABLE_SLACK,
    TargetOutOfReach,
    check_target,
    floor_2dp,
    max_speedup,
    plateaus,
    shortest_decimal_above,
    threshold_for_speedup,
)
from test_cli_errors import assert_one_line_error


def builder(task: str, K: int = 2, R: float = 0.2, steps: int | None = None, **flags):
    """`thresh -> Plan` for a task's bundled table at its default shift and solver."""
    spec = TASKS[task]
    setup = magcache_setup(Sampling.from_flags({"task": task, "sample_steps": steps or spec.sample_steps,
                                                "magcache_K": K, "retention_ratio": R, **flags}))
    return setup.plan_at


def assert_smallest(build, target: float, result) -> None:
    """The plan at `thresh` reaches the target; none at or below the breakpoint does."""
    assert result.target == target
    assert build(result.thresh).forward_speedup == result.speedup >= target
    assert json.loads(json.dumps(result.thresh)) == float(str(result.thresh)) == result.thresh
    if result.breakpoint is None:
        assert result.thresh == 0.0
        return
    assert result.breakpoint < result.thresh <= result.breakpoint + READABLE_SLACK
    assert build(result.breakpoint).forward_speedup < target
    assert build(result.thresh - 2 * READABLE_SLACK).forward_speedup < target
    # the float just above the breakpoint gives the very same plan as the readable threshold
    exact = build(math.nextafter(result.breakpoint, math.inf))
    assert exact.skipped_forwards == build(result.thresh).skipped_forwards
    # independent of the plateau walk: a dense grid below the breakpoint never reaches it
    for t in np.linspace(0.0, result.breakpoint, 400):
        assert build(float(t)).forward_speedup < target, t


TI2V_TARGETS = (1.2, 1.4, 1.6, 1.8, 2.0)


def test_ti2v_targets_pick_non_decreasing_smallest_thresholds():
    build = builder("ti2v-5B")
    results = [threshold_for_speedup(build, x) for x in TI2V_TARGETS]
    for x, r in zip(TI2V_TARGETS, results):
        assert_smallest(build, x, r)
    thresholds = [r.thresh for r in results]
    assert thresholds == sorted(thresholds)
    assert len(set(thresholds)) == len(thresholds)
    assert {r.max_speedup for r in results} == {build(sys.float_info.max).forward_speedup}


@pytest.mark.parametrize("task, targets", [
    ("t2v-A14B", (1.1, 1.3, 1.5, 1.8, 2.0)),
    ("i2v-A14B", (1.1, 1.3, 1.5)),
])
def test_a14b_targets(task, targets):
    build = builder(task)
    previous = 0.0
    for x in targets:
        r = threshold_for_speedup(build, x)
        assert_smallest(build, x, r)
        assert r.thresh >= previous
        previous = r.thresh


def test_target_one_is_threshold_zero():
    r = threshold_for_speedup(builder("t2v-A14B"), 1.0)
    assert (r.thresh, r.breakpoint, r.speedup) == (0.0, None, 1.0)


@pytest.mark.parametrize("task, R", [("ti2v-5B", 0.2), ("t2v-A14B", 0.4), ("i2v-A14B", 0.1), ("t2v-A14B", 0.0)])
def test_unbounded_threshold_gives_the_maximum(task, R):
    """Greedy skipping (skip whenever K and a residual allow) is the most any threshold gives."""
    build = builder(task, R=R)
    walk = list(plateaus(build))
    assert walk[-1][0].upto is None and walk[0][0].above is None
    assert max_speedup(build) == walk[-1][0].speedup == build(sys.float_info.max).forward_speedup
    # consecutive plateaus tile the threshold axis
    assert all(a.upto == b.above for (a, _), (b, _) in zip(walk, walk[1:]))


def test_the_maximum_does_not_depend_on_the_ratios():
    """Unbounded, the threshold never says no: K, retention and the split decide (README)."""
    spec = TASKS["ti2v-5B"]
    tops = {max_speedup(magcache_setup(Sampling.from_flags({"task": spec.name, "sample_steps": 50,
                                                            "image": "a.png" if image else None})).plan_at)
            for image in (False, True)}
    assert len(tops) == 1


# One branch-pair schedule where a larger threshold skips fewer forwards: an early skip makes K
# end a run where, with a smaller threshold, a later cheap skip fit. Found by random search.
DIP_MAG = [1.0, 1.0, 0.78, 1.34, 1.21, 1.12, 0.89, 1.01, 1.23, 0.76]


def dip_build(thresh: float):
    return plan("ti2v", 5, 5.0, None, MagCacheParams(thresh=thresh, K=3, retention_ratio=0.0), DIP_MAG, None,
                ("single",))


def test_speedup_is_not_monotone_and_the_search_takes_the_first_threshold_reaching_it():
    speedups = [p.speedup for p, _ in plateaus(dip_build)]
    assert any(a > b for a, b in zip(speedups, speedups[1:])), speedups
    assert dip_build(0.2048).forward_speedup == pytest.approx(10 / 7)  # 1.43x
    assert dip_build(0.215).forward_speedup == 1.25  # a larger threshold, fewer skips
    r = threshold_for_speedup(dip_build, 1.4)
    assert_smallest(dip_build, 1.4, r)
    assert 0.2047 < r.thresh < 0.2048
    r = threshold_for_speedup(dip_build, 1.6)
    assert_smallest(dip_build, 1.6, r)
    assert 0.21 < r.thresh < 0.2201
    # a bisection that trusted monotonicity would have settled in the dip's far side
    assert all(dip_build(float(t)).forward_speedup < 1.6 for t in np.linspace(0, r.breakpoint, 2000))


def test_out_of_reach_raises_with_the_maximum():
    build = builder("i2v-A14B", R=0.1)
    top = max_speedup(build)
    with pytest.raises(TargetOutOfReach) as info:
        threshold_for_speedup(build, top + 0.01)
    assert info.value.max_speedup == top
    assert threshold_for_speedup(build, top).speedup == top


@pytest.mark.parametrize("bad", [0.99, 0.0, -1.0, math.nan, math.inf, True])
def test_check_target_rejects_what_no_threshold_can_mean(bad):
    with pytest.raises(ValueError, match="target speedup"):
        check_target(bad)


def test_shortest_decimal_above():
    assert shortest_decimal_above(0.026050000000000018, 0.026051) == 0.026051
    assert shortest_decimal_above(0.0, 1e-6) == 1e-6
    assert shortest_decimal_above(0.04, 0.3) == 0.1
    low = 0.1
    assert shortest_decimal_above(low, math.nextafter(low, 1)) == math.nextafter(low, 1)
    assert floor_2dp(2.01) == "2.01" and floor_2dp(80 / 52) == "1.53" and floor_2dp(2.0) == "2.00"


# -- launcher wiring ------------------------------------------------------------------------------
def plan_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_shows_the_chosen_threshold_and_reaches_the_target(capsys):
    p = plan_json(capsys, "--task", "ti2v-5B", "--magcache-target-speedup", "1.5")
    assert p["target_speedup"] == 1.5 and p["thresh_from"] == "target"
    assert p["thresh"] == p["params"]["thresh"] == threshold_for_speedup(builder("ti2v-5B"), 1.5).thresh
    assert p["computed_forwards"] * 1.5 <= p["total_forwards"]
    assert p["target_search"]["breakpoint"] < p["thresh"]
    # the threshold as printed, given back as --magcache_thresh, is the same schedule
    same = plan_json(capsys, "--task", "ti2v-5B", "--magcache_thresh", str(p["thresh"]))
    assert same["thresh_from"] == "flag" and same["target_speedup"] is None and same["target_search"] is None
    assert same["forwards"] == p["forwards"]
    # the snake_case alias
    assert plan_json(capsys, "--task", "ti2v-5B", "--magcache_target_speedup", "1.5")["thresh"] == p["thresh"]


def test_plan_table_prints_the_threshold_above_the_table(capsys):
    assert main(["plan", "--task", "t2v-A14B", "--magcache-target-speedup", "1.5"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    thresh = threshold_for_speedup(builder("t2v-A14B"), 1.5).thresh
    assert out.startswith(f"threshold {thresh!r} for --magcache-target-speedup 1.5:")
    assert out.index("--magcache-target-speedup") < out.index("MagCache plan")


def test_unreachable_target_exits_2_naming_the_maximum():
    top = floor_2dp(max_speedup(builder("t2v-A14B")))
    proc = run_cli("plan", "--task", "t2v-A14B", "--magcache-target-speedup", "3.0")
    assert_one_line_error(proc, "--magcache-target-speedup 3.0 is out of reach for t2v-A14B at 40 steps with K 2, "
                                f"retention 0.2: at most {top}x; raise --magcache_K or lower --retention_ratio")


def test_generate_checks_the_target_before_touching_the_checkpoint(tmp_path):
    """An empty checkpoint folder would fail inspection with its own error; the target is judged first."""
    from e2e_helpers import make_image

    image = make_image(tmp_path / "first.png")
    proc = run_cli("generate", "--task", "i2v-A14B", "--ckpt_dir", str(tmp_path), "--prompt", "a cat",
                   "--image", str(image), "--sample_steps", "10", "--magcache-target-speedup", "2.0",
                   "--save_file", str(tmp_path / "v.mp4"), "--use_magcache")
    assert_one_line_error(proc, "--magcache-target-speedup 2.0 is out of reach for i2v-A14B at 10 steps",
                          "at most 1.66x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.png"]


def test_both_threshold_flags_exit_2(tmp_path):
    proc = run_cli("plan", "--task", "ti2v-5B", "--magcache_thresh", "0.06", "--magcache-target-speedup", "1.5")
    assert_one_line_error(proc, "--magcache_thresh 0.06", "--magcache-target-speedup 1.5", "pick one")
    # even the default value, given explicitly, counts as given
    with pytest.raises(UsageError, match="pick one"):
        MagCacheOptions.from_flags({"magcache_thresh": 0.04, "magcache_target_speedup": 1.5})


def test_target_below_one_exits_2(capsys):
    assert main(["plan", "--task", "ti2v-5B", "--magcache-target-speedup", "0.9"]) == 2
    assert "--magcache-target-speedup 0.9: must be a number >= 1" in capsys.readouterr().err


def test_calibration_ignores_the_target():
    flags = {"task": "ti2v-5B", "ckpt_dir": "/nowhere", "prompt": "a cat", "magcache_target_speedup": 99.0,
             "magcache_thresh": 0.1}
    config = run_config_from_flags(flags, calibration=True, check_paths=False)
    assert config.magcache.target_speedup is None and config.magcache.thresh_from == "flag"


def test_batch_items_resolve_their_own_threshold(tmp_path):
    """A ti2v-5B item with an image reads the image-mode table, so it gets its own threshold."""
    from launcher.batch import resolved_item_config as item_config
    from launcher.batch.items import BatchItem

    flags = {"task": "ti2v-5B", "ckpt_dir": str(tmp_path), "magcache_target_speedup": 1.5, "use_magcache": True}
    text = item_config(flags, BatchItem(index=0, line=1, prompt="a cat"), tmp_path)
    image_path = tmp_path / "first.png"
    from e2e_helpers import make_image

    make_image(image_path)
    image = item_config(flags, BatchItem(index=1, line=2, prompt="a cat", image=image_path), tmp_path)
    spec = TASKS["ti2v-5B"]
    for config, with_image in ((text, False), (image, True)):
        mc = config.magcache
        expected = magcache_setup(Sampling.from_flags({**flags, "sample_steps": 50,
                                                       "image": "a.png" if with_image else None})).target
        assert expected is not None and mc.thresh == expected.thresh and mc.thresh_from == "target"
    assert text.magcache.thresh != image.magcache.thresh


def test_batch_exits_2_on_an_unreachable_target_before_loading(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code = main(["batch", str(prompts), "--out-dir", str(tmp_path / "out"), "--task", "ti2v-5B",
                 "--ckpt_dir", str(tmp_path), "--magcache-target-speedup", "5", "--use_magcache"])
    assert code == 2
    assert "out of reach for ti2v-5B at 50 steps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_with_a_target_skips_what_plan_printed(tiny_ckpt, tmp_path, capsys):
    from e2e_helpers import generate

    flags = ["--magcache-target-speedup", "1.5", "--retention_ratio", "0.2", "--magcache_K", "2"]
    p = plan_json(capsys, "--task", "ti2v-5B", "--sample_steps", "10", *flags)
    m = generate(tiny_ckpt("ti2v-5B"), tmp_path / "run", "ti2v-5B", "--use_magcache", *flags, steps=10)
    mc = m["magcache"]
    assert p["skipped_forwards"] and mc["skipped_forwards"] == p["skipped_forwards"]
    assert (mc["target_speedup"], mc["thresh"], mc["thresh_from"]) == (1.5, p["thresh"], "target")
    assert m["flags"]["magcache"]["thresh"] == p["thresh"]
    assert mc["forward_speedup"] >= 1.5
