"""Run configuration: task defaults merged with flags, validated before anything heavy happens.

Pure Python (no torch import) so that bad input exits in milliseconds with one clear line,
before a process group is created or a weight is read.
"""
from __future__ import annotations

import math
import os
import random
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from magcache.ratios import checkpoint_ratio_file
from parallel.attention_choices import BACKENDS
from launcher.errors import InputError, UsageError
from launcher.preflight import check_checkpoint_files, lora_header
from launcher.options import MAGCACHE_THRESH_DEFAULT, cli_name, flag_defaults
from launcher.wan.tasks import TASKS, TaskSpec, max_area_for
from launcher.wan.quant_schedule import QuantizeSpecError, QuantSpec


#: --dist-timeout that outlasts a cold --compile of the DiT block (minutes on 8 ranks sharing the CPU for Triton)
COLD_COMPILE_TIMEOUT_S = 900

Solver = Literal["unipc", "dpm++", "euler"]

#: step-distilled presets: the flags each sets unless given (Wan2.2-Lightning configs and generate.py,
#: github ModelTC/Wan2.2-Lightning: `sample_steps=4`, `sample_shift=5.0`, `sample_guide_scale=(1.0, 1.0)`
#: for t2v-A14B, i2v-A14B and ti2v-5B, `--sample_solver euler`; launcher/wan/solvers.py has the schedule)
DISTILLED_PRESETS: dict[str, dict[str, Any]] = {
    "lightning": {"sample_solver": "euler", "sample_steps": 4, "sample_shift": 5.0, "sample_guide_scale": "1"},
}
DTypeName = Literal["bfloat16", "float16", "float32"]
SplitMode = Literal["upstream", "scheduler"]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[*xX]\s*(\d+)\s*$")


def parse_size(size: str, task: TaskSpec) -> tuple[int, int]:
    """`W*H` (width first, as official) -> (width, height), multiples of the task's token stride."""
    m = _SIZE_RE.match(size)
    if not m:
        raise UsageError(f"--size {size!r} is not WIDTH*HEIGHT (e.g. 832*480)")
    width, height = int(m.group(1)), int(m.group(2))
    stride = task.spatial_stride
    if width <= 0 or height <= 0 or width % stride or height % stride:
        near = "*".join(str(max(stride, round(v / stride) * stride)) for v in (width, height))
        raise UsageError(
            f"--size {size}: width and height must be positive multiples of {stride} for {task.name} "
            f"(VAE stride {task.vae_stride[1]} x patch {task.patch_size[1]}); nearest that runs: {near}; "
            f"trained sizes: {', '.join(task.supported_sizes)}"
        )
    return width, height


def parse_guide_scale(value: str | float | None, task: TaskSpec) -> tuple[float, float]:
    """One float for both experts (official), or `low,high`; returns (low_noise, high_noise)."""
    if value is None:
        return task.guide_scale
    if isinstance(value, (int, float)):
        return float(value), float(value)
    parts = [p for p in str(value).replace(" ", "").split(",") if p]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"--sample_guide_scale {value!r} is not a number or LOW,HIGH pair") from None
    if len(nums) == 1:
        return nums[0], nums[0]
    if len(nums) == 2:
        return nums[0], nums[1]
    raise UsageError(f"--sample_guide_scale {value!r}: give one number or LOW,HIGH")


def distilled_magcache_warning(preset: str, steps: int) -> str:
    """Why MagCache and a step-distilled model do not mix (`plan` and `generate` print it)."""
    return (f"--distilled {preset}: a step-distilled model makes each of its {steps} steps count; MagCache finds "
            "almost nothing to skip there and every skip costs quality: run it without --use_magcache")


