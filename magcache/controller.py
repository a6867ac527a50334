"""The MagCache strategy around a DiT block stack: skip with a cached residual, or compute.

The DiT forward calls `runner.forward(index, x, run_blocks, expert)` for every forward and
never asks whether MagCache is on: `ComputeAll` is the same interface without skipping.
Only `may_skip` needs agreement between ranks (retention and expert are deterministic), so
a run costs one tiny collective per non-retained forward, through the `sync` callable the
launcher builds (MIN over the ranks computing this branch, on a CPU/gloo group).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from magcache.plan import Decision
from magcache.schedule import MagCacheSchedule, branch_of

RunBlocks = Callable[[Tensor], Tensor]
#: local may_skip -> the group's may_skip (MIN over ranks)
Sync = Callable[[bool], bool]


class BlockRunner(Protocol):
    """What the DiT forward calls around its block stack: this controller, `ComputeAll`, or the
    calibration recorder (`magcache.calibrate`). The one name for it in the code base."""

    decisions: list[Decision]

    def forward(self, index: int, x: Tensor, run_blocks: RunBlocks, expert: str = "single",
                valid: int | Tensor | None = None) -> Tensor: ...

    def reset(self) -> None: ...


class MagCacheController:
    """Holds one residual per branch and applies the schedule's (group-agreed) decisions."""

    def __init__(self, schedule: MagCacheSchedule, sync: Sync | None = None) -> None:
        self.schedule = schedule
        self.sync = sync
        self._residual: list[Tensor | None] = [None, None]
        self.decisions: list[Decision] = []

    def reset(self) -> None:
        """Start a new video: no residuals, fresh accumulators, no decisions."""
        self.schedule.reset()
        self._residual = [None, None]
        self.decisions = []

    def forward(self, index: int, x: Tensor, run_blocks: RunBlocks, expert: str = "single",
                valid: int | Tensor | None = None) -> Tensor:
        """`x` after patch embedding (and sequence split); returns x after the blocks.

        `valid` (this rank's real tokens) is part of the shared interface; skipping ignores it.
        """
        b = index % 2
        proposal = self.schedule.propose(index)
        skip = False
        if not proposal.retained:
            skip = proposal.may_skip if self.sync is None else bool(self.sync(proposal.may_skip))
        self.schedule.commit(index, skip)
        if proposal.fresh:
            self._residual[b] = None  # reset_at_switch: the low-noise expert starts clean
        if skip:
            out = x + self._residual[b]
        else:
            out = run_blocks(x)
            self._residual[b] = out - x
        self.decisions.append(Decision(index=index, step=index // 2, branch=branch_of(index),
                                       expert=expert, retained=proposal.retained, skip=skip))
        return out

    @property
    def skipped(self) -> list[int]:
        return [d.index for d in self.decisions if d.skip]


class ComputeAll:
    """The no-MagCache variant: always runs the blocks, records every forward as computed."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    def reset(self) -> None:
        self.decisions = []

    def forward(self, index: int, x: Tensor, run_blocks: RunBlocks, expert: str = "single",
                valid: int | Tensor | None = None) -> Tensor:
        self.decisions.append(Decision(index=index, step=index // 2, branch=branch_of(index),
                                       expert=expert, retained=False, skip=False))
        return run_blocks(x)

    @property
    def skipped(self) -> list[int]:
        return []
