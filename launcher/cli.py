"""`magcache-launch`: parse flags, hand them to the runner, print results. Nothing else lives here."""
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from launcher.config import (
    check_output_location,
    distilled_magcache_warning,
    parse_bool,
    with_defaults,
    run_config_from_flags,
)
from launcher.errors import UsageError, is_input_error
from launcher.serve.limits import Limits
from launcher.signals import install_signal_handlers
from launcher.options import (
    Role,
    compose_params,
    flags_where,
    layout_params,
    magcache_params,
    model_params,
    output_params,
    per_video_params,
    request_params,
    sampling_params,
    some_params,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flag names whole at any width (rich's table cuts them at 80 columns)
    help="Wan2.2 video generation on one GPU or many, with rank-synchronized MagCache. "
         "`magcache-launch --nproc-per-node N COMMAND ...` starts N local ranks itself (like torchrun on one "
         "node) and ends with the first failing rank's one-line reason and exit code.",
)


def _is_rank0() -> bool:
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var) not in (None, "", "0"):
            return False
    return True


@app.command()
@compose_params(request_params, model_params, sampling_params, magcache_params, output_params)
def generate(
    magcache_calibration: Annotated[bool, typer.Option("--magcache-calibration", "--magcache_calibration", help="run uncached and record a ratio table")] = False,
    json_summary: Annotated[bool, typer.Option("--json", help="print the manifest as JSON on stdout at the end")] = False,
    **flags: Any,
) -> None:
    """Generate one video (single process, torchrun or srun)."""
    config = run_config_from_flags(flags, calibration=magcache_calibration)
    from launcher.engine.generate import run_generate

    manifest = run_generate(config)
    if manifest is not None and json_summary:
        print(json.dumps(manifest, ensure_ascii=False))


@app.command()
@compose_params(request_params, model_params, sampling_params, magcache_params, output_params)
def calibrate(
    out: Annotated[Path, typer.Option("--out", help="ratio file to write (a PNG plot is written beside it)")] = Path("magcache_ratios.json"),
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="prompt file (batch format): average the curves over its prompts")] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="with --prompts: seeds to run each prompt with, e.g. 1,2,3")] = None,
    **flags: Any,
) -> None:
    """Record MagCache ratios for your checkpoint with uncached runs; writes OUT and OUT.png.

    One prompt (--prompt) records one run's curves; --prompts FILE [--seeds ...] averages the
    curves of every prompt x seed (one model load) and keeps their spread in the file and plot.
    """
    check_output_location(out, "--out")
    if prompts is None:
        if seeds is not None:
            raise UsageError("--seeds needs --prompts FILE; with one --prompt use --base_seed")
        config = run_config_from_flags(flags, calibration=True)
        from launcher.engine.generate import run_generate

        run_generate(config, calibration_out=out)
        return
    from launcher.batch.calibrate import calibrate_prompt_file

    calibrate_prompt_file(prompts, seeds, flags, out)


#: the flags that decide the MagCache schedule (declared in options.py); `plan` accepts every other
#: flag of `generate` too
SCHEDULE_FLAGS = frozenset(flags_where(schedule=True))


def attention_here(requested: str) -> dict[str, Any]:
    """What `--attention` will choose from, said without torch (`plan` never imports it): the kernel
    named, or for auto the kernels this Python has in auto's order; each rank takes the first that runs
    on its device, and the manifest records the one that ran."""
    from parallel.attention_choices import installed_kernels

    return {"requested": requested, "candidates": installed_kernels() if requested == "auto" else [requested]}


