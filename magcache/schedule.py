"""The MagCache decision rule of MagCache4Wan2.2 (`magcache_forward`), in pure Python.

Pure (no torch, no numpy) so the rule can be read next to the upstream script and tested
exhaustively, and so `plan` runs without a model. Upstream keeps one counter over the
`2*steps` DiT forwards (even = cond, odd = uncond) shared by both A14B experts, and per-branch
accumulators; we keep the same index space but split each decision into `propose` (pure)
and `commit` (the group-agreed outcome), so ranks can agree on a skip before acting on it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

TaskMode = Literal["t2v", "i2v", "ti2v"]
SplitMode = Literal["upstream", "scheduler"]
Branch = Literal["cond", "uncond"]

BRANCHES: tuple[Branch, Branch] = ("cond", "uncond")
TASK_MODES: tuple[str, ...] = ("t2v", "i2v", "ti2v")
SPLIT_MODES: tuple[str, ...] = ("upstream", "scheduler")
#: The official schedulers' `num_train_timesteps`; the expert boundary is `boundary * 1000`.
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class MagCacheParams:
    """MagCache knobs; the defaults are upstream's CLI defaults."""

    #: skip while the accumulated error stays below this (`--magcache_thresh`)
    thresh: float = 0.04
    #: at most this many consecutive skips per branch (`--magcache_K`)
    K: int = 2
    #: share of forwards always computed (`--retention_ratio`), see `is_retained`
    retention_ratio: float = 0.2
    #: "upstream": expert split from upstream's own timestep formula (exact upstream);
    #: "scheduler": split where the real scheduler switches experts
    split_mode: SplitMode = "upstream"
    #: fresh accumulators and residual cache at the first low-noise forward (not upstream)
    reset_at_switch: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.thresh, bool) or not isinstance(self.thresh, (int, float)) \
                or not math.isfinite(self.thresh) or self.thresh < 0:
            raise ValueError(f"magcache thresh must be a finite number >= 0, got {self.thresh!r}")
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K < 1:
            raise ValueError(f"magcache K must be an integer >= 1, got {self.K!r}")
        r = self.retention_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"magcache retention ratio must be between 0 and 1, got {r!r}")
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(
                f"magcache split mode must be one of {', '.join(SPLIT_MODES)}, got {self.split_mode!r}")


