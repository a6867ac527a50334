"""The three Wan2.2 tasks with the official defaults (wan/configs/*.py @ 42bf4cf).

Pure data, no torch: the CLI validates flags against these before any weight is read,
and `magcache-launch plan` needs them without a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: `sample_neg_prompt` of wan/configs/shared_config.py, verbatim. Used when --negative-prompt is "".
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

TaskName = Literal["t2v-A14B", "i2v-A14B", "ti2v-5B"]
ExpertName = Literal["high", "low", "single"]

#: `MAX_AREA_CONFIGS` of the official configs: `--size` only sets the pixel area for image tasks.
MAX_AREA_CONFIGS: dict[str, int] = {
    "720*1280": 921600, "1280*720": 921600, "480*832": 399360, "832*480": 399360,
    "704*1280": 901120, "1280*704": 901120, "1024*704": 720896, "704*1024": 720896,
}


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One Wan2.2 task: what the official pipeline does with its checkpoint by default."""

    name: str
    mode: Literal["t2v", "i2v", "ti2v"]
    #: "2.1": z 16, stride 4x8x8 (`Wan2.1_VAE.pth`); "2.2": z 48, stride 4x16x16 (`Wan2.2_VAE.pth`).
    vae_version: Literal["2.1", "2.2"]
    vae_stride: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    #: channels of the noise latent (i2v-A14B: 16, the DiT sees 36 = noise + mask + image latent)
    z_dim: int
    dit_in_channels: int
    #: ("high", "low") for the two-expert A14B models, ("single",) for ti2v-5B
    experts: tuple[ExpertName, ...]
    #: high-noise expert runs while t >= boundary * num_train_timesteps; None: one model
    boundary: float | None
    sample_shift: float
    sample_steps: int
    #: (low_noise, high_noise), the official tuple order; ti2v uses the same value twice
    guide_scale: tuple[float, float]
    frame_num: int
    sample_fps: int
    num_heads: int
    supported_sizes: tuple[str, ...]
    image: Literal["none", "required", "optional"]
    #: the official checkpoint's Hugging Face Hub repository (its diffusers form adds "-Diffusers")
    hub_repo: str = ""
    t5_checkpoint: str = "models_t5_umt5-xxl-enc-bf16.pth"
    t5_tokenizer: str = "google/umt5-xxl"
    vae_checkpoint: str = "Wan2.1_VAE.pth"
    text_len: int = 512
    num_train_timesteps: int = 1000
    sample_neg_prompt: str = OFFICIAL_NEGATIVE_PROMPT

    @property
    def spatial_stride(self) -> int:
        """Pixels per token side: VAE stride x patch size (16 for A14B, 32 for 5B)."""
        return self.vae_stride[1] * self.patch_size[1]

    @property
    def model_names(self) -> tuple[str, ...]:
        """What a client may call this model: the task, its Hub repository and that repository's diffusers form."""
        return (self.name, self.hub_repo, f"{self.hub_repo}-Diffusers")

    @property
    def expert_folders(self) -> dict[str, str]:
        """Official sub-folder per expert ('' = checkpoint root)."""
        if self.experts == ("single",):
            return {"single": ""}
        return {"high": "high_noise_model", "low": "low_noise_model"}


TASKS: dict[str, TaskSpec] = {
    "t2v-A14B": TaskSpec(
        name="t2v-A14B", mode="t2v", vae_version="2.1", vae_stride=(4, 8, 8), patch_size=(1, 2, 2),
        z_dim=16, dit_in_channels=16, experts=("high", "low"), boundary=0.875, sample_shift=12.0,
        sample_steps=40, guide_scale=(3.0, 4.0), frame_num=81, sample_fps=16, num_heads=40,
        supported_sizes=("720*1280", "1280*720", "480*832", "832*480"), image="none",
        hub_repo="Wan-AI/Wan2.2-T2V-A14B",
    ),
    "i2v-A14B": TaskSpec(
        name="i2v-A14B", mode="i2v", vae_version="2.1", vae_stride=(4, 8, 8), patch_size=(1, 2, 2),
        z_dim=16, dit_in_channels=36, experts=("high", "low"), boundary=0.900, sample_shift=5.0,
        sample_steps=40, guide_scale=(3.5, 3.5), frame_num=81, sample_fps=16, num_heads=40,
        supported_sizes=("720*1280", "1280*720", "480*832", "832*480"), image="required",
        hub_repo="Wan-AI/Wan2.2-I2V-A14B",
    ),
    "ti2v-5B": TaskSpec(
        name="ti2v-5B", mode="ti2v", vae_version="2.2", vae_stride=(4, 16, 16), patch_size=(1, 2, 2),
        z_dim=48, dit_in_channels=48, experts=("single",), boundary=None, sample_shift=5.0,
        sample_steps=50, guide_scale=(5.0, 5.0), frame_num=121, sample_fps=24, num_heads=24,
        supported_sizes=("704*1280", "1280*704"), image="optional", vae_checkpoint="Wan2.2_VAE.pth",
        hub_repo="Wan-AI/Wan2.2-TI2V-5B",
    ),
}


def max_area_for(size: str, width: int, height: int) -> int:
    """Pixel budget for image-conditioned runs: the official table, else W*H for other sizes."""
    return MAX_AREA_CONFIGS.get(size, width * height)
