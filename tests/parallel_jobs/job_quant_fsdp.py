"""FSDP2 over blocks holding 8-bit layers (`quant.linear.QuantLinear`): each rank quantizes and loads
only its rows, the all-gather moves the 8-bit weights as stored (never cast to the blocks' bf16
mixed-precision dtype), and the forward equals the unsharded quantized model.

Args: MODE (fp8 | int8). Reports per rank: the weight dtype a quantized layer sees in its forward, the
local rows it holds, and the max error against one process.
"""
import sys

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.dist import init_distributed
from parallel.fsdp import load_sharded, shard_stack
from parallel.launch import detect_launch
from parallel.mesh import ParallelDims
from quant.linear import QuantLinear
from quant.source import QuantizingSource
from spawn import emit
from tiny_blocks import DictRows

DIM, HIDDEN, BLOCKS = 32, 80, 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(DIM))  # a plain parameter: gathered in the blocks' bf16
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gain * self.down(torch.nn.functional.gelu(self.up(x)))


def build(mode: str) -> tuple[nn.Sequential, dict[str, str]]:
    model = nn.Sequential(*[Block() for _ in range(BLOCKS)])
    targets = {}
    for i, block in enumerate(model):
        for name in ("up", "down"):
            setattr(block, name, QuantLinear.like(getattr(block, name), mode))
            targets[f"{i}.{name}.weight"] = mode
    return model, targets


def main() -> None:
    mode = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    with torch.device("cpu"):
        full = nn.Sequential(*[Block() for _ in range(BLOCKS)])
    for p in full.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    state = {k: v.detach() for k, v in full.state_dict().items()}
    with init_distributed(detect_launch(), device_preference="cpu", timeout=60) as ctx:
        pm = ParallelDims.from_world(ctx.world_size, ulysses=ctx.world_size).build(ctx)
        with torch.device("meta"):
            model, targets = build(mode)
        stack = shard_stack(list(model), pm.submesh("sp"), param_dtype=torch.bfloat16)
        load_sharded(model, QuantizingSource(DictRows(state), targets), device="cpu")
        seen = []
        model[1].up.register_forward_pre_hook(lambda m, args: seen.append(str(m.weight.dtype)))
        local = model[1].up.weight
        x = torch.randn(2, 7, DIM, generator=torch.Generator().manual_seed(5))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = stack(x)
        reference, ref_targets = build(mode)
        ref_state = QuantizingSource(DictRows(state), ref_targets)
        reference.load_state_dict({k: ref_state.get(k) for k in ref_state.keys()})
        for i in range(BLOCKS):  # one process's blocks in the same bf16 mixed precision
            reference[i].gain.data = reference[i].gain.data.to(torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = reference(x)
        emit({"rank": ctx.rank, "seen_dtype": seen, "is_dtensor": isinstance(local, DTensor),
              "local_rows": local.to_local().shape[0], "local_dtype": str(local.to_local().dtype),
              "max_err": (out.float() - expected.float()).abs().max().item()})


if __name__ == "__main__":
    main()