def cond_only_experts(task: TaskSpec, guide_scale: tuple[float, float]) -> tuple[str, ...]:
    """Experts whose guidance scale is exactly 1: their steps run the cond forward alone.

    Official runs both and combines `uncond + 1*(cond - uncond)`, which equals cond up to float
    rounding (one subtraction and one addition in float32); the one-branch path returns cond itself,
    as Wan2.2-Lightning's `use_cfg` does (`wan/utils/utils.py`, |g - 1| <= 1e-6 there, exactly 1 here).
    """
    low, high = guide_scale
    if task.boundary is None:
        return ("single",) if low == 1 else ()
    return tuple(e for e, g in (("high", high), ("low", low)) if g == 1)


def parse_bool(value: str | bool | None, flag: str) -> bool | None:
    """Official `str2bool` semantics for flags that take a value (`--offload_model True`)."""
    if value is None or isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off"):
        return False
    raise UsageError(f"{flag} {value!r}: expected True or False")


#: LoRA flag -> which experts it applies to
LORA_FLAGS: dict[str, Literal["all", "high", "low"]] = {"lora": "all", "lora_high": "high", "lora_low": "low"}


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """One `--lora FILE[:SCALE]` (or `--lora-high` / `--lora-low`), checked before anything loads."""

    path: Path
    #: multiplies the LoRA's own alpha/rank: W += scale * alpha/rank * (B @ A)
    scale: float
    #: "all" (every expert), "high" or "low" (one A14B expert)
    expert: Literal["all", "high", "low"]

    @property
    def flag(self) -> str:
        return {"all": "--lora", "high": "--lora-high", "low": "--lora-low"}[self.expert]

    def applies_to(self, expert: str) -> bool:
        return self.expert == "all" or self.expert == expert

    @property
    def label(self) -> str:
        """`file:scale` (`[high]`/`[low]` for one expert): how ratio files record the LoRAs they were made with."""
        return f"{self.path}:{self.scale:g}" + ("" if self.expert == "all" else f"[{self.expert}]")


def parse_lora(value: str, expert: Literal["all", "high", "low"], task: TaskSpec, *,
               check_paths: bool = True) -> LoraSpec:
    """`FILE[:SCALE]` -> LoraSpec; a missing file, a bad scale or an expert the task lacks exits 2."""
    flag = {"all": "--lora", "high": "--lora-high", "low": "--lora-low"}[expert]
    path_text, scale = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path_text = head
        except ValueError:  # a ':' inside the file name, or a scale that is not a number
            if check_paths and not Path(value).expanduser().exists() and Path(head).expanduser().exists():
                raise UsageError(f"{flag} {value}: scale {tail!r} is not a number (FILE[:SCALE], "
                                 "e.g. style.safetensors:0.8)") from None
    if not math.isfinite(scale):
        raise UsageError(f"{flag} {value}: the scale must be a finite number (FILE[:SCALE], e.g. style.safetensors:0.8)")
    if expert != "all" and task.boundary is None:
        raise UsageError(f"{flag} {path_text}: {task.name} has one expert (no high/low-noise pair); use --lora")
    path = Path(path_text).expanduser()
    if check_paths and path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))[:4]
        raise UsageError(f"{flag} {path}: is a directory; give one .safetensors file in it"
                         + (f" ({', '.join(inside)})" if inside else " (it holds none)"))
    if check_paths and not path.is_file():
        raise UsageError(f"{flag} {path}: file not found")
    if check_paths:
        lora_header(path)  # a pickle or a truncated file refuses now, not after importing torch
    return LoraSpec(path=path, scale=scale, expert=expert)


def parse_loras(flags: Mapping[str, Any], task: TaskSpec, *, check_paths: bool = True) -> tuple[LoraSpec, ...]:
    """Every LoRA flag in the order given per flag: --lora first, then --lora-high, then --lora-low."""
    out: list[LoraSpec] = []
    for flag, expert in LORA_FLAGS.items():
        for value in flags.get(flag) or ():
            out.append(parse_lora(value, expert, task, check_paths=check_paths))
    return tuple(out)


#: MagCacheOptions field <- the flag it comes from (the defaults live with the flags, in options.py);
#: `thresh` and `target_speedup` are settled together in `MagCacheOptions.from_flags`
_MAGCACHE_FLAGS = {"K": "magcache_K", "retention_ratio": "retention_ratio", "split": "magcache_split",
                   "reset_at_switch": "magcache_reset_at_switch", "ratios_file": "magcache_ratios"}


