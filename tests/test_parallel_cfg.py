"""parallel.cfg: cond/uncond exchange between the two cfg halves, on 4 gloo ranks (cfg 2 x sp 2)."""
from __future__ import annotations

import pytest

from parallel_jobs.spawn import run_job


@pytest.mark.slow
def test_cfg_halves_exchange_predictions_and_decide_alone():
    run = run_job("job_mesh.py", 4, "2", "2")
    assert run.ok, run.output[-4000:]
    got = run.by_rank()
    for rank, res in got.items():
        half, pos = divmod(rank, 2)  # ranks 0,1 = cond half; 2,3 = uncond half
        assert res["coords"]["cfg"] == half and res["coords"]["sp"] == pos
        # Each rank's pred starts with its own rank number: cond comes from the cond-half partner.
        cond_rank, uncond_rank = pos, 2 + pos
        assert res["exchanged"] == [float(cond_rank), float(uncond_rank)]
        # The MagCache vote of one half never involves the other half.
        assert res["votes"] == [r // 2 != half for r in range(4)]


def test_exchange_refuses_a_missing_cfg_group():
    import torch

    from parallel.cfg import exchange_predictions

    with pytest.raises(ValueError, match="needs the 2-rank cfg group"):
        exchange_predictions(torch.zeros(2), None)
