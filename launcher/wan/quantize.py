"""Which DiT linears run in FP8/INT8, in which blocks, experts and steps (the Wan quantization policy).

Quantized: the attention projections (self and cross: q, k, v, out) and the FFN of every block the
schedule selects. Never quantized: patch and text embeddings, norms, modulation tables, the time
embedding and the head, which official Wan computes in float32. The mechanism (`quant.linear`) knows
nothing of Wan; this module swaps the chosen `nn.Linear`s of a meta-built model for `QuantLinear`s
before FSDP2 sees it, so each rank later loads (and quantizes) only its own rows.

Schedule: `--quantize-blocks A:B` and `--quantize-steps A:B` are Python slices over the block and
step indices (negative counts from the end: `2:-2` keeps the first and last two in high precision);
`--quantize-experts` picks the A14B expert(s). Blocks and experts left out keep their weights as
loaded; steps left out run the quantized layers on their dequantized weights in the compute dtype
(no activation quantization; the 8-bit weights stay, so the memory does not grow).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from launcher.wan.quant_schedule import MODES, QuantizeSpecError, QuantSpec  # noqa: F401 (re-exported)
from quant.linear import MODES as LINEAR_MODES
from quant.linear import Precision, QuantLinear

assert MODES == LINEAR_MODES, "launcher.wan.quant_schedule.MODES names the modes quant.linear runs"

#: per block: the linears quantized (diffusers WanTransformerBlock names)
BLOCK_LINEARS: tuple[str, ...] = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)
def quantized_linears(model: nn.Module, spec: QuantSpec, expert: str) -> list[str]:
    """Module names of the linears `spec` quantizes in this expert (empty when none)."""
    if not spec.quantizes_expert(expert):
        return []
    blocks = model.get_submodule("blocks")
    return [f"blocks.{i}.{name}" for i in spec.quantized_blocks(len(blocks)) for name in BLOCK_LINEARS]


def install_quantized(model: nn.Module, names: Iterable[str], mode: str) -> Precision:
    """Replace each named `nn.Linear` by an empty `QuantLinear` (meta stays meta) sharing one `Precision`."""
    precision = Precision()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = parent.get_submodule(child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not a Linear; the quantization policy is stale")
        setattr(parent, child, QuantLinear.like(linear, mode, precision))
    return precision


def quantize_model(model: nn.Module, spec: QuantSpec, expert: str) -> tuple[dict[str, str], Precision | None]:
    """Install the quantized layers `spec` asks for in one expert built on meta.

    Returns {weight key: mode} (what a loading source must quantize) and the expert's precision
    switch (None when nothing is quantized)."""
    names = quantized_linears(model, spec, expert)
    if not names:
        return {}, None
    precision = install_quantized(model, names, spec.mode)
    return {f"{n}.weight": spec.mode for n in names}, precision


def step_switch(spec: QuantSpec, precisions: Iterable[Precision]) -> Callable[[int, int], None] | None:
    """A per-step hook `(step, steps)` setting every quantized layer low or high precision; None when
    every step is low precision (nothing to switch)."""
    switches = list(precisions)
    if not switches or spec.all_steps:
        return None

    def at_step(step: int, steps: int) -> None:
        low = step in spec.low_steps(steps)
        for p in switches:
            p.low = low

    return at_step
