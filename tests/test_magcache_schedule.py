"""The schedule against a literal transcription of upstream MagCache4Wan2.2, plus its invariants."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magcache.ratios import bundled_table
from magcache.schedule import (
    MagCacheParams,
    MagCacheSchedule,
    build_schedule,
    is_retained,
    low_expert_start,
    split_forwards,
    upstream_timesteps,
)

# task key -> (mode, shift, boundary) as the official configs set them
TASKS = {
    "t2v-A14B": ("t2v", 12.0, 0.875),
    "i2v-A14B": ("i2v", 5.0, 0.900),
    "ti2v-5B/t2v": ("ti2v", 5.0, None),
    "ti2v-5B/i2v": ("ti2v", 5.0, None),
}


def official_unipc_timesteps(steps: int, shift: float) -> list[int]:
    """Fact 13: linspace(0.999, 0, steps+1)[:-1], shifted, *1000, int64 truncation."""
    sigmas = np.linspace(0.999, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [int(t) for t in (sigmas * 1000).astype(np.int64)]


# ---------------------------------------------------------------------------------------------
# Upstream, transcribed: class-level state patched onto the model class, one counter shared by
# both experts, decisions made inside forward. Only the bookkeeping; the blocks are elided.
# ---------------------------------------------------------------------------------------------
def upstream_nearest_interp(src_array, target_length):
    src_length = len(src_array)
    if target_length == 1:
        return np.array([src_array[-1]])
    scale = (src_length - 1) / (target_length - 1)
    mapped_indices = np.round(np.arange(target_length) * scale).astype(int)
    return src_array[mapped_indices]


def upstream_get_timesteps(shift, steps):
    sigmas = np.linspace(1.0, 0.01, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return (sigmas * 1000).astype(np.int64)


class UpstreamCrash(Exception):
    """Upstream would add `None` (no cached residual yet) and raise a TypeError."""


class UpstreamWanModel:
    def forward(self):
        skip_forward = False
        b = self.cnt % 2
        n = self.num_steps
        split = self.split_step
        R = self.retention_ratio
        if self.mode == "t2v":
            retained = self.cnt < int(split * R) or split <= self.cnt <= (n - split) * R + split
        elif self.mode == "i2v":
            retained = self.cnt < int(split + (n - split) * R)
        else:
            retained = self.cnt < int(n * R)
        if not retained:
            cur_mag_ratio = self.mag_ratios[self.cnt]
            self.accumulated_ratio[b] = self.accumulated_ratio[b] * cur_mag_ratio
            self.accumulated_steps[b] += 1
            cur_skip_err = np.abs(1 - self.accumulated_ratio[b])
            self.accumulated_err[b] += cur_skip_err
            if self.accumulated_err[b] < self.magcache_thresh and self.accumulated_steps[b] <= self.K:
                skip_forward = True
                residual_x = self.residual_cache[b]
            else:
                self.accumulated_err[b] = 0
                self.accumulated_steps[b] = 0
                self.accumulated_ratio[b] = 1.0
        if skip_forward:
            if residual_x is None:
                raise UpstreamCrash(self.cnt)
        else:
            residual_x = "computed"
        self.residual_cache[b] = residual_x
        self.cnt += 1  # in place: `cnt` is one shared 0-d array (a tensor upstream)
        if self.cnt >= self.num_steps:
            self.cnt -= self.num_steps
            self.accumulated_ratio[:] = [1.0, 1.0]
            self.accumulated_err[:] = [0.0, 0.0]
            self.accumulated_steps[:] = [0, 0]
        return skip_forward


def upstream_run(key: str, steps: int, shift: float, thresh: float, K: int, R: float) -> list[bool]:
    """Upstream's skip decisions; cut short where upstream would crash."""
    mode, _, boundary = TASKS[key]

    class Model(UpstreamWanModel):
        pass

    # init_magcache: everything on the class, called once (on the high-noise model)
    Model.mode = mode
    Model.cnt = np.array(0)
    Model.num_steps = steps * 2
    Model.magcache_thresh = thresh
    Model.K = K
    Model.retention_ratio = R
    Model.accumulated_err = [0.0, 0.0]
    Model.accumulated_steps = [0, 0]
    Model.accumulated_ratio = [1.0, 1.0]
    Model.residual_cache = [None, None]
    mag = np.array([1.0] * 2 + list(bundled_table(key).ratios))
    if len(mag) != steps * 2:
        con = upstream_nearest_interp(mag[0::2], steps)
        ucon = upstream_nearest_interp(mag[1::2], steps)
        mag = np.concatenate([con.reshape(-1, 1), ucon.reshape(-1, 1)], axis=1).reshape(-1)
    Model.mag_ratios = mag
    if mode == "ti2v":
        Model.split_step = 0
    else:
        Model.split_step = 2 * int((upstream_get_timesteps(shift, steps) >= boundary * 1000).sum())
    high_noise_model, low_noise_model = Model(), Model()
    skips = []
    try:
        for t in official_unipc_timesteps(steps, shift):
            model = high_noise_model if mode == "ti2v" or t >= boundary * 1000 else low_noise_model
            skips.append(model.forward())  # cond
            skips.append(model.forward())  # uncond
    except UpstreamCrash:
        pass
    return skips


