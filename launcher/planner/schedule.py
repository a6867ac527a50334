"""Turn launcher flags into MagCache's inputs: one set-up per request (ratio table, timesteps, params).

`plan`, the runner and the manifest all take the one `MagCacheSetup` made from a frozen `Sampling`
record, so the schedule `plan` prints is, by construction, the one a generation executes; that
includes the threshold --magcache-target-speedup chooses, which depends only on the ratio table
and the schedule flags.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from magcache.plan import Plan, plan
from magcache.ratios import RatioTable, bundled_table, load_ratio_file, table_key, table_warnings
from magcache.schedule import MagCacheParams, MagCacheSchedule, build_schedule
from magcache.target import TargetOutOfReach, TargetResult, floor_2dp, threshold_for_speedup

from launcher.config import (
    MagCacheOptions,
    RunConfig,
    cond_only_experts,
    parse_guide_scale,
    parse_loras,
    parse_timesteps,
    resolve_sampling,
    with_defaults,
)
from launcher.errors import UsageError
from launcher.wan.tasks import TaskSpec


@dataclass(frozen=True, slots=True)
class Sampling:
    """What fixes one run's MagCache schedule, from a RunConfig or `plan`'s flags: the one record
    the set-up is made from (hashable, so equal requests share one set-up)."""

    task: TaskSpec
    steps: int
    shift: float
    solver: str
    #: euler's base timesteps (--timesteps); None: the solver's own
    timesteps: tuple[float, ...] | None
    #: an image conditions the run (ti2v-5B's image table)
    with_image: bool
    #: experts at guidance 1, whose steps run one forward (`RunConfig.cond_only_experts`)
    cond_only: tuple[str, ...]
    #: the MagCache options; for a target run the threshold is the set-up's output, so it is None here
    options: MagCacheOptions
    #: the LoRAs' labels, for the "table made elsewhere" warning
    loras: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: RunConfig) -> Sampling:
        mc = config.magcache
        options = replace(mc, enabled=True, calibration=False,
                          thresh=None if mc.target_speedup is not None else mc.thresh)
        return cls(task=config.task, steps=config.sample_steps, shift=config.sample_shift, solver=config.sample_solver,
                   timesteps=config.timesteps, with_image=config.uses_image and config.task.image != "none",
                   cond_only=config.cond_only_experts, options=options, loras=tuple(s.label for s in config.loras))

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> Sampling:
        """`plan`'s record: the schedule flags alone (no prompt, checkpoint or output needed), the
        cached schedule whether or not --use_magcache is given."""
        spec, steps, shift, solver = resolve_sampling(flags)
        f = with_defaults(flags)  # with a --distilled preset's solver, steps, shift and guidance
        options = MagCacheOptions.from_flags(f, enabled=True)
        return cls(task=spec, steps=steps, shift=shift, solver=solver, timesteps=parse_timesteps(f["timesteps"]),
                   with_image=f["image"] is not None and spec.image != "none",
                   # guidance 1 runs one forward per step of that expert: the plan has no uncond forward there
                   cond_only=cond_only_experts(spec, parse_guide_scale(f["sample_guide_scale"], spec)),
                   options=options, loras=tuple(s.label for s in parse_loras(f, spec, check_paths=False)))


@dataclass(frozen=True, slots=True)
class MagCacheSetup:
    """One run's MagCache, set up once: the ratio table (read once), the scheduler timesteps
    (computed once), the threshold (chosen once for a target), the params (validated once) and the
    plan. `plan` prints `plan`, the runner follows `schedule()`, the manifest records `table`."""

    sampling: Sampling
    table: RatioTable
    #: the timesteps the pipeline's scheduler will produce (Euler's truncated: the expert switch
    #: compares them with whole numbers)
    scheduler_timesteps: tuple[int, ...]
    #: the options with the threshold that runs
    options: MagCacheOptions
    params: MagCacheParams
    #: the --magcache-target-speedup search's result (None without a target)
    target: TargetResult | None
    #: the forward-by-forward plan at `params`, with the table's warnings
    plan: Plan

    def plan_at(self, thresh: float) -> Plan:
        """The plan this set-up gives at another threshold (what the target search walks)."""
        return _plan_at(self.sampling, self.table, self.scheduler_timesteps, thresh)

    def schedule(self) -> MagCacheSchedule:
        """A fresh schedule (per video state) for the runner: the plan's rule, forward by forward."""
        s = self.sampling
        return build_schedule(s.task.mode, s.steps, s.shift, s.task.boundary, self.params, self.table.mag(s.steps),
                              self.scheduler_timesteps)