@dataclass(frozen=True, kw_only=True, slots=True)
class MagCacheOptions:
    """MagCache flags, resolved. Defaults are upstream MagCache4Wan2.2's, declared in options.py."""

    enabled: bool
    #: upper bound of the accumulated error (upstream default 0.04; the seed README uses 0.06).
    #: None while it is still to be chosen from `target_speedup` (`planner.schedule.resolve_config`
    #: fills it in before any weight is loaded)
    thresh: float | None
    #: maximum consecutive skipped forwards per branch
    K: int
    #: fraction of forwards always computed (task-specific windows)
    retention_ratio: float
    #: split = 2 x high-noise steps, counted the upstream way or from the real scheduler
    split: SplitMode
    #: fresh accumulators and residual cache when the low-noise expert takes over (not upstream)
    reset_at_switch: bool
    #: calibrated ratio table (from `magcache-launch calibrate`); None = bundled table
    ratios_file: Path | None
    #: --magcache-target-speedup: choose `thresh` as the smallest reaching this forward-count speedup
    target_speedup: float | None = None
    #: run uncached and record ratios instead of skipping
    calibration: bool = False

    def __post_init__(self) -> None:
        if self.target_speedup is not None:
            t = self.target_speedup
            if not math.isfinite(t) or t < 1:
                raise UsageError(f"--magcache-target-speedup {t}: must be a number >= 1 (1 = skip nothing)")
        elif self.thresh is None:
            raise ValueError("MagCacheOptions needs a thresh or a target_speedup")
        if self.thresh is not None and self.thresh < 0:
            raise UsageError(f"--magcache_thresh {self.thresh}: must be >= 0")
        if self.K < 1:
            raise UsageError(f"--magcache_K {self.K}: must be >= 1")
        if not 0.0 <= self.retention_ratio <= 1.0:
            raise UsageError(f"--retention_ratio {self.retention_ratio}: must be within [0, 1]")
        if self.split not in ("upstream", "scheduler"):
            raise UsageError(f"--magcache-split {self.split!r}: choose upstream or scheduler")
        if self.ratios_file is not None and not Path(self.ratios_file).is_file():
            raise UsageError(f"--magcache_ratios {self.ratios_file}: file not found")

    @property
    def thresh_from(self) -> Literal["target", "flag"]:
        """Where the threshold came from: --magcache-target-speedup, or --magcache_thresh / its default."""
        return "target" if self.target_speedup is not None else "flag"

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any] | None = None, *, calibration: bool = False,
                   enabled: bool | None = None) -> MagCacheOptions:
        """From the flag dict; flags not given take their declared defaults.

        `enabled`: override --use_magcache (`plan` always shows the cached schedule). A calibration
        runs uncached, so it ignores --magcache-target-speedup (and never resolves it).
        """
        f = with_defaults(flags or {})
        on = f["use_magcache"] if enabled is None else enabled
        thresh, target = f["magcache_thresh"], None if calibration else f["magcache_target_speedup"]
        if target is not None and thresh is not None:
            raise UsageError(f"--magcache_thresh {thresh} and --magcache-target-speedup {target} both set the "
                             "threshold; pick one")
        if target is None and thresh is None:
            thresh = MAGCACHE_THRESH_DEFAULT
        fields = {field: f[flag] for field, flag in _MAGCACHE_FLAGS.items()}
        if fields["ratios_file"] is None:  # a table shipped in the checkpoint folder drives its runs
            fields["ratios_file"] = checkpoint_ratio_file(f.get("ckpt_dir"))
        return cls(enabled=bool(on) and not calibration, calibration=calibration, thresh=thresh,
                   target_speedup=target, **fields)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything one `generate` needs, resolved from flags and the official task defaults.

    No defaults here: every value comes through `run_config_from_flags`, which takes the
    declared flag defaults (options.py) and the task's official ones (tasks.py).
    """

    task: TaskSpec
    ckpt_dir: Path
    prompt: str
    size: str
    width: int
    height: int
    frame_num: int
    image: Path | None
    negative_prompt: str
    base_seed: int
    sample_solver: Solver
    sample_steps: int
    sample_shift: float
    #: euler: base timesteps before the shift (--timesteps); None = linspace(1000, 0, steps+1)[:-1]
    timesteps: tuple[float, ...] | None
    #: --distilled preset that filled the sampling flags, if any
    distilled: str | None
    #: (low_noise, high_noise) as in the official tuple
    guide_scale: tuple[float, float]
    offload_model: bool | None
    convert_model_dtype: bool
    t5_cpu: bool
    t5_fsdp: bool
    dit_fsdp: bool
    ulysses_size: int
    cfg_parallel: bool
    #: ring-attention degree (outer factor of the sequence group; 1: Ulysses alone)
    ring_size: int = 1
    dtype: DTypeName | None
    device: str | None
    #: regional torch.compile of the DiT block (launcher.wan.dit.compile_blocks)
    compile: bool
    save_file: Path | None
    save_frames: Path | None
    save_latents: Path | None
    overwrite: bool
    dist_timeout_s: float = field(metadata={"flag": "dist_timeout"})
    magcache: MagCacheOptions
    #: LoRAs merged into the DiT weights at load time, in the order they are applied
    loras: tuple[LoraSpec, ...]
    #: "auto": every rank of a generation decodes a band of rows (launcher.wan.vae_parallel); "off": one rank
    vae_parallel: Literal["auto", "off"] = "auto"

    #: --attention as given (parallel.attention resolves it on the rank's device: Placement.attention)
    attention: str = "auto"
    #: --quantize and its schedule (launcher.wan.quantize)
    quantization: QuantSpec = QuantSpec()

    @property
    def max_area(self) -> int:
        return max_area_for(self.size, self.width, self.height)

    @property
    def uses_image(self) -> bool:
        return self.image is not None

    @property
    def negative_or_default(self) -> str:
        """Official: an empty negative prompt means the config's long default string."""
        return self.negative_prompt if self.negative_prompt != "" else self.task.sample_neg_prompt

    @property
    def warnings(self) -> list[str]:
        """Accepted but unusual settings the user should know about (printed, and in the manifest)."""
        out = []
        if self.distilled is not None and self.magcache.enabled:
            out.append(distilled_magcache_warning(self.distilled, self.sample_steps))
        if self.size not in self.task.supported_sizes and self.size.replace("x", "*") not in self.task.supported_sizes:
            out.append(f"--size {self.size} is not one of {self.task.name}'s trained sizes "
                       f"({', '.join(self.task.supported_sizes)}); expect lower quality")
        for lora in self.loras:
            if lora.scale < 0:  # some do this on purpose (steer away from a style): allowed, but said
                out.append(f"{lora.flag} {lora.path}:{lora.scale:g}: a negative scale subtracts the LoRA "
                           "(steers away from what it learned); give a positive scale to apply it")
            elif lora.scale == 0:
                out.append(f"{lora.flag} {lora.path}:0: scale 0 changes no weight; drop the flag or give a scale")
        if self.compile and self.dist_timeout_s < COLD_COMPILE_TIMEOUT_S:
            out.append(f"--compile with --dist-timeout {self.dist_timeout_s:g}: a rank still compiling its first block "
                       f"keeps its peers waiting in the first collective; use --dist-timeout {COLD_COMPILE_TIMEOUT_S} "
                       "or more until the compile cache is warm")
        return out

    @property
    def cond_only_experts(self) -> tuple[str, ...]:
        """Experts at guidance 1, run with the cond forward alone (see `cond_only_experts`)."""
        return cond_only_experts(self.task, self.guide_scale)

    @property
    def ratio_table_key(self) -> str:
        """Which bundled table applies: ti2v has one for text mode and one for image mode."""
        if self.task.name == "ti2v-5B":
            return "ti2v-5B/i2v" if self.uses_image else "ti2v-5B/t2v"
        return self.task.name


