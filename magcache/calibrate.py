"""Calibration: measure the residual magnitude ratios a ratio table is made of.

Upstream `magcache_calibration` runs every forward and records, per forward after the first
step, the token mean of ||r_t|| / ||r_{t-1}|| (norm over channels, same branch), its std
(unbiased, torch's default) and the mean cosine distance 1 - cos(r_t, r_{t-1}) (eps 1e-8),
rounded to 5 decimals. Here the token sums are reduced over the whole sequence group
(`reduce_sum`), so a sequence-parallel calibration equals the single-process one, and
padded tokens are left out (upstream has none on one GPU).
"""
from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from magcache.controller import RunBlocks
from magcache.plan import Decision
from magcache.ratios import parse_table
from magcache.schedule import branch_of

#: sums tensor -> sums over every rank holding a part of the sequence (an all-reduce SUM)
ReduceSum = Callable[[Tensor], Tensor]


@dataclass(frozen=True, slots=True)
class CalibrationRecord:
    index: int
    step: int
    branch: str
    expert: str
    ratio: float
    std: float
    cos_dist: float
    #: valid tokens the statistics were taken over (whole group)
    tokens: int


class CalibrationRecorder:
    """A block cache that never skips and records the ratio statistics of every forward.

    The per-forward token sums stay on the device (and go through `reduce_sum` there); they are
    brought to the host together, with one sync, the first time `records` is read, so calibrating
    never drains the GPU queue between forwards.
    """

    def __init__(self, reduce_sum: ReduceSum | None = None) -> None:
        self.reduce_sum = reduce_sum
        self.reset()

    def reset(self) -> None:
        self._residual: list[Tensor | None] = [None, None]
        self._records: list[CalibrationRecord] = []
        #: (index, expert, valid, [sum d, sum d^2, n, sum cos] on the device) not yet read back
        self._pending: list[tuple[int, str, Any, Tensor]] = []
        self.decisions: list[Decision] = []

    @property
    def records(self) -> list[CalibrationRecord]:
        if self._pending:
            sums = torch.stack([p[3] for p in self._pending]).tolist()  # the one host sync
            for (index, expert, valid, _), row in zip(self._pending, sums):
                ratio, std, cos_dist, tokens = _statistics(row, valid, index)
                self._records.append(CalibrationRecord(index=index, step=index // 2, branch=branch_of(index),
                                                       expert=expert, ratio=ratio, std=std,
                                                       cos_dist=cos_dist, tokens=tokens))
            self._pending = []
        return self._records

    def forward(
        self,
        index: int,
        x: Tensor,
        run_blocks: RunBlocks,
        expert: str = "single",
        valid: int | Tensor | None = None,
    ) -> Tensor:
        """`x` is [B, L, C] (this rank's tokens); `valid` = leading valid tokens or a [B, L] mask."""
        out = run_blocks(x)
        residual = out - x
        b = index % 2
        previous = self._residual[b]
        if previous is not None:  # like upstream, the cache spans both experts
            self._pending.append((index, expert, valid if not isinstance(valid, Tensor) else "mask",
                                  self._sums(residual, previous, valid)))
        self._residual[b] = residual
        self.decisions.append(Decision(index=index, step=index // 2, branch=branch_of(index),
                                       expert=expert, retained=False, skip=False))
        return out

    def _sums(self, cur: Tensor, prev: Tensor, valid: int | Tensor | None) -> Tensor:
        """[sum (ratio - 1), sum (ratio - 1)^2, valid tokens, sum cos distance] over the whole group, on the device."""
        dtype = torch.promote_types(cur.dtype, torch.float32)  # bf16 residuals: norms in float32
        cur, prev = cur.to(dtype), prev.to(dtype)
        ratio = torch.linalg.vector_norm(cur, dim=-1) / torch.linalg.vector_norm(prev, dim=-1)
        cos_dist = 1 - F.cosine_similarity(cur, prev, dim=-1, eps=1e-8)
        mask = _token_mask(valid, ratio.shape, ratio.device)
        zero = ratio.new_zeros((), dtype=torch.float64)
        # centre at 1 before squaring: ratios sit near 1, and sum(x^2) - sum(x)^2/n would cancel;
        # `where`, not a product, because padded tokens may hold 0/0 = nan
        d = torch.where(mask, ratio.double() - 1, zero)
        cos = torch.where(mask, cos_dist.double(), zero)
        sums = torch.stack([d.sum(), (d * d).sum(), mask.sum(dtype=torch.float64), cos.sum()])
        return self.reduce_sum(sums) if self.reduce_sum is not None else sums


