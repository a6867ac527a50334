"""The DiT forward: diffusers' WanTransformer3DModel sub-modules, called by us.

We call the sub-modules (patch embed, rope, condition embedder, blocks, head) instead of the
root `forward` because we must own two things diffusers' forward hides: where the token sequence
is split across ranks (Ulysses) and the block stack that MagCache may skip. Numerics are the
diffusers modules' own, which equal the official WanModel (docs/pipeline_facts.md #34).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformer3DModel

from magcache.controller import BlockRunner


class SequenceSharding(Protocol):
    """How the token sequence is spread over the ranks that compute one branch."""

    size: int

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Pad `dim` to a multiple of `size` and return this rank's contiguous chunk."""

    def gather(self, x: torch.Tensor, dim: int, valid_len: int) -> torch.Tensor:
        """Concatenate the ranks' chunks along `dim` and drop the padding beyond `valid_len`."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_len: int) -> torch.Tensor:
        """Self-attention over the whole sequence for local q/k/v [B, S_local, H, D]."""

    def local_valid(self, valid_len: int) -> int:
        """How many of this rank's tokens are real (not padding) when the sequence has `valid_len`."""


class LocalSequence:
    """One rank holds the whole sequence: split/gather are identities, attention is plain SDPA."""

    size = 1

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor, dim: int, valid_len: int) -> torch.Tensor:
        return x.narrow(dim, 0, valid_len)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_len: int) -> torch.Tensor:
        # [B, S, H, D] -> SDPA wants [B, H, S, D]; no padding exists on one rank.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def local_valid(self, valid_len: int) -> int:
        return valid_len


@dataclass(frozen=True, slots=True)
class StepInput:
    """One step's embedded input on this rank: shared by the cond and uncond forwards."""

    x: torch.Tensor  # [1, L_local, dim]
    rotary: tuple[torch.Tensor, torch.Tensor]
    temb: torch.Tensor
    tproj: torch.Tensor
    seq_len: int  # real (unpadded) tokens of the whole sequence
    grid: tuple[int, int, int]


@dataclass
class _ForwardState:
    """Per-forward facts the self-attention processors need (diffusers' block passes only tensors)."""

    valid_len: int = 0


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding (interleaved pairs), kept bit-identical."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class ShardedSelfAttnProcessor:
    """Self-attention of a Wan block whose tokens are sharded; the exchange is the sharding's job.

    Same projections, q/k RMS norm over the full width and RoPE as diffusers' WanAttnProcessor;
    only the attention call goes through `sharding.attention` (Ulysses all-to-all when sharded).
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
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q = _apply_rotary(q, *rotary_emb)
            k = _apply_rotary(k, *rotary_emb)
        # Under autocast the RMS norms return float32 while v is in the compute dtype: send all three in
        # v's dtype, as official casts q, k, v to half before its all-to-all. Attention would round q and
        # k to that dtype anyway (SDPA autocasts), so values are unchanged; the exchange halves.
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = self.sharding.attention(q, k, v, self.state.valid_len)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class WanDiT:
    """One expert: a WanTransformer3DModel plus the sequence sharding it runs under."""

    def __init__(self, model: WanTransformer3DModel, sharding: SequenceSharding | None = None) -> None:
        self.model = model
        self.sharding: SequenceSharding = sharding or LocalSequence()
        self._state = _ForwardState()
        processor = ShardedSelfAttnProcessor(self.sharding, self._state)
        for block in model.blocks:
            block.attn1.set_processor(processor)
        self.patch_size: tuple[int, int, int] = tuple(model.config.patch_size)  # type: ignore[assignment]

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.model.blocks

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Text projection of a [1, text_len, text_dim] context (same for every step of one prompt)."""
        return self.model.condition_embedder.text_embedder(context)

    @torch.no_grad()
    def embed(self, latent: torch.Tensor, timestep: torch.Tensor, dtype: torch.dtype) -> StepInput:
        """Patch + time embedding of one step's input, already split across the branch's ranks.

        Cond and uncond see the same latent and timestep, so the pipeline embeds once per step
        and runs both branches from it (`dtype`: the text states' dtype, as diffusers casts temb).
        """
        m = self.model
        p_t, p_h, p_w = self.patch_size
        x5 = latent.unsqueeze(0).to(m.patch_embedding.weight.dtype)
        _, _, frames, height, width = x5.shape

        # patch embed -> tokens in (f, h, w) order: [1, L, dim]
        rope_cos, rope_sin = m.rope(x5)  # [1, L, 1, head_dim] each
        x = m.patch_embedding(x5).flatten(2).transpose(1, 2).contiguous()
        seq_len = x.shape[1]

        # time embedding: [1, dim] + [1, 6, dim], or per token [1, L, dim] + [1, L, 6, dim]
        temb, tproj = self._embed_time(timestep, dtype)

        # shard the sequence (and everything that is per token) across the branch's ranks
        sh = self.sharding
        x = sh.split(x, 1)
        rotary = (sh.split(rope_cos, 1), sh.split(rope_sin, 1))
        if temb.ndim == 3:
            temb, tproj = sh.split(temb, 1), sh.split(tproj, 1)
        grid = (frames // p_t, height // p_h, width // p_w)
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
        x = (m.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = m.proj_out(x)

        x = sh.gather(x, 1, step.seq_len)  # [1, L, C_out * p_t * p_h * p_w]
        f, h, w = step.grid
        p_t, p_h, p_w = self.patch_size
        x = x.reshape(1, f, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)[0]

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor, *,
                runner: BlockRunner, index: int, expert: str = "single") -> torch.Tensor:
        """One forward: latent [C_in,F,H,W], timestep [1] or per-token [1, L] -> [C_out,F,H,W]."""
        step = self.embed(latent, timestep, text_states.dtype)
        return self.run(step, text_states, runner=runner, index=index, expert=expert)

    def _embed_time(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' condition embedder (time part), without re-projecting the text each call."""
        ce = self.model.condition_embedder
        per_token = timestep.ndim == 2
        t = timestep.flatten()
        t_freq = ce.timesteps_proj(t)
        if per_token:
            t_freq = t_freq.unflatten(0, (timestep.shape[0], timestep.shape[1]))
        emb_dtype = next(iter(ce.time_embedder.parameters())).dtype
        temb = ce.time_embedder(t_freq.to(emb_dtype)).to(dtype)
        tproj = ce.time_proj(ce.act_fn(temb))
        tproj = tproj.unflatten(2, (6, -1)) if per_token else tproj.unflatten(1, (6, -1))
        return temb, tproj


def pad_context(context: torch.Tensor, text_len: int) -> torch.Tensor:
    """Official WanModel: zero-pad the trimmed T5 output to `text_len` rows; all rows are attended."""
    rows, dim = context.shape
    out = context.new_zeros(1, text_len, dim)
    out[0, : min(rows, text_len)] = context[:text_len]
    return out
