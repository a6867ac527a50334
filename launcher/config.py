"""Run configuration: task defaults merged with flags, validated before anything heavy happens.

Pure Python (no torch import) so that bad input exits in milliseconds with one clear line,
before a process group is created or a weight is read.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from launcher.errors import InputError
from launcher.tasks import TASKS, TaskSpec, max_area_for


class UsageError(InputError):
    """A flag with a bad value. The CLI prints the message as one line and exits 2."""


Solver = Literal["unipc", "dpm++"]
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
        raise UsageError(
            f"--size {size}: width and height must be positive multiples of {stride} for {task.name} "
            f"(VAE stride {task.vae_stride[1]} x patch {task.patch_size[1]})"
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


@dataclass(kw_only=True, slots=True)
class MagCacheOptions:
    """MagCache flags. Defaults are upstream MagCache4Wan2.2's."""

    enabled: bool = False
    #: upper bound of the accumulated error (upstream default 0.04; the seed README uses 0.06)
    thresh: float = 0.04
    #: maximum consecutive skipped forwards per branch
    K: int = 2
    #: fraction of forwards always computed (task-specific windows)
    retention_ratio: float = 0.2
    #: split = 2 x high-noise steps, counted the upstream way or from the real scheduler
    split: SplitMode = "upstream"
    #: fresh accumulators and residual cache when the low-noise expert takes over (not upstream)
    reset_at_switch: bool = False
    #: calibrated ratio table (from `magcache-launch calibrate`); None = bundled table
    ratios_file: Path | None = None
    #: run uncached and record ratios instead of skipping
    calibration: bool = False

    def __post_init__(self) -> None:
        if self.thresh < 0:
            raise UsageError(f"--magcache_thresh {self.thresh}: must be >= 0")
        if self.K < 1:
            raise UsageError(f"--magcache_K {self.K}: must be >= 1")
        if not 0.0 <= self.retention_ratio <= 1.0:
            raise UsageError(f"--retention_ratio {self.retention_ratio}: must be within [0, 1]")
        if self.split not in ("upstream", "scheduler"):
            raise UsageError(f"--magcache-split {self.split!r}: choose upstream or scheduler")
        if self.ratios_file is not None and not Path(self.ratios_file).is_file():
            raise UsageError(f"--magcache_ratios {self.ratios_file}: file not found")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything one `generate` needs, resolved from flags and the official task defaults."""

    task: TaskSpec
    ckpt_dir: Path
    prompt: str
    size: str
    width: int
    height: int
    frame_num: int
    image: Path | None = None
    negative_prompt: str = ""
    base_seed: int = -1
    sample_solver: Solver = "unipc"
    sample_steps: int = 0
    sample_shift: float = 0.0
    #: (low_noise, high_noise) as in the official tuple
    guide_scale: tuple[float, float] = (5.0, 5.0)
    offload_model: bool | None = None
    convert_model_dtype: bool = False
    t5_cpu: bool = False
    t5_fsdp: bool = False
    dit_fsdp: bool = False
    ulysses_size: int = 1
    cfg_parallel: bool = False
    dtype: DTypeName | None = None
    device: str | None = None
    save_file: Path | None = None
    save_frames: Path | None = None
    save_latents: Path | None = None
    overwrite: bool = False
    dist_timeout_s: float = 600.0
    magcache: MagCacheOptions = field(default_factory=MagCacheOptions)

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
        if self.size not in self.task.supported_sizes and self.size.replace("x", "*") not in self.task.supported_sizes:
            out.append(f"--size {self.size} is not one of {self.task.name}'s trained sizes "
                       f"({', '.join(self.task.supported_sizes)}); expect lower quality")
        return out

    @property
    def ratio_table_key(self) -> str:
        """Which bundled table applies: ti2v has one for text mode and one for image mode."""
        if self.task.name == "ti2v-5B":
            return "ti2v-5B/i2v" if self.uses_image else "ti2v-5B/t2v"
        return self.task.name


def _check_writable_parent(path: Path, flag: str) -> None:
    parent = path.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {parent} is not writable; choose another path")


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


def build_run_config(
    *,
    task: str,
    ckpt_dir: str | Path | None,
    prompt: str | None,
    size: str | None = None,
    frame_num: int | None = None,
    image: str | Path | None = None,
    negative_prompt: str = "",
    base_seed: int = -1,
    sample_solver: str = "unipc",
    sample_steps: int | None = None,
    sample_shift: float | None = None,
    sample_guide_scale: str | float | None = None,
    offload_model: str | bool | None = None,
    convert_model_dtype: bool = False,
    t5_cpu: bool = False,
    t5_fsdp: bool = False,
    dit_fsdp: bool = False,
    ulysses_size: int = 1,
    cfg_parallel: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    save_file: str | Path | None = None,
    save_frames: str | Path | None = None,
    save_latents: str | Path | None = None,
    overwrite: bool = False,
    dist_timeout_s: float = 600.0,
    magcache: MagCacheOptions | None = None,
    check_paths: bool = True,
) -> RunConfig:
    """Merge flags with the task's official defaults; raise UsageError on the first bad value."""
    if task not in TASKS:
        raise UsageError(f"--task {task!r} is unknown; choose one of {', '.join(TASKS)}")
    spec = TASKS[task]
    size = size or spec.supported_sizes[0]
    width, height = parse_size(size, spec)
    frame_num = spec.frame_num if frame_num is None else frame_num
    if frame_num < 1 or (frame_num - 1) % 4:
        raise UsageError(f"--frame_num {frame_num}: must be 4n+1 (1, 5, 9, ..., 81)")
    steps = spec.sample_steps if sample_steps is None else sample_steps
    if steps < 1:
        raise UsageError(f"--sample_steps {steps}: must be >= 1")
    shift = spec.sample_shift if sample_shift is None else sample_shift
    if shift <= 0:
        raise UsageError(f"--sample_shift {shift}: must be > 0")
    if sample_solver not in ("unipc", "dpm++"):
        raise UsageError(f"--sample_solver {sample_solver!r}: choose unipc or dpm++")
    if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
        raise UsageError(f"--dtype {dtype!r}: choose bfloat16, float16 or float32")
    if ulysses_size < 1:
        raise UsageError(f"--ulysses_size {ulysses_size}: must be >= 1")
    if prompt is None or not prompt.strip():
        raise UsageError("--prompt is empty; give the text to generate from")
    if ckpt_dir is None:
        raise UsageError("--ckpt_dir is required: the folder with the Wan2.2 checkpoint")
    ckpt = Path(ckpt_dir)
    if check_paths and not ckpt.is_dir():
        raise UsageError(f"--ckpt_dir {ckpt}: directory not found")
    img = Path(image) if image else None
    if img is None and spec.image == "required":
        raise UsageError(f"{spec.name} needs --image (the first frame)")
    if img is not None and check_paths:
        _check_image(img, spec)
    elif img is not None and spec.image == "none":
        raise UsageError(f"--image is not used by {spec.name} (text-only); drop it or use i2v-A14B / ti2v-5B")
    outputs = {"--save_file": save_file, "--save-frames": save_frames, "--save-latents": save_latents}
    for flag, p in outputs.items():
        if p is not None and check_paths:
            _check_writable_parent(Path(p) if flag != "--save-frames" else Path(p) / "x", flag)
    if save_latents is not None and not str(save_latents).endswith(".safetensors"):
        raise UsageError(f"--save-latents {save_latents}: use a .safetensors file name")
    if save_file is not None and check_paths and Path(save_file).exists() and not overwrite:
        raise UsageError(f"--save_file {save_file} exists; pass --overwrite or choose another name")
    return RunConfig(
        task=spec,
        ckpt_dir=ckpt,
        prompt=prompt,
        size=size,
        width=width,
        height=height,
        frame_num=frame_num,
        image=img,
        negative_prompt=negative_prompt,
        base_seed=base_seed,
        sample_solver=sample_solver,  # type: ignore[arg-type]
        sample_steps=steps,
        sample_shift=shift,
        guide_scale=parse_guide_scale(sample_guide_scale, spec),
        offload_model=parse_bool(offload_model, "--offload_model"),
        convert_model_dtype=convert_model_dtype,
        t5_cpu=t5_cpu,
        t5_fsdp=t5_fsdp,
        dit_fsdp=dit_fsdp,
        ulysses_size=ulysses_size,
        cfg_parallel=cfg_parallel,
        dtype=dtype,  # type: ignore[arg-type]
        device=device,
        save_file=Path(save_file) if save_file else None,
        save_frames=Path(save_frames) if save_frames else None,
        save_latents=Path(save_latents) if save_latents else None,
        overwrite=overwrite,
        dist_timeout_s=dist_timeout_s,
        magcache=magcache or MagCacheOptions(),
    )


def run_config_from_flags(kw: dict, *, calibration: bool = False) -> RunConfig:
    """The CLI's flag dict (option names as Typer passes them) -> a validated RunConfig.

    `generate`, `calibrate` and every `batch` item go through here, so a batch item is exactly
    `generate` with the same flags.
    """
    kw = dict(kw)
    calibration = calibration or kw.pop("magcache_calibration", False)
    mc = MagCacheOptions(
        enabled=kw.pop("use_magcache") and not calibration,
        thresh=kw.pop("magcache_thresh"),
        K=kw.pop("magcache_K"),
        retention_ratio=kw.pop("retention_ratio"),
        split=kw.pop("magcache_split"),
        reset_at_switch=kw.pop("magcache_reset_at_switch"),
        ratios_file=kw.pop("magcache_ratios"),
        calibration=calibration,
    )
    kw["dist_timeout_s"] = kw.pop("dist_timeout")
    return build_run_config(magcache=mc, **kw)
