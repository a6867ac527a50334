"""`magcache-launch`: parse flags, hand them to the runner, print results. Nothing else lives here."""
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from launcher.config import MagCacheOptions, UsageError, run_config_from_flags
from launcher.options import compose_params, magcache_params, model_params, output_params, sampling_params

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Wan2.2 video generation on one GPU or many, with rank-synchronized MagCache.",
)


def _is_rank0() -> bool:
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var) not in (None, "", "0"):
            return False
    return True


@app.command()
@compose_params(model_params, sampling_params, magcache_params, output_params)
def generate(
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="what to generate")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="first frame (i2v-A14B; optional for ti2v-5B)")] = None,
    magcache_calibration: Annotated[bool, typer.Option("--magcache-calibration", "--magcache_calibration", help="run uncached and record a ratio table")] = False,
    json_summary: Annotated[bool, typer.Option("--json", help="print the manifest as JSON on stdout at the end")] = False,
    **kw: Any,
) -> None:
    """Generate one video (single process, torchrun or srun)."""
    cfg = run_config_from_flags(dict(kw, prompt=prompt, image=image, magcache_calibration=magcache_calibration))
    from launcher.runner import run_generate

    manifest = run_generate(cfg)
    if manifest is not None and json_summary:
        print(json.dumps(manifest, ensure_ascii=False))


@app.command()
@compose_params(model_params, sampling_params, magcache_params)
def calibrate(
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="a prompt typical of your use")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="first frame for image tasks")] = None,
    out: Annotated[Path, typer.Option("--out", help="ratio file to write (a PNG plot is written beside it)")] = Path("magcache_ratios.json"),
    save_file: Annotated[Optional[Path], typer.Option("--save-file", "--save_file", help="also keep the uncached video")] = None,
    **kw: Any,
) -> None:
    """Record MagCache ratios for your checkpoint with an uncached run; writes OUT and OUT.png."""
    cfg = run_config_from_flags(
        dict(kw, prompt=prompt, image=image, save_file=save_file, save_frames=None, save_latents=None, overwrite=True),
        calibration=True,
    )
    from launcher.runner import run_generate

    run_generate(cfg, calibration_out=out)


@app.command()
def plan(
    task: Annotated[str, typer.Option("--task", help="t2v-A14B, i2v-A14B or ti2v-5B")] = "t2v-A14B",
    sample_steps: Annotated[Optional[int], typer.Option("--sample-steps", "--sample_steps")] = None,
    sample_shift: Annotated[Optional[float], typer.Option("--sample-shift", "--sample_shift")] = None,
    sample_solver: Annotated[str, typer.Option("--sample-solver", "--sample_solver")] = "unipc",
    image: Annotated[bool, typer.Option("--image/--no-image", help="ti2v-5B: use the image-mode ratio table")] = False,
    magcache_thresh: Annotated[float, typer.Option("--magcache-thresh", "--magcache_thresh")] = 0.04,
    magcache_K: Annotated[int, typer.Option("--magcache-k", "--magcache-K", "--magcache_K")] = 2,
    retention_ratio: Annotated[float, typer.Option("--retention-ratio", "--retention_ratio")] = 0.2,
    magcache_split: Annotated[str, typer.Option("--magcache-split", "--magcache_split")] = "upstream",
    magcache_reset_at_switch: Annotated[bool, typer.Option("--magcache-reset-at-switch", "--magcache_reset_at_switch")] = False,
    magcache_ratios: Annotated[Optional[Path], typer.Option("--magcache-ratios", "--magcache_ratios")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Print the forward-by-forward MagCache schedule for these flags, without loading weights."""
    from launcher.planning import make_plan, plan_to_json
    from launcher.report import print_plan

    mc = MagCacheOptions(
        enabled=True, thresh=magcache_thresh, K=magcache_K, retention_ratio=retention_ratio,
        split=magcache_split, reset_at_switch=magcache_reset_at_switch,  # type: ignore[arg-type]
        ratios_file=magcache_ratios,
    )
    the_plan = make_plan(
        task=task, steps=sample_steps, shift=sample_shift, solver=sample_solver, with_image=image, options=mc
    )
    if as_json:
        print(json.dumps(plan_to_json(the_plan, task=task, solver=sample_solver, options=mc, with_image=image)))
    else:
        print_plan(the_plan, task=task)


@app.command()
@compose_params(model_params, sampling_params, magcache_params)
def batch(
    prompts: Annotated[Path, typer.Argument(help="JSONL (one object per line) or text (one prompt per line)")],
    out_dir: Annotated[Path, typer.Option("--out-dir", "--out_dir", help="where videos, manifests and summary.json go")],
    force: Annotated[bool, typer.Option("--force", help="regenerate items that already verify")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="i/n: take every n-th item starting at i (Slurm arrays)")] = None,
    **kw: Any,
) -> None:
    """Generate many prompts with one model load; resumable; data-parallel over spare ranks."""
    from launcher.batch import run_batch

    code = run_batch(prompts_file=prompts, out_dir=out_dir, force=force, shard=shard, flags=kw)
    raise typer.Exit(code)


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


def _raise_terminated(signum: int, _frame: Any) -> None:
    from launcher.errors import Terminated

    raise Terminated(signum)


def _install_signal_handlers() -> None:
    """SIGTERM (torchrun, srun, schedulers) and Ctrl-C unwind the run: temp files go away.

    Our own exception for SIGINT too, because Typer turns KeyboardInterrupt into a silent
    return code; an ignored SIGINT (background job) stays ignored.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_terminated)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: bad input exits 2 with one line, never a traceback."""
    from launcher.errors import InputError, PeerLost, RunFailed, Terminated, peer_lost

    _install_signal_handlers()
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
    except (UsageError, InputError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 2)
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
        lost = peer_lost(e)  # a collective outside run_generate (batch) failed on a dead peer
        if lost is None:
            raise
        print(f"error: {_rank_label()}{lost}", file=sys.stderr)
        return lost.exit_code


if __name__ == "__main__":
    sys.exit(main())
