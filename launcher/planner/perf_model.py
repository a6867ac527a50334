"""A written-down roofline model of one Wan2.2 generation on a given layout: a MODEL, never a measurement.

Pure arithmetic (no torch), so `magcache-launch plan --gpus N` can price every layout before a
weight is read. What it counts, per rank:

- DiT compute, from the model's dimensions: per block the linear layers (self q/k/v/o, cross q/o,
  cross k/v over the 512 text tokens, FFN) and the two attentions (4 S^2 d for self-attention),
  divided by the sequence-parallel degree (ulysses x ring); at peak bf16 TFLOP/s times one
  efficiency per kind of work (matmul, attention), plus the element-wise passes (norms,
  modulation, RoPE, gates, GELU) at HBM bandwidth.
- Communication: Ulysses all-to-alls (4 per block: q, k, v out, attention back), ring
  point-to-point K/V passes (R-1 per attention, overlapped with the attention they feed), FSDP
  all-gathers of each block's parameters (prefetched, overlapped with the block), the CFG-parallel
  exchange once per step; each on the link it crosses (inside a node or the inter-node network).
- --quantize: the block linears' bytes halve (8 bits plus a float32 scale per row) and their time
  divides by the GPU's FP8/INT8 GEMM factor (`GpuSpec.fp8_gemm_factor`: the datasheet ratio of dense
  8-bit to dense bf16 peak, a MODEL; the per-token activation quantization is not priced).
- Fixed costs: T5 (two prompts), VAE decode (and the i2v conditioning encode), the offload
  transfers over PCIe when the idle expert lives on the CPU.

The constants (`Efficiency`) are one set for every GPU and size: `tests/test_perf_model.py` checks
them against the official Wan2.2 README's H100 table. A `gpu_check.py` result (`Calibration`)
replaces the roofline's DiT compute with measured per-block times.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from launcher.wan.tasks import TaskSpec

GB = 1e9


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Datasheet figures (dense bf16, no sparsity). Link bandwidths are per GPU, one direction."""

    name: str
    bf16_tflops: float
    hbm_gbps: float
    memory_gb: float
    #: NVLink (or PCIe where the card has no NVLink) between GPUs of one node
    intra_gbps: float
    intra_link: str
    #: the inter-node network per GPU (e.g. one 400 Gb/s NIC per GPU = 50 GB/s)
    inter_gbps: float
    #: host <-> GPU (offload transfers)
    pcie_gbps: float
    #: MODEL: dense FP8 / INT8 tensor-core peak over dense bf16 (datasheets), applied to the linear
    #: layers' time under --quantize; None: no FP8 tensor cores (A100: int8 only)
    fp8_gemm_factor: float | None = 2.0
    int8_gemm_factor: float = 2.0

    def gemm_factor(self, quant: str) -> float:
        if quant == "none":
            return 1.0
        factor = self.fp8_gemm_factor if quant == "fp8" else self.int8_gemm_factor
        if factor is None:
            raise ValueError(f"the {self.name} has no {quant.upper()} tensor cores")
        return factor


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("H100 SXM 80GB", 989.0, 3350.0, 80.0, 450.0, "NVLink", 50.0, 25.0),
    "h200": GpuSpec("H200 SXM 141GB", 989.0, 4800.0, 141.0, 450.0, "NVLink", 50.0, 25.0),
    "a100": GpuSpec("A100 SXM 80GB", 312.0, 2039.0, 80.0, 300.0, "NVLink", 25.0, 25.0, fp8_gemm_factor=None),
    "h20": GpuSpec("H20 96GB", 148.0, 4000.0, 96.0, 450.0, "NVLink", 50.0, 25.0),
    "l20": GpuSpec("L20 48GB", 119.5, 864.0, 48.0, 25.0, "PCIe", 25.0, 25.0),
    "4090": GpuSpec("RTX 4090 24GB", 165.0, 1008.0, 24.0, 25.0, "PCIe", 12.5, 25.0),
}


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Fraction of the datasheet peak each kind of work reaches: one set for every GPU and size.

    Chosen once against the official Wan2.2 README's H100 table (see BENCHMARKS.md, "Layout
    planner"); `vae` is low because the official VAE runs in float32 causal chunks of conv3d.
    """

    matmul: float = 0.60
    attention: float = 0.70
    #: element-wise passes over the activations, against HBM bandwidth
    hbm: float = 0.60
    comm_intra: float = 0.70
    comm_inter: float = 0.70
    pcie: float = 0.80
    #: ring attention's attention efficiency relative to one kernel over the whole sequence: r
    #: smaller kernels plus the log-sum-exp merges (not from a published figure: no Wan ring run
    #: is published; the planner's ring predictions are the least grounded)
    ring_attention: float = 0.85
    vae: float = 0.035
    #: per collective (launch + synchronisation), seconds
    collective_latency_s: float = 30e-6
    #: element-wise passes over S x dim bf16 activations per block (read + write each): the official
    #: block runs its norms, modulation, RoPE and gates in float32, so a pass there counts double
    elementwise_passes: int = 96
    #: VAE 2.1 / 2.2 FLOPs per video pixel, counted with torch's FlopCounterMode on diffusers'
    #: AutoencoderKLWan built on the meta device from shared/reference's configs (480x832, 9 frames)
    vae_decode_flops_per_pixel: dict[str, float] = field(default_factory=lambda: {"2.1": 8.75e6, "2.2": 18.9e6})
    #: the i2v conditioning encode (official: the whole frame_num video, image then zeros)
    vae_encode_flops_per_pixel: dict[str, float] = field(default_factory=lambda: {"2.1": 5.24e6, "2.2": 3.62e6})
    #: CUDA context, allocator slack, workspace (GB per GPU)
    reserve_gb: float = 3.0


@dataclass(frozen=True, slots=True)
class DitDims:
    dim: int
    ffn: int
    heads: int
    layers: int
    #: parameters of one expert (official checkpoint numel, shared/reference/official_wanmodel_*.json)
    params: int
    experts: int
    text_len: int = 512
    t5_params: int = 5_680_910_336  # umt5-xxl encoder numel (official_t5_umt5_xxl_encoder.json)

    @property
    def block_params(self) -> int:
        """The linear layers of one block (attention projections and FFN): what --quantize stores in 8 bits."""
        d = self.dim
        return 8 * d * d + 2 * d * self.ffn

    def expert_bytes(self, quant: str = "none") -> float:
        """One expert's weights in bf16, the block linears in 8 bits under --quantize (scales: 4 bytes a row)."""
        linear = self.layers * self.block_params
        if quant == "none":
            return 2.0 * self.params
        rows = self.layers * (8 * self.dim + self.ffn + self.dim)
        return 2.0 * (self.params - linear) + linear + 4.0 * rows

    def block_bytes(self, quant: str = "none") -> float:
        """One block's linear weights as all-gathered (bf16, or 8 bits plus scales)."""
        return (2.0 if quant == "none" else 1.0) * self.block_params


