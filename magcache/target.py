"""Choose the MagCache threshold from a wanted forward-count speedup, exactly.

A plan depends on its threshold only through the comparisons `err < thresh` the rule makes
(`Plan.compared_errors`), so the speedup is a step function of the threshold: constant on
intervals `(a, b]` whose ends are accumulated-error values, changing just above each end.
`plateaus` walks those intervals in increasing threshold order, one plan per interval, with
no tolerance: from a threshold `t`, the plan stays the same up to and including the smallest
compared error `>= t`, and the next interval starts at the float just above it.

The speedup is not monotone in the threshold in every case (an early skip moves where K ends a
run of skips, and later a costlier forward can no longer skip), so the search does not bisect:
it takes the first interval, in threshold order, whose speedup reaches the target. Walking
every interval costs a few dozen plans (about 25 ms for 50 steps), so the reachable maximum is
the true maximum over all thresholds, not an assumption.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, localcontext
from typing import Protocol, TypeVar

#: how far above the exact breakpoint the returned threshold may lie, so it can be a short decimal
READABLE_SLACK = 1e-6


class ThresholdPlan(Protocol):
    """What the search reads from a plan (`magcache.plan.Plan` is one)."""

    @property
    def forward_speedup(self) -> float: ...

    @property
    def compared_errors(self) -> Sequence[float]: ...


P = TypeVar("P", bound=ThresholdPlan)


class TargetOutOfReach(ValueError):
    """No threshold gives the wanted speedup: K and the retention windows cap the skips."""

    def __init__(self, target: float, max_speedup: float) -> None:
        super().__init__(f"forward-count speedup {target} is out of reach: at most {floor_2dp(max_speedup)}x")
        self.target = target
        self.max_speedup = max_speedup


@dataclass(frozen=True, slots=True)
class Plateau:
    """Every threshold `t` with `above < t <= upto` gives one plan, the one `plateaus` yields
    beside this (`above` None: from 0 inclusive; `upto` None: without bound)."""

    above: float | None
    upto: float | None
    speedup: float


@dataclass(frozen=True, slots=True)
class TargetResult:
    """The chosen threshold for a wanted speedup, and what it and any threshold can give."""

    #: the wanted forward-count speedup (forwards / computed forwards)
    target: float
    #: the threshold to run with: the shortest decimal within READABLE_SLACK above `breakpoint`
    #: that gives the same plan, so it survives JSON and the command line unchanged
    thresh: float
    #: the accumulated error the threshold has to exceed; thresholds up to and including it do
    #: not reach the target (None: threshold 0 already does)
    breakpoint: float | None
    #: the speedup the plan at `thresh` gives (>= target)
    speedup: float
    #: the largest speedup any threshold gives
    max_speedup: float


def plateaus(build: Callable[[float], P]) -> Iterator[tuple[Plateau, P]]:
    """The threshold intervals with one plan each, from threshold 0 up to the unbounded one.

    `build(thresh)` makes the plan for one threshold, all else fixed. The last interval has
    `upto=None`: above every error the rule can compare, it is the unbounded threshold's plan.
    """
    thresh, above = 0.0, None
    while True:
        the_plan = build(thresh)
        ahead = [e for e in the_plan.compared_errors if e >= thresh]
        upto = min(ahead) if ahead else None
        yield Plateau(above=above, upto=upto, speedup=the_plan.forward_speedup), the_plan
        if upto is None:
            return
        above, thresh = upto, math.nextafter(upto, math.inf)


def check_target(target: float) -> None:
    """A speedup below 1 (or not a finite number) asks for nothing a threshold can give."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) \
            or target < 1:
        raise ValueError(f"target speedup must be a finite number >= 1, got {target!r}")


def threshold_for_speedup(build: Callable[[float], ThresholdPlan], target: float) -> TargetResult:
    """The smallest threshold whose plan's `forward_speedup` is >= `target`.

    Exact: the first plateau (in threshold order) that reaches the target starts just above its
    `above` breakpoint, and no threshold at or below that breakpoint reaches it. Raises
    TargetOutOfReach, carrying the maximum, when no threshold does.
    """
    check_target(target)
    found: tuple[Plateau, float] | None = None
    best = 0.0
    for plateau, _plan in plateaus(build):
        best = max(best, plateau.speedup)
        if found is None and plateau.speedup >= target:
            found = plateau, _readable(plateau)
    if found is None:
        raise TargetOutOfReach(target, best)
    plateau, thresh = found
    return TargetResult(target=target, thresh=thresh, breakpoint=plateau.above, speedup=plateau.speedup,
                        max_speedup=best)


def max_speedup(build: Callable[[float], ThresholdPlan]) -> float:
    """The largest forward-count speedup any threshold gives."""
    return max(plateau.speedup for plateau, _plan in plateaus(build))


def _readable(plateau: Plateau) -> float:
    """A threshold inside the plateau, at most READABLE_SLACK above its start, with fewest decimals."""
    if plateau.above is None:
        return 0.0
    high = plateau.above + READABLE_SLACK
    if plateau.upto is not None:
        high = min(high, plateau.upto)
    return shortest_decimal_above(plateau.above, high)


def shortest_decimal_above(low: float, high: float) -> float:
    """The float with the fewest decimal places in `(low, high]`; the float after `low` if none is
    shorter. `float(repr(x)) == x`, so what is printed is what runs."""
    exact = Decimal(low)  # the binary value exactly
    with localcontext() as ctx:
        ctx.prec = 80
        for places in range(0, 25):
            quantum = Decimal(1).scaleb(-places)
            value = float((exact // quantum + 1) * quantum)  # the first multiple of 10^-places above low
            if low < value <= high:
                return value
    return math.nextafter(low, math.inf)


def floor_2dp(speedup: float) -> str:
    """`speedup` rounded down to 2 decimals of its shortest repr (2.01 stays "2.01"), for "at most
    ...x" messages that must never overstate what is reachable."""
    return str(Decimal(repr(speedup)).quantize(Decimal("0.01"), rounding=ROUND_FLOOR))
