"""Official `_prepare_model_for_timestep`: when experts swap, every idle expert on the GPU leaves it.

With sp > 1, no FSDP and --offload_model True both A14B experts are loaded on the GPU and swapping is
on; the idle one must leave at the first step although the active one is already there (#23 item 2).
The meta device stands in for the GPU: moving an expert there and back goes through its host home
(`HostResident`), as on CUDA, without copying data.
"""
from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from launcher.wan.dit import WanDiT
from launcher.wan.pipeline import Models, WanPipeline
from launcher.wan.residency import HostResident
from launcher.wan.tasks import TASKS

GPU = torch.device("meta")


def _tiny_expert() -> WanDiT:
    model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1)
    return WanDiT(model.eval().requires_grad_(False))


def _where(models: Models) -> dict[str, str]:
    return {name: dit.model.patch_embedding.weight.device.type for name, dit in models.experts.items()}


def _models(*, on_gpu: tuple[str, ...], swap: bool) -> Models:
    experts = {"high": _tiny_expert(), "low": _tiny_expert()}
    homes = {name: HostResident(dit.model, pin=False) for name, dit in experts.items()}
    for name in on_gpu:
        homes[name].to(GPU)
    return Models(task=TASKS["t2v-A14B"], tokenizer=None, text_encoder=torch.nn.Identity(), vae=torch.nn.Identity(),
                  experts=experts, device=GPU, text_device=torch.device("cpu"), dit_dtype=torch.float32,
                  swap_experts=swap, residency=homes)


def test_idle_expert_leaves_the_gpu_when_the_active_one_is_already_there():
    models = _models(on_gpu=("high", "low"), swap=True)  # sp > 1, no FSDP: both loaded on the GPU
    pipeline = WanPipeline(models)
    pipeline._activate("high")
    assert _where(models) == {"high": "meta", "low": "cpu"}
    pipeline._activate("low")  # the expert switch
    assert _where(models) == {"high": "cpu", "low": "meta"}


def test_experts_loaded_on_the_host_come_in_one_at_a_time():
    models = _models(on_gpu=(), swap=True)  # official init_on_cpu
    pipeline = WanPipeline(models)
    pipeline._activate("high")
    assert _where(models) == {"high": "meta", "low": "cpu"}
    pipeline._activate("high")  # a later step of the same expert moves nothing
    assert _where(models) == {"high": "meta", "low": "cpu"}


def test_without_swapping_both_experts_stay_where_they_are():
    models = _models(on_gpu=("high", "low"), swap=False)  # FSDP or --offload_model False with sp > 1
    WanPipeline(models)._activate("low")
    assert _where(models) == {"high": "meta", "low": "meta"}
