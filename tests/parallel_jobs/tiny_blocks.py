"""A small model shaped like a DiT for the FSDP tests: replicated root pieces around a stack of blocks.

Widths are odd on purpose (HIDDEN rows split 1000/999 over two ranks, `gain` has one row, so
one rank's shard is empty), and each block has a persistent buffer FSDP2 must not shard. The
forward calls the pieces one by one, as our DiT forward does, never the root module.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

IN, WIDTH, HIDDEN, BLOCKS = 16, 512, 1999, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, HIDDEN)
        self.down = nn.Linear(HIDDEN, WIDTH)
        self.gain = nn.Parameter(torch.ones(1))
        self.register_buffer("scale", torch.ones(WIDTH))

    def forward(self, x: Tensor) -> Tensor:
        # the norm in float32 whatever the weights' dtype, as diffusers' FP32LayerNorm in the Wan blocks
        normed = torch.nn.functional.layer_norm(x.float(), (WIDTH,), self.norm.weight.float(), self.norm.bias.float())
        return x + self.gain * self.scale * self.down(torch.nn.functional.gelu(self.up(normed)))


class TinyDiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.scale_shift_table = nn.Parameter(torch.zeros(2, WIDTH))
        self.head = nn.Linear(WIDTH, IN)


def run_pieces(model: TinyDiT, x: Tensor) -> Tensor:
    """The forward, piece by piece: root embed, each block by itself, root head."""
    h = model.embed(x) + model.scale_shift_table[0]
    for block in model.blocks:
        h = block(h)
    return model.head(h * (1 + model.scale_shift_table[1]))


def write_checkpoint(path: Path, seed: int = 0) -> dict[str, tuple[tuple[int, ...], int]]:
    """Random weights to `path`; returns name -> (shape, bytes) as stored."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = TinyDiT()
    with torch.no_grad():
        for block in model.blocks:
            block.gain.fill_(0.5)
            block.scale.uniform_(0.5, 1.5)
        model.scale_shift_table.normal_(std=0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return {k: (tuple(v.shape), v.numel() * v.element_size()) for k, v in state.items()}


class DictRows:
    """In-memory RowSource over a state dict, for single-process checks."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self):
        return self.state.keys()

    def shape(self, key):
        return tuple(self.state[key].shape)

    def get(self, key):
        return self.state[key]

    def get_slice(self, key, start, stop):
        return self.state[key][start:stop]
