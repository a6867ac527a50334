"""parallel.ulysses: sharded attention equals single-process SDPA, with and without padding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel.ulysses import gather_sequence, split_sequence, ulysses_attention
from parallel_jobs.spawn import run_job

LENGTHS = {13, 16, 29}


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_one_rank_is_plain_sdpa_and_drops_padded_keys():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 11, 4, 8, generator=gen) for _ in range(3))
    assert torch.equal(ulysses_attention(q, k, v, None, valid_len=None), _sdpa(q, k, v))
    padded = [torch.cat([t, torch.zeros(2, 3, 4, 8)], dim=1) for t in (q, k, v)]
    out = ulysses_attention(*padded, None, valid_len=11)
    torch.testing.assert_close(out[:, :11], _sdpa(q, k, v), rtol=0, atol=1e-6)


def test_one_rank_split_gather_are_identity():
    x = torch.randn(2, 7, 3)
    local, pad = split_sequence(x, 1, None)
    assert pad == 0 and local is x
    assert torch.equal(gather_sequence(local, 1, None, 7), x)


def test_bad_arguments():
    q = torch.zeros(1, 4, 6, 8)
    with pytest.raises(ValueError, match="valid_len 5 must be in 1..4"):
        ulysses_attention(q, q, q, None, valid_len=5)
    with pytest.raises(ValueError, match="one shape"):
        ulysses_attention(q, q[:, :2], q, None, valid_len=None)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_sharded_attention_equals_single_process(nproc):
    run = run_job("job_ulysses.py", nproc)
    assert run.ok, run.output[-4000:]
    sizes = {2} if nproc == 2 else {2, 4}
    for rank, res in run.by_rank().items():
        cases = {(c["sp"], c["length"]): c for c in res["cases"]}
        assert set(cases) == {(sp, n) for sp in sizes for n in LENGTHS}
        for (sp, length), c in cases.items():
            assert c["pad"] == -length % sp and c["local_len"] == (length + c["pad"]) // sp
            assert c["shape"] == [2, length, 8, 16]
            assert c["roundtrip"], f"split+gather changed the tensor (sp={sp}, len={length})"
            assert c["max_err"] < 1e-6, f"rank {rank} sp={sp} len={length}: err {c['max_err']}"
            if c["pad"]:  # the comparison is sensitive: attending to the padding would show
                assert c["unmasked_err"] > 1e-3