@app.command()
@compose_params(request_params, model_params, sampling_params, magcache_params, output_params, layout_params)
def plan(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="also name the given flags that do not change the schedule")] = False,
    magcache_calibration: Annotated[bool, typer.Option("--magcache-calibration", "--magcache_calibration", hidden=True)] = False,
    **flags: Any,
) -> None:
    """Print the forward-by-forward MagCache schedule for these flags, without loading weights.

    Takes the same flags as `generate` (swap the verb): the schedule is the one MagCache would
    follow, whether or not --use_magcache is given; flags that do not change it are ignored.
    With --gpus N it also prices every layout of N GPUs with a roofline model and recommends one.
    """
    cluster = {k: flags.pop(k) for k in flags_where(role=Role.CLUSTER)}
    if cluster["gpus"] is None:
        given = [f"--{k.replace('_', '-')}" for k in ("nodes", "gpus_per_node", "calibration", "dry_run")
                 if cluster[k] not in (None, False)]
        if given:
            verb = "is" if len(given) == 1 else "are"
            raise UsageError(f"{', '.join(given)} {verb} for layout planning: add --gpus N (the GPUs to plan for)")
    from launcher.planner.schedule import Sampling, magcache_setup, plan_to_json
    from launcher.options import cli_name, flag_defaults
    from launcher.outputs.report import console, print_layouts, print_plan

    sampling = Sampling.from_flags(flags)
    spec = sampling.task
    setup = magcache_setup(sampling)
    f = with_defaults(flags)  # with a --distilled preset's solver, steps, shift and guidance
    extra = () if f["distilled"] is None else (distilled_magcache_warning(f["distilled"], sampling.steps),)
    the_plan = replace(setup.plan, warnings=(*setup.plan.warnings, *extra))
    layouts = None
    if cluster["gpus"] is not None:
        from launcher.config import parse_size
        from launcher.planner.layouts import plan_layouts

        width, height = parse_size(f["size"] or spec.supported_sizes[0], spec)
        frames = spec.frame_num if f["frame_num"] is None else f["frame_num"]
        given = {"ulysses": f["ulysses_size"], "ring": f.get("ring_size", 1), "cfg": 2 if f["cfg_parallel"] else 1,
                 "dit_fsdp": bool(f["dit_fsdp"])}
        layouts = plan_layouts(task=spec.name, width=width, height=height, frames=frames, the_plan=the_plan,
                               gpus=cluster["gpus"], gpu=cluster["gpu"], nodes=cluster["nodes"],
                               gpus_per_node=cluster["gpus_per_node"], calibration_file=cluster["calibration"],
                               magcache=bool(f["use_magcache"]),
                               given=given if given != {"ulysses": 1, "ring": 1, "cfg": 1, "dit_fsdp": False} else None,
                               vae_parallel=f["vae_parallel"] != "off", quant=f["quantize"],
                               offload_model=parse_bool(f["offload_model"], "--offload_model"), t5_cpu=f["t5_cpu"],
                               convert_model_dtype=bool(f.get("convert_model_dtype")))
    attention = attention_here(f["attention"])
    dry = None
    if cluster["dry_run"]:  # imports torch and the models: only here, so plain `plan --gpus` stays fast
        from launcher.engine.dryrun import dry_run_from_flags

        dry = dry_run_from_flags(flags, cluster["gpus"])
    if as_json:
        print(json.dumps({**plan_to_json(setup, extra_warnings=extra), **(layouts or {}), "attention": attention,
                          **({"dry_run": dry} if dry else {})}))
    else:
        print_plan(the_plan, task=spec.name, target=setup.target)
        if layouts is not None:
            print_layouts(layouts)
        console.print(f"attention: --attention {attention['requested']} takes the first that runs on each rank's "
                      f"device of {', '.join(attention['candidates'])} (the manifest records the kernel used)")
        if dry is not None:
            from launcher.outputs.report import print_dry_run

            print_dry_run(dry)
    if verbose:
        defaults = flag_defaults()
        ignored = [cli_name(k) for k, v in flags.items() if k not in SCHEDULE_FLAGS and v != defaults.get(k)]
        if magcache_calibration:
            ignored.append("--magcache-calibration")
        console.print(f"ignored (no effect on the schedule): {', '.join(ignored)}" if ignored
                      else "every given flag is part of the schedule")


@app.command()
@compose_params(model_params, sampling_params, magcache_params)
def batch(
    prompts: Annotated[Path, typer.Argument(help="JSONL (one object per line) or text (one prompt per line)")],
    out_dir: Annotated[Path, typer.Option("--out-dir", "--out_dir", help="where videos, manifests and summary.json go")],
    force: Annotated[bool, typer.Option("--force", help="regenerate items that already verify")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="i/n: take every n-th item starting at i (Slurm arrays)")] = None,
    **flags: Any,
) -> None:
    """Generate many prompts with one model load; resumable; data-parallel over spare ranks."""
    from launcher.batch import run_batch

    code = run_batch(prompts_file=prompts, out_dir=out_dir, force=force, shard=shard, flags=flags)
    raise typer.Exit(code)


