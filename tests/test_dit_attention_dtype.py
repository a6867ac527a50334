"""The sharded self-attention sends q, k, v in one dtype (issue 12 defect 6).

Under autocast the q/k RMS norms (official's: rounded, then scaled by a float32 weight) and the
float64 RoPE return float32 while v comes out of its Linear in the compute dtype; stacking them for
the Ulysses all-to-all promoted v and doubled the bytes. The processor casts q, k, v to the autocast
dtype, as official flash attention's `half()` does and attention would anyway: the output is unchanged.
"""
from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from launcher.wan.dit import LocalSequence, WanDiT, rope_angles


class RecordingSequence(LocalSequence):
    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[tuple[torch.dtype, ...]] = []

    def attention(self, q, k, v, valid_len):
        self.dtypes.append((q.dtype, k.dtype, v.dtype))
        return super().attention(q, k, v, valid_len)


def _tiny_block_model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                 rope_max_seq_len=64).eval()


def _attn_out(model: WanTransformer3DModel, sharding: LocalSequence, x: torch.Tensor, rotary) -> torch.Tensor:
    WanDiT(model, sharding)  # installs the sharded processor
    return model.blocks[0].attn1(x, rotary_emb=rotary)


def test_q_k_v_reach_the_exchange_in_the_compute_dtype_under_autocast():
    model = _tiny_block_model()
    x = torch.randn(1, 6, 32)
    rotary = rope_angles((1, 2, 3), 16)
    rec = RecordingSequence()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _attn_out(model, rec, x, rotary)
    assert rec.dtypes == [(torch.bfloat16,) * 3]
    # attention rounds q and k to bf16 anyway: the output equals sending them in float32
    reference = RecordingSequence()
    reference.attention = lambda q, k, v, n: LocalSequence.attention(reference, q.float(), k.float(), v, n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = _attn_out(model, reference, x, rotary)
    assert torch.equal(out, same)


def test_float32_stays_float32():
    model = _tiny_block_model()
    rec = RecordingSequence()
    _attn_out(model, rec, torch.randn(1, 6, 32), rope_angles((1, 2, 3), 16))
    assert rec.dtypes == [(torch.float32,) * 3]
