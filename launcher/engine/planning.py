"""Turn launcher flags into MagCache's inputs: ratio table, params, real timesteps.

`plan` and `generate` both go through here, so the schedule `plan` prints is, by construction,
the one a generation executes; that includes the threshold --magcache-target-speedup chooses
(`resolve_target`), which depends only on the ratio table and the schedule flags.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from magcache.plan import Plan, plan
from magcache.ratios import RatioTable, bundled_table, load_ratio_file, table_key, table_warnings
from magcache.schedule import MagCacheParams, MagCacheSchedule, build_schedule
from magcache.target import TargetOutOfReach, TargetResult, floor_2dp, threshold_for_speedup

from launcher.config import MagCacheOptions, RunConfig, SplitMode, UsageError
from launcher.wan.tasks import TASKS, TaskSpec


def magcache_params(options: MagCacheOptions, thresh: float | None = None) -> MagCacheParams:
    """The algorithm's params; `thresh` overrides the options' (the target search tries many)."""
    thresh = options.thresh if thresh is None else thresh
    if thresh is None:
        raise ValueError("the MagCache threshold is still to be chosen from --magcache-target-speedup; "
                         "resolve the options first (resolve_target)")
    return MagCacheParams(
        thresh=thresh,
        K=options.K,
        retention_ratio=options.retention_ratio,
        split_mode=options.split,
        reset_at_switch=options.reset_at_switch,
    )


def ratio_table(task: TaskSpec, *, with_image: bool, options: MagCacheOptions) -> RatioTable:
    """The calibrated file when given (checked against the task), else the bundled table."""
    if options.ratios_file is not None:
        return load_ratio_file(options.ratios_file, task=task.name)
    return bundled_table(table_key(task.name, with_image))


def scheduler_timesteps(solver: str, steps: int, shift: float,
                        timesteps: tuple[float, ...] | None = None) -> list[int]:
    """The timesteps the pipeline's scheduler will produce, computed without building it (Euler's
    float timesteps truncated: the expert switch compares them with whole numbers)."""
    from launcher.wan.solvers import official_timesteps

    return [int(t) for t in official_timesteps(solver, steps, shift, timesteps)]


def plan_builder(
    spec: TaskSpec, *, steps: int, shift: float, solver: str, with_image: bool, options: MagCacheOptions,
    table: RatioTable | None = None, cond_only: tuple[str, ...] = (), timesteps: tuple[float, ...] | None = None,
) -> Callable[[float], Plan]:
    """`thresh -> Plan` with everything else fixed (table, timesteps, K, retention, split, reset);
    `table`: the ratio table when the caller already read it; `cond_only`: experts run at guidance 1
    (one forward per step, `RunConfig.cond_only_experts`)."""
    if table is None:
        table = ratio_table(spec, with_image=with_image and spec.image != "none", options=options)
    mag, ts = table.mag(steps), scheduler_timesteps(solver, steps, shift, timesteps)

    def build(thresh: float) -> Plan:
        return plan(spec.mode, steps, shift, spec.boundary, magcache_params(options, thresh), mag, ts,
                    spec.experts, calibrated_steps=table.sample_steps, cond_only=cond_only)

    return build


def resolve_target(
    spec: TaskSpec, *, steps: int, shift: float, solver: str, with_image: bool, options: MagCacheOptions,
    cond_only: tuple[str, ...] = (), timesteps: tuple[float, ...] | None = None,
) -> tuple[MagCacheOptions, TargetResult | None]:
    """Options with the threshold --magcache-target-speedup asks for, and the search's result.

    Without a target: the options unchanged and None. An unreachable target is a UsageError
    naming the maximum, raised from flags and ratio table alone, before any weight is loaded.
    """
    if options.target_speedup is None:
        return options, None
    build = plan_builder(spec, steps=steps, shift=shift, solver=solver, with_image=with_image, options=options,
                         cond_only=cond_only, timesteps=timesteps)
    try:
        result = threshold_for_speedup(build, options.target_speedup)
    except TargetOutOfReach as e:
        hint = "raise --magcache_K or lower --retention_ratio" if options.retention_ratio > 0 else "raise --magcache_K"
        raise UsageError(
            f"--magcache-target-speedup {options.target_speedup} is out of reach for {spec.name} at {steps} steps "
            f"with K {options.K}, retention {options.retention_ratio}: at most {floor_2dp(e.max_speedup)}x; {hint}"
        ) from None
    return replace(options, thresh=result.thresh), result


def resolve_config(config: RunConfig) -> RunConfig:
    """The run's config with its threshold chosen (a no-op without a target or once resolved).

    `generate` and every `batch` item go through here before the checkpoint is touched, so the
    manifest records the threshold that ran and a bad target exits 2 without loading a weight.
    """
    mc = config.magcache
    if mc.target_speedup is None or mc.thresh is not None:
        return config
    thresh = _target_thresh(config.task.name, config.sample_steps, config.sample_shift, config.sample_solver,
                            config.uses_image, mc.K, mc.retention_ratio, mc.split, mc.reset_at_switch,
                            None if mc.ratios_file is None else str(mc.ratios_file), mc.target_speedup,
                            config.cond_only_experts, config.timesteps)
    return replace(config, magcache=replace(mc, thresh=thresh))


@lru_cache(maxsize=64)
def _target_thresh(task: str, steps: int, shift: float, solver: str, with_image: bool, K: int, retention: float,
                   split: SplitMode, reset: bool, ratios_file: str | None, target: float,
                   cond_only: tuple[str, ...] = (), timesteps: tuple[float, ...] | None = None) -> float:
    """resolve_target's threshold, once per distinct setting: a batch's items mostly share one,
    and each search builds a few dozen plans (~30 ms)."""
    options = MagCacheOptions(enabled=True, thresh=None, K=K, retention_ratio=retention, split=split,
                              reset_at_switch=reset, ratios_file=None if ratios_file is None else Path(ratios_file),
                              target_speedup=target)
    resolved, _ = resolve_target(TASKS[task], steps=steps, shift=shift, solver=solver, with_image=with_image,
                                 options=options, cond_only=cond_only, timesteps=timesteps)
    assert resolved.thresh is not None
    return resolved.thresh


def _resolved(spec: TaskSpec, *, steps: int, shift: float, solver: str, with_image: bool,
              options: MagCacheOptions, cond_only: tuple[str, ...] = (),
              timesteps: tuple[float, ...] | None = None) -> MagCacheOptions:
    if options.thresh is not None:
        return options
    return resolve_target(spec, steps=steps, shift=shift, solver=solver, with_image=with_image, options=options,
                          cond_only=cond_only, timesteps=timesteps)[0]


def make_schedule(
    task: TaskSpec, *, steps: int, shift: float, solver: str, with_image: bool, options: MagCacheOptions,
    timesteps: tuple[float, ...] | None = None, cond_only: tuple[str, ...] = (),
) -> tuple[MagCacheSchedule, RatioTable]:
    options = _resolved(task, steps=steps, shift=shift, solver=solver, with_image=with_image, options=options,
                        cond_only=cond_only, timesteps=timesteps)
    table = ratio_table(task, with_image=with_image, options=options)
    schedule = build_schedule(
        task.mode, steps, shift, task.boundary, magcache_params(options), table.mag(steps),
        scheduler_timesteps(solver, steps, shift, timesteps),
    )
    return schedule, table


def make_plan(
    *, task: str, steps: int, shift: float, solver: str, with_image: bool, options: MagCacheOptions,
    cond_only: tuple[str, ...] = (), timesteps: tuple[float, ...] | None = None, loras: tuple[str, ...] = (),
) -> Plan:
    """The MagCache schedule, forward by forward, for resolved settings (`config.resolve_sampling`);
    a threshold still to be chosen from --magcache-target-speedup is chosen here. `cond_only`: the
    experts at guidance 1, whose steps run one forward."""
    spec = TASKS[task]
    options = _resolved(spec, steps=steps, shift=shift, solver=solver, with_image=with_image, options=options,
                        cond_only=cond_only, timesteps=timesteps)
    assert options.thresh is not None
    table = ratio_table(spec, with_image=with_image and spec.image != "none", options=options)
    the_plan = plan_builder(spec, steps=steps, shift=shift, solver=solver, with_image=with_image, options=options,
                            table=table, cond_only=cond_only, timesteps=timesteps)(options.thresh)
    made_elsewhere = table_warnings(table, shift=shift, solver=solver, loras=loras)
    return replace(the_plan, warnings=the_plan.warnings + tuple(made_elsewhere)) if made_elsewhere else the_plan


def plan_to_json(the_plan: Plan, *, task: str, solver: str, options: MagCacheOptions, with_image: bool,
                 target: TargetResult | None = None) -> dict:
    """`plan --json`: the task and run settings by their CLI names, the threshold and where it came
    from (with the target search's breakpoint and maximum), then the schedule itself."""
    spec = TASKS[task]
    table = ratio_table(spec, with_image=with_image and spec.image != "none", options=options)
    return {
        "task": task,
        "sample_steps": the_plan.steps,
        "sample_shift": the_plan.shift,
        "sample_solver": solver,
        "ratio_table": {"key": table.key, "source": table.source, "sample_steps": table.sample_steps},
        "target_speedup": options.target_speedup,
        "thresh": the_plan.params.thresh,
        "thresh_from": options.thresh_from,
        "target_search": None if target is None else {"breakpoint": target.breakpoint,
                                                      "max_forward_speedup": target.max_speedup},
        **the_plan.to_json(),
    }
