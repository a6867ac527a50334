"""Calibration statistics: upstream's expressions, and a 2-rank split that sums to the same."""
from __future__ import annotations


import pytest
from gloo_threads import run_ranks
import torch
import torch.distributed as dist
import torch.nn.functional as F

from magcache.calibrate import CalibrationRecorder, plot_calibration, table_from_records, write_ratio_file
from magcache.ratios import load_ratio_file

STEPS, TOKENS, DIM = 4, 12, 8


def residuals(seed: int = 0) -> list[torch.Tensor]:
    """One residual per forward; later ones shrink like a denoising run."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, TOKENS, DIM, generator=gen, dtype=torch.float64) * (1 - 0.1 * i)
            for i in range(2 * STEPS)]


def upstream_statistics(cur: torch.Tensor, prev: torch.Tensor) -> tuple[float, float, float]:
    """magcache_calibration's three expressions, verbatim in meaning."""
    norm_ratio = (cur.norm(dim=-1) / prev.norm(dim=-1)).mean().item()
    norm_std = (cur.norm(dim=-1) / prev.norm(dim=-1)).std().item()
    cos_dis = (1 - F.cosine_similarity(cur, prev, dim=-1, eps=1e-8)).mean().item()
    return norm_ratio, norm_std, cos_dis


def stats(records) -> list[float]:
    return [v for r in records for v in (r.ratio, r.std, r.cos_dist)]


def run(recorder: CalibrationRecorder, res: list[torch.Tensor], token_slice=slice(None), valid=None,
        pad: int = 0) -> None:
    gen = torch.Generator().manual_seed(1)
    for index, r in enumerate(res):
        x = torch.randn(1, TOKENS, DIM, generator=gen, dtype=torch.float64)
        r_local, x_local = r[:, token_slice], x[:, token_slice]
        if pad:  # padded tokens: garbage input, zero residual (0/0 ratios) on the last rank
            x_local = torch.cat([x_local, torch.full((1, pad, DIM), 7.0, dtype=torch.float64)], dim=1)
            r_local = torch.cat([r_local, torch.zeros(1, pad, DIM, dtype=torch.float64)], dim=1)
        out = recorder.forward(index, x_local, lambda x_in, r_local=r_local: x_in + r_local,
                               expert="high" if index < 4 else "low", valid=valid)
        assert torch.allclose(out, x_local + r_local)


def test_statistics_equal_upstream_expressions():
    res = residuals()
    recorder = CalibrationRecorder()
    run(recorder, res)
    assert [r.index for r in recorder.records] == list(range(2, 2 * STEPS))
    assert [r.expert for r in recorder.records] == ["high", "high", "low", "low", "low", "low"]
    for record in recorder.records:
        ratio, std, cos = upstream_statistics(res[record.index], res[record.index - 2])
        assert record.ratio == pytest.approx(ratio, rel=1e-12)
        assert record.std == pytest.approx(std, rel=1e-9)
        assert record.cos_dist == pytest.approx(cos, rel=1e-12)
        assert record.tokens == TOKENS and record.branch == ("cond", "uncond")[record.index % 2]
    assert all(not d.skip for d in recorder.decisions) and len(recorder.decisions) == 2 * STEPS


def test_padded_tokens_are_left_out():
    res = residuals()
    reference = CalibrationRecorder()
    run(reference, res)
    for valid in (TOKENS, torch.arange(TOKENS + 3) < TOKENS):
        padded = CalibrationRecorder()
        run(padded, res, valid=valid, pad=3)
        assert stats(padded.records) == pytest.approx(stats(reference.records), rel=1e-12)