def _numpy_linspace(start: float, stop: float, num: int) -> list[float]:
    """`np.linspace(start, stop, num)` bit for bit: `i*step + start`, last value set to `stop`."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    values = [i * step + start for i in range(num)]
    values[-1] = stop
    return values


def upstream_timesteps(shift: float, steps: int) -> list[int]:
    """Upstream `get_timesteps`: the simplified schedule MagCache4Wan2.2 splits experts with."""
    _check_steps(steps)
    sigmas = _numpy_linspace(1.0, 0.01, steps + 1)[:-1]
    shifted = [shift * s / (1 + (shift - 1) * s) for s in sigmas]
    return [int(s * 1000) for s in shifted]  # int64 cast truncates; all values are positive


def high_noise_steps(timesteps: Sequence[int], boundary: float) -> int:
    """Steps run by the high-noise expert: official rule `t >= boundary * num_train_timesteps`."""
    return sum(1 for t in timesteps if t >= boundary * NUM_TRAIN_TIMESTEPS)


def split_forwards(
    mode: TaskMode,
    steps: int,
    shift: float,
    boundary: float | None,
    split_mode: SplitMode = "upstream",
    scheduler_timesteps: Sequence[int] | None = None,
) -> int:
    """Forward index where MagCache's two retention regimes meet: 2 x high-noise steps.

    "upstream" counts with `upstream_timesteps` (what upstream does, even where it disagrees
    with the real switch); "scheduler" counts the pipeline's real timesteps. ti2v: 0.
    """
    _check_mode(mode)
    _check_steps(steps)
    if mode == "ti2v":
        return 0
    if boundary is None:
        raise ValueError(f"task mode {mode} needs an expert boundary; pass the task's boundary")
    if split_mode == "upstream":
        return 2 * high_noise_steps(upstream_timesteps(shift, steps), boundary)
    if split_mode == "scheduler":
        return 2 * high_noise_steps(_checked_timesteps(scheduler_timesteps, steps), boundary)
    raise ValueError(f"magcache split mode must be one of {', '.join(SPLIT_MODES)}, got {split_mode!r}")


def low_expert_start(
    mode: TaskMode, steps: int, boundary: float | None, scheduler_timesteps: Sequence[int] | None
) -> int | None:
    """First forward index run by the low-noise expert (real timesteps); None if it never runs."""
    _check_mode(mode)
    if mode == "ti2v":
        return None
    if boundary is None:
        raise ValueError(f"task mode {mode} needs an expert boundary; pass the task's boundary")
    start = 2 * high_noise_steps(_checked_timesteps(scheduler_timesteps, steps), boundary)
    return start if start < 2 * steps else None


def is_retained(mode: TaskMode, index: int, total: int, split: int, retention_ratio: float) -> bool:
    """Forced compute (upstream retention), with upstream's own float arithmetic.

    t2v: `cnt < int(split*R)` or `split <= cnt <= (n-split)*R + split`;
    i2v: `cnt < int(split + (n-split)*R)`; ti2v: `cnt < int(n*R)`.
    """
    r = retention_ratio
    if mode == "t2v":
        return index < int(split * r) or split <= index <= (total - split) * r + split
    if mode == "i2v":
        return index < int(split + (total - split) * r)
    if mode == "ti2v":
        return index < int(total * r)
    raise ValueError(f"task mode must be one of {', '.join(TASK_MODES)}, got {mode!r}")


def branch_of(index: int) -> Branch:
    return BRANCHES[index % 2]


@dataclass(frozen=True, slots=True)
class Proposal:
    """What this rank would do at one forward, before the group agrees."""

    #: forced compute; deterministic, so it needs no agreement
    retained: bool
    #: this rank's vote; the group skips only if every rank may skip
    may_skip: bool
    #: this forward starts the low-noise expert with fresh state (reset_at_switch):
    #: the caller drops that branch's residual cache
    fresh: bool = False
    #: the accumulated error compared with the threshold here; None where the threshold did not
    #: decide (retained, K reached, no residual yet). A plan changes only where a threshold
    #: crosses one of these values, which is what `magcache.target` searches over.
    err: float | None = None


@dataclass(slots=True)
class _BranchState:
    ratio: float = 1.0
    err: float = 0.0
    steps: int = 0
    #: a residual was computed for this branch; upstream would add `None` and crash without one
    has_residual: bool = False
    last_index: int = -1


class MagCacheSchedule:
    """The upstream rule as a state machine over forward indices 0..2*steps-1.

    Only the indices a rank actually sees are needed (with CFG-parallel a rank sees all even
    or all odd ones): every piece of state is per branch.
    """

    def __init__(
        self,
        *,
        mode: TaskMode,
        steps: int,
        split: int,
        mag: Sequence[float],
        params: MagCacheParams,
        low_start: int | None = None,
    ) -> None:
        _check_mode(mode)
        _check_steps(steps)
        if len(mag) != 2 * steps:
            raise ValueError(f"magnitude ratios have {len(mag)} values but {steps} steps need {2 * steps}; "
                             "interpolate them with magcache.ratios.mag_ratios")
        if not 0 <= split <= 2 * steps or split % 2:
            raise ValueError(f"split {split} must be an even forward index in 0..{2 * steps}")
        self.mode: TaskMode = mode
        self.steps = steps
        self.total = 2 * steps
        self.split = split
        self.mag = tuple(float(m) for m in mag)
        self.params = params
        self.low_start = low_start if params.reset_at_switch else None
        self._state = [_BranchState(), _BranchState()]

    def reset(self) -> None:
        """Forget everything: a new video starts (upstream resets when `cnt` reaches 2*steps)."""
        self._state = [_BranchState(), _BranchState()]

    def retained(self, index: int) -> bool:
        return is_retained(self.mode, index, self.total, self.split, self.params.retention_ratio)

    def propose(self, index: int) -> Proposal:
        """Evaluate the rule at `index` without changing any state."""
        state, fresh = self._effective_state(index)
        if self.retained(index):
            return Proposal(retained=True, may_skip=False, fresh=fresh)
        ratio, steps, err = self._accumulate(state, index)
        if steps > self.params.K or not state.has_residual:
            return Proposal(retained=False, may_skip=False, fresh=fresh)
        return Proposal(retained=False, may_skip=err < self.params.thresh, fresh=fresh, err=err)

    def commit(self, index: int, skip: bool) -> Proposal:
        """Apply the group's decision; a compute where we proposed a skip resets like upstream."""
        proposal = self.propose(index)
        if skip and not proposal.may_skip:
            raise ValueError(f"forward {index}: the group skipped although this rank could not; "
                             "the sync callable must return the MIN over ranks")
        state, _ = self._effective_state(index)
        if skip:
            state.ratio, state.steps, state.err = self._accumulate(state, index)
        else:
            if not proposal.retained:
                state.ratio, state.steps, state.err = 1.0, 0, 0.0
            state.has_residual = True
        state.last_index = index
        self._state[index % 2] = state
        return proposal

    def _accumulate(self, state: _BranchState, index: int) -> tuple[float, int, float]:
        ratio = state.ratio * self.mag[index]
        return ratio, state.steps + 1, state.err + abs(1 - ratio)

    def _effective_state(self, index: int) -> tuple[_BranchState, bool]:
        """A copy of this branch's state as seen at `index` (fresh when crossing the switch)."""
        if not 0 <= index < self.total:
            raise ValueError(f"forward index {index} is outside 0..{self.total - 1} for {self.steps} steps")
        current = self._state[index % 2]
        if index <= current.last_index:
            raise ValueError(f"forward index {index} repeats or goes back after {current.last_index}; "
                             "call reset() between videos")
        if self.low_start is not None and current.last_index < self.low_start <= index:
            return _BranchState(), True
        return _BranchState(current.ratio, current.err, current.steps, current.has_residual,
                            current.last_index), False