def ours_run(key: str, steps: int, shift: float, params: MagCacheParams, **kw) -> list[bool]:
    mode, _, boundary = TASKS[key]
    schedule = build_schedule(mode, steps, shift, boundary, params, bundled_table(key).mag(steps),
                              official_unipc_timesteps(steps, shift), **kw)
    return [schedule.commit(i, schedule.propose(i).may_skip).may_skip for i in range(2 * steps)]


def compare(key, steps, shift, thresh, K, R) -> bool:
    """Asserts our decisions equal upstream's; False where upstream crashes (and we compute)."""
    expected = upstream_run(key, steps, shift, thresh, K, R)
    ours = ours_run(key, steps, shift, MagCacheParams(thresh=thresh, K=K, retention_ratio=R))
    config = (key, steps, shift, thresh, K, R)
    if len(expected) < 2 * steps:  # upstream skipped with no residual cached: x + None
        crash = len(expected)
        assert ours[:crash] == expected and ours[crash] is False, config
        return False
    assert ours == expected, config
    return True


NAMES = ("steps", "thresh", "K", "R")


@pytest.mark.parametrize("key", list(TASKS))
def test_equals_upstream_on_a_grid(key):
    _, shift, _ = TASKS[key]
    grid = itertools.product((4, 7, 10, 20, 30, 40, 50, 60), (0.0, 0.02, 0.06, 0.12, 0.3, 0.5),
                             (1, 2, 3, 4), (0.0, 0.1, 0.2, 0.4, 0.7, 1.0))
    crashed = [config for config in grid if not compare(key, shift=shift, **dict(zip(NAMES, config)))]
    # upstream adds None when the first forward of a branch is neither retained nor computed:
    # thresh > 0 and int(2*steps*R) (or its t2v/i2v analogue) below 2
    assert len(crashed) < 250 and all(thresh > 0 and R <= 0.2 for _, thresh, _, R in crashed)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(list(TASKS)), steps=st.integers(4, 60), shift=st.floats(1.0, 16.0),
       thresh=st.floats(0.0, 0.5), K=st.integers(1, 4), R=st.floats(0.0, 1.0))
def test_equals_upstream_random(key, steps, shift, thresh, K, R):
    compare(key, steps, shift, thresh, K, R)


def test_where_upstream_would_crash_we_compute():
    """R=0: upstream skips forward 0 with no cached residual (x + None); we compute it."""
    assert upstream_run("ti2v-5B/t2v", 50, 5.0, 0.06, 2, 0.0) == []
    skips = ours_run("ti2v-5B/t2v", 50, 5.0, MagCacheParams(thresh=0.06, retention_ratio=0.0))
    assert skips[:2] == [False, False] and any(skips)


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 13, 20, 30, 40, 50, 64, 100])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0, 12.0, 17.5])
def test_upstream_timesteps_equal_numpy(steps, shift):
    assert upstream_timesteps(shift, steps) == upstream_get_timesteps(shift, steps).tolist()


