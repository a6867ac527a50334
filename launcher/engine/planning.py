"""Turn launcher flags into MagCache's inputs: ratio table, params, real timesteps.

`plan` and `generate` both go through here, so the schedule `plan` prints is, by construction,
the one a generation executes.
"""
from __future__ import annotations

from magcache.plan import Plan, plan
from magcache.ratios import RatioTable, bundled_table, load_ratio_file, table_key
from magcache.schedule import MagCacheParams, MagCacheSchedule, build_schedule

from launcher.config import MagCacheOptions
from launcher.wan.tasks import TASKS, TaskSpec


def magcache_params(options: MagCacheOptions) -> MagCacheParams:
    return MagCacheParams(
        thresh=options.thresh,
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


def scheduler_timesteps(solver: str, steps: int, shift: float) -> list[int]:
    """The timesteps the pipeline's scheduler will produce, computed without building it."""
    from launcher.wan.solvers import official_timesteps

    return [int(t) for t in official_timesteps(solver, steps, shift)]


def make_schedule(
    task: TaskSpec, *, steps: int, shift: float, solver: str, with_image: bool, options: MagCacheOptions
) -> tuple[MagCacheSchedule, RatioTable]:
    table = ratio_table(task, with_image=with_image, options=options)
    timesteps = scheduler_timesteps(solver, steps, shift)
    schedule = build_schedule(
        task.mode, steps, shift, task.boundary, magcache_params(options), table.mag(steps), timesteps
    )
    return schedule, table


def make_plan(
    *, task: str, steps: int, shift: float, solver: str, with_image: bool, options: MagCacheOptions
) -> Plan:
    """The MagCache schedule, forward by forward, for resolved settings (`config.resolve_sampling`)."""
    spec = TASKS[task]
    table = ratio_table(spec, with_image=with_image and spec.image != "none", options=options)
    return plan(
        spec.mode, steps, shift, spec.boundary, magcache_params(options), table.mag(steps),
        scheduler_timesteps(solver, steps, shift), spec.experts, calibrated_steps=table.sample_steps,
    )


def plan_to_json(the_plan: Plan, *, task: str, solver: str, options: MagCacheOptions, with_image: bool) -> dict:
    """`plan --json`: the task and run settings by their CLI names, then the schedule itself."""
    spec = TASKS[task]
    table = ratio_table(spec, with_image=with_image and spec.image != "none", options=options)
    return {
        "task": task,
        "sample_steps": the_plan.steps,
        "sample_shift": the_plan.shift,
        "sample_solver": solver,
        "ratio_table": {"key": table.key, "source": table.source, "sample_steps": table.sample_steps},
        **the_plan.to_json(),
    }
