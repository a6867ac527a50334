"""Human-facing output on rank 0: the plan table, progress and the end-of-run summary (rich)."""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from magcache.plan import Plan
from magcache.target import TargetResult, floor_2dp
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True, highlight=False)


def _action(fwd: Any) -> str:
    if fwd.retained:
        return "[cyan]compute[/] (kept)"
    return "[green]skip[/]" if fwd.skip else "compute"


def print_plan(the_plan: Plan, *, task: str, target: TargetResult | None = None, out: Console | None = None) -> None:
    """The threshold a --magcache-target-speedup chose (if any), one row per step (cond and uncond
    side by side; '-' where guidance 1 runs the cond forward alone), then the speedup and warnings."""
    out = out or Console(file=sys.stdout, highlight=False)
    if target is not None:
        where = ("threshold 0 already reaches it" if target.breakpoint is None else
                 f"no threshold at or below {target.breakpoint!r} reaches it")
        out.print(f"threshold [bold]{target.thresh!r}[/] for --magcache-target-speedup {target.target}: {where} "
                  f"({target.speedup:.2f}x here; at most {floor_2dp(target.max_speedup)}x at any threshold)")
    table = Table(title=f"MagCache plan: {task}, {the_plan.steps} steps")
    for col in ("step", "expert", "cond", "uncond"):
        table.add_column(col)
    by_step: dict[int, dict[str, object]] = {}
    for f in the_plan.forwards:
        by_step.setdefault(f.step, {})[f.branch] = f
    for step, pair in by_step.items():
        cond, uncond = pair["cond"], pair.get("uncond")
        # guidance 1: that step runs the cond forward alone (no uncond forward exists to skip)
        table.add_row(str(step), cond.expert, _action(cond), _action(uncond) if uncond is not None else "[dim]-[/] (g=1)")
    out.print(table)
    experts = sorted({f.expert for f in the_plan.forwards})
    if len(experts) > 1:  # forwards count cond and uncond: forward 2n is step n's cond
        out.print(f"experts switch at forward {the_plan.split_forwards}, step {the_plan.split_forwards // 2}")
    skipped = len(the_plan.skipped_forwards)
    out.print(
        f"skipped {skipped} of {the_plan.total_forwards} forwards "
        f"(cond {the_plan.skips_by_branch.get('cond', 0)}, uncond {the_plan.skips_by_branch.get('uncond', 0)}); "
        f"forward-count speedup [bold]{the_plan.forward_speedup:.2f}x[/]"
    )
    for w in the_plan.warnings:
        out.print(f"[yellow]warning:[/] {w}")


#: `serve --log-format json`: every log line (and the denoise progress) is one JSON object on stderr
_json_logs = False


def use_json_logs() -> None:
    global _json_logs
    _json_logs = True


def _json_line(level: str, message: str, **fields: Any) -> None:
    import json

    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": level, "message": message,
              **fields}
    sys.stderr.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    sys.stderr.flush()


def log(message: str, **fields: Any) -> None:
    """One status line on stderr (callers print on the output rank only); `fields` go into JSON logs."""
    if _json_logs:
        _json_line("info", message, **fields)
        return
    console.print(f"[dim]\\[magcache-launch][/] {escape(message)}", soft_wrap=True)