@app.command()
@compose_params(model_params, sampling_params, magcache_params)
def sweep(
    prompts: Annotated[Path, typer.Option("--prompts", help="prompt file, as for batch (JSONL or one prompt per line)")],
    out_dir: Annotated[Path, typer.Option("--out-dir", "--out_dir", help="videos per prompt and setting, report.md, pareto.png, sweep.json")],
    thresholds: Annotated[Optional[str], typer.Option("--thresholds", help="MagCache thresholds to try, e.g. 0.02,0.04,0.06,0.1")] = None,
    speedups: Annotated[Optional[str], typer.Option("--speedups", help="forward-count speedups to reach, e.g. 1.5,2.0 (a threshold is chosen for each)")] = None,
    lpips_weights: Annotated[Optional[Path], typer.Option("--lpips-weights", help="folder with LPIPS weights (alexnet + lin layers); without it LPIPS is skipped")] = None,
    force: Annotated[bool, typer.Option("--force", help="regenerate videos that already verify")] = False,
    **flags: Any,
) -> None:
    """Measure each MagCache setting's quality cost against the uncached video, on your prompts.

    One model load; per prompt the uncached reference and one video per threshold/speedup, all
    from one seed; then a report (Markdown, JSON, Pareto plot). Resumable like batch.
    """
    from launcher.batch.sweep import run_sweep

    code = run_sweep(prompts_file=prompts, out_dir=out_dir, thresholds=thresholds, speedups=speedups, force=force,
                     lpips_weights=lpips_weights, flags=flags)
    raise typer.Exit(code)


@app.command()
@compose_params(model_params, sampling_params, magcache_params)
def serve(
    host: Annotated[str, typer.Option("--host", help="address to listen on (default: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port; the URL goes to JOBS_DIR/server.json)")] = 8000,
    token: Annotated[Optional[list[str]], typer.Option("--token", envvar="MAGCACHE_TOKEN", help="require 'Authorization: Bearer TOKEN' on every request (or env MAGCACHE_TOKEN); repeat for one token per client")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="serve an address other machines reach without a --token")] = False,
    jobs_dir: Annotated[Path, typer.Option("--jobs-dir", "--jobs_dir", help="requests, states and videos; a restart resumes its queue")] = Path("magcache-jobs"),
    max_queue: Annotated[int, typer.Option("--max-queue", "--max_queue", help="queued jobs beyond this get HTTP 429")] = 100,
    max_queue_per_client: Annotated[Optional[int], typer.Option("--max-queue-per-client", help="queued + running jobs one client (token, or address without tokens) may hold; default half of --max-queue")] = None,
    max_frames: Annotated[int, typer.Option("--max-frames", help="largest frame_num a request may ask for")] = Limits.max_frames,
    max_steps: Annotated[int, typer.Option("--max-steps", help="most sample_steps a request may ask for")] = Limits.max_steps,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="largest width*height a request may ask for")] = Limits.max_pixels,
    max_image_pixels: Annotated[int, typer.Option("--max-image-pixels", help="largest uploaded image (width*height, read from its header)")] = Limits.max_image_pixels,
    max_body_mb: Annotated[int, typer.Option("--max-body-mb", help="largest request body in MiB (HTTP 413 beyond)")] = Limits.max_body_mb,
    body_timeout: Annotated[float, typer.Option("--body-timeout", help="seconds a client may take to send a request body (HTTP 408 beyond)")] = Limits.body_timeout_s,
    stop_grace: Annotated[float, typer.Option("--stop-grace", help="seconds SIGTERM lets the running jobs finish before stopping them at a step (they stay queued)")] = 60.0,
    image_dir: Annotated[Optional[Path], typer.Option("--image-dir", "--image_dir", help="requests may name image files under this folder (else base64 only)")] = None,
    log_format: Annotated[str, typer.Option("--log-format", help="text, or json: one JSON object per log line")] = "text",
    **flags: Any,
) -> None:
    """Keep the models loaded and generate jobs posted over HTTP (single process, torchrun or srun).

    Rank 0 serves the JSON API and a web page at /; every rank runs the queued jobs in step, spare
    ranks as data-parallel replicas. SIGTERM stops intake, lets the running jobs finish within
    --stop-grace (a second signal: now), keeps the rest queued and exits 0.
    """
    from launcher.serve import ServeOptions, run_serve

    if log_format not in ("text", "json"):
        raise UsageError(f"--log-format {log_format}: choose text or json")
    if log_format == "json":
        from launcher.outputs.report import use_json_logs

        use_json_logs()
    limits = Limits(max_body_mb=max_body_mb, max_frames=max_frames, max_steps=max_steps, max_pixels=max_pixels,
                    max_image_pixels=max_image_pixels, body_timeout_s=body_timeout)
    options = ServeOptions(host=host, port=port, tokens=tuple(token or ()), insecure=insecure, jobs_dir=jobs_dir,
                           max_queue=max_queue, max_queue_per_client=max_queue_per_client, image_dir=image_dir,
                           limits=limits, stop_grace=stop_grace)
    raise typer.Exit(run_serve(options, flags))


