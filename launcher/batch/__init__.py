"""`magcache-launch batch`: many prompts, one model load, resumable, spread over data-parallel groups.

Fixed order, the same on every rank: read and check the prompt file and flags (exit 2, nothing
loaded) -> inspect the checkpoint -> the World (`open_world`) -> global rank 0 settles each item (invalid, already
done, or to generate with its seed) and every rank takes that one plan, so ranks never disagree
on what to run -> each dp group generates its share (all its ranks call `session.generate`, its
output rank writes) -> rank 0 gathers every group's results, writes the summary, prints the table.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.batch.items import BatchItem, parse_shard, read_items, summary_name, take_shard
from launcher.batch.results import ItemResult, one_line, print_table, verified_manifest, write_summary
from launcher.config import RunConfig, check_output_location, draw_seed, item_config, with_defaults
from launcher.errors import InputError, UsageError

if TYPE_CHECKING:
    from launcher.engine.lifecycle import Engine

EXIT_SOME_FAILED = 3


@dataclass(slots=True)
class BatchPlan:
    """Rank 0's decision for every item of this shard; broadcast so all ranks run the same work."""

    settled: list[ItemResult]  # invalid (failed) or verified done (skipped)
    todo: list[tuple[int, int]]  # (item index, seed), in file order


def _fixed_seed(item: BatchItem, flags: dict[str, Any]) -> int | None:
    """The item's seed, else --base_seed; None when that is negative (drawn by rank 0)."""
    seed = item.seed if item.seed is not None else int(with_defaults(flags)["base_seed"])
    return seed if seed >= 0 else None


def resolved_item_config(flags: dict[str, Any], item: BatchItem, out_dir: Path) -> RunConfig:
    """The item's own config, its threshold resolved (a ti2v-5B item with an image reads the image
    table), so the resume check compares the threshold the manifest recorded."""
    from launcher.planner.schedule import resolve_config

    return resolve_config(item_config(flags, item.overrides(), seed=_fixed_seed(item, flags),
                                         video=out_dir / f"{item.stem}.mp4"))


def _row(item: BatchItem, seed: int | None, **kw: Any) -> ItemResult:
    return ItemResult(index=item.index, name=item.stem, line=item.line, prompt=item.prompt, seed=seed, **kw)


def plan_batch(items: list[BatchItem], configs: dict[int, RunConfig | str], flags: dict[str, Any],
              *, force: bool) -> BatchPlan:
    """Invalid items fail, verified ones are skipped (unless --force), the rest get their seed."""
    plan = BatchPlan(settled=[], todo=[])
    for item in items:
        config, fixed = configs[item.index], _fixed_seed(item, flags)
        if isinstance(config, str):
            plan.settled.append(_row(item, fixed, status="failed", error=config))
            continue
        t0 = time.perf_counter()
        manifest = None if force else verified_manifest(config, fixed)
        if manifest is not None and config.save_file is not None:
            plan.settled.append(ItemResult.from_manifest(_row(item, fixed, status="skipped"), manifest,
                                                         config.save_file, time.perf_counter() - t0, "skipped"))
            continue
        if config.save_file is not None:
            _remove_stale_temps(config.save_file)
        plan.todo.append((item.index, fixed if fixed is not None else draw_seed(-1)))
    return plan


def _remove_stale_temps(video: Path) -> None:
    """Temp files a killed run left for this item (`video.atomic_path` names): they are never renamed."""
    for pattern in (f".{video.name}.*.tmp.mp4", f".{video.with_suffix('.json').name}.*.tmp.json"):
        for stale in video.parent.glob(pattern):
            stale.unlink(missing_ok=True)


def _generate_share(plan: BatchPlan, items: dict[int, BatchItem], configs: dict[int, RunConfig | str],
                    engine: Engine, prompts_file: Path, *, warm_up: bool = False) -> list[ItemResult]:
    """This dp group's items (the k-th item to generate goes to group k % dp_size).

    `warm_up`: first an untimed 2-step denoise without decode, so the first item's timings are
    not the process's first-use costs (allocator, kernel selection) when items' times are compared.
    """
    from rich.markup import escape

    from launcher.outputs.report import console, warn_once

    world = engine.world
    mine = [(i, s) for k, (i, s) in enumerate(plan.todo) if k % world.dp_size == world.dp_rank]
    if not mine:
        return []
    first = configs[mine[0][0]]
    assert isinstance(first, RunConfig)
    session = engine.session()
    engine.at("while generating")
    if world.is_output_rank:  # said once each with a count, not once per item
        warn_once([session.warnings_for(configs[i]) for i, _ in mine])  # type: ignore[arg-type]
    if warm_up:
        from launcher.outputs.files import Outputs

        session.generate(replace(first, sample_steps=min(2, first.sample_steps)), mine[0][1], Outputs(video=None),
                         decode=False, quiet=True)
    results: list[ItemResult] = []
    for n, (index, seed) in enumerate(mine, start=1):
        item, config = items[index], replace(configs[index], base_seed=seed)  # type: ignore[type-var]
        t0 = time.perf_counter()
        try:
            result = _run_item(session, item, config, seed, world.dp_rank, prompts_file)
        except Exception as exc:
            if world.world_size > 1:
                raise  # the group's ranks may now disagree on where they are: end the job, rerun resumes
            result = _row(item, seed, status="failed", error=one_line(exc), dp_group=world.dp_rank,
                          seconds=round(time.perf_counter() - t0, 3))
        if result is not None and world.is_output_rank:
            results.append(result)
            error = f": {escape(result.error)}" if result.error else ""
            console.print(f"dp group {world.dp_rank}: item {n}/{len(mine)} [bold]{item.stem}[/] {result.status} "
                          f"in {result.seconds:.1f}s{error}", highlight=False)
    return results


