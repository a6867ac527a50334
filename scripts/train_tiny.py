#!/usr/bin/env python
"""Train the tiny-shapes Wan2.2 (t2v-A14B layout) from scratch on CPU and write it in the official layout.

    python scripts/train_tiny.py --out models/tiny-shapes [--work /tmp/tiny-shapes-work] [--seed 0]

Stages (each caches its result in --work, so an interrupted run resumes where it stopped):
  1. vae      a Wan2.1-architecture VAE (diffusers AutoencoderKLWan, base_dim 8, z 16) trained on
              random 32x32x5 crops of the shapes clips (the net is convolutional: a crop costs 1/7 of
              a full clip and exercises both the first-frame and the 4-frame path), in stages:
              first encoder and decoder are each taught an analytic latent (the top-16 PCA
              components of the 4x8x8x3 pixel patches behind each latent voxel), then the whole
              autoencoder is fine-tuned end to end, its last steps on 9-frame crops (trained end to
              end from random weights it stalls at ~11 dB: see models/tiny-shapes/README.md)
  2. latents  the official normalised latents ((mu - mean) / std, Wan2.1 constants) of --clips clips
              (encoder only)
  3. text     the tokenizer (the shapes vocabulary as whole words) and the random tiny umt5 encoder
              (make_tiny_checkpoint's T5, frozen); every prompt's context and the official negative
              prompt's, computed once
  4. dit      one WanTransformer3DModel trained with flow matching over all noise levels, then copied
              into the two experts, each fine-tuned on its side of the official boundary (t >= 875:
              high-noise expert); 10% of samples get the negative prompt's context (for guidance)
  5. write    the official layout (make_tiny_checkpoint's writer) in --out
  6. ratios   the model's own MagCache ratio table: `magcache-launch calibrate --prompts` over 8 of the
              prompts (calibration_prompts.jsonl, seed 1), written beside it as magcache_ratios.json

Everything is seeded; the same thread count gives the same weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: E402
from transformers import UMT5Config, UMT5EncoderModel  # noqa: E402

from launcher.checkpoint import tiny as mtc  # noqa: E402
from launcher.cli import main as cli  # noqa: E402
from benchmarks import shapes  # noqa: E402
from launcher.wan.tasks import TASKS  # noqa: E402
from launcher.wan.text_encoder import encode_prompts  # noqa: E402
from launcher.wan.vae import LATENT_STATS  # noqa: E402

TASK = TASKS["t2v-A14B"]
VAE_BASE_DIM = 8
VAE_LR = 1e-3
DIT = {"num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 256, "num_layers": 4, "freq_dim": 256,
       "text_dim": mtc.T5_DIM, "patch_size": [1, 2, 2], "cross_attn_norm": True,
       "qk_norm": "rms_norm_across_heads", "eps": 1e-6}
VOCAB = tuple(dict.fromkeys(
    tuple(mtc.WORDS) + ("moving", "background") + shapes.SHAPES + tuple(shapes.PALETTE) + tuple(shapes.DIRECTIONS)))
#: the boundary in shifted-uniform coordinates: sigma = shift*u / (1 + (shift-1)*u) >= boundary
U_BOUNDARY = TASK.boundary / (TASK.sample_shift - (TASK.sample_shift - 1) * TASK.boundary)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _mean_std() -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = LATENT_STATS["2.1"]
    return torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)


def new_vae() -> AutoencoderKLWan:
    mean, std = LATENT_STATS["2.1"]
    return AutoencoderKLWan(base_dim=VAE_BASE_DIM, z_dim=16, latents_mean=list(mean), latents_std=list(std))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item()


def _crops(gen: torch.Generator, batch: int, seed_base: int, frames: int = 5) -> torch.Tensor:
    """Random 32x32 crops of `frames` frames (1 + 4k; 5 = two latent frames, 9 = three)."""
    out = []
    for i in range(batch):
        _, video = shapes.clip(seed_base + i)
        f0 = int(torch.randint(0, shapes.FRAMES - frames + 1, (1,), generator=gen))
        y, x = (int(v) for v in torch.randint(0, shapes.SIZE - 32 + 1, (2,), generator=gen))
        out.append(video[:, f0:f0 + frames, y:y + 32, x:x + 32])
    return torch.stack(out)


def _patches(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, 1+4k, H, W] -> [B, 1+k, H/8, W/8, 768]: the pixels behind each latent voxel (4 frames x 8 x 8 x
    RGB; the first latent frame sees one frame, repeated 4 times, as the causal encoder does)."""
    b, c, f, h, w = x.shape
    x = torch.cat([x[:, :, :1].expand(-1, -1, 4, -1, -1), x[:, :, 1:]], 2)
    t = x.shape[2] // 4
    p = x.reshape(b, c, t, 4, h // 8, 8, w // 8, 8).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return p.reshape(b, t, h // 8, w // 8, c * 4 * 64)


def fit_pca(clips: int, seed_base: int = 3_000_000) -> dict:
    """The top-16 principal components of the 4x8x8x3 patches of `clips` clips, scaled so that each
    coefficient has unit variance: the analytic latent the VAE is first taught (linear, ~26 dB)."""
    p = _patches(torch.stack([shapes.clip(seed_base + i)[1] for i in range(clips)])).reshape(-1, 768)
    mean = p.mean(0)
    v = torch.linalg.svd(p - mean, full_matrices=False)[2]
    comp = v[:16]
    scale = ((p - mean) @ comp.T).std(0)
    return {"mean": mean, "comp": comp, "scale": scale}


def analytic_latent(x: torch.Tensor, pca: dict) -> torch.Tensor:
    """Normalised target latent [B, 16, 1+k, H/8, W/8] of a batch of videos (PCA coefficients / their std)."""
    c = (_patches(x) - pca["mean"]) @ pca["comp"].T / pca["scale"]
    return c.permute(0, 4, 1, 2, 3).contiguous()


def _decode_unclamped(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """diffusers' `AutoencoderKLWan._decode` (frame by frame through the causal cache) without its final
    clamp to [-1, 1], which would stop the gradient of every overshooting pixel."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, 2)


def encode_norm(vae: AutoencoderKLWan, x: torch.Tensor) -> torch.Tensor:
    """The official normalised latent ((mu - mean) / std, Wan2.1 constants) of a batch [B, 3, F, H, W]."""
    mean, std = _mean_std()
    return (vae.encode(x).latent_dist.mode() - mean) / std


def decode_norm(vae: AutoencoderKLWan, zn: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std()
    return _decode_unclamped(vae, zn * std + mean)


def vae_roundtrip(vae: AutoencoderKLWan, x: torch.Tensor, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, normalised latent) of a batch [B, 3, F, H, W]."""
    zn = encode_norm(vae, x)
    z = zn + noise * torch.randn_like(zn) if noise else zn
    return decode_norm(vae, z), zn


def _rec_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (y - x).abs().mean() + ((y - x) ** 2).mean()


def train_vae(steps: int, batch: int, seed: int, teach_steps: int, full_steps: int, pca_clips: int = 128,
              anchor: float = 0.1) -> tuple[AutoencoderKLWan, dict]:
    """Two stages, the second ending on 9-frame crops. Trained end to end from random weights this VAE
    does not learn (it stalls at ~11 dB, below a per-crop mean colour; see models/tiny-shapes/README.md),
    so:

    1. teach (`teach_steps`): the encoder regresses the analytic latent (PCA of the clips' patches,
       `analytic_latent`) and the decoder reconstructs the clips from that same analytic latent: two
       halves that each learn on their own;
    2. joint (`steps - teach_steps`): the usual autoencoder loss through the encoder's own latent, with a
       small pull (`anchor`) towards the analytic latent, which keeps the latents near zero mean / unit
       variance per channel and smooth in space, what the DiT's noise assumes.
    Both on 5-frame crops (two latent frames), then the last `full_steps` (of `steps`) joint on 9-frame
    crops: with 5-frame crops alone the third latent frame's path through the causal caches (the
    decoder's temporal upsampling fed a real cached frame, not the first chunk's) is never trained,
    and frames 5-8 of a full clip decode at 9-22 dB while frames 0-4 reach 24 dB. 9-frame crops
    throughout learn less per CPU-second (0.9 vs 0.54 CPU-s a step: 19.1 dB after 1000 steps).
    """
    torch.manual_seed(seed)
    vae = new_vae().train()
    pca = fit_pca(pca_clips)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.process_time()

    def run(n: int, lr: float, joint: bool, first: int, frames: int = 5) -> None:
        if n <= 0:
            return
        opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n, pct_start=0.05)
        for i in range(n):
            step = first + i
            x = _crops(gen, batch, 1_000_000 + step * batch, frames)
            za = analytic_latent(x, pca)
            zn = encode_norm(vae, x)
            fit = ((zn - za) ** 2).mean()
            if joint:
                rec = _rec_loss(decode_norm(vae, zn + 0.05 * torch.randn_like(zn)), x)
                loss = rec + anchor * fit
            else:
                rec = _rec_loss(decode_norm(vae, za + 0.05 * torch.randn_like(za)), x)
                loss = rec + fit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 25 == 0 or i == n - 1:
                log(f"vae {'joint' if joint else 'teach'}/{frames} step {step}/{steps} rec {rec.item():.4f} "
                    f"latent-fit {fit.item():.3f} ({(time.process_time() - t0) / (step + 1):.2f} CPU-s/step)")

    run(teach_steps, VAE_LR, joint=False, first=0)
    run(steps - teach_steps - full_steps, VAE_LR / 3, joint=True, first=teach_steps)
    run(full_steps, VAE_LR / 3, joint=True, first=steps - full_steps, frames=9)
    vae.eval().requires_grad_(False)
    return vae, {"vae_steps": steps, "vae_teach_steps": teach_steps, "vae_full_steps": full_steps, "vae_batch": batch,
                 "vae_cpu_seconds": round(time.process_time() - t0, 1)}


@torch.no_grad()
def encode_clips(vae: AutoencoderKLWan, count: int, batch: int = 8) -> tuple[torch.Tensor, list[str]]:
    """The normalised latents (encoder only) and prompts of clips 0..count-1."""
    latents, prompts = [], []
    t0 = time.perf_counter()
    for start in range(0, count, batch):
        items = [shapes.clip(seed) for seed in range(start, min(count, start + batch))]
        latents.append(encode_norm(vae, torch.stack([v for _, v in items])))
        prompts += [s.prompt for s, _ in items]
        if start % (batch * 20) == 0:
            log(f"latents {start + len(items)}/{count} ({time.perf_counter() - t0:.0f} s)")
    return torch.cat(latents), prompts


def make_text(seed: int) -> tuple[object, UMT5EncoderModel]:
    tokenizer = mtc.make_tokenizer(VOCAB)
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **mtc.TINY_T5))
    mtc._randomize(t5, seed, "t5")
    return tokenizer, t5.to(torch.bfloat16).eval()


