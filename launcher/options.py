"""Every flag of the run, declared once: name, aliases, type, default and help.

Each flag has its canonical kebab-case name plus the snake_case spelling of the official
`generate.py` / MagCache4Wan2.2 scripts as an alias, so their command lines run unchanged.
Commands compose these parameter sets with `compose_params`; `launcher.config` takes the
defaults from here (`flag_defaults`), so a default lives in exactly one place.
"""
import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from magcache.schedule import MagCacheParams

#: upstream MagCache4Wan2.2's defaults, owned by the algorithm (magcache/); the flags point at them
_UPSTREAM = MagCacheParams()
#: the threshold when neither --magcache-thresh nor --magcache-target-speedup is given. The flag's
#: own default is None so that giving both can be told apart from giving the target alone.
MAGCACHE_THRESH_DEFAULT = _UPSTREAM.thresh


def _opt(*names: str, help: str, **kw: Any) -> Any:
    return typer.Option(*names, help=help, **kw)


def request_params(
    prompt: Annotated[Optional[str], _opt("--prompt", help="what to generate")] = None,
    image: Annotated[Optional[Path], _opt("--image", help="first frame (i2v-A14B; optional for ti2v-5B)")] = None,
) -> None:
    """What one video shows (a batch line brings its own)."""


def model_params(
    task: Annotated[str, _opt("--task", help="t2v-A14B, i2v-A14B or ti2v-5B")] = "t2v-A14B",
    ckpt_dir: Annotated[Optional[Path], _opt("--ckpt-dir", "--ckpt_dir", help="checkpoint folder (official or diffusers layout)")] = None,
    offload_model: Annotated[Optional[str], _opt("--offload-model", "--offload_model", help="True/False: move the idle expert to CPU (official default True on one GPU)")] = None,
    convert_model_dtype: Annotated[bool, _opt("--convert-model-dtype", "--convert_model_dtype", help="cast DiT weights to --dtype")] = False,
    t5_cpu: Annotated[bool, _opt("--t5-cpu", "--t5_cpu", help="keep the T5 encoder on CPU")] = False,
    t5_fsdp: Annotated[bool, _opt("--t5-fsdp", "--t5_fsdp", help="shard T5 blocks with FSDP2")] = False,
    dit_fsdp: Annotated[bool, _opt("--dit-fsdp", "--dit_fsdp", help="shard DiT blocks with FSDP2 over the sequence group")] = False,
    ulysses_size: Annotated[int, _opt("--ulysses-size", "--ulysses_size", help="Ulysses sequence-parallel degree (divides the heads)")] = 1,
    ring_size: Annotated[int, _opt("--ring-size", "--ring_size", help="ring-attention degree: the sequence group is ring x ulysses ranks, ring across nodes, Ulysses inside one")] = 1,
    cfg_parallel: Annotated[bool, _opt("--cfg-parallel", "--cfg_parallel", help="cond and uncond forwards on two halves of the world")] = False,
    dtype: Annotated[Optional[str], _opt("--dtype", help="bfloat16, float16 or float32 (default: bfloat16 on CUDA, float32 on CPU)")] = None,
    device: Annotated[Optional[str], _opt("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available)")] = None,
    dist_timeout: Annotated[float, _opt("--dist-timeout", "--dist_timeout", help="seconds before a stuck collective fails the job")] = 600.0,
    compile: Annotated[bool, _opt("--compile", help="torch.compile the DiT block once, reused by every block of every expert (the first step pays the compile)")] = False,
    vae_parallel: Annotated[str, _opt("--vae-parallel", "--vae_parallel", help="auto: split the VAE decode by rows over every rank of a generation (equal to one rank); off: the output rank decodes alone")] = "auto",
    lora: Annotated[Optional[list[str]], _opt("--lora", help="FILE[:SCALE] LoRA merged into every expert at load time (repeatable; scale 1 by default)")] = None,
    lora_high: Annotated[Optional[list[str]], _opt("--lora-high", "--lora_high", help="FILE[:SCALE] LoRA for the high-noise A14B expert only (repeatable)")] = None,
    lora_low: Annotated[Optional[list[str]], _opt("--lora-low", "--lora_low", help="FILE[:SCALE] LoRA for the low-noise A14B expert only (repeatable)")] = None,
) -> None:
    """Flags that choose and place the model (shared by every command that loads it)."""


def sampling_params(
    size: Annotated[Optional[str], _opt("--size", help="WIDTH*HEIGHT, e.g. 1280*720 (area only, for image tasks)")] = None,
    frame_num: Annotated[Optional[int], _opt("--frame-num", "--frame_num", help="frames, 4n+1")] = None,
    negative_prompt: Annotated[str, _opt("--negative-prompt", "--negative_prompt", help="'' = the official default")] = "",
    base_seed: Annotated[int, _opt("--base-seed", "--base_seed", help="-1 draws a random seed (recorded in the manifest)")] = -1,
    sample_solver: Annotated[str, _opt("--sample-solver", "--sample_solver", help="unipc, dpm++ or euler (flow-matching Euler, the step-distilled recipe)")] = "unipc",
    sample_steps: Annotated[Optional[int], _opt("--sample-steps", "--sample_steps", help="denoising steps (task default)")] = None,
    sample_shift: Annotated[Optional[float], _opt("--sample-shift", "--sample_shift", help="flow shift (task default)")] = None,
    sample_guide_scale: Annotated[Optional[str], _opt("--sample-guide-scale", "--sample_guide_scale", help="CFG scale, or LOW,HIGH per expert")] = None,
    timesteps: Annotated[Optional[str], _opt("--timesteps", help="euler only: base timesteps before the shift, e.g. 1000,750,500,250 (one per step)")] = None,
    distilled: Annotated[Optional[str], _opt("--distilled", help="step-distilled preset: 'lightning' = euler, 4 steps, shift 5, guidance 1 (Wan2.2-Lightning / LightX2V 4-step LoRAs)")] = None,
) -> None:
    """Flags of one generation that a batch line may override."""


