"""Every flag of the run, declared once: name, aliases, type, default and help.

Each flag has its canonical kebab-case name plus the snake_case spelling of the official
`generate.py` / MagCache4Wan2.2 scripts as an alias, so their command lines run unchanged.
Commands compose these parameter sets with `compose_params`; `launcher.config` takes the
defaults from here (`flag_defaults`), so a default lives in exactly one place.

Each flag also declares its role (`Declared`, beside its `typer.Option`): whether it changes the
video or only where and how it is made, whether it decides the MagCache schedule, and whether a
batch line or a serve request may set it per video. Every list of flags elsewhere (batch resume,
`plan`'s schedule, serve's request fields, `submit`'s options) is derived from these declarations.
"""
import enum
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, get_args, get_origin

import typer

from magcache.schedule import MagCacheParams

#: upstream MagCache4Wan2.2's defaults, owned by the algorithm (magcache/); the flags point at them
_UPSTREAM = MagCacheParams()
#: the threshold when neither --magcache-thresh nor --magcache-target-speedup is given. The flag's
#: own default is None so that giving both can be told apart from giving the target alone.
MAGCACHE_THRESH_DEFAULT = _UPSTREAM.thresh


class Role(enum.Enum):
    """What a flag is about."""

    #: what one video shows: the prompt and the first frame (a batch line brings its own)
    REQUEST = "request"
    #: which weights and numerics (task, checkpoint, LoRAs, dtype, device): a change gives another video
    MODEL = "model"
    #: how the work is spread over processes and devices: the same video on any setting (up to float
    #: rounding), so a batch resumed with another placement keeps the videos it has
    PLACEMENT = "placement"
    #: the denoising of one video (size, frames, seed, solver, steps, guidance): a change gives another video
    SAMPLING = "sampling"
    #: the MagCache rule: a change gives another schedule, hence another video
    MAGCACHE = "magcache"
    #: where one generation's files go
    OUTPUT = "output"
    #: `plan --gpus`: the cluster to price layouts for (no run reads them)
    CLUSTER = "cluster"
    #: where a Hub --ckpt_dir's files come from (revision, download): resolved into the checkpoint
    #: folder before any run, so the folder (a MODEL flag) is what a run and its resume key see
    SOURCE = "source"


#: per_video: a batch line and a serve request may set the flag for one video
LINE = "line"
#: per_video: a serve request may set it for one video (a batch line may not)
REQUEST_ONLY = "request"


@dataclass(frozen=True, slots=True)
class Declared:
    """A flag's role, declared beside its `typer.Option` (Typer ignores this metadata)."""

    role: Role
    #: it decides the MagCache schedule that `plan` prints (the rest of `generate`'s flags do not)
    schedule: bool = False
    #: who else may set it for one video: LINE (a batch line and a serve request), REQUEST_ONLY, or None
    per_video: Literal["line", "request"] | None = None
    #: its name in a batch line or a request, where that is not the flag's (`seed` for --base-seed)
    field: str | None = None


REQUEST, MODEL, PLACEMENT, SAMPLING, MAGCACHE, OUTPUT, CLUSTER, SOURCE = Role
_d = Declared


def _opt(*names: str, help: str, **kw: Any) -> Any:
    return typer.Option(*names, help=help, **kw)


def request_params(
    prompt: Annotated[Optional[str], _d(REQUEST, per_video=LINE), _opt("--prompt", help="what to generate")] = None,
    image: Annotated[Optional[Path], _d(REQUEST, schedule=True, per_video=LINE), _opt("--image", help="first frame (i2v-A14B; optional for ti2v-5B)")] = None,
) -> None:
    """What one video shows (a batch line brings its own)."""