def config_fields(flags: tuple[str, ...] | list[str]) -> set[str]:
    """The RunConfig fields these flags set as they are (most share the flag's name; `magcache`,
    `loras` and `guide_scale` are made from several flags or parsed, and are not among them)."""
    return {_FIELD_OF_FLAG[flag] for flag in flags if flag in _FIELD_OF_FLAG}


def check_output_location(path: Path, flag: str, *, directory: bool = False) -> None:
    """Exit 2 now, not after a 20-minute denoise, when an output could not be written there.

    Permission bits say little (root ignores them; procfs and read-only mounts refuse anyway), so
    a probe file is created and removed in the nearest existing directory: missing directories
    below it are created at write time. Nothing is left behind.
    """
    path = Path(path).absolute()
    if not directory and path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    if directory and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a directory; choose another path")
    probe = path if directory else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is a file, not a directory; choose another path")
    try:
        fd, name = tempfile.mkstemp(prefix=".magcache-launch-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UsageError(f"{flag} {path}: directory {probe} is not writable ({e.strerror or e}); "
                         "choose another path") from None


def _check_image(image: Path, task: TaskSpec) -> None:
    if task.image == "none":
        raise UsageError(f"--image is not used by {task.name} (text-only); drop it or use i2v-A14B / ti2v-5B")
    if not image.is_file():
        raise UsageError(f"--image {image}: file not found")
    try:
        from PIL import Image

        with Image.open(image) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for broken files
        raise UsageError(f"--image {image}: not a readable image ({type(exc).__name__}); give a PNG or JPEG") from None