def _run_item(session: Any, item: BatchItem, config: RunConfig, seed: int, dp_group: int,
              prompts_file: Path) -> ItemResult | None:
    """Generate one item; on the group's output rank write its manifest (after the video) and report."""
    from launcher.outputs.files import Outputs
    from launcher.outputs.atomic import manifest_path_for, write_json

    assert config.save_file is not None
    t0 = time.perf_counter()
    manifest = session.generate(config, seed, Outputs(video=config.save_file), quiet=True)
    if manifest is None:
        return None  # not the group's output rank
    manifest["batch"] = {"prompts_file": str(prompts_file), "index": item.index, "line": item.line,
                         "name": item.stem, "dp_group": dp_group}
    write_json(manifest_path_for(config.save_file), manifest)
    return ItemResult.from_manifest(_row(item, seed, status="ok"), manifest, config.save_file,
                                    time.perf_counter() - t0, "ok", dp_group=dp_group)


def _merge(plan: BatchPlan, parts: list[list[ItemResult]], items: dict[int, BatchItem]) -> list[ItemResult]:
    """Settled items plus every group's results, in file order; an item no group reported fails."""
    merged: dict[int, ItemResult] = {r.index: r for r in plan.settled}
    for part in parts:
        for r in part:
            merged.setdefault(r.index, r)
    for index, seed in plan.todo:
        if index not in merged:
            merged[index] = _row(items[index], seed, status="failed", error="no result from its dp group")
    return sorted(merged.values(), key=lambda r: r.index)


def _announce(plan: BatchPlan, label: str, dp_size: int) -> None:
    from launcher.outputs.report import console

    done = sum(r.status == "skipped" for r in plan.settled)
    invalid = sum(r.status == "failed" for r in plan.settled)
    console.print(f"{label}: {len(plan.todo)} to generate on {dp_size} dp group(s), "
                  f"{done} already done, {invalid} invalid", highlight=False)


def generate_items(engine: Engine, items: list[BatchItem], configs: dict[int, RunConfig | str], flags: dict[str, Any],
                   *, force: bool, prompts_file: Path, label: str, warm_up: bool = False) -> list[ItemResult]:
    """Every rank: settle, spread over the dp groups, generate, gather. The results, on every rank.

    `batch` and `sweep` both run their items through here (one model load per dp group).
    """
    world = engine.world
    engine.at("while settling the items")
    plan = world.all_gather_object(plan_batch(items, configs, flags, force=force) if world.rank == 0 else None)[0]
    if world.rank == 0:
        _announce(plan, label, world.dp_size)
    by_index = {item.index: item for item in items}
    local = _generate_share(plan, by_index, configs, engine, prompts_file, warm_up=warm_up)
    engine.at("while gathering the results")
    return _merge(plan, world.all_gather_object(local, patient=True), by_index)


def prepare_out_dir(out_dir: Path) -> None:
    check_output_location(out_dir, "--out-dir", directory=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out-dir {out_dir}: cannot create it ({e.strerror})") from None


def run_batch(*, prompts_file: Path, out_dir: Path, force: bool, shard: str | None, flags: dict[str, Any]) -> int:
    """Run the batch; 0 when every item is done (now or before), 3 when any failed."""
    from launcher.engine.lifecycle import check_inputs, open_engine, probe_config

    started = time.perf_counter()
    shard_ix = parse_shard(shard)
    shard_text = None if shard is None else f"{shard_ix[0]}/{shard_ix[1]}"
    all_items = read_items(Path(prompts_file))
    base = probe_config(flags)
    inputs = check_inputs(base)
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir)
    items = take_shard(all_items, shard_ix)
    configs: dict[int, RunConfig | str] = {}
    for item in items:
        try:
            configs[item.index] = resolved_item_config(flags, item, out_dir)
        except InputError as e:
            configs[item.index] = one_line(e)

    where = f" (shard {shard_text} of {len(all_items)} in the file)" if shard_text is not None else ""
    with open_engine(base, data_parallel=True, inputs=inputs) as engine:
        world = engine.world
        results = generate_items(engine, items, configs, flags, force=force, prompts_file=Path(prompts_file),
                                 label=f"batch: {len(items)} item(s){where}")
        if world.rank == 0:
            write_summary(
                out_dir / summary_name(shard_ix), results, prompts_file=str(prompts_file), out_dir=str(out_dir),
                shard=shard_text, task=base.task.name,
                world=world.describe(), seconds=round(time.perf_counter() - started, 3),
            )
            print_table(results, title=f"batch {Path(prompts_file).name} -> {out_dir}")
    return EXIT_SOME_FAILED if any(r.status == "failed" for r in results) else 0