def magcache_params(
    use_magcache: Annotated[bool, _opt("--use-magcache", "--use_magcache", help="skip DiT forwards with MagCache")] = False,
    magcache_thresh: Annotated[Optional[float], _opt("--magcache-thresh", "--magcache_thresh", help=f"accumulated-error bound (default {MAGCACHE_THRESH_DEFAULT})")] = None,
    magcache_target_speedup: Annotated[Optional[float], _opt("--magcache-target-speedup", "--magcache_target_speedup", help="choose the smallest threshold whose plan reaches this forward-count speedup (>= 1); replaces --magcache-thresh")] = None,
    magcache_K: Annotated[int, _opt("--magcache-k", "--magcache-K", "--magcache_K", help="max consecutive skips per branch")] = _UPSTREAM.K,
    retention_ratio: Annotated[float, _opt("--retention-ratio", "--retention_ratio", help="fraction of forwards always computed")] = _UPSTREAM.retention_ratio,
    magcache_split: Annotated[str, _opt("--magcache-split", "--magcache_split", help="upstream (default) or scheduler expert split")] = _UPSTREAM.split_mode,
    magcache_reset_at_switch: Annotated[bool, _opt("--magcache-reset-at-switch", "--magcache_reset_at_switch", help="fresh cache for the low-noise expert")] = _UPSTREAM.reset_at_switch,
    magcache_ratios: Annotated[Optional[Path], _opt("--magcache-ratios", "--magcache_ratios", help="calibrated ratio file (default: the checkpoint folder's magcache_ratios.json when it has one, else the bundled table)")] = None,
) -> None:
    """MagCache flags (upstream defaults)."""


def output_params(
    save_file: Annotated[Optional[Path], _opt("--save-file", "--save_file", help="output mp4 (default: a timestamped name)")] = None,
    save_frames: Annotated[Optional[Path], _opt("--save-frames", "--save_frames", help="folder for lossless PNG frames")] = None,
    save_latents: Annotated[Optional[Path], _opt("--save-latents", "--save_latents", help="final latents (.safetensors, key 'latents')")] = None,
    overwrite: Annotated[bool, _opt("--overwrite", help="replace an existing --save_file")] = False,
) -> None:
    """Where one generation's outputs go."""


def layout_params(
    gpus: Annotated[Optional[int], _opt("--gpus", help="plan: also price every layout (dp x cfg x ring x ulysses, FSDP) on this many GPUs (a model, not a measurement)")] = None,
    gpu: Annotated[str, _opt("--gpu", help="plan --gpus: h100, h200, a100, h20, l20 or 4090")] = "h100",
    nodes: Annotated[Optional[int], _opt("--nodes", help="plan --gpus: nodes the GPUs are spread over (default: 8 GPUs per node)")] = None,
    gpus_per_node: Annotated[Optional[int], _opt("--gpus-per-node", "--gpus_per_node", help="plan --gpus: GPUs per node")] = None,
    calibration: Annotated[Optional[Path], _opt("--calibration", help="plan --gpus: a scripts/gpu_check.py result; its measured A14B block times replace the roofline's DiT compute")] = None,
) -> None:
    """`plan`'s layout planner: the cluster to price layouts for."""


#: the flag names of `layout_params`, which `plan` takes out before reading the schedule flags
LAYOUT_FLAGS = ("gpus", "gpu", "nodes", "gpus_per_node", "calibration")


def compose_params(*sources: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give `fn(**kw)` the union of the sources' parameters (its own keyword params come first)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
        params = list(own)
        annotations = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k != "return"}
        for src in sources:
            for p in inspect.signature(src).parameters.values():
                params.append(p.replace(kind=p.KEYWORD_ONLY))
            annotations.update({k: v for k, v in src.__annotations__.items() if k != "return"})
        own_pos = [p for p in params if p.kind is not p.KEYWORD_ONLY]
        kw_only = [p for p in params if p.kind is p.KEYWORD_ONLY]
        fn.__signature__ = inspect.Signature(own_pos + kw_only)  # type: ignore[attr-defined]
        fn.__annotations__ = annotations
        return fn

    return deco


#: every parameter set a run is configured from, in help order
RUN_PARAM_SETS: tuple[Callable[..., None], ...] = (request_params, model_params, sampling_params, magcache_params,
                                                   output_params)


def flag_defaults() -> dict[str, Any]:
    """Flag name (as Typer passes it) -> its declared default, for every flag of a run (a fresh dict)."""
    return dict(_declared_defaults())


@functools.cache
def _declared_defaults() -> tuple[tuple[str, Any], ...]:
    # read from the signatures once: every config (each batch item, sweep setting) asks several times
    return tuple((name, p.default) for fn in RUN_PARAM_SETS for name, p in inspect.signature(fn).parameters.items())


def cli_name(flag: str) -> str:
    """`sample_steps` -> `--sample-steps`, the canonical spelling, for messages."""
    return "--" + flag.replace("_", "-")