def with_defaults(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The flag dict completed with every flag's declared default; unknown names are a bug.

    A `--distilled` preset fills the sampling flags it sets where they were not given (the solver
    always: its default cannot be told apart from an explicit unipc).
    """
    defaults = flag_defaults()
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise TypeError(f"unknown run flags {unknown}; declare them in launcher/options.py")
    f = {**defaults, **flags}
    preset = f.get("distilled")
    if preset is not None:
        if preset not in DISTILLED_PRESETS:
            raise UsageError(f"--distilled {preset!r} is unknown; choose {', '.join(DISTILLED_PRESETS)}")
        for name, value in DISTILLED_PRESETS[preset].items():
            if name == "sample_solver" or f[name] is None:
                f[name] = value
    return f


def parse_timesteps(value: str | None) -> tuple[float, ...] | None:
    """`--timesteps 1000,750,500,250` -> base timesteps, strictly decreasing within (0, 1000]."""
    if value is None:
        return None
    try:
        out = tuple(float(p) for p in str(value).replace(" ", "").split(",") if p)
    except ValueError:
        raise UsageError(f"--timesteps {value!r}: give comma-separated numbers, e.g. 1000,750,500,250") from None
    if not out or any(not 0 < t <= 1000 for t in out) or any(a <= b for a, b in zip(out, out[1:])):
        raise UsageError(f"--timesteps {value}: give strictly decreasing numbers within (0, 1000], e.g. 1000,750,500,250")
    return out


def resolve_sampling(flags: Mapping[str, Any]) -> tuple[TaskSpec, int, float, Solver]:
    """(task, steps, shift, solver): what fixes the denoising schedule, with the task's defaults."""
    f = with_defaults(flags)
    if f["task"] not in TASKS:
        raise UsageError(f"--task {f['task']!r} is unknown; choose one of {', '.join(TASKS)}")
    spec = TASKS[f["task"]]
    timesteps = parse_timesteps(f["timesteps"])
    default_steps = spec.sample_steps if timesteps is None else len(timesteps)
    steps = default_steps if f["sample_steps"] is None else f["sample_steps"]
    if steps < 1:
        raise UsageError(f"--sample_steps {steps}: must be >= 1")
    if timesteps is not None and len(timesteps) != steps:
        raise UsageError(f"--timesteps has {len(timesteps)} values but --sample_steps is {steps}; give one per step")
    shift = spec.sample_shift if f["sample_shift"] is None else f["sample_shift"]
    if shift <= 0:
        raise UsageError(f"--sample_shift {shift}: must be > 0")
    if f["sample_solver"] not in ("unipc", "dpm++", "euler"):
        raise UsageError(f"--sample_solver {f['sample_solver']!r}: choose unipc, dpm++ or euler")
    if timesteps is not None and f["sample_solver"] != "euler":
        raise UsageError(f"--timesteps is read by --sample_solver euler only (got {f['sample_solver']}); "
                         "add --sample_solver euler or drop --timesteps")
    return spec, steps, shift, f["sample_solver"]


def parse_quantization(flags: Mapping[str, Any], task: TaskSpec) -> QuantSpec:
    """--quantize and its schedule flags, checked before anything loads."""
    f = with_defaults(flags)
    try:
        return QuantSpec.from_flags(f["quantize"], f["quantize_steps"], f["quantize_blocks"], f["quantize_experts"],
                                    task.experts)
    except QuantizeSpecError as e:
        raise UsageError(str(e)) from None


def run_config_from_flags(flags: Mapping[str, Any], *, calibration: bool = False,
                          check_paths: bool = True) -> RunConfig:
    """The CLI's flag dict (names as Typer passes them; missing ones take their declared default)
    -> a validated RunConfig; raises UsageError on the first bad value.

    `generate`, `calibrate`, `plan` and every `batch` item go through here, so a batch item is
    exactly `generate` with the same flags. `check_paths=False` skips the file-system checks
    (batch checks its command line before the items' images are known).
    """
    f = with_defaults(flags)
    spec, steps, shift, solver = resolve_sampling(f)
    size = f["size"] or spec.supported_sizes[0]
    width, height = parse_size(size, spec)
    frame_num = spec.frame_num if f["frame_num"] is None else f["frame_num"]
    if frame_num < 1 or (frame_num - 1) % 4:
        raise UsageError(f"--frame_num {frame_num}: must be 4n+1 (1, 5, 9, ..., 81)")
    if f["dtype"] is not None and f["dtype"] not in ("bfloat16", "float16", "float32"):
        raise UsageError(f"--dtype {f['dtype']!r}: choose bfloat16, float16 or float32")
    if f["ulysses_size"] < 1:
        raise UsageError(f"--ulysses_size {f['ulysses_size']}: must be >= 1")
    if f["ring_size"] < 1:
        raise UsageError(f"--ring_size {f['ring_size']}: must be >= 1")
    if f["vae_parallel"] not in ("auto", "off"):
        raise UsageError(f"--vae-parallel {f['vae_parallel']!r}: choose auto or off")
    magcache = MagCacheOptions.from_flags(f, calibration=calibration)
    prompt = f["prompt"]
    if prompt is None or not prompt.strip():
        raise UsageError("--prompt is empty; give the text to generate from")
    if f["ckpt_dir"] is None:
        raise UsageError("--ckpt_dir is required: the folder with the Wan2.2 checkpoint")
    from launcher.hub import resolve_ckpt_dir

    ckpt = resolve_ckpt_dir(f["ckpt_dir"], spec, download=f["download"], revision=f["revision"])
    if check_paths and not ckpt.is_dir():
        raise UsageError(f"--ckpt_dir {ckpt}: directory not found")
    if check_paths:
        check_checkpoint_files(ckpt)  # missing shards, truncated files: from headers, before torch is imported
    img = Path(f["image"]) if f["image"] else None
    if img is None and spec.image == "required":
        raise UsageError(f"{spec.name} needs --image (the first frame)")
    if img is not None and check_paths:
        _check_image(img, spec)
    elif img is not None and spec.image == "none":
        raise UsageError(f"--image is not used by {spec.name} (text-only); drop it or use i2v-A14B / ti2v-5B")
    outputs = {name: Path(f[name]) if f[name] else None for name in ("save_file", "save_frames", "save_latents")}
    if outputs["save_latents"] is not None and not str(outputs["save_latents"]).endswith(".safetensors"):
        raise UsageError(f"--save-latents {outputs['save_latents']}: use a .safetensors file name")
    if outputs["save_file"] is not None and outputs["save_file"].suffix.lower() != ".mp4":
        raise UsageError(f"--save_file {outputs['save_file']}: the video is written as MP4 (H.264); "
                         "use a .mp4 file name")
    if check_paths:
        for name, path in outputs.items():
            if path is not None:
                # official spelling for the official flag, ours for our own
                flag = "--save_file" if name == "save_file" else cli_name(name)
                check_output_location(path, flag, directory=name == "save_frames")
        if outputs["save_file"] is None and not calibration:
            check_output_location(Path.cwd() / "video.mp4", "the default output folder (the working directory)")
        if outputs["save_file"] is not None and outputs["save_file"].exists() and not f["overwrite"]:
            raise UsageError(f"--save_file {outputs['save_file']} exists; pass --overwrite or choose another name")
    guide_scale = parse_guide_scale(f["sample_guide_scale"], spec)
    one_branch = cond_only_experts(spec, guide_scale)
    if f["cfg_parallel"] and one_branch and not calibration:
        raise UsageError(f"--cfg-parallel with guidance scale 1 ({', '.join(one_branch)} expert): such steps run the "
                         "cond forward alone, so half the ranks would idle; drop --cfg-parallel and give those ranks "
                         f"to Ulysses (--ulysses_size {2 * max(1, f['ulysses_size'])})")

    if f["attention"] not in BACKENDS:
        raise UsageError(f"--attention {f['attention']}: choose one of {', '.join(BACKENDS)}")
    # every flag that names a RunConfig field goes in as given; then the values resolved above
    as_given = {fld: f[flag] for flag, fld in _FIELD_OF_FLAG.items() if flag in f}
    return RunConfig(**{
        **as_given,
        "task": spec, "ckpt_dir": ckpt, "prompt": prompt, "size": size, "width": width, "height": height,
        "frame_num": frame_num, "image": img, "sample_solver": solver, "sample_steps": steps, "sample_shift": shift,
        "timesteps": parse_timesteps(f["timesteps"]), "guide_scale": guide_scale,
        "offload_model": parse_bool(f["offload_model"], "--offload_model"), "magcache": magcache, **outputs,
        "loras": parse_loras(f, spec, check_paths=check_paths), "quantization": parse_quantization(f, spec),
    })


#: flag name -> the RunConfig field it sets (the same name, except where the field says otherwise)
_FIELD_OF_FLAG = {f.metadata.get("flag", f.name): f.name for f in fields(RunConfig)}


def item_config(flags: Mapping[str, Any], overrides: Mapping[str, Any], *, seed: int | None, video: Path) -> RunConfig:
    """One video of many (a batch line, a sweep setting, a served request): the command line's
    flags with the video's own over them, its seed (None: drawn later), its video file; checked
    exactly as `generate` checks its flags. The threshold of a target is still to be chosen
    (`planner.schedule.resolve_config`)."""
    return run_config_from_flags(dict(flags, **overrides, base_seed=-1 if seed is None else seed, save_file=video,
                                      save_frames=None, save_latents=None, overwrite=True))


def default_save_file(config: RunConfig) -> Path:
    """Official naming: task_size_ulysses_prompt50_timestamp.mp4 in the working directory."""
    prompt = config.prompt.replace(" ", "_").replace("/", "_")[:50]
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path(f"{config.task.name}_{config.size.replace('*', 'x')}_{config.ulysses_size}_{prompt}_{stamp}.mp4")


def draw_seed(base_seed: int) -> int:
    """Official: a negative seed means `random.randint(0, sys.maxsize)`."""
    return base_seed if base_seed >= 0 else random.randint(0, sys.maxsize)
