"""The official memory policy (wan/text2video.py, textimage2video.py @ 42bf4cf) as a table.

Official: `offload_model` defaults to True on one GPU and False with several (generate.py);
`init_on_cpu` is True unless sequence parallel, --dit_fsdp or --t5_fsdp; experts swap
`if offload_model or self.init_on_cpu`; DiTs park before decode and T5 after encoding only
with `offload_model`. CPU runs keep everything where it is.
"""
from __future__ import annotations

import pytest
import torch

from launcher.planner.memory import memory_policy

# (case, flags) -> (offload, dit_load, swap_experts, park_before_decode, t5_home, t5_runs_on)
CASES = [
    ("one GPU, default offload", dict(offload_model=None, world_size=1, sp=1), (True, "cpu", True, True, "cpu", "gpu")),
    ("one GPU, --offload_model False", dict(offload_model=False, world_size=1, sp=1),
     (False, "cpu", True, False, "gpu", "gpu")),  # init_on_cpu still swaps the experts (defect 1)
    ("cfg-parallel at ulysses 1", dict(offload_model=None, world_size=2, sp=1), (False, "cpu", True, False, "gpu", "gpu")),
    ("batch dp 4 at ulysses 1", dict(offload_model=None, world_size=4, sp=1), (False, "cpu", True, False, "gpu", "gpu")),
    ("ulysses 8", dict(offload_model=None, world_size=8, sp=8), (False, "gpu", False, False, "gpu", "gpu")),
    ("ulysses 8, --offload_model True", dict(offload_model=True, world_size=8, sp=8),
     (True, "gpu", True, True, "cpu", "gpu")),
    ("ulysses 8 + dit_fsdp", dict(offload_model=None, world_size=8, sp=8, dit_fsdp=True),
     (False, "gpu", False, False, "gpu", "gpu")),
    ("ulysses 8 + dit_fsdp + offload", dict(offload_model=True, world_size=8, sp=8, dit_fsdp=True),
     (True, "gpu", False, False, "cpu", "gpu")),  # sharded DiTs stay put (the one deviation)
    ("t5_fsdp alone", dict(offload_model=False, world_size=2, sp=2, t5_fsdp=True),
     (False, "gpu", False, False, "gpu", "gpu")),
    ("--t5_cpu", dict(offload_model=None, world_size=1, sp=1, t5_cpu=True), (True, "cpu", True, True, "cpu", "cpu")),
]


@pytest.mark.parametrize("flags,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_official_rules_on_a_gpu(flags, expected):
    kw = dict(dit_fsdp=False, t5_fsdp=False, t5_cpu=False) | flags
    p = memory_policy(on_gpu=True, **kw)
    assert (p.offload_model, p.dit_load, p.swap_experts, p.park_dit_before_decode, p.t5_home, p.t5_runs_on) == expected


@pytest.mark.parametrize("offload", [None, True, False])
def test_nothing_moves_on_a_cpu(offload):
    p = memory_policy(on_gpu=False, offload_model=offload, world_size=1, sp=1, dit_fsdp=False, t5_fsdp=False,
                      t5_cpu=False)
    assert not (p.offload_model or p.swap_experts or p.park_dit_before_decode)
    assert p.dit_load == p.t5_home == p.t5_runs_on == "cpu"


def _config(**flags):
    from launcher.config import run_config_from_flags

    return run_config_from_flags({"prompt": "a cat", "ckpt_dir": "/x", **flags}, check_paths=False)


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16", "float32"])
def test_t5_runs_in_bf16_on_a_gpu_whatever_dtype_says(dtype):
    from launcher.engine.placement import placement_for

    gpu = placement_for(_config(dtype=dtype), device=torch.device("cuda", 0))
    assert gpu.text_dtype == torch.bfloat16  # official t5_dtype (defect 5: fp16 used to reach T5)
    cpu = placement_for(_config(dtype=dtype), device=torch.device("cpu"))
    assert cpu.text_dtype == cpu.compute_dtype


@pytest.mark.parametrize(("device", "flags", "param", "autocast"), [
    ("cuda", {}, torch.float32, True),                                   # official default: fp32 weights, bf16 autocast
    ("cuda", {"convert_model_dtype": True}, torch.bfloat16, True),       # official still autocasts (defect 4)
    ("cuda", {"dtype": "float32"}, torch.float32, False),
    ("cpu", {}, torch.float32, False),
    ("cpu", {"dtype": "bfloat16"}, torch.float32, True),                 # the policy runs (and is tested) on CPU
])
def test_autocast_whenever_the_compute_dtype_is_half(device, flags, param, autocast):
    from launcher.engine.placement import placement_for

    p = placement_for(_config(**flags), device=torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
    assert (p.dit_param_dtype, p.autocast) == (param, autocast)


def test_placement_takes_the_sequence_group_into_account():
    from launcher.engine.placement import placement_for

    replicated = placement_for(_config(ulysses_size=2), world_size=2, sp=2, device=torch.device("cuda", 1))
    assert replicated.memory.dit_load == "gpu" and not replicated.memory.swap_experts
    cfg_parallel = placement_for(_config(cfg_parallel=True), world_size=2, sp=1, device=torch.device("cuda", 1))
    assert cfg_parallel.memory.swap_experts and cfg_parallel.memory.dit_load == "cpu"


def test_device_with_an_index_under_several_ranks_exits_2(tiny_ckpt, tmp_path):
    from conftest import cli_env, run_cli
    from test_cli_errors import assert_one_line_error, base

    env = cli_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT="29555", TORCHELASTIC_RUN_ID="x")
    proc = run_cli(*base(tiny_ckpt("t2v-A14B"), tmp_path, **{"--device": "cuda:1", "--ulysses_size": "2"}), env=env)
    assert_one_line_error(proc, "--device cuda:1", "every rank", "CUDA_VISIBLE_DEVICES")


def test_one_process_on_cuda_n_makes_that_device_current():
    """--device cuda:3 in one process: cuda:3 becomes the current device before anything runs
    (else the first default-device call opens a stray context on cuda:0); a CPU run binds nothing."""
    from launcher.engine.world import single_world

    bound: list[torch.device] = []
    world = single_world(_config(device="cuda:3"), set_device=bound.append)
    assert bound == [torch.device("cuda", 3)] and world.placement.device == torch.device("cuda", 3)
    single_world(_config(device="cpu"), set_device=bound.append)
    assert bound == [torch.device("cuda", 3)]
