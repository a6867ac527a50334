"""The DiT forward: diffusers' WanTransformer3DModel sub-modules, called by us.

We call the sub-modules (patch embed, rope, condition embedder, blocks, head) instead of the
root `forward` because we must own three things diffusers' forward hides: where the token sequence
is split across ranks (Ulysses), the block stack that MagCache may skip, and the precision policy.
In float32 the modules equal the official WanModel (docs/pipeline_facts.md #34). Under autocast
diffusers' policy is not official's, so the block, the attention norms, the time embedding and the
head run here in the official order and precision (docs/pipeline_facts.md #36): the sinusoid in
float64, time embedding and modulation in float32, the residual stream in float32 (official's
`x + y * e` promotes), the q/k RMS norm rounded to the input dtype before its weight, attention in
the half dtype, and the head in float32. Matmuls and convolutions run in the autocast dtype.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformer3DModel

from magcache.controller import BlockRunner
from parallel.attention import attend


class SequenceSharding(Protocol):
    """How the token sequence is spread over the ranks that compute one branch."""

    size: int
    #: the attention kernel every attention of the DiT runs (parallel.attention)
    kernel: str

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Pad `dim` to a multiple of `size` and return this rank's contiguous chunk."""

    def gather(self, x: torch.Tensor, dim: int, valid_len: int) -> torch.Tensor:
        """Concatenate the ranks' chunks along `dim` and drop the padding beyond `valid_len`."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_len: int) -> torch.Tensor:
        """Self-attention over the whole sequence for local q/k/v [B, S_local, H, D]."""

    def local_valid(self, valid_len: int) -> int:
        """How many of this rank's tokens are real (not padding) when the sequence has `valid_len`."""


def _half_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force, else the half dtype among `tensors`; None when all run float32.

    Official flash attention takes q, k, v in half precision (`half()` to bfloat16 unless one is
    already half); under autocast the projection outputs tell us which half."""
    for device in {t.device.type for t in tensors}:
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    for t in tensors:
        if t.dtype in (torch.float16, torch.bfloat16):
            return t.dtype
    return None


def _official_rms_norm(norm: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """Official WanRMSNorm: normalise in float32, round to the input dtype, then scale by the weight.

    torch's fused `rms_norm` under autocast scales in float32 without that rounding, so q and k
    would differ from official in their last bits before attention."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + norm.eps)).type_as(x)
    return normed * norm.weight if norm.weight is not None else normed


class LocalSequence:
    """One rank holds the whole sequence: split/gather are identities, attention is one kernel call."""

    size = 1

    def __init__(self, kernel: str = "sdpa") -> None:
        #: the attention kernel (a name parallel.attention.resolve returned)
        self.kernel = kernel

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor, dim: int, valid_len: int) -> torch.Tensor:
        return x.narrow(dim, 0, valid_len)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_len: int) -> torch.Tensor:
        return attend(q, k, v, self.kernel)  # no padding exists on one rank

    def local_valid(self, valid_len: int) -> int:
        return valid_len


@dataclass(frozen=True, slots=True)
class StepInput:
    """One step's embedded input on this rank: shared by the cond and uncond forwards."""

    x: torch.Tensor  # [1, L_local, dim]
    rotary: tuple[torch.Tensor, torch.Tensor]
    temb: torch.Tensor  # float32, as official's time embedding
    tproj: torch.Tensor  # float32 modulation input
    seq_len: int  # real (unpadded) tokens of the whole sequence
    grid: tuple[int, int, int]


@dataclass
class _ForwardState:
    """Per-forward facts the self-attention processors need (diffusers' block passes only tensors)."""

    valid_len: int = 0


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Official 3-axis RoPE as float64 (cos, sin), each [1, f*h*w, 1, head_dim/2], one per pair.

    Official splits the head's pairs into frame/height/width parts (`rope_params` with
    d - 4*(d//6), 2*(d//6), 2*(d//6) dims) and rotates in complex128; diffusers' `WanRotaryPosEmbed`
    uses the same angles but rounds cos/sin to float32 first, so its rotated q and k differ from
    official's in the last float32 bits (which can flip a bf16 rounding of the attention inputs)."""
    f, h, w = grid
    dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    parts = []
    for positions, dim, shape in zip((f, h, w), dims, ((f, 1, 1), (1, h, 1), (1, 1, w))):
        inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64, device=device).div(dim))
        angle = torch.outer(torch.arange(positions, dtype=torch.float64, device=device), inv)
        parts.append(angle.view(*shape, -1).expand(f, h, w, -1))
    angles = torch.cat(parts, dim=-1).reshape(1, f * h * w, 1, -1)
    return torch.cos(angles), torch.sin(angles)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Official `rope_apply`: rotate interleaved pairs in float64, return float32 (as official does)."""
    x1, x2 = x.to(torch.float64).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).float()


def _projections(attn: WanAttention, x: torch.Tensor, context: torch.Tensor):
    """q from `x`, k and v from `context`, [B, S, H, D]; q and k through official's RMS norm."""
    q = _official_rms_norm(attn.norm_q, attn.to_q(x)).unflatten(2, (attn.heads, -1))
    k = _official_rms_norm(attn.norm_k, attn.to_k(context)).unflatten(2, (attn.heads, -1))
    v = attn.to_v(context).unflatten(2, (attn.heads, -1))
    return q, k, v