def model_params(


    task: Annotated[str, _d(MODEL, schedule=True), _opt("--task", help="t2v-A14B, i2v-A14B or ti2v-5B")] = "t2v-A14B",
    ckpt_dir: Annotated[Optional[Path], _d(MODEL), _opt("--ckpt-dir", "--ckpt_dir", help="checkpoint folder (official or diffusers layout), or a Hub repository such as Wan-AI/Wan2.2-TI2V-5B (from the local Hub cache)")] = None,
    download: Annotated[bool, _d(SOURCE), _opt("--download", help="fetch a Hub --ckpt_dir's missing files (only those the task reads)")] = False,
    revision: Annotated[Optional[str], _d(SOURCE), _opt("--revision", help="branch, tag or commit of a Hub --ckpt_dir (default main)")] = None,
    offload_model: Annotated[Optional[str], _d(PLACEMENT), _opt("--offload-model", "--offload_model", help="True/False: move the idle expert to CPU (official default True on one GPU)")] = None,
    convert_model_dtype: Annotated[bool, _d(MODEL), _opt("--convert-model-dtype", "--convert_model_dtype", help="cast DiT weights to --dtype")] = False,
    t5_cpu: Annotated[bool, _d(PLACEMENT), _opt("--t5-cpu", "--t5_cpu", help="keep the T5 encoder on CPU")] = False,
    t5_fsdp: Annotated[bool, _d(PLACEMENT), _opt("--t5-fsdp", "--t5_fsdp", help="shard T5 blocks with FSDP2")] = False,
    dit_fsdp: Annotated[bool, _d(PLACEMENT), _opt("--dit-fsdp", "--dit_fsdp", help="shard DiT blocks with FSDP2 over the sequence group")] = False,
    ulysses_size: Annotated[int, _d(PLACEMENT), _opt("--ulysses-size", "--ulysses_size", help="Ulysses sequence-parallel degree (divides the heads)")] = 1,
    ring_size: Annotated[int, _d(PLACEMENT), _opt("--ring-size", "--ring_size", help="ring-attention degree: the sequence group is ring x ulysses ranks, ring across nodes, Ulysses inside one")] = 1,
    cfg_parallel: Annotated[bool, _d(PLACEMENT), _opt("--cfg-parallel", "--cfg_parallel", help="cond and uncond forwards on two halves of the world")] = False,
    dtype: Annotated[Optional[str], _d(MODEL), _opt("--dtype", help="bfloat16, float16 or float32 (default: bfloat16 on CUDA, float32 on CPU)")] = None,
    device: Annotated[Optional[str], _d(MODEL), _opt("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available)")] = None,
    dist_timeout: Annotated[float, _d(PLACEMENT), _opt("--dist-timeout", "--dist_timeout", help="seconds before a stuck collective fails the job")] = 600.0,
    attention: Annotated[str, _d(PLACEMENT), _opt("--attention", help="attention kernel: auto (FlashAttention-3 on Hopper, then cuDNN, FlashAttention-2, SDPA: the first that runs here), sdpa, flash2, flash3 or cudnn (refused in one line where it cannot run)")] = "auto",
    compile: Annotated[bool, _d(PLACEMENT), _opt("--compile", help="torch.compile the DiT block once, reused by every block of every expert (the first step pays the compile)")] = False,
    vae_parallel: Annotated[str, _d(PLACEMENT), _opt("--vae-parallel", "--vae_parallel", help="auto: split the VAE decode by rows over every rank of a generation (equal to one rank); off: the output rank decodes alone")] = "auto",
    quantize: Annotated[str, _d(MODEL), _opt("--quantize", help="none, fp8 or int8: the DiT attention projections and FFN in 8 bits (per-channel weight scale, per-token activation scale; fp8 needs sm89+, int8 runs on A100)")] = "none",
    quantize_steps: Annotated[str, _d(MODEL), _opt("--quantize-steps", "--quantize_steps", help="START:STOP slice of the steps run quantized, e.g. 2:-2 keeps the first and last two in the compute dtype (default : = all)")] = ":",
    quantize_blocks: Annotated[str, _d(MODEL), _opt("--quantize-blocks", "--quantize_blocks", help="START:STOP slice of the DiT blocks quantized, e.g. 1:-1 keeps the edge blocks unquantized (default : = all)")] = ":",
    quantize_experts: Annotated[str, _d(MODEL), _opt("--quantize-experts", "--quantize_experts", help="both, high or low: the A14B expert(s) quantized")] = "both",
    lora: Annotated[Optional[list[str]], _d(MODEL), _opt("--lora", help="FILE[:SCALE] LoRA merged into every expert at load time (repeatable; scale 1 by default)")] = None,
    lora_high: Annotated[Optional[list[str]], _d(MODEL), _opt("--lora-high", "--lora_high", help="FILE[:SCALE] LoRA for the high-noise A14B expert only (repeatable)")] = None,
    lora_low: Annotated[Optional[list[str]], _d(MODEL), _opt("--lora-low", "--lora_low", help="FILE[:SCALE] LoRA for the low-noise A14B expert only (repeatable)")] = None,
) -> None:
    """Flags that choose and place the model (shared by every command that loads it)."""