def _statistics(row: Sequence[float], valid: Any, index: int) -> tuple[float, float, float, int]:
    """(mean ratio, its std, mean cosine distance, tokens) from one forward's group-wide sums."""
    s_d, s_dd, n, s_cos = row
    if n < 1:
        raise ValueError(f"no valid tokens to calibrate on at forward {index}; check the valid-token count {valid!r}")
    var = (s_dd - s_d * s_d / n) / (n - 1) if n > 1 else 0.0
    return 1 + s_d / n, math.sqrt(max(var, 0.0)), s_cos / n, int(n)


def _token_mask(valid: int | Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """True for real tokens, False for padding, as a bool [B, L] tensor."""
    if valid is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if isinstance(valid, Tensor):
        return valid.to(device=device, dtype=torch.bool).expand(shape)
    return (torch.arange(shape[-1], device=device) < valid).expand(shape)


def table_from_records(
    records: Sequence[CalibrationRecord], steps: int
) -> tuple[list[float], list[float], list[float]]:
    """Ratios, stds and cosine distances in forward order 2..2*steps-1 (records of all ranks merged)."""
    by_index = {r.index: r for r in records}
    missing = [i for i in range(2, 2 * steps) if i not in by_index]
    if missing:
        raise ValueError(f"calibration has no record for forwards {missing[:6]}; "
                         f"run all {steps} steps and merge the records of both CFG branches")
    ordered = [by_index[i] for i in range(2, 2 * steps)]
    return [r.ratio for r in ordered], [r.std for r in ordered], [r.cos_dist for r in ordered]


def write_ratio_file(
    path: str | Path,
    task: str,
    steps: int,
    shift: float,
    ratios: Sequence[float],
    stds: Sequence[float] | None = None,
    cos_dists: Sequence[float] | None = None,
    *,
    decimals: int | None = 5,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a table `magcache.ratios.load_ratio_file` reads, atomically (temp file, rename).

    Values are rounded to `decimals` like upstream's `round(x, 5)` (None keeps them exact).
    """
    def rounded(values: Sequence[float] | None) -> list[float] | None:
        if values is None:
            return None
        return [round(float(v), decimals) if decimals is not None else float(v) for v in values]

    data: dict[str, Any] = {"task": task, "sample_steps": steps, "sample_shift": float(shift),
                            "ratios": rounded(ratios)}
    for name, values in (("stds", stds), ("cos_dists", cos_dists)):
        if values is not None:
            data[name] = rounded(values)
    if meta:
        data["meta"] = meta
    path = Path(path)
    parse_table(data, source=str(path))  # never write a file the loader would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    # mode 0666 before the umask, as a plain open() gives (mkstemp's 0600 hides the file from colleagues)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_calibration(path_png: str | Path, records: Sequence[CalibrationRecord], title: str = "") -> Path:
    """Ratio per forward (cond/uncond) with its std band, cosine distance, expert switch marked."""
    from matplotlib.figure import Figure  # Figure without pyplot: Agg, no global backend state

    fig = Figure(figsize=(10, 6), layout="constrained")
    ax_ratio, ax_cos = fig.subplots(2, 1, sharex=True)
    for branch, color in (("cond", "tab:blue"), ("uncond", "tab:orange")):
        rows = sorted((r for r in records if r.branch == branch), key=lambda r: r.index)
        if not rows:
            continue
        idx = [r.index for r in rows]
        ratio = [r.ratio for r in rows]
        ax_ratio.plot(idx, ratio, color=color, label=f"{branch} ratio")
        ax_ratio.fill_between(idx, [r.ratio - r.std for r in rows], [r.ratio + r.std for r in rows],
                              color=color, alpha=0.2, label=f"{branch} ±std")
        ax_cos.plot(idx, [r.cos_dist for r in rows], color=color, label=f"{branch} cosine distance")
    switch = next((r.index for r in sorted(records, key=lambda r: r.index) if r.expert == "low"), None)
    for ax in (ax_ratio, ax_cos):
        if switch is not None:
            ax.axvline(switch - 0.5, color="gray", linestyle="--", label="expert switch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax_ratio.set_ylabel("||r_t|| / ||r_t-1||")
    ax_cos.set_ylabel("1 - cos")
    ax_cos.set_xlabel("forward index (even cond, odd uncond)")
    return _save(fig, path_png, title)


def _save(fig: Any, path_png: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=100)
    return path_png


@dataclass(frozen=True, slots=True)
class AveragedCalibration:
    """Ratio curves averaged over several calibration runs (prompts x seeds), with their spread.

    Per forward 2..2*steps-1 in forward order (even cond, odd uncond, as the table stores them):
    the mean over runs of each run's token-mean ratio, token std and cosine distance, and the
    standard deviation of the ratio across runs (`spread`, 0 for a single run).
    """

    ratios: list[float]
    stds: list[float]
    cos_dists: list[float]
    spread: list[float]
    experts: list[str]
    runs: int

    def per_branch(self) -> dict[str, dict[str, list[float]]]:
        """cond/uncond curves (step order) with their spread, as the plot and the file's meta show them."""
        out: dict[str, dict[str, list[float]]] = {}
        for branch, start in (("cond", 0), ("uncond", 1)):
            out[branch] = {"ratio": self.ratios[start::2], "spread": self.spread[start::2]}
        return out

    def per_expert(self) -> dict[str, dict[str, float]]:
        """Mean ratio and mean spread of each expert's forwards (the curve drops at the switch)."""
        out: dict[str, dict[str, float]] = {}
        for expert in dict.fromkeys(self.experts):
            idx = [i for i, e in enumerate(self.experts) if e == expert]
            out[expert] = {"forwards": len(idx), "mean_ratio": sum(self.ratios[i] for i in idx) / len(idx),
                           "mean_spread": sum(self.spread[i] for i in idx) / len(idx)}
        return out


def average_runs(runs: Sequence[Sequence[CalibrationRecord]], steps: int) -> AveragedCalibration:
    """Average whole-run tables forward by forward; every run must cover all `steps` steps."""
    if not runs:
        raise ValueError("no calibration runs to average")
    tables = [table_from_records(records, steps) for records in runs]
    experts = [r.expert for r in sorted(runs[0], key=lambda r: r.index) if 2 <= r.index < 2 * steps]
    n = len(tables)

    def mean(column: int, i: int) -> float:
        return sum(t[column][i] for t in tables) / n

    count = 2 * steps - 2
    ratios = [mean(0, i) for i in range(count)]
    spread = [math.sqrt(sum((t[0][i] - ratios[i]) ** 2 for t in tables) / n) for i in range(count)]
    return AveragedCalibration(ratios=ratios, stds=[mean(1, i) for i in range(count)],
                               cos_dists=[mean(2, i) for i in range(count)], spread=spread, experts=experts, runs=n)


def plot_averaged(path_png: str | Path, averaged: AveragedCalibration, title: str = "") -> Path:
    """The averaged ratio per branch with a ±spread band across runs, expert switch marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    for (branch, curve), color in zip(averaged.per_branch().items(), ("tab:blue", "tab:orange")):
        start = 2 if branch == "cond" else 3
        idx = list(range(start, start + 2 * len(curve["ratio"]), 2))
        lo = [r - s for r, s in zip(curve["ratio"], curve["spread"])]
        hi = [r + s for r, s in zip(curve["ratio"], curve["spread"])]
        ax.plot(idx, curve["ratio"], color=color, label=f"{branch} mean ratio")
        ax.fill_between(idx, lo, hi, color=color, alpha=0.25, label=f"{branch} ±std over {averaged.runs} run(s)")
    switch = next((i + 2 for i, e in enumerate(averaged.experts) if e == "low"), None)
    if switch is not None:
        ax.axvline(switch - 0.5, color="gray", linestyle="--", label="expert switch")
    ax.set_xlabel("forward index (even cond, odd uncond)")
    ax.set_ylabel("||r_t|| / ||r_t-1||")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path_png, title)
