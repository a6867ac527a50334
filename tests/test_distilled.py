"""The step-distilled recipe: Wan2.2-Lightning's Euler schedule reproduced exactly, and `--distilled lightning`.

The reference below is Wan2.2-Lightning's `EulerScheduler` (github ModelTC/Wan2.2-Lightning,
`wan/utils/fm_solvers_euler.py`) rewritten in torch: float32 `linspace(1000, 0, steps+1)`, `/1000`,
the shift, `*1000`; the loop runs `timesteps[:-1]` and steps `x + (sigma_next - sigma) * v`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from launcher.cli import main
from launcher.wan.solvers import make_scheduler, sampling_timesteps


def lightning_schedule(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    timesteps = torch.from_numpy(np.linspace(1000, 0, steps + 1, dtype=np.float32))
    sigmas = timesteps / 1000
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas * 1000, sigmas


@pytest.mark.parametrize("steps,shift", [(4, 5.0), (4, 3.0), (8, 12.0), (3, 1.0)])
def test_euler_timesteps_equal_the_recipe_exactly(steps, shift):
    want_t, want_sigmas = lightning_schedule(steps, shift)
    assert sampling_timesteps("euler", steps, shift) == want_t[:-1].tolist()
    scheduler = make_scheduler("euler", steps, shift)
    assert torch.equal(scheduler.timesteps, want_t[:-1]) and torch.equal(scheduler.sigmas, want_sigmas)


def test_lightning_preset_timesteps_and_lightx2v_step_list():
    assert sampling_timesteps("euler", 4, 5.0) == [1000.0, 937.5, 833.3333129882812, 625.0]
    # LightX2V's denoising_step_list [1000, 750, 500, 250] is the same base list
    assert sampling_timesteps("euler", 4, 5.0, (1000, 750, 500, 250)) == sampling_timesteps("euler", 4, 5.0)


def test_euler_step_is_flow_matching_euler():
    scheduler = make_scheduler("euler", 4, 5.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 3, 3, generator=g)
    _, sigmas = lightning_schedule(4, 5.0)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=g)
        want = x + (sigmas[i + 1] - sigmas[i]) * v
        x = scheduler.step(v, t, x, return_dict=False)[0]
        assert torch.equal(x, want)


@pytest.mark.slow
def test_distilled_lightning_generation(tiny_ckpt, tmp_path):
    video = tmp_path / "v.mp4"
    assert main(["generate", "--task", "t2v-A14B", "--size", "64*64", "--frame_num", "5", "--ckpt_dir",
                 str(tiny_ckpt("t2v-A14B")), "--prompt", "a cat", "--base_seed", "3", "--distilled", "lightning",
                 "--save_file", str(video)]) == 0
    m = json.loads(video.with_suffix(".json").read_text())
    assert m["scheduler"] == {"solver": "euler", "steps": 4, "shift": 5.0,
                              "timesteps": [1000.0, 937.5, 833.3333129882812, 625.0],
                              "experts": ["high", "high", "low", "low"]}
    assert m["flags"]["guide_scale"] == [1.0, 1.0] and m["flags"]["distilled"] == "lightning"
    assert m["magcache"]["total_forwards"] == 4  # guidance 1: one forward per step


@pytest.mark.parametrize("flags,needle", [
    (["--timesteps", "1000,500"], "--timesteps is read by --sample_solver euler only"),
    (["--sample_solver", "euler", "--timesteps", "1000,500", "--sample_steps", "3"], "--timesteps has 2 values"),
    (["--sample_solver", "euler", "--timesteps", "500,1000"], "strictly decreasing"),
    (["--distilled", "turbo"], "--distilled 'turbo' is unknown"),
])
def test_bad_sampling_flags_exit_2(tiny_ckpt, tmp_path, capsys, flags, needle):
    code = main(["generate", "--task", "t2v-A14B", "--ckpt_dir", str(tiny_ckpt("t2v-A14B")), "--prompt", "a",
                 "--save_file", str(tmp_path / "v.mp4"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
