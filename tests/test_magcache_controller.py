"""The controller with dummy blocks whose output says which forward computed the residual."""
from __future__ import annotations


import numpy as np
import pytest
from gloo_threads import run_ranks
import torch
import torch.distributed as dist

from launcher.wan.tasks import TASKS
from magcache.controller import ComputeAll, MagCacheController
from magcache.plan import expert_labels, plan
from magcache.ratios import bundled_table
from magcache.schedule import MagCacheParams, MagCacheSchedule, build_schedule


def official_unipc_timesteps(steps: int, shift: float) -> list[int]:
    sigmas = np.linspace(0.999, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [int(t) for t in (sigmas * 1000).astype(np.int64)]


class TaggedBlocks:
    """Blocks that add 1000 + index: out - x names the forward that computed the residual."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.index = -1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.index)
        return x + (1000.0 + self.index)


def run_video(cache, steps: int, labels: list[str], indices=None, seed: int = 0):
    """One video through `cache`; returns {index: tag of the residual used} and the blocks."""
    blocks = TaggedBlocks()
    gen = torch.Generator().manual_seed(seed)
    used = {}
    for index in indices if indices is not None else range(2 * steps):
        x = torch.randint(-50, 50, (1, 6, 4), generator=gen).double()  # integers: sums stay exact
        x_before = x.clone()
        blocks.index = index
        out = cache.forward(index, x, blocks, expert=labels[index // 2])
        assert torch.equal(x, x_before)  # never modified in place
        tag = out - x
        assert torch.all(tag == tag.flatten()[0])
        used[index] = int(tag.flatten()[0].item()) - 1000
    return used, blocks


def setup(task: str, table: str, params: MagCacheParams, steps: int | None = None):
    spec = TASKS[task]
    steps = steps or spec.sample_steps
    ts = official_unipc_timesteps(steps, spec.sample_shift)
    mag = bundled_table(table).mag(steps)
    schedule = build_schedule(spec.mode, steps, spec.sample_shift, spec.boundary, params, mag, ts)
    expected = plan(spec.mode, steps, spec.sample_shift, spec.boundary, params, mag, ts, spec.experts)
    return schedule, expected, expert_labels(spec.experts, spec.boundary, ts, steps), steps


def expected_sources(expected) -> dict[int, int]:
    """Skipped forwards reuse the residual of the last computed forward of the same branch."""
    last, out = {}, {}
    for f in expected.forwards:
        if not f.skip:
            last[f.index % 2] = f.index
        out[f.index] = last[f.index % 2]
    return out


@pytest.mark.parametrize("task, table, R", [("t2v-A14B", "t2v-A14B", 0.4), ("i2v-A14B", "i2v-A14B", 0.1),
                                            ("ti2v-5B", "ti2v-5B/t2v", 0.2)])
def test_single_process_follows_the_plan(task, table, R):
    schedule, expected, labels, steps = setup(task, table, MagCacheParams(thresh=0.06, retention_ratio=R))
    controller = MagCacheController(schedule)
    used, blocks = run_video(controller, steps, labels)
    assert used == expected_sources(expected)
    assert blocks.calls == [f.index for f in expected.forwards if not f.skip]
    assert [(d.index, d.step, d.branch, d.expert, d.retained, d.skip) for d in controller.decisions] == \
        [(f.index, f.step, f.branch, f.expert, f.retained, f.skip) for f in expected.forwards]
    assert controller.skipped == list(expected.skipped_forwards)
    # a second video after reset() is the same video
    controller.reset()
    assert run_video(controller, steps, labels)[0] == used


def test_sync_called_once_per_non_retained_forward_with_the_local_vote():
    schedule, expected, labels, steps = setup("t2v-A14B", "t2v-A14B", MagCacheParams(thresh=0.06, retention_ratio=0.4))
    votes = []

    def sync(may_skip: bool) -> bool:
        votes.append(may_skip)
        return may_skip

    used, _ = run_video(MagCacheController(schedule, sync), steps, labels)
    assert votes == [f.skip for f in expected.forwards if not f.retained]
    assert used == expected_sources(expected)


def test_disagreeing_group_forces_computes_and_resets_accumulators():
    params = MagCacheParams(thresh=0.06, retention_ratio=0.2)
    schedule, expected, labels, steps = setup("ti2v-5B", "ti2v-5B/t2v", params)
    vetoed = set(list(expected.skipped_forwards)[::3])  # another rank refuses these

    def sync(may_skip: bool) -> bool:
        return may_skip and sync.index not in vetoed

    class Indexed(MagCacheController):
        def forward(self, index, x, run_blocks, expert="single"):
            sync.index = index
            return super().forward(index, x, run_blocks, expert)

    controller = Indexed(schedule, sync)
    used, blocks = run_video(controller, steps, labels)
    # the same decisions as a bare schedule told "compute" at the vetoed forwards
    ref = build_schedule("ti2v", steps, 5.0, None, params, bundled_table("ti2v-5B/t2v").mag(steps))
    ref_skips = []
    for i in range(2 * steps):
        p = ref.propose(i)
        skip = p.may_skip and i not in vetoed
        ref.commit(i, skip)
        ref_skips.append(skip)
    assert [d.skip for d in controller.decisions] == ref_skips
    assert vetoed <= set(blocks.calls)
    assert ref_skips != [f.skip for f in expected.forwards]


def test_a_sync_that_skips_against_our_vote_is_an_error():
    schedule, _, labels, steps = setup("ti2v-5B", "ti2v-5B/t2v", MagCacheParams(thresh=0.06))
    with pytest.raises(ValueError, match="MIN over ranks"):
        run_video(MagCacheController(schedule, lambda may_skip: True), steps, labels)


def test_cfg_parallel_rank_runs_one_branch():
    params = MagCacheParams(thresh=0.06, retention_ratio=0.4)
    _, expected, labels, steps = setup("t2v-A14B", "t2v-A14B", params)
    full = expected_sources(expected)
    for b in (0, 1):
        schedule, *_ = setup("t2v-A14B", "t2v-A14B", params)
        used, _ = run_video(MagCacheController(schedule), steps, labels, indices=range(b, 2 * steps, 2))
        assert used == {i: s for i, s in full.items() if i % 2 == b}


def test_reset_at_switch_drops_the_residual_cache():
    params = MagCacheParams(thresh=1.0, K=10, retention_ratio=0.0, reset_at_switch=True)
    schedule = MagCacheSchedule(mode="ti2v", steps=6, split=0, mag=[1.0] * 12, params=params, low_start=6)
    used, blocks = run_video(MagCacheController(schedule), 6, ["high"] * 3 + ["low"] * 3)
    assert used == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0, 5: 1, 6: 6, 7: 7, 8: 6, 9: 7, 10: 6, 11: 7}
    assert blocks.calls == [0, 1, 6, 7]


def test_ranks_with_different_tables_agree_over_gloo():
    """Two ranks (threads, a real gloo group) with different ratio tables make one decision."""
    spec = TASKS["i2v-A14B"]
    steps, params = spec.sample_steps, MagCacheParams(thresh=0.06, retention_ratio=0.1)
    ts = official_unipc_timesteps(steps, spec.sample_shift)
    labels = expert_labels(spec.experts, spec.boundary, ts, steps)
    tables = [bundled_table("i2v-A14B").mag(steps), bundled_table("t2v-A14B").mag(steps)]
    def rank_main(rank: int, group: dist.ProcessGroup):
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN

        def sync(may_skip: bool) -> bool:
            flag = torch.tensor([int(may_skip)], dtype=torch.int32)
            group.allreduce([flag], opts).wait()
            return bool(flag.item())

        schedule = build_schedule(spec.mode, steps, spec.sample_shift, spec.boundary, params, tables[rank], ts)
        controller = MagCacheController(schedule, sync)
        return run_video(controller, steps, labels)[0], [d.skip for d in controller.decisions]

    results = run_ranks(2, rank_main)
    assert results[0] == results[1]
    # the reference: both schedules stepped together, skipping only where both may
    pair = [build_schedule(spec.mode, steps, spec.sample_shift, spec.boundary, params, m, ts) for m in tables]
    agreed = []
    for i in range(2 * steps):
        skip = all(s.propose(i).may_skip for s in pair)
        for s in pair:
            s.commit(i, skip)
        agreed.append(skip)
    assert results[0][1] == agreed and any(agreed)
    alone = [plan(spec.mode, steps, spec.sample_shift, spec.boundary, params, m, ts, spec.experts) for m in tables]
    assert all([f.skip for f in p.forwards] != agreed for p in alone)  # the tables really disagree


def test_compute_all_never_skips():
    cache = ComputeAll()
    used, blocks = run_video(cache, 5, ["single"] * 5)
    assert used == {i: i for i in range(10)} and blocks.calls == list(range(10))
    assert [d.skip for d in cache.decisions] == [False] * 10 and cache.skipped == []
    cache.reset()
    assert cache.decisions == []
