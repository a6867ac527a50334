"""parallel.mesh: degree validation, the head check, and the real mesh layout on 4 gloo ranks."""
from __future__ import annotations

import pytest

from parallel.dist import init_distributed
from parallel.launch import LaunchEnv
from parallel.mesh import ParallelConfigError, ParallelDims, check_heads
from parallel_jobs.spawn import run_job


def test_from_world_puts_the_rest_into_dp():
    assert ParallelDims.from_world(8, sp=2, cfg=2) == ParallelDims(dp=2, cfg=2, sp=2, world_size=8)
    assert ParallelDims.from_world(3) == ParallelDims(dp=3, cfg=1, sp=1, world_size=3)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(world_size=6, sp=4, cfg=1), "not divisible by ulysses size 4"),
    (dict(world_size=6, sp=2, cfg=2), "not divisible by ulysses size 2 x cfg 2"),
    (dict(world_size=4, sp=1, cfg=3), "cfg degree must be 1 or 2"),
    (dict(world_size=4, sp=0, cfg=1), "ulysses size must be >= 1"),
    (dict(world_size=0, sp=1, cfg=1), "world size must be an integer >= 1"),
])
def test_from_world_rejects_bad_degrees_in_one_line(kwargs, fragment):
    with pytest.raises(ParallelConfigError, match=fragment) as info:
        ParallelDims.from_world(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args, fragment", [
    ((1, 2, 2, 8), "= 4 ranks, but the world has 8"),
    ((1, 3, 1, 3), "cfg degree must be 1 or 2"),
    ((0, 1, 1, 0), "dp must be an integer >= 1"),
    ((1, 1, True, 1), "sp must be an integer >= 1"),
])
def test_dims_validate_on_creation(args, fragment):
    with pytest.raises(ParallelConfigError, match=fragment):
        ParallelDims(*args)


def test_check_heads():
    check_heads(40, 8)
    check_heads(24, 4)
    with pytest.raises(ParallelConfigError, match=r"ulysses size 16 does not divide the 40 attention heads; "
                                                  r"use one of \[1, 2, 4, 5, 8, 10, 20, 40\]"):
        check_heads(40, 16)
    with pytest.raises(ParallelConfigError, match="ulysses size must be >= 1"):
        check_heads(40, 0)


def test_single_process_mesh_has_no_groups():
    with init_distributed(LaunchEnv(kind="single"), device_preference="cpu") as ctx:
        pm = ParallelDims.from_world(1).build(ctx)
        assert (pm.dp_rank, pm.cfg_rank, pm.sp_rank) == (0, 0, 0)
        assert pm.sp_group is None and pm.branch_cpu_group is None and pm.submesh("sp") is None
        with pytest.raises(ParallelConfigError, match="dims are for 2 ranks but this job has 1"):
            ParallelDims.from_world(2).build(ctx)


def _expected_layout(world: int, sp: int, cfg: int) -> dict[int, dict]:
    """Row-major (dp, cfg, sp) with sp fastest, written out independently of parallel.mesh."""
    dp = world // (sp * cfg)
    layout = {}
    for d in range(dp):
        for c in range(cfg):
            for s in range(sp):
                rank = (d * cfg + c) * sp + s
                layout[rank] = dict(
                    coords=dict(dp=d, cfg=c, sp=s),
                    ranks=dict(dp=[(x * cfg + c) * sp + s for x in range(dp)],
                               cfg=[(d * cfg + x) * sp + s for x in range(cfg)],
                               sp=[(d * cfg + c) * sp + x for x in range(sp)]))
    return layout


@pytest.mark.slow
@pytest.mark.parametrize("sp, cfg", [(2, 1), (1, 2)])
def test_mesh_layout_on_four_ranks(sp, cfg):
    run = run_job("job_mesh.py", 4, str(sp), str(cfg))
    assert run.ok, run.output[-4000:]
    expected = _expected_layout(4, sp, cfg)
    got = run.by_rank()
    assert sorted(got) == [0, 1, 2, 3]
    for rank, res in got.items():
        assert res["coords"] == expected[rank]["coords"]
        assert res["ranks"] == expected[rank]["ranks"]
        assert res["branch"] == expected[rank]["ranks"]["sp"]
        # Round r: only rank r cannot skip -> exactly the branch that contains r computes.
        assert res["votes"] == [r not in res["branch"] for r in range(4)]
        assert res["world_votes"] == [False] * 4
        assert res["branch_sum"] == [float(sum(res["branch"])), float(len(res["branch"]))]