def _attend_in_half(attn: WanAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Official flash attention's dtype contract, then the output projection: q, k, v in the half
    dtype (`half()`), the result back in q's dtype (`x.type(out_dtype)`)."""
    out_dtype = q.dtype
    half = _half_dtype(q, k, v)
    if half is not None:
        q, k, v = q.to(half), k.to(half), v.to(half)
    out = attend(q, k, v).flatten(2, 3).to(out_dtype)
    return attn.to_out[1](attn.to_out[0](out))


class ShardedSelfAttnProcessor:
    """Self-attention of a Wan block whose tokens are sharded; the exchange is the sharding's job.

    Official WanSelfAttention's order and precision on diffusers' projections: q/k RMS norm over the
    full width (official rounding), RoPE, then q, k, v in the half dtype (official flash attention's
    `half()`), which also halves the Ulysses all-to-all. The output returns in q's dtype before the
    output projection, as official's `x.type(out_dtype)`.
    """

    def __init__(self, sharding: SequenceSharding, state: _ForwardState) -> None:
        self.sharding = sharding
        self.state = state

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        q, k, v = _projections(attn, hidden_states, hidden_states)
        if rotary_emb is not None:
            q = _apply_rotary(q, *rotary_emb)
            k = _apply_rotary(k, *rotary_emb)
        return _attend_in_half(attn, q, k, v,
                               lambda q, k, v: self.sharding.attention(q, k, v, self.state.valid_len))


class CrossAttnProcessor:
    """Text cross-attention with official WanCrossAttention's precision (see ShardedSelfAttnProcessor).

    Each rank attends its own query tokens to the whole text, so no exchange is needed. Wan2.2 has
    no image context (no CLIP branch), so diffusers' `add_k_proj` path never applies. `kernel`: the
    run's attention kernel (parallel.attention), the self-attention's."""

    def __init__(self, kernel: str = "sdpa") -> None:
        self.kernel = kernel

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if attn.add_k_proj is not None:
            raise ValueError("Wan2.2 cross-attention has no image context; this checkpoint has one")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return _attend_in_half(attn, *_projections(attn, hidden_states, context),
                               functools.partial(attend, kernel=self.kernel))


def _modulation(table: torch.Tensor, e: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """(table + e) in float32, split into `parts` [B, 1 or L, dim] tensors (official `e` chunks)."""
    if e.ndim == 4:  # per-token [B, L, parts, dim] (ti2v)
        return [c.squeeze(2) for c in (table.unsqueeze(0) + e.float()).chunk(parts, dim=2)]
    return list((table + e.float()).chunk(parts, dim=1))


def official_block_forward(block: torch.nn.Module, x: torch.Tensor, context: torch.Tensor,
                           tproj: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                           rounded: torch.Tensor | None = None, half: torch.dtype | None = None) -> torch.Tensor:
    """Official WanAttentionBlock.forward on diffusers' WanTransformerBlock modules.

    diffusers casts the residual stream back to the input dtype after every add (bf16 under
    autocast); official lets `x + y * e` promote to float32 and keeps it there. Module mapping:
    official norm1/norm3/norm2 = diffusers norm1/norm2/norm3, self_attn/cross_attn = attn1/attn2.

    Under autocast the first block alone receives half-precision x (from the patch embedding) and
    its norm1 output is rounded to that dtype (official `WanLayerNorm(...).type_as(x)`). The
    compiled block takes every x in float32 instead (exact) and redoes that rounding where the
    bool tensor `rounded` says so (a value, not a guard), so one graph serves every block.
    """
    shift, scale, gate, c_shift, c_scale, c_gate = _modulation(block.scale_shift_table, tproj, 6)
    normed = block.norm1(x)
    if rounded is not None and half is not None:
        normed = torch.where(rounded, normed.to(half).float(), normed)
    y = block.attn1(normed.float() * (1 + scale) + shift, None, None, rotary)
    x = x + y * gate
    x = x + block.attn2(block.norm2(x), context, None, None)
    y = block.ffn(block.norm3(x).float() * (1 + c_scale) + c_shift)
    return x + y * c_gate


def _linear_fp32(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer computed in float32 whatever its parameters' dtype (official's
    `autocast(dtype=float32)` regions upcast bf16 weights the same way)."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), bias)


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Official `sinusoidal_embedding_1d`: cos then sin of position * 10000^(-i/half), in float64.

    diffusers' `Timesteps` computes the same formula in float32; official casts to float32 only
    after the cos/sin, so we do too (their float32 results differ in the last bits)."""
    half = dim // 2
    pos = position.to(torch.float64)
    sinusoid = torch.outer(pos, torch.pow(10000, -torch.arange(half, device=pos.device).to(pos).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class WanDiT:
    """One expert: a WanTransformer3DModel plus the sequence sharding it runs under."""

    def __init__(self, model: WanTransformer3DModel, sharding: SequenceSharding | None = None,
                 block_stack: torch.nn.Module | None = None) -> None:
        """`block_stack`: a module running `model.blocks` in order (the FSDP2 root over sharded blocks,
        which prefetches each next block's weights); None: the blocks are called one by one."""
        self.model = model
        self.block_stack = block_stack
        self.sharding: SequenceSharding = sharding or LocalSequence()
        self._state = _ForwardState()
        processor = ShardedSelfAttnProcessor(self.sharding, self._state)
        cross = CrossAttnProcessor(self.sharding.kernel)
        for block in model.blocks:
            block.attn1.set_processor(processor)
            block.attn2.set_processor(cross)
            # An instance attribute, so block(...) still runs FSDP2's and torch.compile's call hooks.
            block.forward = functools.partial(official_block_forward, block)
        self.patch_size: tuple[int, int, int] = tuple(model.config.patch_size)  # type: ignore[assignment]

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.model.blocks

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Text projection of a [1, text_len, text_dim] context (same for every step of one prompt)."""
        return self.model.condition_embedder.text_embedder(context)

    @torch.no_grad()
    def embed(self, latent: torch.Tensor, timestep: torch.Tensor) -> StepInput:
        """Patch + time embedding of one step's input, already split across the branch's ranks.

        Cond and uncond see the same latent and timestep, so the pipeline embeds once per step
        and runs both branches from it.
        """
        m = self.model
        p_t, p_h, p_w = self.patch_size
        x5 = latent.unsqueeze(0).to(m.patch_embedding.weight.dtype)
        _, _, frames, height, width = x5.shape

        # patch embed -> tokens in (f, h, w) order: [1, L, dim]
        grid = (frames // p_t, height // p_h, width // p_w)
        head_dim = m.config.attention_head_dim
        rope_cos, rope_sin = rope_angles(grid, head_dim, device=x5.device)  # [1, L, 1, head_dim/2] float64
        x = m.patch_embedding(x5).flatten(2).transpose(1, 2).contiguous()
        seq_len = x.shape[1]

        # time embedding: [1, dim] + [1, 6, dim], or per token [1, L, dim] + [1, L, 6, dim]
        temb, tproj = self._embed_time(timestep)

        # shard the sequence (and everything that is per token) across the branch's ranks
        sh = self.sharding
        x = sh.split(x, 1)
        rotary = (sh.split(rope_cos, 1), sh.split(rope_sin, 1))
        if temb.ndim == 3:
            temb, tproj = sh.split(temb, 1), sh.split(tproj, 1)
        return StepInput(x=x, rotary=rotary, temb=temb, tproj=tproj, seq_len=seq_len, grid=grid)

    @torch.no_grad()
    def run(self, step: StepInput, text_states: torch.Tensor, *, runner: BlockRunner, index: int,
            expert: str = "single") -> torch.Tensor:
        """Blocks (through the runner: may be skipped), head and unpatchify -> [C_out,F,H,W]."""
        m = self.model
        sh = self.sharding
        self._state.valid_len = step.seq_len
        tproj, rotary = step.tproj, step.rotary

        def run_blocks(h: torch.Tensor) -> torch.Tensor:
            if self.block_stack is not None:
                return self.block_stack(h, text_states, tproj, rotary)
            for block in m.blocks:
                h = block(h, text_states, tproj, rotary)
            return h

        x = runner.forward(index, step.x, run_blocks, expert=expert, valid=sh.local_valid(step.seq_len))

        # head: modulated norm + projection, on this rank's tokens
        temb = step.temb
        if temb.ndim == 3:
            shift, scale = (m.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = m.norm_out(x.float()) * (1 + scale) + shift
        with torch.autocast(x.device.type, enabled=False):
            x = _linear_fp32(m.proj_out, x)  # official Head: float32 throughout

        x = sh.gather(x, 1, step.seq_len)  # [1, L, C_out * p_t * p_h * p_w]
        f, h, w = step.grid
        p_t, p_h, p_w = self.patch_size
        x = x.reshape(1, f, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)[0]

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor, *,
                runner: BlockRunner, index: int, expert: str = "single") -> torch.Tensor:
        """One forward: latent [C_in,F,H,W], timestep [1] or per-token [1, L] -> [C_out,F,H,W]."""
        step = self.embed(latent, timestep)
        return self.run(step, text_states, runner=runner, index=index, expert=expert)

    def _embed_time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Official time embedding: float64 sinusoid, then the MLPs in float32 (autocast off).

        Same modules as diffusers' condition embedder (time part), without re-projecting the text."""
        ce = self.model.condition_embedder
        per_token = timestep.ndim == 2
        t_freq = sinusoidal_embedding(ce.timesteps_proj.num_channels, timestep.flatten()).float()
        if per_token:
            t_freq = t_freq.unflatten(0, (timestep.shape[0], timestep.shape[1]))
        emb = ce.time_embedder
        with torch.autocast(t_freq.device.type, enabled=False):
            temb = _linear_fp32(emb.linear_2, emb.act(_linear_fp32(emb.linear_1, t_freq)))
            tproj = _linear_fp32(ce.time_proj, ce.act_fn(temb))
        tproj = tproj.unflatten(2, (6, -1)) if per_token else tproj.unflatten(1, (6, -1))
        return temb, tproj


#: compiled block graphs kept per run (one per (size, frames) seen): serve, batch and sweep vary the
#: sizes; past dynamo's default of 8 every new size would run the blocks eagerly for the rest of the process
RECOMPILE_LIMIT = 64


def compile_blocks(dits: Iterable[WanDiT], *, backend: str = "inductor") -> None:
    """Regional compilation: one `torch.compile` of the block function, called by every block.

    Blocks of both experts have the same structure and shapes, and dynamo inlines the module's
    parameters as graph inputs, so the whole stack shares one graph (compiled once, at the first
    forward) instead of one per block; `dynamic=False` because shapes are fixed for a request.
    Under autocast the residual stream enters the first block in the half dtype and the others in
    float32: `_UniformBlock` hands every block float32 (see `official_block_forward`), so that
    difference is no second graph. Compiling the block, not the model, keeps MagCache's skip and
    the Ulysses exchange eager. Each new (size, frames) compiles one more graph, kept up to
    RECOMPILE_LIMIT. `backend`: torch.compile's (tests count graphs with "eager").
    """
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    compiled = torch.compile(official_block_forward, dynamic=False, backend=backend)
    for dit in dits:
        for block in dit.model.blocks:
            block.forward = _UniformBlock(compiled, block)


class _UniformBlock:
    """A block's forward through the shared compiled function, with the input dtype made uniform."""

    _flags: dict[tuple[torch.device, bool], torch.Tensor] = {}

    def __init__(self, compiled: Callable[..., torch.Tensor], block: torch.nn.Module) -> None:
        self.compiled = compiled
        self.block = block

    def __call__(self, x: torch.Tensor, context: torch.Tensor, tproj: torch.Tensor,
                 rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        device = x.device.type
        half = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        key = (x.device, x.dtype != torch.float32)
        flag = self._flags.get(key)
        if flag is None:  # made once per device: no host-to-device copy per block
            flag = self._flags[key] = torch.tensor(key[1], device=x.device)
        return self.compiled(self.block, x.float(), context, tproj, rotary, flag, half)


def pad_context(context: torch.Tensor, text_len: int) -> torch.Tensor:
    """Official WanModel: zero-pad the trimmed T5 output to `text_len` rows; all rows are attended."""
    rows, dim = context.shape
    out = context.new_zeros(1, text_len, dim)
    out[0, : min(rows, text_len)] = context[:text_len]
    return out
