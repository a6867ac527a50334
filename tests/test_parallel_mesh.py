"""parallel.mesh: degree validation, the head check, and the real mesh layout on 4 gloo ranks."""
from __future__ import annotations

import pytest

from parallel.dist import init_distributed
from parallel.launch import LaunchEnv
from parallel.mesh import ParallelConfigError, ParallelDims, check_heads
from parallel_jobs.spawn import run_job


def test_from_world_puts_the_rest_into_dp():
    assert ParallelDims.from_world(8, ulysses=2, cfg=2) == ParallelDims(dp=2, cfg=2, sp=2, world_size=8)
    assert ParallelDims.from_world(3) == ParallelDims(dp=3, cfg=1, sp=1, world_size=3)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(world_size=6, ulysses=4, cfg=1), "--ulysses_size 4 x config 1 = 4 ranks per video, but 6 were launched"),
    (dict(world_size=6, ulysses=2, cfg=2), "--ulysses_size 2 x config 2 = 4 ranks per video"),
    (dict(world_size=4, ulysses=1, cfg=3), "cfg degree must be 1 or 2"),
    (dict(world_size=4, ulysses=0, cfg=1), "--ulysses_size must be >= 1"),
    (dict(world_size=0, ulysses=1, cfg=1), "world size must be an integer >= 1"),
    (dict(world_size=1, cfg=2), "--cfg-parallel needs an even number of ranks"),
    (dict(world_size=8, ulysses=16, num_heads=40), "--ulysses_size 16 does not divide the 40 attention heads"),
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
    with pytest.raises(ParallelConfigError, match=r"--ulysses_size 16 does not divide the 40 attention heads; "
                                                  r"use one of \[1, 2, 4, 5, 8, 10, 20, 40\]"):
        check_heads(40, 16)
    with pytest.raises(ParallelConfigError, match="--ulysses_size must be >= 1"):
        check_heads(40, 0)


def test_single_process_mesh_has_no_groups():
    with init_distributed(LaunchEnv(kind="single"), device_preference="cpu") as ctx:
        pm = ParallelDims.from_world(1).build(ctx)
        assert (pm.dp_rank, pm.cfg_rank, pm.sp_rank) == (0, 0, 0)
        assert pm.sp_group is None and pm.branch_cpu_group is None and pm.submesh("sp") is None
        with pytest.raises(ParallelConfigError, match="dims are for 2 ranks but this job has 1"):
            ParallelDims.from_world(2).build(ctx)


def _grid_groups(world, dp, cfg, ring, uly):
    """Every group of each dim, written out from the row-major (dp, cfg, ring, ulysses) formula."""
    rank = lambda d, c, r, u: ((d * cfg + c) * ring + r) * uly + u  # noqa: E731
    import itertools
    out = {}
    spans = {"dp": "d", "cfg": "c", "ring": "r", "ulysses": "u", "sp": "ru", "replica": "cru"}
    sizes = dict(d=dp, c=cfg, r=ring, u=uly)
    for name, span in spans.items():
        fixed = [a for a in "dcru" if a not in span]
        groups = []
        for f in itertools.product(*(range(sizes[a]) for a in fixed)):
            groups.append(sorted(rank(**{**dict(zip(fixed, f)), **dict(zip(span, v))})
                                 for v in itertools.product(*(range(sizes[a]) for a in span))))
        out[name] = sorted(groups)
    return out


def test_every_dim_and_flattened_dim_partitions_the_grid():
    dims = ParallelDims.from_world(32, ulysses=2, ring=2, cfg=2)
    assert (dims.dp, dims.cfg, dims.ring, dims.ulysses, dims.sp) == (4, 2, 2, 2, 4)
    expected = _grid_groups(32, 4, 2, 2, 2)
    for name in ("dp", "cfg", "ring", "ulysses", "sp", "replica"):
        assert sorted(sorted(g) for g in dims.partition(name)) == expected[name], name
    # within a flattened dim the order is ring-major, Ulysses-minor: sp_rank = ring * ulysses_size + ulysses
    assert dims.partition("sp")[0] == [0, 1, 2, 3] and dims.partition("replica")[1] == list(range(8, 16))
    c = dims.coordinates(15)  # 15 = ((1 * 2 + 1) * 2 + 1) * 2 + 1
    assert c == dict(dp=1, cfg=1, ring=1, ulysses=1, sp=3, replica=7)


def test_groups_are_enumerated_with_an_explicit_backend():
    """CUDA meshes use NCCL groups built by enumeration, never split from the mixed cpu:gloo,cuda:nccl world."""
    import torch

    from parallel.mesh import compute_backend

    assert compute_backend(torch.device("cuda", 3)) == "nccl"
    assert compute_backend(torch.device("cpu")) == "gloo"
    source = __import__("inspect").getsource(__import__("parallel.mesh", fromlist=["x"]))
    assert "init_device_mesh(" not in source and "split_group(" not in source


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
        assert {n: res["ranks"][n] for n in ("dp", "cfg", "sp")} == expected[rank]["ranks"]
        assert res["ranks"]["replica"] == sorted(set(res["ranks"]["sp"]) | set(res["ranks"]["cfg"]))
        assert res["branch"] == expected[rank]["ranks"]["sp"]
        # Round r: only rank r cannot skip -> exactly the branch that contains r computes.
        assert res["votes"] == [r not in res["branch"] for r in range(4)]
        assert res["world_votes"] == [False] * 4
        assert res["branch_sum"] == [float(sum(res["branch"])), float(len(res["branch"]))]


@pytest.mark.slow
def test_cfg_by_ring_mesh_on_four_gloo_ranks():
    """cfg 2 x ring 2: one DeviceMesh over (cfg, ring) wrapping the enumerated gloo groups; sp is the
    ring group itself, replica = cfg x sp a group of its own, FSDP a second communicator over sp."""
    run = run_job("job_mesh.py", 4, "1", "2", "0", "2")
    assert run.ok, run.output[-4000:]
    for rank, res in run.by_rank().items():
        c, r = divmod(rank, 2)
        assert res["mesh_dims"] == ["cfg", "ring"] and res["wraps"]
        assert res["ranks"]["ring"] == res["ranks"]["sp"] == [2 * c, 2 * c + 1]
        assert res["ranks"]["cfg"] == [r, r + 2] and res["ranks"]["replica"] == [0, 1, 2, 3]
        assert res["replica_rank"] == rank and res["coords"] == dict(dp=0, cfg=c, sp=r)
        assert set(res["backends"].values()) == {"gloo"}
        assert res["fsdp"] == dict(ranks=[2 * c, 2 * c + 1], own=True)
