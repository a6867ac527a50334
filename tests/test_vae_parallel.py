"""Band-split VAE decode (launcher.wan.vae_parallel over parallel.halo) equals the one-rank decode."""
from __future__ import annotations

import pytest
import torch
from parallel_jobs.spawn import run_job

from launcher.wan.vae_parallel import plan_decode
from parallel.halo import BandSplit, RowExchange, halo_bytes_per_exchange, usable_parts


def test_band_split_is_contiguous_and_uneven_bands_differ_by_one_row():
    split = BandSplit.even(7, 3)
    assert split.sizes == (3, 2, 2) and split.rows == 7
    assert [split.start(i) for i in range(3)] == [0, 3, 5]
    assert split.scaled(8).sizes == (24, 16, 16)
    with pytest.raises(ValueError, match="cannot cut 2 rows into 3"):
        BandSplit.even(2, 3)


def test_too_few_rows_fall_back_to_fewer_ranks_and_say_so():
    assert usable_parts(3, 4, 1) == 3 and usable_parts(9, 4, 2) == 4 and usable_parts(1, 8, 1) == 1
    plan = plan_decode(3, 4)
    assert plan.split.sizes == (1, 1, 1)
    assert plan.describe() == {"ranks": 3, "of": 4, "latent_rows": [1, 1, 1], "fallback": plan.note}
    assert "1 rank(s) idle" in plan.note
    assert "fallback" not in plan_decode(8, 4).describe()


def test_one_band_pads_zeros_like_the_convolution_would():
    x = torch.randn(2, 3, 4, 5)
    ex = RowExchange(BandSplit((4,)))
    out = ex.halo_padded(x, dim=2, halo=1, pad=[2, 1])
    assert torch.equal(out, torch.nn.functional.pad(x, (2, 1, 1, 1)))
    assert ex.row_elements[""] == 2 * 3 * 5
    assert ex.all_gather(x, 2) is x and ex.gather_to(x, 2) is x
    with pytest.raises(ValueError, match="leave it out"):
        ex.halo_padded(x, dim=2, halo=1, pad=[0, 0, 1, 0])


def test_halo_formula():
    # 3 cuts, 1 row each way, rows of 2*3*5 float32 values
    assert halo_bytes_per_exchange(4, 1, 30, 4) == 2 * 3 * 1 * 30 * 4


@pytest.mark.slow
@pytest.mark.parametrize("nproc, heights", [(2, "5,7"), (4, "3,6,9")])
def test_split_decode_equals_one_rank(nproc, heights):
    run = run_job("job_vae_band.py", nproc, heights)
    assert run.ok, run.output[-4000:]
    by_rank = run.by_rank()
    assert set(by_rank) == set(range(nproc))
    cases = by_rank[0]["cases"]
    assert {(c["version"], c["h"]) for c in cases} == {(v, int(h)) for v in ("2.1", "2.2") for h in heights.split(",")}
    for c in cases:
        assert c["shape"] == c["ref_shape"]
        assert c["max_err"] <= 1e-5, c
        assert c["parts"] == min(nproc, c["h"])
        assert (c["fallback"] is not None) == (c["h"] < nproc)
        assert c["halo_bytes"] > 0
    for rank, res in by_rank.items():
        for c in res["cases"]:
            if rank:
                assert not c["got_video"]
            assert c["idle"] == (rank >= c["parts"])
