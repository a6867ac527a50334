"""The tiny-shapes data set and its detector: one job, shared by training, benchmarks and tests.

A clip is a flat-coloured shape (circle, square, triangle) moving in a straight line over a
flat-coloured background, 9 frames of 64x64, with the prompt that says so:
"a red circle moving left on a black background". Everything is drawn from a seed (`clip`), so
the data set is the same on every machine. `detect` reads a generated video back: the shape's
colour (the palette entry nearest to the pixels that differ from the background) and its
direction (the centroid's path from the first to the last frame).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIZE, FRAMES = 64, 9
SHAPES = ("circle", "square", "triangle")
#: RGB in [0, 1]
PALETTE = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05)}
SHAPE_COLOURS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("black", "white", "blue", "green")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True, slots=True)
class Scene:
    shape: str
    colour: str
    direction: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every prompt the model is trained on (the background never has the shape's colour)."""
    return [Scene(s, c, d, b) for s in SHAPES for c in SHAPE_COLOURS for d in DIRECTIONS for b in BACKGROUNDS
            if b != c]


def _sdf(shape: str, x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (pixels) to the shape centred at the origin with 'radius' r."""
    if shape == "circle":
        return torch.sqrt(x * x + y * y) - r
    if shape == "square":
        return torch.maximum(x.abs(), y.abs()) - 0.85 * r
    # equilateral triangle pointing up: max of the three edge half-planes
    k = math.sqrt(3.0) / 2
    rr = 1.1 * r
    return torch.maximum(torch.maximum(-y - 0.5 * rr, k * x + 0.5 * y - 0.5 * rr), -k * x + 0.5 * y - 0.5 * rr)


def render(scene: Scene, cx: float, cy: float, r: float, speed: float) -> torch.Tensor:
    """The clip [3, FRAMES, SIZE, SIZE] in [-1, 1] (the VAE's range), anti-aliased edges."""
    dx, dy = DIRECTIONS[scene.direction]
    coords = torch.arange(SIZE, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    fg = torch.tensor(PALETTE[scene.colour]).view(3, 1, 1)
    bg = torch.tensor(PALETTE[scene.background]).view(3, 1, 1)
    frames = []
    for f in range(FRAMES):
        px, py = cx + dx * speed * f, cy + dy * speed * f
        alpha = (0.5 - _sdf(scene.shape, xx - px, yy - py, r)).clamp(0, 1)
        frames.append(bg + (fg - bg) * alpha)
    return torch.stack(frames, dim=1) * 2 - 1


def random_clip(scene: Scene, gen: torch.Generator) -> torch.Tensor:
    """`scene` at a random size, speed and start that keeps the shape inside the frame."""
    u = torch.rand(4, generator=gen).tolist()
    r = 7.0 + 4.0 * u[0]
    speed = 2.5 + 1.0 * u[1]
    travel = speed * (FRAMES - 1)
    margin = r + 2
    dx, dy = DIRECTIONS[scene.direction]
    lo_x = margin + (travel if dx < 0 else 0)
    hi_x = SIZE - margin - (travel if dx > 0 else 0)
    lo_y = margin + (travel if dy < 0 else 0)
    hi_y = SIZE - margin - (travel if dy > 0 else 0)
    return render(scene, lo_x + (hi_x - lo_x) * u[2], lo_y + (hi_y - lo_y) * u[3], r, speed)


def clip(seed: int) -> tuple[Scene, torch.Tensor]:
    """Clip number `seed` of the data set: its scene (and prompt) and the video."""
    gen = torch.Generator().manual_seed(seed)
    scenes = all_scenes()
    scene = scenes[int(torch.randint(len(scenes), (1,), generator=gen))]
    return scene, random_clip(scene, gen)


def nearest_colour(rgb: torch.Tensor, names: tuple[str, ...] = tuple(PALETTE)) -> str:
    table = torch.tensor([PALETTE[n] for n in names])
    return names[int(((table - rgb.view(1, 3)) ** 2).sum(1).argmin())]


@dataclass(frozen=True, slots=True)
class Detection:
    background: str
    colour: str | None  # None: nothing differs from the background
    direction: str | None  # None: the shape did not move (or was not found)
    shape_fraction: float  # pixels that are the shape, mean over frames


def detect(video: torch.Tensor) -> Detection:
    """Read colour and direction off a video [3, F, H, W] in [-1, 1] (or uint8 [F, H, W, 3])."""
    if video.dtype == torch.uint8:
        video = video.permute(3, 0, 1, 2).float() / 127.5 - 1
    rgb = (video.float().clamp(-1, 1) + 1) / 2  # [3, F, H, W]
    border = torch.cat([rgb[:, :, :2].flatten(1), rgb[:, :, -2:].flatten(1),
                        rgb[:, :, :, :2].flatten(1), rgb[:, :, :, -2:].flatten(1)], dim=1)
    bg_rgb = border.median(dim=1).values
    background = nearest_colour(bg_rgb)
    mask = ((rgb - bg_rgb.view(3, 1, 1, 1)) ** 2).sum(0).sqrt() > 0.35  # [F, H, W]
    fraction = float(mask.float().mean())
    if mask.sum() < 10:
        return Detection(background, None, None, fraction)
    colour = nearest_colour(rgb.permute(1, 2, 3, 0)[mask].median(dim=0).values, SHAPE_COLOURS)
    coords = torch.arange(SIZE, dtype=torch.float32)
    centroids = []
    for f in (0, 1, -2, -1):
        m = mask[f].float()
        if m.sum() < 5:
            return Detection(background, colour, None, fraction)
        centroids.append(((m.sum(0) * coords).sum() / m.sum(), (m.sum(1) * coords).sum() / m.sum()))
    mx = (centroids[2][0] + centroids[3][0] - centroids[0][0] - centroids[1][0]) / 2
    my = (centroids[2][1] + centroids[3][1] - centroids[0][1] - centroids[1][1]) / 2
    if max(abs(mx), abs(my)) < 4:  # less than 4 px over the clip: not moving
        return Detection(background, colour, None, fraction)
    direction = ("right" if mx > 0 else "left") if abs(mx) >= abs(my) else ("down" if my > 0 else "up")
    return Detection(background, colour, direction, fraction)
