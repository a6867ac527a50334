"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"), AlexNet, v0.1.

Plain torch, no torchvision: the AlexNet `features` stack is five convolutions, rebuilt here with
torchvision's layer indices so its checkpoint loads unchanged. Weights come only from files the
user supplies (`--lpips-weights DIR`); nothing is ever downloaded. Both files are loaded with
`torch.load(weights_only=True)`, which reads tensors and never runs code from the pickle.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from launcher.errors import UsageError
from launcher.quality.lpips_files import (
    ALEXNET_FILE,
    ALEXNET_SOURCE,
    LIN_FILE,
    LIN_SOURCE,
    LPIPS_MIN_SIZE,
)

#: (in, out, kernel, stride, padding) of torchvision's AlexNet convolutions at features.0/3/6/8/10
_CONVS = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1), 8: (384, 256, 3, 1, 1),
          10: (256, 256, 3, 1, 1)}
#: LPIPS taps the ReLU after each convolution: features[0:2], [2:5], [5:8], [8:10], [10:12]
_TAPS = (1, 4, 7, 9, 11)
_CHANNELS = (64, 192, 384, 256, 256)
#: the LPIPS ScalingLayer: inputs in [-1, 1] are shifted and scaled to ImageNet statistics
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class _NetLin(nn.Module):
    """`linN.model.1.weight` as in the lpips package (model.0 is a dropout, inactive at eval)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LpipsAlex(nn.Module):
    """d(x0, x1) = sum over 5 AlexNet layers of mean_hw( w_l . (x0_l/|x0_l| - x1_l/|x1_l|)^2 )."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(12):
            if i in _CONVS:
                c_in, c_out, k, s, p = _CONVS[i]
                layers.append(nn.Conv2d(c_in, c_out, k, stride=s, padding=p))
            elif i in (2, 5):
                layers.append(nn.MaxPool2d(3, 2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        for n, c in enumerate(_CHANNELS):
            self.add_module(f"lin{n}", _NetLin(c))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in [-1, 1] each -> [N] distances (0 for identical images)."""
        total = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        for n, (f0, f1) in enumerate(zip(self._taps(x0), self._taps(x1))):
            d = (_unit(f0) - _unit(f1)) ** 2
            total = total + getattr(self, f"lin{n}").model(d).mean(dim=(1, 2, 3))
        return total


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length along channels at every position (lpips.normalize_tensor)."""
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + eps)


class Lpips:
    """LPIPS on uint8 RGB frames; callable as `compare_frames(..., lpips=)` expects."""

    def __init__(self, net: LpipsAlex, batch: int = 4) -> None:
        self.net = net
        self.batch = batch

    def distance(self, a: np.ndarray, b: np.ndarray) -> list[float]:
        """Per-frame LPIPS of uint8 [F,H,W,3] (or one [H,W,3]) A and B; frames scaled to [-1, 1]."""
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise UsageError(f"LPIPS needs two frames of one shape, got {list(a.shape)} and {list(b.shape)}")
        if a.ndim == 3:
            a, b = a[None], b[None]
        if a.ndim != 4 or a.shape[-1] != 3:
            raise UsageError(f"LPIPS takes RGB frames [F,H,W,3] or [H,W,3], got {list(a.shape)}")
        h, w = a.shape[1:3]
        if h < LPIPS_MIN_SIZE or w < LPIPS_MIN_SIZE:
            raise UsageError(f"frames are {w}x{h}; LPIPS (AlexNet) needs at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} pixels")
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, a.shape[0], self.batch):
                x0, x1 = _to_tensor(a[i:i + self.batch]), _to_tensor(b[i:i + self.batch])
                out.extend(float(v) for v in self.net(x0, x1))
        return out

    def __call__(self, a: np.ndarray, b: np.ndarray) -> list[float]:
        return self.distance(a, b)


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def load_lpips(directory: str | Path) -> Lpips:
    """Build LPIPS from DIR/alexnet-owt-7be5be79.pth and DIR/alex.pth; one-line UsageError otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"--lpips-weights {directory}: not a folder; give the folder holding {ALEXNET_FILE} and {LIN_FILE}")
    net = LpipsAlex()
    expected = net.state_dict()
    alex = _load(directory / ALEXNET_FILE, ALEXNET_SOURCE)
    lin = _load(directory / LIN_FILE, LIN_SOURCE)
    state = {}
    for key, want in expected.items():
        path, source, src = (directory / ALEXNET_FILE, ALEXNET_SOURCE, alex) if key.startswith("features.") else \
            (directory / LIN_FILE, LIN_SOURCE, lin)
        got = src.get(key)
        if not isinstance(got, torch.Tensor):
            raise UsageError(f"{path}: no tensor {key}; expected {source}")
        if tuple(got.shape) != tuple(want.shape):
            raise UsageError(f"{path}: {key} has shape {list(got.shape)}, expected {list(want.shape)}; "
                             f"expected {source}")
        state[key] = got.float()
    net.load_state_dict(state, strict=True)
    return Lpips(net)


def _load(path: Path, source: str) -> Mapping[str, object]:
    if not path.is_file():
        raise UsageError(f"--lpips-weights: {path} not found; it is {source}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a plain tensor pickle
        raise UsageError(f"{path}: not a torch weights file ({type(e).__name__}); expected {source}") from None
    if not isinstance(obj, Mapping):
        raise UsageError(f"{path}: holds a {type(obj).__name__}, not a state dict; expected {source}")
    return obj