def test_split_differs_from_scheduler_where_known():
    for steps, key, expected in ((30, "t2v-A14B", (40, 38)), (50, "i2v-A14B", (38, 36)),
                                 (40, "t2v-A14B", (52, 52)), (40, "i2v-A14B", (30, 30))):
        mode, shift, boundary = TASKS[key]
        ts = official_unipc_timesteps(steps, shift)
        got = (split_forwards(mode, steps, shift, boundary),
               split_forwards(mode, steps, shift, boundary, "scheduler", ts))
        assert got == expected, (key, steps)
    assert split_forwards("ti2v", 50, 5.0, None) == 0


def test_split_mode_scheduler_needs_timesteps():
    with pytest.raises(ValueError, match="scheduler timesteps"):
        split_forwards("t2v", 40, 12.0, 0.875, "scheduler", None)
    with pytest.raises(ValueError, match="one per step"):
        split_forwards("t2v", 40, 12.0, 0.875, "scheduler", [999] * 39)


def test_retention_uses_python_float_arithmetic():
    assert int(14 * 0.2) == 2  # 2.8000000000000003 -> 2
    assert [is_retained("ti2v", i, 14, 0, 0.2) for i in range(4)] == [True, True, False, False]
    # t2v second window: split <= cnt <= (n-split)*R + split, a float bound
    n, split, r = 80, 52, 0.4
    window = [i for i in range(n) if is_retained("t2v", i, n, split, r)]
    assert window == list(range(int(split * r))) + list(range(split, int((n - split) * r + split) + 1))
    assert [i for i in range(80) if is_retained("i2v", i, 80, 30, 0.1)] == list(range(int(30 + 50 * 0.1)))


@pytest.mark.parametrize("kwargs, match", [
    ({"thresh": -0.01}, "thresh"), ({"thresh": float("nan")}, "thresh"), ({"K": 0}, "K"),
    ({"K": 1.5}, "K"), ({"retention_ratio": 1.2}, "retention"), ({"retention_ratio": -0.1}, "retention"),
    ({"split_mode": "real"}, "split mode"),
])
def test_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MagCacheParams(**kwargs)


# ------------------------------------------------------------------------------ properties
def _run(key, steps, params):
    mode, shift, boundary = TASKS[key]
    schedule = build_schedule(mode, steps, shift, boundary, params, bundled_table(key).mag(steps),
                              official_unipc_timesteps(steps, shift))
    proposals = [schedule.commit(i, schedule.propose(i).may_skip) for i in range(2 * steps)]
    return schedule, proposals


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(list(TASKS)), steps=st.integers(2, 60), thresh=st.floats(0.0, 0.5),
       K=st.integers(1, 4), R=st.floats(0.0, 1.0), split_mode=st.sampled_from(["upstream", "scheduler"]),
       reset=st.booleans())
def test_invariants(key, steps, thresh, K, R, split_mode, reset):
    params = MagCacheParams(thresh=thresh, K=K, retention_ratio=R, split_mode=split_mode, reset_at_switch=reset)
    schedule, proposals = _run(key, steps, params)
    for b in (0, 1):
        branch = proposals[b::2]
        assert not branch[0].may_skip  # nothing cached yet
        run = 0
        for p in branch:
            run = run + 1 if p.may_skip else 0
            assert run <= K
    for i, p in enumerate(proposals):
        assert p.retained == schedule.retained(i)
        assert not (p.retained and p.may_skip)
    if thresh == 0:
        assert not any(p.may_skip for p in proposals)


