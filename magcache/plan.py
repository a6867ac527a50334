"""Which forwards a run will skip, computed before any weight is loaded.

Because the rule reads only ratio tables, the whole run's decisions are known up front:
`magcache-launch plan` prints them, and the manifest of a real run must match them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from magcache.schedule import (
    NUM_TRAIN_TIMESTEPS,
    Branch,
    MagCacheParams,
    TaskMode,
    branch_of,
    build_schedule,
    split_forwards,
)

Expert = Literal["high", "low", "single"]

#: below this many steps retention and K cover most forwards
FEW_STEPS = 10
#: a table interpolated by more than this factor in step count no longer describes the run well
STEP_FACTOR_WARN = 1.5


@dataclass(frozen=True, slots=True)
class Decision:
    """One forward: planned (`Plan.forwards`) or as it ran (a runner's `decisions`, the manifest's
    list). One record for both, so "the manifest equals the plan" compares like with like."""

    index: int
    step: int
    branch: Branch
    expert: Expert
    retained: bool
    skip: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Plan:
    task_mode: TaskMode
    steps: int
    shift: float
    boundary: float | None
    params: MagCacheParams
    #: forward index where the schedule's two regimes meet (per params.split_mode)
    split_forwards: int
    #: the same index from upstream's formula and from the real timesteps (None: no experts)
    upstream_split: int | None
    scheduler_split: int | None
    forwards: tuple[Decision, ...]
    warnings: tuple[str, ...]
    #: the accumulated errors the rule compared with `params.thresh`, in forward order: every
    #: threshold that keeps each comparison's outcome gives this same plan (`magcache.target`)
    compared_errors: tuple[float, ...] = ()

    @property
    def total_forwards(self) -> int:
        return len(self.forwards)

    @property
    def skipped_forwards(self) -> tuple[int, ...]:
        return tuple(f.index for f in self.forwards if f.skip)

    @property
    def computed_forwards(self) -> int:
        return self.total_forwards - len(self.skipped_forwards)

    @property
    def forward_speedup(self) -> float:
        """Forwards run without MagCache / forwards run with it (block compute, not wall time)."""
        return self.total_forwards / self.computed_forwards

    @property
    def skips_by_branch(self) -> dict[str, int]:
        return {b: sum(1 for f in self.forwards if f.skip and f.branch == b) for b in ("cond", "uncond")}

    @property
    def skips_by_expert(self) -> dict[str, int]:
        experts = dict.fromkeys(f.expert for f in self.forwards)
        return {e: sum(1 for f in self.forwards if f.skip and f.expert == e) for e in experts}

    def to_json(self) -> dict[str, Any]:
        return {
            "task_mode": self.task_mode,
            "steps": self.steps,
            "shift": self.shift,
            "boundary": self.boundary,
            "params": asdict(self.params),
            "split_forwards": self.split_forwards,
            "upstream_split": self.upstream_split,
            "scheduler_split": self.scheduler_split,
            "total_forwards": self.total_forwards,
            "computed_forwards": self.computed_forwards,
            "skipped_forwards": list(self.skipped_forwards),
            "forward_speedup": round(self.forward_speedup, 4),
            "skips_by_branch": self.skips_by_branch,
            "skips_by_expert": self.skips_by_expert,
            "forwards": [f.to_json() for f in self.forwards],
            "warnings": list(self.warnings),
        }


def expert_labels(
    experts: Sequence[str], boundary: float | None, scheduler_timesteps: Sequence[int] | None, steps: int
) -> list[Expert]:
    """Expert per step, by the official rule on the real timesteps: `t >= boundary*1000` is high."""
    if tuple(experts) == ("single",):
        return ["single"] * steps
    if tuple(experts) != ("high", "low"):
        raise ValueError(f"experts must be ('high', 'low') or ('single',), got {tuple(experts)!r}")
    if boundary is None or scheduler_timesteps is None or len(scheduler_timesteps) != steps:
        raise ValueError("a two-expert plan needs the boundary and one scheduler timestep per step")
    return ["high" if t >= boundary * NUM_TRAIN_TIMESTEPS else "low" for t in scheduler_timesteps]


def plan(
    task_mode: TaskMode,
    steps: int,
    shift: float,
    boundary: float | None,
    params: MagCacheParams,
    mag: Sequence[float],
    scheduler_timesteps: Sequence[int] | None,
    experts: Sequence[str],
    *,
    calibrated_steps: int | None = None,
    cond_only: Sequence[str] = (),
) -> Plan:
    """Run the schedule over the whole run as one process would (no agreement needed).

    `mag` is the per-forward list (`RatioTable.mag(steps)`); `calibrated_steps` is the step
    count its table was calibrated at, for the interpolation warning. `cond_only`: experts whose
    guidance scale is 1, so their steps run the cond forward alone; their uncond forwards are not
    in the plan (the cond decisions keep their indices: state is per branch, so they are unchanged).
    """
    schedule = build_schedule(task_mode, steps, shift, boundary, params, mag, scheduler_timesteps)
    labels = expert_labels(experts, boundary, scheduler_timesteps, steps)
    forwards = []
    compared = []
    for index in range(2 * steps):
        if index % 2 and labels[index // 2] in cond_only:
            continue
        proposal = schedule.propose(index)
        if proposal.err is not None:
            compared.append(proposal.err)
        schedule.commit(index, proposal.may_skip)
        forwards.append(Decision(index=index, step=index // 2, branch=branch_of(index),
                                  expert=labels[index // 2], retained=proposal.retained,
                                  skip=proposal.may_skip))
    upstream_split = scheduler_split = None
    if task_mode != "ti2v":
        upstream_split = split_forwards(task_mode, steps, shift, boundary, "upstream")
        if scheduler_timesteps is not None:
            scheduler_split = split_forwards(task_mode, steps, shift, boundary, "scheduler", scheduler_timesteps)
    warnings = _warnings(steps, params, upstream_split, scheduler_split, calibrated_steps)
    return Plan(task_mode=task_mode, steps=steps, shift=shift, boundary=boundary, params=params,
                split_forwards=schedule.split, upstream_split=upstream_split,
                scheduler_split=scheduler_split, forwards=tuple(forwards), warnings=tuple(warnings),
                compared_errors=tuple(compared))


def _warnings(
    steps: int,
    params: MagCacheParams,
    upstream_split: int | None,
    scheduler_split: int | None,
    calibrated_steps: int | None,
) -> list[str]:
    out = []
    if upstream_split is not None and scheduler_split is not None and upstream_split != scheduler_split:
        if params.split_mode == "upstream":
            out.append(
                f"upstream's timestep formula puts the expert split at forward {upstream_split}, but the "
                f"scheduler switches experts at forward {scheduler_split}; retention windows follow upstream "
                "(pass --magcache-split scheduler to follow the real switch)")
        else:
            out.append(
                f"split follows the scheduler (forward {scheduler_split}); upstream MagCache4Wan2.2 would use "
                f"forward {upstream_split}, so skips differ from upstream at this step count")
    if steps < FEW_STEPS:
        out.append(f"only {steps} steps: retention windows and K={params.K} leave few forwards to skip, "
                   "expect a small or no speedup")
    if calibrated_steps is not None:
        factor = max(steps, calibrated_steps) / min(steps, calibrated_steps)
        if factor > STEP_FACTOR_WARN:
            out.append(
                f"ratios were calibrated at {calibrated_steps} steps and are nearest-interpolated to {steps}; "
                f"skips may hurt quality more than expected (calibrate at {steps} steps and pass the file)")
    return out
