"""FSDP2 per-block sharding on a meta-built model, loaded rank-by-rank from safetensors.

Args: CHECKPOINT. Each rank: build TinyDiT on meta, fully_shard each block over the world
(sp) mesh, load only its own rows, run the pieces on a rank-specific input, then compare with
the unsharded model loaded whole. Reports bytes read, resident shard bytes, RSS growth during the load and peak RSS, the
local shard shapes, and the max abs error.
"""
import ctypes
import sys

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from parallel.dist import init_distributed
from parallel.launch import detect_launch
from parallel.fsdp import load_sharded, shard_modules, shard_stack
from parallel.mesh import ParallelDims
from spawn import emit
from tiny_blocks import IN, TinyDiT, run_pieces


class SafetensorsRows:
    """Row-range reader over one safetensors file (mmap); the shape FSDP loading expects."""

    def __init__(self, path: str) -> None:
        self._file = safe_open(path, framework="pt", device="cpu")

    def keys(self):
        return self._file.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def get_slice(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._file.get_slice(key)[start:stop]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes malloc has handed out (heap + mmap chunks): unlike RSS, not hidden by reused free pages."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    ckpt = sys.argv[1]
    with init_distributed(detect_launch(), device_preference="cpu", timeout=60) as ctx:
        pm = ParallelDims.from_world(ctx.world_size, ulysses=ctx.world_size).build(ctx)
        with torch.device("meta"):
            model = TinyDiT()
        sharded_blocks = shard_modules(list(model.blocks), pm.submesh("sp"))
        rss0, heap0 = status_kib("VmRSS"), heap_in_use()
        stats = load_sharded(model, SafetensorsRows(ckpt), device="cpu")
        rss1, peak, heap1 = status_kib("VmRSS"), status_kib("VmHWM"), heap_in_use()
        local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters()
                          if isinstance(p, DTensor))
        local_rows = {n: p.to_local().shape[0] for n, p in model.blocks[0].named_parameters()}
        x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(100 + ctx.rank))
        with torch.no_grad():
            out = run_pieces(model, x)
            out2 = run_pieces(model, x)  # second pass: blocks reshard after forward and gather again
        whole = SafetensorsRows(ckpt)
        reference = TinyDiT()
        reference.load_state_dict({k: whole.get(k) for k in whole.keys()})
        with torch.no_grad():
            expected = run_pieces(reference, x)
        # official FSDP's mixed precision: blocks all-gathered and used in bf16, shards stay float32
        with torch.device("meta"):
            mp_model = TinyDiT()
        shard_modules(list(mp_model.blocks), pm.submesh("sp"), param_dtype=torch.bfloat16)
        load_sharded(mp_model, SafetensorsRows(ckpt), device="cpu")
        seen: list[tuple[str, str]] = []
        mp_model.blocks[0].up.register_forward_pre_hook(
            lambda m, args: seen.append((str(m.weight.dtype), str(args[0].dtype))))
        block_params = {n for n, _ in reference.named_parameters() if n.startswith("blocks.")}
        rounded = TinyDiT()
        rounded.load_state_dict({k: whole.get(k).to(torch.bfloat16).float() if k in block_params else whole.get(k)
                                 for k in whole.keys()})
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            mp_out = run_pieces(mp_model, x)
            mp_expected = run_pieces(rounded, x)
        # one FSDP2 root over the blocks, each block prefetching the next one's all-gather
        with torch.device("meta"):
            stacked = TinyDiT()
        stack = shard_stack(stacked.blocks, pm.submesh("sp"))
        load_sharded(stacked, SafetensorsRows(ckpt), device="cpu")
        with torch.no_grad():
            h = stack(stacked.embed(x) + stacked.scale_shift_table[0])
            stack_out = stacked.head(h * (1 + stacked.scale_shift_table[1]))
        # torch keeps the explicit prefetch targets in a private list; read it to see the chain is set
        prefetch = [len(b._get_fsdp_state()._states_to_forward_prefetch) for b in stacked.blocks]
        mp = dict(gathered_dtype=seen[0][0], block_input_dtype=seen[0][1],
                  shard_dtype=str(mp_model.blocks[0].up.weight.to_local().dtype),
                  max_err=(mp_out.float() - mp_expected.float()).abs().max().item())
        stacked_result = dict(max_err=(stack_out - expected).abs().max().item(), prefetching=prefetch)
        emit(dict(rank=ctx.rank, sharded_blocks=sharded_blocks, mixed_precision=mp, stack=stacked_result, bytes_read=stats.bytes_read,
                  n_sharded=stats.sharded, n_replicated=stats.replicated, local_rows=local_rows,
                  local_sharded_bytes=local_bytes, rss_growth_kib=rss1 - rss0, heap_growth=heap1 - heap0, peak_rss_kib=peak,
                  max_err=(out - expected).abs().max().item(), repeat_equal=bool(torch.equal(out, out2)),
                  root_replicated=not any(isinstance(p, DTensor) for p in (model.head.weight, model.scale_shift_table))))


if __name__ == "__main__":
    main()
