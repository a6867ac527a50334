"""The kernels `--attention` names, torch-free so that flag checks run before torch is imported;
`parallel.attention` decides which one runs and calls it."""
from __future__ import annotations

from typing import Literal

Backend = Literal["auto", "sdpa", "flash2", "flash3", "cudnn"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flash2", "flash3", "cudnn")
#: auto's order of preference
AUTO_ORDER: tuple[str, ...] = ("flash3", "cudnn", "flash2", "sdpa")
#: the packages of the FlashAttention kernels (cuDNN attention and SDPA come with torch)
PACKAGES: dict[str, str] = {"flash3": "flash_attn_interface", "flash2": "flash_attn"}


def installed_kernels() -> list[str]:
    """The kernels whose packages this Python has, in auto's order, found without importing them
    (or torch): what `plan` can say before any device is seen. cuDNN still needs a CUDA GPU, FA3 sm90."""
    import importlib.util

    return [k for k in AUTO_ORDER if k not in PACKAGES or importlib.util.find_spec(PACKAGES[k]) is not None]
