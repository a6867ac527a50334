"""launcher.wan.threads: CPU phases use the rank's cores under torchrun's OMP_NUM_THREADS=1, then give them back."""
from __future__ import annotations

import os

import torch

from launcher.wan.threads import cpu_phase, rank_cores


def test_cpu_phase_uses_the_ranks_share_and_restores_one_thread(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        with cpu_phase("cuda") as n:  # a GPU run's CPU phase
            assert n == torch.get_num_threads() == rank_cores() == cores
        assert torch.get_num_threads() == 1
        with cpu_phase("cpu") as n:  # a run all on the CPU keeps its one thread per rank
            assert n == torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more ranks than cores: one thread each
        with cpu_phase("cuda") as n:
            assert n == 1
        with cpu_phase("cuda", threads=3):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_run_all_on_the_cpu_keeps_its_thread_count_while_loading(tiny_ckpt, monkeypatch):
    """The CPU phases of a GPU run get the rank's cores (the unit test above); a run all on the CPU keeps
    its one thread per rank while loading, because more threads round the LoRA merge and T5 otherwise,
    and N CPU ranks must equal one process (the CPU stand-in for one GPU per rank)."""
    from launcher.checkpoint import inspect_checkpoint
    from launcher.config import run_config_from_flags
    from launcher.engine import models
    from launcher.engine.placement import placement_for

    seen: list[int] = []
    real = models.load_module

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_module", recording)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    ckpt = tiny_ckpt("ti2v-5B")
    config = run_config_from_flags({"prompt": "a cat", "ckpt_dir": str(ckpt), "task": "ti2v-5B", "device": "cpu"},
                                   check_paths=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models.load_models(config, inspect_checkpoint(ckpt, config.task), placement_for(config))
        assert rank_cores() > 1 or os.cpu_count() == 1  # the phase would have raised it on a GPU run
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
