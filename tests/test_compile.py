"""`--compile`: one compiled block serves every block of both experts, and equals eager (issue 12).

Inductor on CPU compiles C++ (about a minute here, longer under load), hence slow-marked.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from launcher.wan.dit import compile_blocks
from tests.test_precision_official import _inputs, _our_forward, _ours


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_compiled_blocks_equal_eager_with_one_graph_for_both_experts(tiny_ckpt, dtype, tolerance):
    """Under bf16 autocast block 0 gets the bf16 patch embedding and the others the float32 residual
    stream: still one graph for every block of both experts (`tolerance`: max error / output scale)."""
    ckpt = tiny_ckpt("t2v-A14B")
    experts = {name: _ours("t2v-A14B", ckpt, name) for name in ("high", "low")}
    latent, _, g = _inputs("t2v-A14B")
    context = torch.randn(7, 32, generator=g)
    t = torch.tensor([900.0])
    eager = {name: _our_forward(dit, latent, t, context, dtype=dtype) for name, dit in experts.items()}
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(experts.values())
    for name, dit in experts.items():
        compiled = _our_forward(dit, latent, t, context, dtype=dtype)
        err = (compiled - eager[name]).abs().max().item()
        scale = eager[name].abs().max().item() if dtype != torch.float32 else 1.0
        assert err <= tolerance * scale, f"{name}: compiled differs from eager by {err:.2e}"
    assert sum(len(d.model.blocks) for d in experts.values()) == 4
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.slow
def test_a_server_seeing_nine_sizes_keeps_a_compiled_graph_for_each():
    """serve/batch vary the size: past dynamo's default recompile limit (8) the blocks would fall
    back to eager for good. Counted with the "eager" backend (dynamo's graphs, no C++ build)."""
    from launcher.wan.dit import RECOMPILE_LIMIT, WanDiT
    from tests.test_dit_attention_dtype import _tiny_block_model

    dit = WanDiT(_tiny_block_model())
    torch._dynamo.reset()
    counters.clear()
    compile_blocks([dit], backend="eager")
    sizes = 9  # one past dynamo's default limit
    assert RECOMPILE_LIMIT >= sizes
    for frames in range(1, sizes + 1):
        latent = torch.randn(4, frames, 4, 4)
        with torch.no_grad():
            dit.forward(latent, torch.tensor([500.0]), dit.embed_text(torch.randn(1, 8, 16)),
                        runner=__import__("magcache.controller", fromlist=["x"]).ComputeAll(), index=0)
    assert counters["stats"]["unique_graphs"] == sizes, dict(counters["stats"])