def sampling_params(
    size: Annotated[Optional[str], _d(SAMPLING, per_video=LINE), _opt("--size", help="WIDTH*HEIGHT, e.g. 1280*720 (area only, for image tasks)")] = None,
    frame_num: Annotated[Optional[int], _d(SAMPLING, per_video=LINE), _opt("--frame-num", "--frame_num", help="frames, 4n+1")] = None,
    negative_prompt: Annotated[str, _d(SAMPLING, per_video=LINE), _opt("--negative-prompt", "--negative_prompt", help="'' = the official default")] = "",
    base_seed: Annotated[int, _d(SAMPLING, per_video=LINE, field="seed"), _opt("--base-seed", "--base_seed", help="-1 draws a random seed (recorded in the manifest)")] = -1,
    sample_solver: Annotated[str, _d(SAMPLING, schedule=True, per_video=REQUEST_ONLY), _opt("--sample-solver", "--sample_solver", help="unipc, dpm++ or euler (flow-matching Euler, the step-distilled recipe)")] = "unipc",
    sample_steps: Annotated[Optional[int], _d(SAMPLING, schedule=True, per_video=REQUEST_ONLY), _opt("--sample-steps", "--sample_steps", help="denoising steps (task default)")] = None,
    sample_shift: Annotated[Optional[float], _d(SAMPLING, schedule=True, per_video=REQUEST_ONLY), _opt("--sample-shift", "--sample_shift", help="flow shift (task default)")] = None,
    sample_guide_scale: Annotated[Optional[str], _d(SAMPLING, schedule=True, per_video=REQUEST_ONLY), _opt("--sample-guide-scale", "--sample_guide_scale", help="CFG scale, or LOW,HIGH per expert")] = None,
    timesteps: Annotated[Optional[str], _d(SAMPLING, schedule=True), _opt("--timesteps", help="euler only: base timesteps before the shift, e.g. 1000,750,500,250 (one per step)")] = None,
    distilled: Annotated[Optional[str], _d(SAMPLING, schedule=True), _opt("--distilled", help="step-distilled preset: 'lightning' = euler, 4 steps, shift 5, guidance 1 (Wan2.2-Lightning / LightX2V 4-step LoRAs)")] = None,
) -> None:
    """Flags of one generation that a batch line may override."""


def magcache_params(

    use_magcache: Annotated[bool, _d(MAGCACHE, schedule=True, per_video=REQUEST_ONLY), _opt("--use-magcache", "--use_magcache", help="skip DiT forwards with MagCache")] = False,
    magcache_thresh: Annotated[Optional[float], _d(MAGCACHE, schedule=True, per_video=REQUEST_ONLY), _opt("--magcache-thresh", "--magcache_thresh", help=f"accumulated-error bound (default {MAGCACHE_THRESH_DEFAULT})")] = None,
    magcache_target_speedup: Annotated[Optional[float], _d(MAGCACHE, schedule=True, per_video=REQUEST_ONLY), _opt("--magcache-target-speedup", "--magcache_target_speedup", help="choose the smallest threshold whose plan reaches this forward-count speedup (>= 1); replaces --magcache-thresh")] = None,
    magcache_K: Annotated[int, _d(MAGCACHE, schedule=True, per_video=REQUEST_ONLY), _opt("--magcache-k", "--magcache-K", "--magcache_K", help="max consecutive skips per branch")] = _UPSTREAM.K,
    retention_ratio: Annotated[float, _d(MAGCACHE, schedule=True, per_video=REQUEST_ONLY), _opt("--retention-ratio", "--retention_ratio", help="fraction of forwards always computed")] = _UPSTREAM.retention_ratio,
    magcache_split: Annotated[str, _d(MAGCACHE, schedule=True), _opt("--magcache-split", "--magcache_split", help="upstream (default) or scheduler expert split")] = _UPSTREAM.split_mode,
    magcache_reset_at_switch: Annotated[bool, _d(MAGCACHE, schedule=True), _opt("--magcache-reset-at-switch", "--magcache_reset_at_switch", help="fresh cache for the low-noise expert")] = _UPSTREAM.reset_at_switch,
    magcache_ratios: Annotated[Optional[Path], _d(MAGCACHE, schedule=True), _opt("--magcache-ratios", "--magcache_ratios", help="calibrated ratio file (default: the checkpoint folder's magcache_ratios.json when it has one, else the bundled table)")] = None,
) -> None:
    """MagCache flags (upstream defaults)."""


def output_params(
    save_file: Annotated[Optional[Path], _d(OUTPUT), _opt("--save-file", "--save_file", help="output mp4 (default: a timestamped name)")] = None,
    save_frames: Annotated[Optional[Path], _d(OUTPUT), _opt("--save-frames", "--save_frames", help="folder for lossless PNG frames")] = None,
    save_latents: Annotated[Optional[Path], _d(OUTPUT), _opt("--save-latents", "--save_latents", help="final latents (.safetensors, key 'latents')")] = None,
    overwrite: Annotated[bool, _d(OUTPUT), _opt("--overwrite", help="replace an existing --save_file")] = False,
) -> None:
    """Where one generation's outputs go."""


