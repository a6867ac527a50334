"""Ring and ring x Ulysses (USP) sequence parallelism: math, layout checks, and real torchrun jobs.

The fast tests check the log-sum-exp merge that makes ring attention exact and the layout rules
(ring outer, Ulysses inner; ring x ulysses x cfg = ranks of a video). The slow ones run gloo jobs:
attention against SDPA, and whole generations (MagCache, --dit_fsdp, a padded sequence) whose
latents and skipped forwards must equal one process.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, cli_env
from e2e_helpers import generate
from parallel_jobs.spawn import run_job
from safetensors.torch import load_file

from parallel.attention import attend_with_lse
from parallel.mesh import ParallelConfigError, ParallelDims
from parallel.ring import (
    block_valid,
    merge_partial,
    ring_attention,
    usp_attention,
)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("length,blocks", [(23, 3), (16, 4), (17, 4), (5, 8)])
def test_blockwise_lse_merge_equals_full_attention(length, blocks):
    """What a ring rank computes, simulated in one process: key blocks in ring order, padding cut."""
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, length, 4, 8, generator=gen) for _ in range(3))
    block_len = -(-length // blocks)
    expected = _sdpa(q, k, v)
    for start in range(blocks):  # every rank sees the blocks in a different rotation
        acc = None
        for step in range(blocks):
            j = (start - step) % blocks
            n = block_valid(j, block_len, length)
            if n:
                acc = merge_partial(acc, attend_with_lse(q, k[:, j * block_len:j * block_len + n],
                                                         v[:, j * block_len:j * block_len + n]))
        torch.testing.assert_close(acc[0], expected, rtol=0, atol=2e-6)


def test_attend_with_lse_is_sdpa_and_its_logsumexp():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 7, 2, 8, generator=gen) for _ in range(3))
    out, lse = attend_with_lse(q, k, v)
    assert torch.equal(out, _sdpa(q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=0, atol=1e-5)


def test_one_rank_ring_and_usp_are_plain_attention_without_padding():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 9, 4, 8, generator=gen) for _ in range(3))
    padded = [torch.cat([t, torch.zeros(2, 3, 4, 8)], dim=1) for t in (q, k, v)]
    torch.testing.assert_close(ring_attention(*padded, None, valid_len=9)[:, :9], _sdpa(q, k, v), rtol=0, atol=1e-6)
    torch.testing.assert_close(usp_attention(*padded, None, None, valid_len=9)[:, :9], _sdpa(q, k, v),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="valid_len 13 must be in 1..12"):
        ring_attention(*padded, None, valid_len=13)


def test_dims_put_ring_outside_ulysses():
    dims = ParallelDims.from_world(16, ulysses=4, ring=2, cfg=2)
    assert (dims.dp, dims.cfg, dims.sp, dims.ring, dims.ulysses) == (1, 2, 8, 2, 4)
    ulysses, ring = ParallelDims.from_world(8, ulysses=2, ring=2).sequence_groups()
    assert ulysses == [[0, 1], [2, 3], [4, 5], [6, 7]]  # neighbours: one node
    assert ring == [[0, 2], [1, 3], [4, 6], [5, 7]]      # strided: across nodes
    with pytest.raises(ParallelConfigError, match=r"--ring_size 2 x --ulysses_size 2 x config 2 = 8 ranks per video, but 4 were launched.*--ring_size"):
        ParallelDims.from_world(4, ulysses=2, ring=2, cfg=2)
    with pytest.raises(ParallelConfigError, match="ring size 3 does not divide"):
        ParallelDims(dp=1, cfg=1, sp=4, world_size=4, ring=3)


def test_bad_ring_size_exits_2(tmp_path, capsys):
    from launcher.cli import main

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert main(["generate", "--ckpt_dir", str(ckpt), "--prompt", "a cat", "--ring_size", "0",
                 "--save_file", str(tmp_path / "v.mp4")]) == 2
    assert "--ring_size 0: must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_ring_and_usp_attention_equal_sdpa_on_gloo():
    run = run_job("job_ring.py", 4)
    assert run.ok, run.output[-4000:]
    for rank, res in run.by_rank().items():
        assert res["groups"]["2x2"]["ring"] == [rank % 2, rank % 2 + 2]
        assert res["groups"]["2x2"]["ulysses"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert {(c["ring"], c["ulysses"]) for c in res["cases"]} == {(2, 1), (4, 1), (2, 2)}
        for c in res["cases"]:
            assert c["max_err"] < 1e-6, (rank, c)
            if c["pad"]:  # attending to the zero padding would show
                assert c["unmasked_err"] > 1e-3, (rank, c)


# ---- whole generations on torchrun/gloo -------------------------------------------------------------
STEPS = 8
SIZE, FRAMES = "80*48", 1  # 5 x 3 = 15 tokens: odd, so every sequence group here pads
MAGCACHE = ["--use_magcache", "--magcache_thresh", "0.5", "--retention_ratio", "0.2"]
RING_LAYOUTS = {
    "r2": (2, ["--ring_size", "2"]),
    "r2-u2": (4, ["--ring_size", "2", "--ulysses_size", "2"]),
    "r2-cfg": (4, ["--ring_size", "2", "--cfg-parallel"]),
}


@pytest.fixture(scope="module")
def ring_reference(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ring-ref")
    return generate(tiny_ckpt("t2v-A14B"), out, "t2v-A14B", *MAGCACHE, "--size", SIZE, steps=STEPS, frames=FRAMES)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(RING_LAYOUTS))
def test_ring_generation_equals_single_process(tiny_ckpt, ring_reference, tmp_path, layout):
    import json

    nproc, flags = RING_LAYOUTS[layout]
    video = tmp_path / "ring.mp4"
    args = ["generate", "--task", "t2v-A14B", "--size", SIZE, "--frame_num", str(FRAMES),
            "--ckpt_dir", str(tiny_ckpt("t2v-A14B")), "--prompt", "a red car drives through a snowy city at night",
            "--base_seed", "7", "--sample_steps", str(STEPS), "--save_file", str(video),
            "--save-latents", str(tmp_path / "ring.safetensors"), "--dit_fsdp", *MAGCACHE, *flags]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "launcher", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=420, check=False)
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    sharded = json.loads(video.with_suffix(".json").read_text())
    ref = ring_reference
    assert ref["seq_len"] % 2 == 1  # padded on every layout
    a, b = load_file(tmp_path / "ring.safetensors")["latents"], ref["_latents"]
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 1e-5, rel
    assert ref["magcache"]["skipped_count"] > 0
    assert sharded["magcache"]["skipped_forwards"] == ref["magcache"]["skipped_forwards"]
    assert [d["skip"] for d in sharded["magcache"]["decisions"]] == [d["skip"] for d in ref["magcache"]["decisions"]]
    mesh = sharded["world"]["mesh"]
    assert (mesh["ring"], mesh["ulysses"], mesh["cfg"]) == (2, 2 if "u2" in layout else 1, 2 if "cfg" in layout else 1)
    assert sharded["world"]["size"] == nproc


def test_ring_layout_that_does_not_match_the_ranks_exits_2(tiny_ckpt, tmp_path, capsys):
    """One process asked for ring 2 x ulysses 2: the fix names the ranks to launch."""
    from launcher.cli import main

    code = main(["generate", "--task", "t2v-A14B", "--size", SIZE, "--frame_num", "1", "--ckpt_dir",
                 str(tiny_ckpt("t2v-A14B")), "--prompt", "a cat", "--ring_size", "2", "--ulysses_size", "2",
                 "--save_file", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--ring_size 2 x --ulysses_size 2 x config 1 = 4 ranks per video, but 1 were launched" in err
    assert not (tmp_path / "v.mp4").exists()
