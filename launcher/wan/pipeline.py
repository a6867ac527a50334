"""The official Wan2.2 sampling loop (text2video / image2video / textimage2video), once for all tasks.

Per step: pick the expert by `t >= boundary*1000`, run the cond then the uncond forward (or one
of them per CFG half), combine `uncond + g*(cond - uncond)` (at g = 1 only the cond forward runs:
that sum is cond up to float rounding), take a scheduler step; ti2v with an
image re-imposes the first-frame latent after every step. Each forward goes through the block
runner (MagCache controller, calibration recorder or compute-all) with its global forward index.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from PIL import Image

from launcher.wan import conditioning as cond
from launcher.wan.dit import WanDiT, pad_context
from launcher.wan.residency import HostResident
from launcher.wan.threads import cpu_phase
from magcache.controller import BlockRunner
from launcher.wan.solvers import make_scheduler
from launcher.wan.tasks import TaskSpec


class BranchExchange(Protocol):
    """Which CFG branches this rank computes, and how both predictions reach every rank."""

    branches: tuple[int, ...]

    def combine(self, preds: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...


class SerialBranches:
    """One rank (or one sequence group) computes cond then uncond, as official does."""

    branches = (0, 1)

    def combine(self, preds: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return preds[0], preds[1]


@dataclass(frozen=True, slots=True)
class Request:
    """What one video needs beyond the loaded models (a batch varies these per item)."""

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    max_area: int
    frame_num: int
    steps: int
    shift: float
    solver: str
    guide_scale: tuple[float, float]  # (low_noise, high_noise)
    image: Image.Image | None = None
    #: experts at guidance 1: their steps run the cond forward alone (`config.cond_only_experts`)
    cond_only: tuple[str, ...] = ()
    #: euler: base timesteps before the shift (None: the solver's own list)
    timesteps: tuple[float, ...] | None = None


@dataclass
class Result:
    latents: torch.Tensor  # [C,F,H,W] float32, before decode
    video: torch.Tensor | None  # [3,F,H,W] in [-1,1], on decoding ranks
    timesteps: list[int] | list[float]
    experts_per_step: list[str]
    seq_len: int
    timings: dict[str, float] = field(default_factory=dict)
    #: with a split decode: the split and this rank's share (launcher.wan.vae_parallel.SplitDecoder)
    decode: dict | None = None


@dataclass
class Models:
    """The loaded modules. `experts` maps "high"/"low" (A14B) or "single" (ti2v) to a DiT."""

    task: TaskSpec
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    experts: dict[str, WanDiT]
    device: torch.device
    text_device: torch.device
    dit_dtype: torch.dtype
    autocast: bool = False
    #: only the active expert on the GPU (official `_prepare_model_for_timestep`; launcher.planner.memory)
    swap_experts: bool = False
    #: official --offload_model: every DiT to the CPU before VAE decode
    park_dit_before_decode: bool = False
    #: official --offload_model also parks T5 on the CPU between prompts (when not --t5_cpu)
    offload_text_encoder: bool = False
    #: experts whose home is (pinned) host memory, by name; moved with them instead of `.to()`
    residency: dict[str, HostResident] = field(default_factory=dict)
    #: called with (step, steps) before each step's forwards: the quantization schedule's switch
    #: between 8-bit and compute-dtype linears (launcher.wan.quantize.step_switch); None: no schedule
    at_step: Callable[[int, int], None] | None = None

    def expert_to(self, name: str, device: torch.device | str) -> None:
        """Move one expert's weights (pinned-memory copies when it has a host home)."""
        if name in self.residency:
            self.residency[name].to(device)
        else:
            self.experts[name].model.to(device)


class _Timer:
    """Seconds per phase. On CUDA each phase ends when the GPU's queued work does, not when Python
    finished queueing it (else "decode" would end before the GPU does and "denoise" absorb its tail)."""

    def __init__(self, device: torch.device) -> None:
        self.timings: dict[str, float] = {}
        self.device = device

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return cond.pil_to_tensor(img)