def test_cfg_parallel_rank_sees_one_branch():
    """A rank that only sees even (or odd) indices decides exactly like the full run."""
    params = MagCacheParams(thresh=0.1, K=3, retention_ratio=0.2)
    _, full = _run("t2v-A14B", 40, params)
    for b in (0, 1):
        mode, shift, boundary = TASKS["t2v-A14B"]
        schedule = build_schedule(mode, 40, shift, boundary, params, bundled_table("t2v-A14B").mag(40))
        mine = [schedule.commit(i, schedule.propose(i).may_skip) for i in range(b, 80, 2)]
        assert mine == full[b::2]


def _flat_schedule(steps: int = 8, K: int = 2) -> MagCacheSchedule:
    """ti2v, no retention, all ratios 1: every non-first forward may skip until K is hit."""
    params = MagCacheParams(thresh=1.0, K=K, retention_ratio=0.0)
    return MagCacheSchedule(mode="ti2v", steps=steps, split=0, mag=[1.0] * (2 * steps), params=params)


def test_propose_does_not_mutate_and_group_compute_resets():
    s = _flat_schedule()
    assert s.propose(0) == s.propose(0)
    decided = [s.commit(i, s.propose(i).may_skip).may_skip for i in range(4)]
    assert decided == [False, False, True, True]
    # cond: 4 would skip (2nd in a row <= K=2) but the group computes -> accumulators reset
    assert s.propose(4).may_skip
    s.commit(4, False)
    s.commit(5, s.propose(5).may_skip)  # uncond: 3rd in a row -> compute
    assert [s.commit(i, s.propose(i).may_skip).may_skip for i in (6, 8, 10)] == [True, True, False]


def test_commit_refuses_a_skip_this_rank_could_not_make():
    s = _flat_schedule()
    with pytest.raises(ValueError, match="MIN over ranks"):
        s.commit(0, True)


def test_indices_must_move_forward_until_reset():
    s = _flat_schedule()
    s.commit(0, False)
    with pytest.raises(ValueError, match="reset"):
        s.propose(0)
    with pytest.raises(ValueError, match="outside"):
        s.propose(16)
    s.reset()
    assert s.propose(0).may_skip is False


def test_reset_at_switch_gives_the_low_expert_fresh_state():
    params = MagCacheParams(thresh=1.0, K=10, retention_ratio=0.0, reset_at_switch=True)
    s = MagCacheSchedule(mode="ti2v", steps=6, split=0, mag=[1.0] * 12, params=params, low_start=6)
    props = [s.commit(i, s.propose(i).may_skip) for i in range(12)]
    assert [p.may_skip for p in props] == [False, False, True, True, True, True,
                                           False, False, True, True, True, True]
    assert [i for i, p in enumerate(props) if p.fresh] == [6, 7]
    # the same on a cfg rank that only sees odd indices
    s = MagCacheSchedule(mode="ti2v", steps=6, split=0, mag=[1.0] * 12, params=params, low_start=6)
    assert [s.commit(i, s.propose(i).may_skip).fresh for i in range(1, 12, 2)] == [False] * 3 + [True, False, False]


def test_reset_at_switch_start_from_real_timesteps():
    ts = official_unipc_timesteps(30, 12.0)
    assert low_expert_start("t2v", 30, 0.875, ts) == 38  # the scheduler's switch, not upstream's 40
    assert low_expert_start("ti2v", 30, None, None) is None
    assert low_expert_start("t2v", 3, 0.0, [999, 500, 1]) is None  # low expert never runs
    params = MagCacheParams(reset_at_switch=True)
    with pytest.raises(ValueError, match="timesteps"):
        build_schedule("t2v", 30, 12.0, 0.875, params, [1.0] * 60)
    assert build_schedule("t2v", 30, 12.0, 0.875, params, [1.0] * 60, ts).low_start == 38


def test_mag_length_must_match_steps():
    with pytest.raises(ValueError, match="interpolate"):
        MagCacheSchedule(mode="ti2v", steps=4, split=0, mag=[1.0] * 7, params=MagCacheParams())