DIMS: dict[str, DitDims] = {
    "t2v-A14B": DitDims(dim=5120, ffn=13824, heads=40, layers=40, params=14_288_491_584, experts=2),
    "i2v-A14B": DitDims(dim=5120, ffn=13824, heads=40, layers=40, params=14_288_901_184, experts=2),
    "ti2v-5B": DitDims(dim=3072, ffn=14336, heads=24, layers=30, params=4_999_787_712, experts=1),
}


@dataclass(frozen=True, slots=True)
class Workload:
    """The video: pixels and the DiT's token count (latent frames (F-1)/4+1, H and W / 16 or 32)."""

    task: str
    width: int
    height: int
    frames: int
    tokens: int
    latent_elems: int
    vae_version: str
    image_conditioned: bool

    @classmethod
    def of(cls, spec: TaskSpec, width: int, height: int, frames: int) -> Workload:
        t, s, p = spec.vae_stride[0], spec.vae_stride[1], spec.patch_size[1]
        lat_f, lat_h, lat_w = (frames - 1) // t + 1, height // s, width // s
        tokens = lat_f * (lat_h // p) * (lat_w // p)
        return cls(task=spec.name, width=width, height=height, frames=frames, tokens=tokens,
                   latent_elems=spec.z_dim * lat_f * lat_h * lat_w, vae_version=spec.vae_version,
                   image_conditioned=spec.mode == "i2v")

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames


@dataclass(frozen=True, slots=True)
class Calibration:
    """Measured per-block times (gpu_check.py S4, A14B block dims) fitted as scale factors on the
    roofline's linear and attention parts: t(S) = a * linear(S) + b * attention(S)."""

    source: str
    linear_scale: float
    attention_scale: float
    points: tuple[tuple[int, float], ...]  # (tokens, measured ms per block)
    #: the GPU gpu_check.py ran on (its S0 step); the fitted scales reproduce the measured times
    #: whatever --gpu says, while communication and HBM terms still use --gpu's figures
    device: str | None = None


@dataclass(frozen=True, slots=True)
class RankLayout:
    """Degrees of one generation's ranks and which link each group crosses."""

    ulysses: int
    ring: int
    cfg: int
    dit_fsdp: bool
    #: only the active expert on the GPU, the other on the CPU (launcher.planner.memory's swap_experts)
    offload: bool
    ulysses_link: str  # "intra" | "inter"
    ring_link: str
    cfg_link: str
    fsdp_link: str
    #: the VAE decode split by rows over the generation's ranks (ours); False: one rank (official)
    vae_parallel: bool = True
    #: T5 parked on the CPU between encodes (offload_model), and the DiTs parked before VAE decode
    t5_offload: bool = False
    park_dit_before_decode: bool = False
    #: the layout needs `--offload_model True` given explicitly (both experts would not fit otherwise)
    offload_flag: bool = False
    #: --quantize: the block linears in fp8/int8 ("none": bf16)
    quant: str = "none"
    #: --convert_model_dtype: DiT weights in bf16 (else float32, as official)
    convert_model_dtype: bool = False
    #: the experts are loaded onto the GPU (official init_on_cpu False: sp > 1 or FSDP)
    dit_load_gpu: bool = True
    #: --t5_cpu: T5 lives and encodes on the CPU
    t5_cpu: bool = False

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring


def _link_gbps(gpu: GpuSpec, eff: Efficiency, link: str) -> float:
    return (gpu.intra_gbps * eff.comm_intra if link == "intra" else gpu.inter_gbps * eff.comm_inter) * GB


def block_flops(dims: DitDims, tokens: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one block over the whole sequence (gpu_check.py's count)."""
    d, s, t = dims.dim, tokens, dims.text_len
    linear = 2 * s * (6 * d * d + 2 * d * dims.ffn) + 2 * t * 2 * d * d
    attention = 4 * s * s * d + 4 * s * t * d
    return float(linear), float(attention)


@dataclass(frozen=True, slots=True)
class Comm:
    """Bytes one rank sends per DiT forward, by kind; and seconds not hidden behind compute."""

    ulysses_a2a_bytes: float
    ring_p2p_bytes: float
    fsdp_allgather_bytes: float
    exposed_s: float


@dataclass(frozen=True, slots=True)
class ForwardCost:
    compute_s: float
    comm: Comm

    @property
    def seconds(self) -> float:
        return self.compute_s + self.comm.exposed_s


def forward_cost(dims: DitDims, work: Workload, place: RankLayout, gpu: GpuSpec, eff: Efficiency,
                 calibration: Calibration | None = None) -> ForwardCost:
    """One DiT forward on one rank of the sequence group."""
    s, sp, u, r = work.tokens, place.sp, place.ulysses, place.ring
    peak = gpu.bf16_tflops * 1e12
    linear, attention = block_flops(dims, s)
    act = s / sp * dims.dim * 2
    # linear layers and the element-wise passes between them; then the attentions
    lin_s = linear / sp / (peak * eff.matmul * gpu.gemm_factor(place.quant)) + eff.elementwise_passes * 2 * act / (gpu.hbm_gbps * GB * eff.hbm)
    attn_s = attention / sp / (peak * eff.attention * (eff.ring_attention if r > 1 else 1.0))
    if calibration is not None:
        lin_s *= calibration.linear_scale
        attn_s *= calibration.attention_scale
    # Ulysses: q, k, v scattered by heads, attention output back: (u-1)/u of the local slice each
    a2a_bytes = 4 * act * (u - 1) / u if u > 1 else 0.0
    a2a_s = (4 * eff.collective_latency_s + a2a_bytes / _link_gbps(gpu, eff, place.ulysses_link)) if u > 1 else 0.0
    # ring: after the all-to-all each rank holds s/r tokens of heads/u; K and V pass r-1 times
    ring_bytes = (r - 1) * 2 * (s / r) * (dims.dim / u) * 2 if r > 1 else 0.0
    ring_s = ((r - 1) * eff.collective_latency_s + ring_bytes / _link_gbps(gpu, eff, place.ring_link)) if r > 1 else 0.0
    attn_block = max(attn_s, ring_s)  # each K/V pass overlaps the previous chunk's attention
    gather_bytes = dims.block_bytes(place.quant) * (sp - 1) / sp if place.dit_fsdp and sp > 1 else 0.0
    gather_s = gather_bytes / _link_gbps(gpu, eff, place.fsdp_link) if gather_bytes else 0.0
    compute_block = lin_s + attn_s
    block = max(compute_block + (attn_block - attn_s), gather_s)  # FSDP prefetch hides the gather
    exposed = dims.layers * (block - compute_block + a2a_s)
    return ForwardCost(compute_s=dims.layers * compute_block,
                       comm=Comm(ulysses_a2a_bytes=dims.layers * a2a_bytes, ring_p2p_bytes=dims.layers * ring_bytes,
                                 fsdp_allgather_bytes=dims.layers * gather_bytes, exposed_s=exposed))


@dataclass(frozen=True, slots=True)
class Prediction:
    """A model's figures for one video on one generation's ranks (seconds)."""

    step_s: float
    denoise_s: float
    total_s: float
    fixed_s: dict[str, float]


def fixed_costs(dims: DitDims, work: Workload, place: RankLayout, gpu: GpuSpec, eff: Efficiency,
                gen_ranks: int) -> dict[str, float]:
    """T5 on two prompts, VAE decode (+ i2v encode), offload transfers: seconds by part."""
    peak = gpu.bf16_tflops * 1e12
    t5 = 2 * 2 * dims.t5_params * dims.text_len / (peak * eff.matmul)
    vae_flops = eff.vae_decode_flops_per_pixel[work.vae_version] * work.pixels
    split = gen_ranks if place.vae_parallel else 1
    out = {"t5_s": t5, "vae_decode_s": vae_flops / split / (peak * eff.vae)}
    if work.image_conditioned:
        out["vae_encode_s"] = eff.vae_encode_flops_per_pixel[work.vae_version] * work.pixels / (peak * eff.vae)
    if place.offload:
        # only the active expert on the GPU: each comes on once and leaves once (at the switch, at
        # the end); with offload_model T5 also comes on to encode and leaves
        moved = 2 * (dims.experts * dims.expert_bytes(place.quant) + (2 * dims.t5_params if place.t5_offload else 0))
        out["offload_s"] = moved / (gpu.pcie_gbps * GB * eff.pcie)
    return out


def predict(dims: DitDims, work: Workload, place: RankLayout, gpu: GpuSpec, eff: Efficiency,
            steps: list[tuple[bool, bool | None]], calibration: Calibration | None = None) -> Prediction:
    """`steps`: per denoising step (cond computed?, uncond computed? / None: guidance 1, no uncond).

    Serial CFG runs the computed forwards one after the other; CFG-parallel runs the two branches
    on two halves at once, so a step costs one forward when either branch computes.
    """
    fwd = forward_cost(dims, work, place, gpu, eff, calibration).seconds
    exchange = eff.collective_latency_s + work.latent_elems * 4 / _link_gbps(gpu, eff, place.cfg_link)
    denoise = 0.0
    for cond, uncond in steps:
        if place.cfg == 2:
            denoise += fwd * (cond or bool(uncond)) + (exchange if uncond is not None else 0.0)
        else:
            denoise += fwd * (int(cond) + int(bool(uncond)))
    full_step = fwd * (1 if place.cfg == 2 else 2) + (exchange if place.cfg == 2 else 0.0)
    fixed = fixed_costs(dims, work, place, gpu, eff, gen_ranks=place.sp * place.cfg)
    return Prediction(step_s=full_step, denoise_s=denoise, total_s=denoise + sum(fixed.values()), fixed_s=fixed)


def model_constants(gpu: GpuSpec, eff: Efficiency, calibration: Calibration | None) -> dict:
    """What `plan --json` prints under "model": every constant the figures came from."""
    return {"kind": "roofline model (predicted, not measured)", "gpu": asdict(gpu), "efficiency": asdict(eff),
            "calibration": None if calibration is None else asdict(calibration)}