class WanPipeline:
    """Runs one request at a time on already-loaded models."""

    def __init__(
        self,
        models: Models,
        *,
        exchange: BranchExchange | None = None,
        decode: bool = True,
        on_step: Callable[[int, int], None] | None = None,
        split_decode: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor | None, dict]] | None = None,
    ) -> None:
        self.m = models
        self.exchange = exchange or SerialBranches()
        self.decode = decode
        #: every rank of the generation decodes a band (the video lands on the output rank); else `decode` decides
        self.split_decode = split_decode
        #: called once the latent is final, before the decode starts (the session logs it)
        self.on_decode: Callable[[], None] | None = None
        self.on_step = on_step

    # -- text -------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> list[torch.Tensor]:
        from launcher.wan.text_encoder import encode_prompts

        with self._text_encoder_in():
            ctx = encode_prompts(self.m.tokenizer, self.m.text_encoder, prompts, text_len=self.m.task.text_len,
                                 device=self.m.text_device)
        return [c.to(self.m.device) for c in ctx]

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder on token ids as `encode_text` runs it, untrimmed [B, text_len, dim] (the dry run)."""
        with self._text_encoder_in():
            hidden = self.m.text_encoder(input_ids=ids.to(self.m.text_device),
                                         attention_mask=mask.to(self.m.text_device)).last_hidden_state
        return hidden.to(self.m.device)

    @contextlib.contextmanager
    def _text_encoder_in(self):
        """Official --offload_model: T5 comes to where it encodes, and goes back to the CPU after."""
        if self.m.offload_text_encoder:
            self.m.text_encoder.to(self.m.text_device)
        on_cpu = cpu_phase(self.m.device) if self.m.text_device.type == "cpu" else contextlib.nullcontext()
        with on_cpu:  # --t5_cpu: T5-XXL with the rank's cores, not torchrun's one thread
            yield
        if self.m.offload_text_encoder:
            self.m.text_encoder.to("cpu")
            torch.cuda.empty_cache()

    # -- conditioning -----------------------------------------------------------------------
    def _prepare(self, req: Request):
        """Initial latent, extra channels (i2v), first-frame latent (ti2v image) and seq_len."""
        task, dev = self.m.task, self.m.device
        sp = 1  # padding for sequence parallel is internal to the sharding; seq_len is the real one
        y = z = mask2 = None
        if task.mode == "i2v":
            img = _to_tensor(req.image)
            h, w, lat_h, lat_w = cond.i2v_target_size(img.shape[1], img.shape[2], req.max_area,
                                                      task.vae_stride[1], task.patch_size[1])
            lat_f = (req.frame_num - 1) // task.vae_stride[0] + 1
            noise = cond.draw_noise((task.z_dim, lat_f, lat_h, lat_w), req.seed, dev)
            from launcher.wan.vae import encode

            frame = cond.i2v_resize(img, h, w)
            video = cond.i2v_condition_video(frame, req.frame_num)
            latent_img = encode(self.m.vae, video.to(dev))
            y = cond.i2v_y(cond.i2v_mask(req.frame_num, lat_h, lat_w).to(dev), latent_img)
            latent = noise
        elif task.mode == "ti2v" and req.image is not None:
            from launcher.wan.vae import encode

            img = cond.ti2v_prepare_image(req.image, req.max_area)  # [3,1,oh,ow]
            z = encode(self.m.vae, img.to(dev))
            shape = (task.z_dim, (req.frame_num - 1) // task.vae_stride[0] + 1, z.shape[2], z.shape[3])
            noise = cond.draw_noise(shape, req.seed, dev)
            mask2 = cond.ti2v_mask(shape).to(dev)
            latent = cond.ti2v_blend(z, noise, mask2)
        else:
            shape = cond.latent_shape(task, req.frame_num, req.height, req.width)
            latent = cond.draw_noise(shape, req.seed, dev)
        _, lat_f, lat_h, lat_w = latent.shape
        seq_len = cond.seq_len(lat_f, lat_h, lat_w, task.patch_size, sp)
        return latent, y, z, mask2, seq_len

    # -- the loop ---------------------------------------------------------------------------
    def expert_for(self, t: int) -> str:
        task = self.m.task
        if task.boundary is None:
            return "single"
        return "high" if t >= task.boundary * task.num_train_timesteps else "low"

    def _activate(self, name: str) -> WanDiT:
        """Official `_prepare_model_for_timestep` (wan/text2video.py:201-211): when swapping, every idle
        expert on the GPU goes to the CPU, whether or not the active one was already there (with
        sp > 1 and no FSDP both experts load on the GPU), then the active one comes in if it is out."""
        dit = self.m.experts[name]
        if not self.m.swap_experts:
            return dit
        idle = [other for other in self.m.experts
                if other != name and self.m.experts[other].model.patch_embedding.weight.device == self.m.device]
        for other in idle:
            self.m.expert_to(other, "cpu")
        if idle:
            torch.cuda.empty_cache()
        if dit.model.patch_embedding.weight.device != self.m.device:
            self.m.expert_to(name, self.m.device)
        return dit

    def _branches(self, cond_only: bool) -> tuple[int, ...]:
        """The CFG branches this rank computes at a step: cond alone at guidance 1."""
        if not cond_only:
            return self.exchange.branches
        if self.exchange.branches != (0, 1):
            raise ValueError("guidance 1 runs the cond forward alone; it cannot be split over CFG-parallel ranks")
        return (0,)

    def forward_step(self, dit: WanDiT, expert: str, i: int, model_in: torch.Tensor, ts: torch.Tensor,
                     ctx: dict[int, torch.Tensor], text_states: dict[tuple[str, int], torch.Tensor],
                     runner: BlockRunner, g: float, *, cond_only: bool) -> torch.Tensor:
        """Step i's noise prediction: this rank's branches through the block runner, then CFG."""
        amp = (torch.autocast(self.m.device.type, dtype=self.m.dit_dtype) if self.m.autocast
               else contextlib.nullcontext())
        preds: dict[int, torch.Tensor] = {}
        branches = self._branches(cond_only)
        for b in branches:
            if (expert, b) not in text_states:
                with amp:
                    text_states[(expert, b)] = dit.embed_text(ctx[b].to(dit.model.dtype))
        with amp:
            step_in = dit.embed(model_in, ts)
            for b in branches:
                out = dit.run(step_in, text_states[(expert, b)], runner=runner, index=2 * i + b, expert=expert)
                preds[b] = out.float()
        if cond_only:  # guidance 1: official's uncond + 1*(cond - uncond) is cond up to rounding
            return preds[0]
        pred_cond, pred_uncond = self.exchange.combine(preds)
        return pred_uncond + g * (pred_cond - pred_uncond)

    @torch.no_grad()
    def generate(self, req: Request, runner: BlockRunner, *, decode: bool = True) -> Result:
        """Denoise `req` with `runner` around the blocks; then decode unless `decode` is False."""
        timer = _Timer(self.m.device)
        task = self.m.task
        with timer.phase("encode_text"):
            context, context_null = self.encode_text([req.prompt, req.negative_prompt])
            ctx = {0: pad_context(context, task.text_len), 1: pad_context(context_null, task.text_len)}
        with timer.phase("prepare"):
            latent, y, z, mask2, seq_len = self._prepare(req)
            scheduler = make_scheduler(req.solver, req.steps, req.shift, device=self.m.device, timesteps=req.timesteps)
        timesteps = scheduler.timesteps.tolist()  # ints (UniPC, DPM++) or Euler's float timesteps
        experts_per_step = [self.expert_for(t) for t in timesteps]
        text_states: dict[tuple[str, int], torch.Tensor] = {}
        with timer.phase("denoise"):
            for i, t in enumerate(scheduler.timesteps):
                expert = experts_per_step[i]
                dit = self._activate(expert)
                if self.m.at_step is not None:
                    self.m.at_step(i, req.steps)
                g = req.guide_scale[1] if expert == "high" else req.guide_scale[0]
                model_in = latent if y is None else torch.cat([latent, y])
                if mask2 is not None:
                    ts = cond.ti2v_timesteps(mask2, t, seq_len).to(self.m.device)
                else:
                    ts = t.reshape(1).to(self.m.device)
                noise_pred = self.forward_step(dit, expert, i, model_in, ts, ctx, text_states, runner, g,
                                               cond_only=expert in req.cond_only)
                latent = scheduler.step(noise_pred.unsqueeze(0), t, latent.unsqueeze(0), return_dict=False)[0][0]
                if mask2 is not None:
                    latent = cond.ti2v_blend(z, latent, mask2)
                if self.on_step is not None:
                    self.on_step(i + 1, req.steps)
        video = None
        if self.m.park_dit_before_decode:
            for name in self.m.experts:
                self.m.expert_to(name, "cpu")
            torch.cuda.empty_cache()
        split = None
        decodes = decode and (self.decode or self.split_decode is not None)
        if self.on_decode is not None and decodes:
            self.on_decode()
        if decodes and self.split_decode is not None:
            with timer.phase("decode"):
                video, split = self.split_decode(self.m.vae, latent)
        elif decodes:
            from launcher.wan.vae import decode as vae_decode

            with timer.phase("decode"):
                video = vae_decode(self.m.vae, latent)
        return Result(latents=latent.float(), video=video, timesteps=timesteps,
                      experts_per_step=experts_per_step, seq_len=seq_len, timings=timer.timings, decode=split)