def test_two_rank_sequence_split_equals_one_rank():
    """Tokens split 7 + 5 (+3 padding on the last rank), statistics all-reduced over real gloo."""
    res = residuals()
    reference = CalibrationRecorder()
    run(reference, res)
    shards = [dict(token_slice=slice(0, 7)), dict(token_slice=slice(7, TOKENS), valid=5, pad=3)]

    def rank_main(rank: int, group: dist.ProcessGroup):
        calls = []

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            calls.append(t.numel())
            group.allreduce([t]).wait()
            return t

        recorder = CalibrationRecorder(reduce_sum)
        run(recorder, res, **shards[rank])
        return recorder.records, calls

    records = run_ranks(2, rank_main)
    for rank in (0, 1):
        got, calls = records[rank]
        assert calls == [4] * (2 * STEPS - 2)  # one small all-reduce per recorded forward
        assert [r.tokens for r in got] == [TOKENS] * len(got)
        assert [r.index for r in got] == [r.index for r in reference.records]
        assert stats(got) == pytest.approx(stats(reference.records), rel=1e-12)


def test_no_valid_tokens_is_an_error():
    recorder = CalibrationRecorder()
    run(recorder, residuals(), valid=0)
    with pytest.raises(ValueError, match="no valid tokens to calibrate on at forward 2"):
        recorder.records  # noqa: B018 - the sums are read (and checked) when the records are


def test_write_then_load_round_trip(tmp_path):
    recorder = CalibrationRecorder()
    run(recorder, residuals())
    ratios, stds, cos = table_from_records(recorder.records, STEPS)
    path = write_ratio_file(tmp_path / "cal" / "t2v.json", "t2v-A14B", STEPS, 12.0, ratios, stds, cos,
                            meta={"prompt": "a cat"})
    table = load_ratio_file(path, task="t2v-A14B")
    assert table.ratios == tuple(round(r, 5) for r in ratios)
    assert table.stds == tuple(round(s, 5) for s in stds) and len(table.cos_dists) == 6
    assert (table.sample_steps, table.sample_shift) == (STEPS, 12.0)
    assert table.mag(STEPS)[2:] == list(table.ratios)
    assert [p.name for p in path.parent.iterdir()] == ["t2v.json"]  # no temp file left behind
    exact = load_ratio_file(write_ratio_file(tmp_path / "exact.json", "t2v-A14B", STEPS, 12.0, ratios, decimals=None))
    assert exact.ratios == tuple(ratios)


def test_incomplete_records_and_bad_tables_are_refused(tmp_path):
    recorder = CalibrationRecorder()
    run(recorder, residuals())
    with pytest.raises(ValueError, match=r"no record for forwards \[3, 5, 7\]"):
        table_from_records([r for r in recorder.records if r.index % 2 == 0], STEPS)
    with pytest.raises(ValueError, match="sample_steps 5 needs 8"):
        write_ratio_file(tmp_path / "bad.json", "t2v-A14B", 5, 12.0, [1.0] * 6)
    assert not (tmp_path / "bad.json").exists()


def test_plot_writes_a_png(tmp_path):
    recorder = CalibrationRecorder()
    run(recorder, residuals())
    path = plot_calibration(tmp_path / "plot.png", recorder.records, title="t2v-A14B 4 steps")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


class _CountsReads(torch.Tensor):
    """A tensor that counts how often its values are read back to the host (a GPU sync each)."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__):
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_calibration_reads_the_device_back_once_not_every_forward():
    _CountsReads.reads = 0
    recorder = CalibrationRecorder(reduce_sum=lambda t: t.as_subclass(_CountsReads))
    torch.manual_seed(0)
    x = torch.randn(1, 6, 4)
    for index in range(8):
        recorder.forward(index, x, lambda h, i=index: h * (1.1 + 0.1 * i) + 0.01 * (i + 1))
    assert _CountsReads.reads == 0  # nothing left the device while forwards ran
    assert len(recorder.records) == 6 and _CountsReads.reads == 1
    assert len(recorder.records) == 6 and _CountsReads.reads == 1  # read once, kept
    reference = CalibrationRecorder()
    for index in range(8):
        reference.forward(index, x, lambda h, i=index: h * (1.1 + 0.1 * i) + 0.01 * (i + 1))
    assert stats(recorder.records) == stats(reference.records)
