"""Device bytes per rank and phase (load, encode, denoise, decode): a MODEL from the dimensions, no torch.

Each term is what the launcher's own code allocates, read from the code and counted by the dry run
(`plan --dry-run`, launcher/engine/dryrun.py: allocated bytes, flash attention, no CUDA context or
caching-allocator rounding; `reserve_gb` in the planner covers those):

- Weights: a DiT expert is float32 unless --convert_model_dtype (official), its blocks / sp under
  FSDP with the root pieces (embeddings, head) in the half dtype; T5 bfloat16, its blocks / sp under
  FSDP, the 256384 x 4096 embedding replicated; the VAE float32. Experts resident: both unless the
  memory policy swaps them (one) or parks them before decode (none); T5 only where it lives on the GPU.
- Load: the experts loaded on the GPU (official init_on_cpu is False with sp > 1 or FSDP), T5, and
  T5's tied embedding read twice before `tie_weights` (the VAE loads after it).
- Denoise, per local token (n = tokens / sp), the peak is k's RoPE in self-attention (float64 as
  official): four float32 [n, dim] (residual stream, norm1 output, modulated input, the block
  input its caller holds), q rotated (float32), k and v (bf16), k in float64 and the four float64
  half products = 48 dim bytes. Kept whole over the sequence: the patch embedding output (bf16,
  the sequence split is a view) and the RoPE tables (float64, head_dim per token). MagCache keeps a
  float32 [n, dim] residual per branch the rank runs (steady state: both serial CFG branches).
  Text states, T5 outputs and two latent-sized float32 tensors are small. FSDP: the current
  block's unsharded parameters (activation) and two all-gather buffers (comm: the current block
  and the prefetched next one), each a block in bf16.
- Decode: the causal VAE decodes one latent frame at a time; its working set per output pixel of
  one frame (`VAE_CHUNK_BYTES_PER_PIXEL`) plus the float32 video it accumulates (3 channels per
  frame), split by rows over the generation's ranks when the decode is split.
"""
from __future__ import annotations

import math

from launcher.planner.perf_model import DitDims, RankLayout, Workload

#: official VAE parameters (shared/reference/official_wan21_vae.json, official_wan22_vae.json total_numel)
VAE_PARAMS = {"2.1": 126_892_531, "2.2": 704_688_668}
#: umt5-xxl's token embedding (256384 x 4096, official_t5_umt5_xxl_encoder.json), replicated under FSDP
T5_EMBEDDING_PARAMS = 256_384 * 4096
T5_DIM = 4096
#: the causal decoder's working set per output pixel of one frame, counted by the dry run (the
#: full-resolution stage: 96-channel float32 conv inputs with their 2 cached frames, the padded copy,
#: the 2D upsample): 2.1 at 1280*720 x 17 frames (checked at 81 frames and at 832*480 x 5, BENCHMARKS.md);
#: 2.2 at 1280*704 x 5 frames (ti2v-5B)
VAE_CHUNK_BYTES_PER_PIXEL = {"2.1": 19.46e3, "2.2": 18.9e3}
#: bytes per local token and dim at the self-attention RoPE peak (see the module docstring)
PEAK_DIM_BYTES_PER_TOKEN = 48
PHASES = ("load", "encode", "denoise-high", "denoise-low", "decode")


def block_params(dims: DitDims) -> int:
    """All parameters of one DiT block: q/k/v/o of both attentions, FFN, their biases, the q/k RMS
    norms, the cross-attention norm and the 6 x dim modulation table."""
    d, f = dims.dim, dims.ffn
    return 8 * d * d + 2 * d * f + f + 21 * d


def expert_bytes(dims: DitDims, place: RankLayout) -> float:
    """One expert on this rank's GPU."""
    if place.quant != "none":
        whole = dims.expert_bytes(place.quant)  # bf16 outside the 8-bit block linears
        blocks = dims.layers * dims.block_bytes(place.quant)
    else:
        whole = dims.params * (2.0 if place.convert_model_dtype else 4.0)
        blocks = dims.layers * block_params(dims) * (2.0 if place.convert_model_dtype else 4.0)
    if not (place.dit_fsdp and place.sp > 1):
        return whole
    root = dims.params - dims.layers * block_params(dims)
    return 2.0 * root + blocks / place.sp


def t5_bytes(dims: DitDims, place: RankLayout) -> float:
    """T5 on this rank's GPU while it is there (bf16; blocks / sp under FSDP, the embedding whole)."""
    if place.dit_fsdp and place.sp > 1:
        return 2.0 * T5_EMBEDDING_PARAMS + 2.0 * (dims.t5_params - T5_EMBEDDING_PARAMS) / place.sp
    return 2.0 * dims.t5_params


def phase_bytes(dims: DitDims, work: Workload, place: RankLayout) -> dict[str, dict[str, float]]:
    """Per phase {"weights", "activations", "comm", "total"} device bytes of one rank of `place`."""
    sp, fsdp = place.sp, place.dit_fsdp and place.sp > 1
    expert = expert_bytes(dims, place)
    t5 = t5_bytes(dims, place)
    t5_resident = 0.0 if place.t5_offload else t5
    vae = 4.0 * VAE_PARAMS[work.vae_version]
    at_load = dims.experts * expert if (fsdp or place.dit_load_gpu) else 0.0
    denoise_dit = (1 if place.offload and not fsdp else dims.experts) * expert
    t5_block = 2.0 * (dims.t5_params - T5_EMBEDDING_PARAMS) / 24  # umt5-xxl: 24 blocks

    def phase(weights: float, activations: float = 0.0, comm: float = 0.0) -> dict[str, float]:
        return {"weights": weights, "activations": activations, "comm": comm,
                "total": weights + activations + comm}

    load = at_load + t5_resident + max(vae, 2.0 * T5_EMBEDDING_PARAMS if t5_resident else 0.0)
    encode = phase(at_load + (0.0 if place.t5_cpu else t5) + vae, comm=t5_block if fsdp else 0.0)

    n = math.ceil(work.tokens / sp)
    d, head_dim = dims.dim, dims.dim // dims.heads
    residuals = 1 if place.cfg == 2 else 2
    act = (PEAK_DIM_BYTES_PER_TOKEN * d * n + residuals * 4 * d * n   # the block's peak, MagCache residuals
           + 2 * d * work.tokens + 8 * head_dim * work.tokens          # patch embedding, RoPE tables (whole)
           + 2 * dims.text_len * d * 2 + 3 * 2 * dims.text_len * T5_DIM  # text states, T5 output, contexts
           + 2 * 4 * work.latent_elems)
    block_half = 2.0 * block_params(dims) if place.quant == "none" else dims.block_bytes(place.quant)
    denoise = phase(denoise_dit + t5_resident + vae, act + (block_half if fsdp else 0.0),
                    2 * block_half if fsdp else 0.0)

    split = place.sp * place.cfg if place.vae_parallel else 1
    pixels = work.width * work.height
    vae_act = pixels * (VAE_CHUNK_BYTES_PER_PIXEL[work.vae_version] + 3 * 4 * work.frames) / split
    decode_dit = 0.0 if place.park_dit_before_decode else denoise_dit
    decode = phase(decode_dit + t5_resident + vae, vae_act + 4 * work.latent_elems)
    return {"load": phase(load), "encode": encode, "denoise-high": denoise, "denoise-low": dict(denoise),
            "decode": decode}