@app.command()
@compose_params(per_video_params(exclude=("prompt",)))
def submit(
    server: Annotated[str, typer.Option("--server", help="the server's URL, e.g. http://127.0.0.1:8000")],
    prompt: Annotated[str, typer.Option("--prompt", help="what to generate")],
    out: Annotated[Optional[Path], typer.Option("--out", help="where to save the mp4 (default: JOB_ID.mp4)")] = None,
    token: Annotated[Optional[str], typer.Option("--token", envvar="MAGCACHE_TOKEN", help="bearer token (or env MAGCACHE_TOKEN)")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="follow the job and download the video")] = True,
    **fields: Any,
) -> None:
    """Send one job to a `serve` server, show its progress and download the video.

    Every per-video field a server accepts is an option here (options.py declares which); one not
    given takes the server's setting. --image is sent as base64.
    """
    from launcher.serve.client import image_field, run_submit

    if out is not None:
        check_output_location(out, "--out")
    if fields.get("image") is not None:
        fields["image"] = image_field(fields["image"])
    raise typer.Exit(run_submit(server, {"prompt": prompt, **fields}, token=token, out=out, wait=wait))


@app.command()
@compose_params(some_params("task", "ckpt_dir", "revision", "download", "quantize", "quantize_blocks",
                            "quantize_experts", "lora", "lora_high", "lora_low"))
def quantize(
    out: Annotated[Optional[Path], typer.Option("--out", help="folder for the quantized copy (same layout; other files hard-linked)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out")] = False,
    **flags: Any,
) -> None:
    """Write an FP8/INT8 copy of a checkpoint once (later runs load it without quantizing)."""
    from launcher.checkpoint import inspect_checkpoint
    from launcher.checkpoint.lora import plan_loras
    from launcher.config import parse_loras, parse_quantization
    from launcher.engine.quantized_export import write_quantized_checkpoint
    from launcher.hub import resolve_ckpt_dir
    from launcher.outputs.atomic import sha256_of
    from launcher.wan.tasks import TASKS

    task = flags["task"]
    if task not in TASKS:
        raise UsageError(f"--task {task!r} is unknown; choose one of {', '.join(TASKS)}")
    if flags["ckpt_dir"] is None or out is None:
        raise UsageError("quantize needs --ckpt_dir (the source) and --out (the folder to write)")
    if flags["quantize"] == "none":
        raise UsageError("quantize: give --quantize fp8 or --quantize int8 (the mode to write)")
    spec = TASKS[task]
    qspec = parse_quantization(flags, spec)
    ckpt = resolve_ckpt_dir(flags["ckpt_dir"], spec, download=flags["download"], revision=flags["revision"])
    info = inspect_checkpoint(ckpt, spec)
    plan = plan_loras(parse_loras(flags, spec), {e: info.transformer_weights[e].shapes for e in spec.experts}, task)
    records = [r.to_json(sha256_of(r.file)) for r in plan.reports]
    manifest = write_quantized_checkpoint(info, qspec, out, loras=plan, lora_records=records, overwrite=overwrite)
    print(f"wrote {out} ({qspec.mode}; {', '.join(f'{e}: {n} linears' for e, n in manifest['quantized_linears'].items())})")


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(metavar="A", help="reference: an .mp4, a folder of PNG frames, or a --save-latents .safetensors")],
    b: Annotated[Path, typer.Argument(metavar="B", help="the video measured against A: same kind and shape")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout instead of the table")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write per-frame PSNR / SSIM (/ LPIPS) curves to this PNG")] = None,
    lpips_weights: Annotated[Optional[Path], typer.Option("--lpips-weights", help="folder with alexnet-owt-7be5be79.pth and alex.pth; without it LPIPS is skipped")] = None,
) -> None:
    """Measure B against A frame by frame: PSNR, SSIM (luma is the headline), flicker, LPIPS."""
    from launcher.quality.compare import run_compare

    run_compare(a, b, as_json=as_json, plot=plot, lpips_weights=lpips_weights)