@torch.no_grad()
def contexts(tokenizer, t5: UMT5EncoderModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact contexts: (rows [N, Lmax+1, text_dim], attention bias [N, Lmax+1]).

    The official DiT zero-pads every context to text_len (512) rows and attends to all of them. The
    pad rows are identical, so the same attention is the real rows plus the pad rows present once
    more than the longest prompt, each weighted by a log-count bias: exact, and ~30x less cross
    attention to train.
    """
    t5 = t5.float()
    encoded = [c.float() for c in encode_prompts(tokenizer, t5, texts, text_len=TASK.text_len, device="cpu")]
    t5.to(torch.bfloat16)
    width = max(c.shape[0] for c in encoded) + 1
    rows = torch.zeros(len(texts), width, mtc.T5_DIM)
    bias = torch.zeros(len(texts), width)
    for i, c in enumerate(encoded):
        n = c.shape[0]
        rows[i, :n] = c
        bias[i, n:] = torch.log(torch.tensor((TASK.text_len - n) / (width - n)))
    return rows, bias


class _BiasedCrossAttention:
    """diffusers' WanAttnProcessor with the compact context's log-count bias as its attention mask."""

    def __init__(self, inner, holder: dict) -> None:
        self.inner, self.holder = inner, holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.holder["bias"], rotary_emb)


def biased(dit: WanTransformer3DModel) -> dict:
    holder: dict = {"bias": None}
    for block in dit.blocks:
        block.attn2.set_processor(_BiasedCrossAttention(block.attn2.processor, holder))
    return holder


def forward(dit: WanTransformer3DModel, holder: dict, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor,
            bias: torch.Tensor) -> torch.Tensor:
    holder["bias"] = bias[:, None, None, :]
    return dit(hidden_states=x, timestep=t, encoder_hidden_states=rows, return_dict=False)[0]


@torch.no_grad()
def check_compact_context(ctx, tokenizer, t5: UMT5EncoderModel, prompt: str) -> None:
    """The compact context gives the official 512-row forward (a random DiT, one prompt), or we stop."""
    torch.manual_seed(123)
    dit = WanTransformer3DModel(**DIT, in_channels=16, out_channels=16).eval()
    full = torch.zeros(1, TASK.text_len, mtc.T5_DIM)
    c = encode_prompts(tokenizer, t5.float(), [prompt], text_len=TASK.text_len, device="cpu")[0].float()
    t5.to(torch.bfloat16)
    full[0, : c.shape[0]] = c
    x, t = torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0])
    want = dit(hidden_states=x, timestep=t, encoder_hidden_states=full, return_dict=False)[0]
    holder = biased(dit)
    got = forward(dit, holder, x, t, ctx[0][:1], ctx[1][:1])
    err = float((got - want).abs().max() / want.abs().max())
    if err > 1e-4:
        raise RuntimeError(f"compact context differs from the 512-row one by {err:.2e}")
    log(f"compact context equals the 512-row forward to {err:.1e} (relative)")


def _sigmas(n: int, lo: float, hi: float, shift: float, gen: torch.Generator) -> torch.Tensor:
    u = lo + (hi - lo) * torch.rand(n, generator=gen)
    return shift * u / (1 + (shift - 1) * u)


def train_dit(dit: WanTransformer3DModel, latents: torch.Tensor, prompt_idx: torch.Tensor, ctx, neg, *,
              steps: int, batch: int, u_range: tuple[float, float], shift: float, lr: float, seed: int,
              name: str) -> WanTransformer3DModel:
    """Flow matching (x_t = (1-s) x0 + s eps, target eps - x0, timestep 1000 s); returns the EMA weights.

    A tenth of each batch gets the official negative prompt's context instead of its own (guidance)."""
    gen = torch.Generator().manual_seed(seed)
    holder = biased(dit)
    dit.train().requires_grad_(True)
    ema = copy.deepcopy(dit.state_dict())
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    n_neg = max(1, batch // 10)
    t0 = time.process_time()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        eps = torch.randn(x0.shape, generator=gen)
        s = _sigmas(batch, *u_range, shift, gen)
        xt = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
        c = n_neg  # the first n_neg samples are unconditional
        pred_c = forward(dit, holder, xt[c:], s[c:] * 1000, ctx[0][prompt_idx[idx[c:]]], ctx[1][prompt_idx[idx[c:]]])
        pred_u = forward(dit, holder, xt[:c], s[:c] * 1000, neg[0].expand(c, -1, -1), neg[1].expand(c, -1))
        loss = ((torch.cat([pred_u, pred_c]) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.998, (1 + step) / (10 + step))
            for k, v in dit.state_dict().items():
                ema[k].lerp_(v, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"dit[{name}] step {step}/{steps} loss {loss.item():.4f} "
                f"({(time.process_time() - t0) / (step + 1) * 1000:.0f} CPU-ms/step)")
    for block in dit.blocks:
        block.attn2.set_processor(block.attn2.processor.inner)
    dit.load_state_dict(ema)
    return dit.eval().requires_grad_(False)


CALIBRATION_PROMPTS = 8


def calibrate(ckpt: Path, seed: int) -> None:
    """Write CALIBRATION_PROMPTS of the training prompts and the ratio table `calibrate` makes from them."""
    scenes = shapes.all_scenes()
    picks = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed + 10))[:CALIBRATION_PROMPTS]
    prompts = ckpt / "calibration_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": scenes[int(i)].prompt}) + "\n" for i in picks))
    try:
        code = cli(["calibrate", "--task", "t2v-A14B", "--size", f"{shapes.SIZE}*{shapes.SIZE}",
                    "--frame_num", str(shapes.FRAMES), "--ckpt_dir", str(ckpt), "--prompts", str(prompts), "--seeds", "1",
                    "--out", str(ckpt / "magcache_ratios.json")])
    except SystemExit as e:  # typer's exit
        code = e.code
    if code not in (0, None):
        raise SystemExit(f"train_tiny: calibrate on {ckpt} failed ({code})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (new or empty)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiny-shapes-work"), help="stage cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1150)
    ap.add_argument("--vae-teach-steps", type=int, default=500,
                    help="of --vae-steps, the first ones that teach encoder and decoder the analytic latent")
    ap.add_argument("--vae-full-steps", type=int, default=150,
                    help="of --vae-steps, the last ones, on 9-frame crops (the others use 5 frames)")
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--clips", type=int, default=2016, help="training clips (12 per prompt)")
    ap.add_argument("--dit-steps", type=int, default=3000, help="shared steps over all noise levels")
    ap.add_argument("--expert-steps", type=int, default=600, help="fine-tuning steps per expert")
    ap.add_argument("--dit-batch", type=int, default=32)
    ap.add_argument("--dit-layers", type=int, default=DIT["num_layers"], help="transformer blocks per expert")
    args = ap.parse_args(argv)
    dit_config = {**DIT, "num_layers": args.dit_layers}
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    info: dict = {}
    meta_path = args.work / "meta.json"
    if meta_path.exists():
        info = json.loads(meta_path.read_text())

    def save_meta() -> None:
        meta_path.write_text(json.dumps(info, indent=1))

    vae_path = args.work / "vae.pt"
    vae = new_vae()
    if vae_path.exists():
        vae.load_state_dict(torch.load(vae_path))
        vae.eval().requires_grad_(False)
    else:
        vae, stats = train_vae(args.vae_steps, args.vae_batch, args.seed, args.vae_teach_steps,
                               args.vae_full_steps)
        torch.save(vae.state_dict(), vae_path)
        info.update(stats)
        with torch.no_grad():
            items = [shapes.clip(2_000_000 + i) for i in range(8)]
            x = torch.stack([v for _, v in items])
            y, zn = vae_roundtrip(vae, x)
            info["vae_psnr_db"] = round(psnr(y, x), 2)
            info["latent_mean_std"] = [round(float(zn.mean()), 3), round(float(zn.std()), 3)]
        save_meta()
        log(f"vae done: PSNR {info['vae_psnr_db']} dB on 8 held-out 64x64x9 clips")

    lat_path = args.work / "latents.pt"
    if lat_path.exists():
        cached = torch.load(lat_path)
        latents, prompts = cached["latents"], cached["prompts"]
    else:
        t0 = time.perf_counter()
        latents, prompts = encode_clips(vae, args.clips)
        torch.save({"latents": latents, "prompts": prompts}, lat_path)
        info["latents_seconds"] = round(time.perf_counter() - t0, 1)
        save_meta()

    tokenizer, t5 = make_text(args.seed)
    scenes = [s.prompt for s in shapes.all_scenes()]
    ctx = contexts(tokenizer, t5, scenes)
    neg = contexts(tokenizer, t5, [TASK.sample_neg_prompt])
    prompt_idx = torch.tensor([scenes.index(p) for p in prompts])
    check_compact_context(ctx, tokenizer, t5, scenes[0])

    experts = {}
    for name in ("high", "low"):
        path = args.work / f"dit-{name}.pt"
        if path.exists():
            experts[name] = WanTransformer3DModel(**dit_config, in_channels=16, out_channels=16)
            experts[name].load_state_dict(torch.load(path))
    if len(experts) < 2:
        shared_path = args.work / "dit-shared.pt"
        torch.manual_seed(args.seed)
        shared = WanTransformer3DModel(**dit_config, in_channels=16, out_channels=16)
        if shared_path.exists():
            shared.load_state_dict(torch.load(shared_path))
        else:
            t0 = time.perf_counter()
            shared = train_dit(shared, latents, prompt_idx, ctx, neg, steps=args.dit_steps, batch=args.dit_batch,
                               u_range=(0.0, 1.0), shift=3.0, lr=1e-3, seed=args.seed + 1, name="shared")
            torch.save(shared.state_dict(), shared_path)
            info["dit_shared_seconds"] = round(time.perf_counter() - t0, 1)
            save_meta()
        ranges = {"high": (U_BOUNDARY, 1.0), "low": (0.0, U_BOUNDARY)}
        for k, name in enumerate(("high", "low")):
            if name in experts:
                continue
            t0 = time.perf_counter()
            experts[name] = train_dit(copy.deepcopy(shared), latents, prompt_idx, ctx, neg,
                                      steps=args.expert_steps, batch=args.dit_batch, u_range=ranges[name],
                                      shift=TASK.sample_shift, lr=3e-4, seed=args.seed + 2 + k, name=name)
            torch.save(experts[name].state_dict(), args.work / f"dit-{name}.pt")
            info[f"dit_{name}_seconds"] = round(time.perf_counter() - t0, 1)
            save_meta()

    parts = {"experts": {k: v.eval() for k, v in experts.items()}, "text_encoder": t5, "vae": vae.eval(),
             "tokenizer": tokenizer}
    args.out.mkdir(parents=True, exist_ok=True)
    for sub in ("high_noise_model", "low_noise_model", TASK.t5_tokenizer):
        if (args.out / sub).exists():
            import shutil
            shutil.rmtree(args.out / sub)
    mtc._write_official(TASK, parts, args.out)
    info.update({"seed": args.seed, "clips": args.clips, "dit_steps": args.dit_steps,
                 "expert_steps": args.expert_steps, "dit_batch": args.dit_batch, "dit": dit_config,
                 "vae_base_dim": VAE_BASE_DIM, "torch_threads": torch.get_num_threads(),
                 "this_run_seconds": round(time.perf_counter() - t_start, 1),
                 "this_run_cpu_seconds": round(time.process_time(), 1)})
    save_meta()
    (args.out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"wrote {args.out} ({mtc.checkpoint_bytes(args.out) / 1e6:.2f} MB); {json.dumps(info)}")
    t0 = time.perf_counter()
    calibrate(args.out, args.seed)
    log(f"calibrated: {args.out / 'magcache_ratios.json'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