def build_schedule(
    mode: TaskMode,
    steps: int,
    shift: float,
    boundary: float | None,
    params: MagCacheParams,
    mag: Sequence[float],
    scheduler_timesteps: Sequence[int] | None = None,
) -> MagCacheSchedule:
    """The schedule for one run: split per `params.split_mode`, switch from the real timesteps."""
    split = split_forwards(mode, steps, shift, boundary, params.split_mode, scheduler_timesteps)
    low_start = None
    if params.reset_at_switch and mode != "ti2v":
        if scheduler_timesteps is None:
            raise ValueError("--magcache-reset-at-switch needs the scheduler timesteps to find the expert switch")
        low_start = low_expert_start(mode, steps, boundary, scheduler_timesteps)
    return MagCacheSchedule(mode=mode, steps=steps, split=split, mag=mag, params=params, low_start=low_start)


def _checked_timesteps(timesteps: Sequence[int] | None, steps: int) -> Sequence[int]:
    if timesteps is None:
        raise ValueError("split mode 'scheduler' needs the scheduler timesteps; pass the pipeline's timesteps")
    if len(timesteps) != steps:
        raise ValueError(f"got {len(timesteps)} scheduler timesteps for {steps} steps; pass one per step")
    return timesteps


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampling steps must be an integer >= 1, got {steps!r}")


def _check_mode(mode: str) -> None:
    if mode not in TASK_MODES:
        raise ValueError(f"task mode must be one of {', '.join(TASK_MODES)}, got {mode!r}")
