"""plan(): the published speedups, expert labels, counts and warnings."""
from __future__ import annotations

import json

import numpy as np
import pytest

from launcher.wan.tasks import TASKS
from magcache.plan import plan
from magcache.ratios import bundled_table
from magcache.schedule import MagCacheParams


def official_unipc_timesteps(steps: int, shift: float) -> list[int]:
    """Fact 13: linspace(0.999, 0, steps+1)[:-1], shifted, *1000, int64 truncation."""
    sigmas = np.linspace(0.999, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [int(t) for t in (sigmas * 1000).astype(np.int64)]


def make_plan(task: str, table: str, params: MagCacheParams, steps: int | None = None, shift: float | None = None):
    spec = TASKS[task]
    steps = steps or spec.sample_steps
    shift = spec.sample_shift if shift is None else shift
    t = bundled_table(table)
    return plan(spec.mode, steps, shift, spec.boundary, params, t.mag(steps),
                official_unipc_timesteps(steps, shift), spec.experts, calibrated_steps=t.sample_steps)


@pytest.mark.parametrize("task, table, R, speedup", [
    ("ti2v-5B", "ti2v-5B/t2v", 0.2, 2.00),
    ("t2v-A14B", "t2v-A14B", 0.4, 1.54),
    ("i2v-A14B", "i2v-A14B", 0.1, 1.36),
])
def test_seed_speedups(task, table, R, speedup):
    p = make_plan(task, table, MagCacheParams(thresh=0.06, K=2, retention_ratio=R))
    assert round(p.forward_speedup, 2) == speedup
    assert p.warnings == ()


def test_t2v_plan_details():
    p = make_plan("t2v-A14B", "t2v-A14B", MagCacheParams(thresh=0.06, K=2, retention_ratio=0.4))
    assert p.total_forwards == 80 and p.split_forwards == 52
    assert p.upstream_split == p.scheduler_split == 52
    assert len(p.skipped_forwards) == 28 and p.computed_forwards == 52
    assert p.skips_by_branch["cond"] + p.skips_by_branch["uncond"] == 28
    assert sum(p.skips_by_expert.values()) == 28 and set(p.skips_by_expert) == {"high", "low"}
    experts = [f.expert for f in p.forwards]
    assert experts == ["high"] * 52 + ["low"] * 28  # t >= 875 for the first 26 steps
    assert all(not f.skip for f in p.forwards if f.retained)
    assert [f.index for f in p.forwards if f.retained] == list(range(20)) + list(range(52, 64))
    assert all(f.branch == ("cond", "uncond")[f.index % 2] and f.step == f.index // 2 for f in p.forwards)


def test_ti2v_is_single_expert_without_split():
    p = make_plan("ti2v-5B", "ti2v-5B/i2v", MagCacheParams())
    assert p.split_forwards == 0 and p.upstream_split is None and p.scheduler_split is None
    assert {f.expert for f in p.forwards} == {"single"}
    assert set(p.skips_by_expert) == {"single"}


def test_split_mismatch_warns_and_scheduler_mode_follows_the_switch():
    params = MagCacheParams(thresh=0.06, retention_ratio=0.4)
    p = make_plan("t2v-A14B", "t2v-A14B", params, steps=30)
    assert (p.split_forwards, p.upstream_split, p.scheduler_split) == (40, 40, 38)
    assert any("forward 40" in w and "forward 38" in w and "--magcache-split scheduler" in w for w in p.warnings)
    # experts follow the real timesteps whatever the split mode
    assert [f.expert for f in p.forwards].index("low") == 38
    s = make_plan("t2v-A14B", "t2v-A14B", MagCacheParams(thresh=0.06, retention_ratio=0.4, split_mode="scheduler"),
                  steps=30)
    assert s.split_forwards == 38
    assert any("upstream MagCache4Wan2.2 would use forward 40" in w for w in s.warnings)
    i2v = make_plan("i2v-A14B", "i2v-A14B", MagCacheParams(), steps=50)
    assert (i2v.upstream_split, i2v.scheduler_split) == (38, 36)


def test_few_steps_and_far_calibration_warn():
    p = make_plan("t2v-A14B", "t2v-A14B", MagCacheParams(), steps=8)
    assert any("only 8 steps" in w for w in p.warnings)
    assert any("calibrated at 40 steps" in w and "calibrate at 8 steps" in w for w in p.warnings)
    near = make_plan("ti2v-5B", "ti2v-5B/t2v", MagCacheParams(), steps=40)
    assert not any("calibrated at" in w for w in near.warnings)


def test_thresh_zero_plans_no_skips():
    p = make_plan("i2v-A14B", "i2v-A14B", MagCacheParams(thresh=0.0))
    assert p.skipped_forwards == () and p.forward_speedup == 1.0


def test_to_json_round_trips_through_json():
    p = make_plan("t2v-A14B", "t2v-A14B", MagCacheParams(thresh=0.06, retention_ratio=0.4))
    data = json.loads(json.dumps(p.to_json()))
    assert data["forward_speedup"] == round(80 / 52, 4)
    assert data["skipped_forwards"] == list(p.skipped_forwards)
    assert data["params"]["retention_ratio"] == 0.4
    assert data["forwards"][0] == {"index": 0, "step": 0, "branch": "cond", "expert": "high",
                                   "retained": True, "skip": False}


def test_two_experts_need_real_timesteps():
    spec = TASKS["t2v-A14B"]
    with pytest.raises(ValueError, match="scheduler timestep"):
        plan(spec.mode, 40, 12.0, spec.boundary, MagCacheParams(), bundled_table("t2v-A14B").mag(40), None,
             spec.experts)