def _params(options: MagCacheOptions, thresh: float) -> MagCacheParams:
    return MagCacheParams(thresh=thresh, K=options.K, retention_ratio=options.retention_ratio,
                          split_mode=options.split, reset_at_switch=options.reset_at_switch)


def _plan_at(s: Sampling, table: RatioTable, ts: tuple[int, ...], thresh: float) -> Plan:
    return plan(s.task.mode, s.steps, s.shift, s.task.boundary, _params(s.options, thresh), table.mag(s.steps), ts,
                s.task.experts, calibrated_steps=table.sample_steps, cond_only=s.cond_only)


def ratio_table(task: TaskSpec, *, with_image: bool, options: MagCacheOptions) -> RatioTable:
    """The calibrated file when given (checked against the task), else the bundled table."""
    if options.ratios_file is not None:
        return load_ratio_file(options.ratios_file, task=task.name)
    return bundled_table(table_key(task.name, with_image))


def scheduler_timesteps(solver: str, steps: int, shift: float,
                        timesteps: tuple[float, ...] | None = None) -> tuple[int, ...]:
    """The timesteps the pipeline's scheduler will produce, computed without building it."""
    from launcher.wan.solvers import official_timesteps

    return tuple(int(t) for t in official_timesteps(solver, steps, shift, timesteps))


@lru_cache(maxsize=64)
def magcache_setup(sampling: Sampling) -> MagCacheSetup:
    """The set-up for this sampling record, made once per distinct record in a process (a batch's
    items and a server's requests mostly share one; a target search builds a few dozen plans).

    An unreachable --magcache-target-speedup is a UsageError naming the maximum, raised from flags
    and the ratio table alone, before any weight is loaded.
    """
    s, options = sampling, sampling.options
    table = ratio_table(s.task, with_image=s.with_image, options=options)
    ts = scheduler_timesteps(s.solver, s.steps, s.shift, s.timesteps)

    def build(thresh: float) -> Plan:
        return _plan_at(s, table, ts, thresh)

    target = None
    if options.target_speedup is not None:
        try:
            target = threshold_for_speedup(build, options.target_speedup)
        except TargetOutOfReach as e:
            hint = "raise --magcache_K or lower --retention_ratio" if options.retention_ratio > 0 else "raise --magcache_K"
            raise UsageError(
                f"--magcache-target-speedup {options.target_speedup} is out of reach for {s.task.name} at {s.steps} "
                f"steps with K {options.K}, retention {options.retention_ratio}: at most {floor_2dp(e.max_speedup)}x; "
                f"{hint}") from None
        options = replace(options, thresh=target.thresh)
    assert options.thresh is not None
    the_plan = build(options.thresh)
    made_elsewhere = table_warnings(table, shift=s.shift, solver=s.solver, loras=s.loras)
    if made_elsewhere:
        the_plan = replace(the_plan, warnings=the_plan.warnings + tuple(made_elsewhere))
    return MagCacheSetup(sampling=s, table=table, scheduler_timesteps=ts, options=options,
                         params=the_plan.params, target=target, plan=the_plan)


def resolve_config(config: RunConfig) -> RunConfig:
    """The run's config with its threshold chosen (a no-op without a target or once resolved).

    `generate` and every `batch` item go through here before the checkpoint is touched, so the
    manifest records the threshold that ran and a bad target exits 2 without loading a weight.
    """
    mc = config.magcache
    if mc.target_speedup is None or mc.thresh is not None:
        return config
    return replace(config, magcache=replace(mc, thresh=magcache_setup(Sampling.of(config)).options.thresh))


def plan_to_json(setup: MagCacheSetup, *, extra_warnings: tuple[str, ...] = ()) -> dict:
    """`plan --json`: the task and run settings by their CLI names, the threshold and where it came
    from (with the target search's breakpoint and maximum), then the schedule itself."""
    s, table, target = setup.sampling, setup.table, setup.target
    the_plan = replace(setup.plan, warnings=(*setup.plan.warnings, *extra_warnings))
    return {
        "task": s.task.name,
        "sample_steps": the_plan.steps,
        "sample_shift": the_plan.shift,
        "sample_solver": s.solver,
        "ratio_table": {"key": table.key, "source": table.source, "sample_steps": table.sample_steps},
        "target_speedup": setup.options.target_speedup,
        "thresh": the_plan.params.thresh,
        "thresh_from": setup.options.thresh_from,
        "target_search": None if target is None else {"breakpoint": target.breakpoint,
                                                      "max_forward_speedup": target.max_speedup},
        **the_plan.to_json(),
    }
