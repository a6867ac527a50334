"""`plan --gpus N --dry-run` at real size: the launch path on the meta device (launcher.engine.dryrun)."""
from __future__ import annotations

import pytest

from launcher.config import run_config_from_flags
from launcher.engine.dryrun import dry_run

#: one A14B expert's parameters (shared/reference/official_wanmodel_t2v-A14B.json total_numel)
EXPERT_PARAMS = 14288491584


def _config(**flags):
    return run_config_from_flags({"task": "t2v-A14B", "prompt": "x", "ckpt_dir": ".", **flags}, check_paths=False)


@pytest.mark.slow  # ~2 min on the 2-core box: two float32 A14B experts loaded and run on the meta device
def test_two_gpu_ulysses_without_fsdp_keeps_one_expert_on_the_gpu_while_denoising():
    """#23 item 2, seen by the dry run: sp 2, no FSDP, --offload_model True loads both experts on the
    GPU; the idle one must leave at the first step (before the fix both stayed: 2 x 53 GiB)."""
    config = _config(size="832*480", frame_num=5, ulysses_size=2, offload_model="True")
    rank = dry_run(config, 2, only_ranks=(0,))["ranks"][0]
    expert = EXPERT_PARAMS * 4  # float32 without --convert_model_dtype
    assert rank["phases"]["load"]["device_by_kind"]["weights"] >= 2 * expert  # both loaded on the GPU
    for phase in ("denoise-high", "denoise-low"):
        weights = rank["phases"][phase]["device_by_kind"]["weights"]
        assert expert <= weights < 1.1 * expert, (phase, weights / 2**30)
    # Ulysses: one all-to-all of q, k, v and one of the output per block and computed forward
    assert set(rank["collectives"]["denoise-high"]) >= {"all_to_all"}