def _rank_label() -> str:
    """`rank N: ` in a multi-rank job, where several ranks' lines interleave; empty otherwise."""
    for var, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if os.environ.get(var) and os.environ.get(world, "1") != "1":
            return f"rank {os.environ[var]}: "
    return ""


def _fail(message: str, code: int) -> int:
    if _is_rank0():
        print(f"error: {message}", file=sys.stderr)
    return code


def _spawn(args: list[str]) -> int:
    """`magcache-launch --nproc-per-node N COMMAND ...`: start N local ranks ourselves (`parallel.spawn`),
    so a failure ends with the failing rank's one line and exit code, not torchrun's traceback and 1."""
    flag, _, value = args[0].partition("=")
    rest = args[1:] if value else args[2:]
    value = value or (args[1] if len(args) > 1 else "")
    if not value.isdigit() or int(value) < 1:
        return _fail(f"{flag} {value!r}: give the number of ranks to start, e.g. {flag} 4 generate ...", 2)
    if not rest or rest[0].startswith("-"):
        return _fail(f"{flag} {value}: name the command to run on every rank, e.g. {flag} {value} generate ...", 2)
    if os.environ.get("RANK") or os.environ.get("SLURM_STEP_ID"):
        return _fail(f"{flag}: this process is already one rank of a job (torchrun or srun); drop {flag}", 2)
    from parallel.spawn import spawn_local

    return spawn_local([sys.executable, "-m", "launcher", *rest], int(value))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: bad input exits 2 with one line, never a traceback."""
    from launcher.errors import PeerLost, RunFailed, Terminated, peer_lost

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].split("=")[0] in ("--nproc-per-node", "--nproc_per_node"):
        return _spawn(args)
    install_signal_handlers()
    try:
        result = app(args=argv, prog_name="magcache-launch", standalone_mode=False)
        return int(result or 0)
    except typer.Exit as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except typer.Abort:
        return _fail("interrupted", 130)
    except typer.TyperException as e:  # Typer's own parse errors (unknown flag, bad int...)
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        return _fail(" ".join(message.split()), 2)
    except PeerLost as e:
        # printed by every rank that notices (rank 0 may be the dead one), marked with its rank
        print(f"error: {_rank_label()}{e}", file=sys.stderr)
        return e.exit_code
    except RunFailed as e:
        return _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted (SIGINT); partial outputs removed", 130)
    except Terminated as e:
        import signal

        name = signal.Signals(e.signum).name
        return _fail(f"stopped by {name}; partial outputs removed", 128 + e.signum)
    except Exception as e:
        if is_input_error(e):
            line = str(e).splitlines()[0] if str(e) else type(e).__name__
            if getattr(e, "every_rank", False):  # true on some hosts only (the rendezvous): every rank says it
                print(f"error: {_rank_label()}{line}", file=sys.stderr)
                return 2
            return _fail(line, 2)
        lost = peer_lost(e)  # a collective outside run_generate (batch) failed on a dead peer
        if lost is None:
            raise
        print(f"error: {_rank_label()}{lost}", file=sys.stderr)
        return lost.exit_code


if __name__ == "__main__":
    sys.exit(main())