def layout_params(

    gpus: Annotated[Optional[int], _d(CLUSTER), _opt("--gpus", help="plan: also price every layout (dp x cfg x ring x ulysses, FSDP) on this many GPUs (a model, not a measurement)")] = None,
    gpu: Annotated[str, _d(CLUSTER), _opt("--gpu", help="plan --gpus: h100, h200, a100, h20, l20 or 4090")] = "h100",
    nodes: Annotated[Optional[int], _d(CLUSTER), _opt("--nodes", help="plan --gpus: nodes the GPUs are spread over (default: 8 GPUs per node)")] = None,
    gpus_per_node: Annotated[Optional[int], _d(CLUSTER), _opt("--gpus-per-node", "--gpus_per_node", help="plan --gpus: GPUs per node")] = None,
    calibration: Annotated[Optional[Path], _d(CLUSTER), _opt("--calibration", help="plan --gpus: a scripts/gpu_check.py result; its measured A14B block times replace the roofline's DiT compute")] = None,
    dry_run: Annotated[bool, _d(CLUSTER), _opt("--dry-run", "--dry_run", help="plan --gpus: run the launch path of your flags at real size on the meta device, every rank role, and report its memory per phase and bytes per collective (no GPU, no weights read; --ckpt_dir optional)")] = False,
) -> None:
    """`plan`'s layout planner: the cluster to price layouts for."""


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


def some_params(*names: str) -> Callable[..., None]:
    """A parameter set (for `compose_params`) of these run flags exactly as declared here (options,
    help, defaults), for a command that takes a few of them (`quantize`)."""
    declared = {p.name: p for src in RUN_PARAM_SETS for p in inspect.signature(src).parameters.values()}
    params = [declared[n].replace(kind=inspect.Parameter.KEYWORD_ONLY) for n in names]

    def chosen() -> None:
        """The run flags a command takes."""

    chosen.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    chosen.__annotations__ = {p.name: p.annotation for p in params}
    return chosen


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


def _declared_in(fn: Callable[..., Any]) -> dict[str, tuple[Declared, Any]]:
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        meta = [m for m in getattr(p.annotation, "__metadata__", ()) if isinstance(m, Declared)]
        if len(meta) != 1:
            raise TypeError(f"flag {name} of {fn.__name__} declares no role (add a Declared beside its option)")
        out[name] = (meta[0], p.annotation)
    return out


@functools.cache
def declarations() -> dict[str, Declared]:
    """Flag name -> its declared role, for every flag of a run and `plan`'s cluster flags (in help order)."""
    return {name: d for fn in (*RUN_PARAM_SETS, layout_params) for name, (d, _) in _declared_in(fn).items()}


def flags_where(*, role: Role | None = None, schedule: bool | None = None,
                per_video: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The flag names (help order) whose declaration matches every criterion given."""
    return tuple(name for name, d in declarations().items()
                 if (role is None or d.role is role) and (schedule is None or d.schedule is schedule)
                 and (per_video is None or d.per_video in per_video))


def value_type(flag: str) -> type:
    """The Python type a flag's value has when given (`Optional[int]` -> int, a list flag -> list)."""
    for fn in (*RUN_PARAM_SETS, layout_params):
        params = inspect.signature(fn).parameters
        if flag in params:
            base = get_args(params[flag].annotation)[0]
            args = [a for a in get_args(base) if a is not type(None)] if get_origin(base) is not None else [base]
            kind = args[0]
            return get_origin(kind) or kind
    raise KeyError(flag)


def _option_info(flag: str) -> Any:
    for fn in (*RUN_PARAM_SETS, layout_params):
        params = inspect.signature(fn).parameters
        if flag in params:
            return next(m for m in params[flag].annotation.__metadata__ if isinstance(m, typer.models.ParameterInfo))
    raise KeyError(flag)


def option_names(flag: str) -> tuple[str, ...]:
    """The flag's declared spellings, canonical first (`--ulysses-size`, `--ulysses_size`)."""
    info = _option_info(flag)
    # in `Annotated` form Typer keeps the first spelling where a default would go
    first = (info.default,) if isinstance(info.default, str) and info.default.startswith("--") else ()
    return (*first, *info.param_decls)


def per_video_params(exclude: tuple[str, ...] = ()) -> Callable[..., None]:
    """A parameter set (for `compose_params`) of every flag a serve request may set, each optional
    with default None (= the server's own), named as the request names it (`--seed` for the seed).
    `submit` takes these, so its options are always the fields a server accepts."""
    params, annotations = [], {}
    for flag in flags_where(per_video=(LINE, REQUEST_ONLY)):
        d = declarations()[flag]
        name = d.field or flag
        if name in exclude:
            continue
        kind, names = value_type(flag), option_names(flag)
        if d.field is not None:
            names = (f"--{d.field}", *names)
        if kind is bool:  # on, off, or the server's choice
            names = (f"{names[0]}/--no-{names[0][2:].removeprefix('use-')}",)
        annotation = Annotated[Optional[kind], typer.Option(*names, help=f"{_option_info(flag).help} (default: the server's)")]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
        annotations[name] = annotation

    def fields() -> None:
        """Per-video fields of a request."""

    fields.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fields.__annotations__ = annotations
    return fields