def warn(message: str) -> None:
    """One warning line on stderr, never wrapped (a log file keeps it whole for grep)."""
    if _json_logs:
        _json_line("warning", message)
        return
    console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def warn_once(per_item: list[list[str]], what: str = "items") -> None:
    """Each distinct warning of many items once, with how many it concerns (a batch, a sweep)."""
    counts: dict[str, int] = {}
    for warnings in per_item:
        for w in dict.fromkeys(warnings):
            counts[w] = counts.get(w, 0) + 1
    for w, n in counts.items():
        warn(w if len(per_item) == 1 else f"{w} ({n} of {len(per_item)} {what})")


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """The end-of-run summary as short lines, each whole (a terminal wraps nothing mid-clause)."""
    timings = manifest.get("timings_s", {})
    lines = [f"video {manifest.get('video')}  seed {manifest.get('seed')}",
             "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())]
    mc = manifest.get("magcache") or {}
    if mc.get("enabled"):
        branches = ", ".join(f"{k} {v}" for k, v in mc["skipped_by_branch"].items())
        experts = ", ".join(f"{k} {v}" for k, v in mc["skipped_by_expert"].items())
        lines.append(f"magcache: skipped {mc['skipped_count']} of {mc['total_forwards']} forwards, "
                     f"forward-count speedup {mc['forward_speedup']:.2f}x")
        lines.append(f"  skipped by branch: {branches}; by expert: {experts}")
    return lines


def print_summary(manifest: dict[str, Any]) -> None:
    """Where the video is, phase timings, skipped forwards (on stderr, with the other status lines)."""
    for line in summary_lines(manifest):
        console.print(escape(line), soft_wrap=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def progress_line(done: int, total: int, since_first: float | None, computed: int, skipped: int) -> str:
    """One plain progress line, well under 80 columns for any run (a log file gets no bar).

    `since_first`: seconds from the end of step 1 to now; the rate leaves step 1 out (it carries the
    first-call warm-up), so step 1 has none yet."""
    rate = ""
    if since_first is not None and done > 1:
        per_step = since_first / (done - 1)
        rate = f"  {per_step:.2f} s/step  ETA {_clock(per_step * (total - done))}"
    return f"step {done}/{total}{rate}  skipped {skipped} of {computed + skipped} forwards"


@contextlib.contextmanager
def progress_bar(total_steps: int, *, enabled: bool, forwards: Callable[[], list[Any]] = list,
                 every_s: float = 10.0) -> Iterator[Callable[[int, int], None] | None]:
    """Denoising progress on rank 0 (stderr); other ranks get no callback.

    On a terminal: a rich bar. Otherwise (sbatch, nohup, a pipe, where a bar draws nothing until the
    end): one plain line per step, at most one per `every_s` seconds, the first and last step always.
    `forwards()` gives this rank's MagCache decisions so far (objects with a `skip` attribute)."""
    if not enabled:
        yield None
        return
    if _json_logs or not console.is_terminal:
        first: list[float] = []  # when step 1 ended
        last = [-every_s]

        def on_line(done: int, total: int) -> None:
            now = time.perf_counter()
            if not first:
                first.append(now)
            if done in (1, total) or now - last[0] >= every_s:
                last[0] = now
                decisions = forwards()
                skipped = sum(1 for d in decisions if d.skip)
                line = progress_line(done, total, now - first[0], len(decisions) - skipped, skipped)
                if _json_logs:
                    _json_line("info", line, step=done, steps=total, skipped=skipped,
                               computed=len(decisions) - skipped)
                else:
                    console.print(line, markup=False, highlight=False, soft_wrap=True)

        yield on_line
        return
    with Progress(TextColumn("denoise"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as progress:
        task = progress.add_task("denoise", total=total_steps)

        def on_step(done: int, total: int) -> None:
            progress.update(task, completed=done)

        yield on_step


def print_dry_run(result: dict[str, Any], out: Console | None = None) -> None:
    """`plan --gpus N --dry-run`: per rank role and phase, peak device GiB (weights / activations /
    communication buffers at that peak), host GiB and GiB sent per collective kind (the JSON's `dry_run`)."""
    out = out or Console(file=sys.stdout, highlight=False, width=200)
    gib = 2**30
    table = Table(title=f"Dry run: {result['task']} {result['size']} x {result['frame_num']} frames on {result['gpus']} "
                        "GPU(s), the launch path on the meta device (MEASURED by the dry run, allocated bytes)")
    for col in ("rank", "phase", "device GiB", "weights", "activations", "comm", "host pageable", "host pinned",
                "sent GiB per collective"):
        table.add_column(col, justify="right")
    for rank in result["ranks"]:
        for phase, peak in rank["phases"].items():
            kinds = peak["device_by_kind"]
            sent = rank["collectives"].get(phase, {})
            table.add_row(f"{rank['rank']} ({rank['role']})", phase, f"{peak['device'] / gib:.2f}",
                          f"{kinds['weights'] / gib:.2f}", f"{kinds['activations'] / gib:.2f}", f"{kinds['comm'] / gib:.2f}",
                          f"{peak['host_pageable'] / gib:.2f}", f"{peak['host_pinned'] / gib:.2f}",
                          " ".join(f"{k} {b / gib:.2f}" for k, b in sorted(sent.items())) or "-")
    out.print(table)
    out.print(f"attention: {result['attention_workspace']}; pinning: {result['pinning']}; not counted: the CUDA "
              "context, the caching allocator's rounding and fragmentation, NCCL's own buffers", soft_wrap=True)


def print_layouts(result: dict[str, Any], out: Console | None = None) -> None:
    """`plan --gpus N`: one row per layout (predicted by the roofline model), then the recommendation.

    Takes `plan --json`'s layout object, so the table and the JSON cannot disagree."""
    out = out or Console(file=sys.stdout, highlight=False, width=200)
    model = result["model"]
    calib = " calibrated by " + model["calibration"]["source"] if model["calibration"] else ""
    table = Table(title=f"Layouts on {result['layouts'][0]['gpus'] if result['layouts'] else 0} x "
                        f"{model['gpu']['name']} ({model['nodes']} node(s) x {model['gpus_per_node']}): "
                        f"MODEL predictions{calib}, not measurements")
    for col in ("#", "dp", "cfg", "ring", "ulysses", "fsdp", "GB/GPU", "fits", "comm GB/step a2a|ring|fsdp",
                "off-node", "step s", "denoise s", "total s", "total s MagCache"):
        table.add_column(col, justify="right")
    for i, lay in enumerate(result["layouts"]):  # * recommended, > the command line's own flags
        comm = lay["comm_per_step_gb"]
        active = {"ulysses": lay["ulysses"] > 1, "ring": lay["ring"] > 1, "cfg": lay["cfg"] > 1,
                  "fsdp": lay["dit_fsdp"]}
        off = ",".join(k for k, link in lay["links"].items() if active[k] and link == "inter") or "-"
        p = lay["predicted"]
        mark = ("[bold green]*[/]" if i == result["recommended"] else "") + ("[bold]>[/]" if i == result.get("given") else "")
        table.add_row(f"{mark}{i}", str(lay["dp"]), str(lay["cfg"]), str(lay["ring"]), str(lay["ulysses"]),
                      ("yes" if lay["dit_fsdp"] else "offload" if lay["offload"] else "no"),
                      f"{lay['memory_gb_per_gpu']:.1f}", "yes" if lay["fits"] else "[red]no[/]",
                      f"{comm['ulysses_all_to_all']:.1f}|{comm['ring_p2p']:.1f}|{comm['fsdp_all_gather']:.1f}",
                      off, f"{p['step_s']:.2f}", f"{p['denoise_s']:.0f}", f"{p['total_s']:.0f}",
                      f"{p['magcache']['total_s']:.0f}")
    out.print(table)
    out.print(f"recommended (model): {escape(result['reason'])}", soft_wrap=True)
    if result.get("given") is not None:
        lay = result["layouts"][result["given"]]
        out.print(f"your flags: layout {result['given']} (marked >), {lay['predicted']['total_s']:.0f} s predicted "
                  f"(model), {lay['memory_gb_per_gpu']:.0f} GB/GPU{'' if lay['fits'] else ', does not fit'}")
