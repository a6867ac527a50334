"""The official Wan2.2 flow-matching solvers, rebuilt on diffusers' schedulers.

Official (`wan/utils/fm_solvers*.py` @ 42bf4cf, docs/pipeline_facts.md #13, #30, #31):
- UniPC: `FlowUniPCMultistepScheduler(shift=1)` then `set_timesteps(steps, shift=shift)`;
  base sigmas `linspace(sigma_max, 0, steps+1)[:-1]` where `sigma_max` is the first
  sigma of the float32 training table read back with `.item()`, i.e. float32(0.999) =
  0.9990000128746033 (plain 0.999 moves some float32 sigmas by one ulp and, e.g. for
  3 steps at shift 1, the int timesteps 666/333 to 665/332).
- DPM++: `FlowDPMSolverMultistepScheduler(shift=1)` with
  `sigmas = get_sampling_sigmas(steps, shift)` (`linspace(1, 0, steps+1)[:steps]`, shifted).
- Both: `shift*s/(1+(shift-1)*s)` in float64, sigmas stored float32 with a final 0,
  timesteps `(sigmas*1000)` truncated to int64 (what the DiT sees).
- Euler, the step-distilled (4-step "Lightning") recipe of Wan2.2-Lightning (github
  ModelTC/Wan2.2-Lightning, `wan/utils/fm_solvers_euler.py::EulerScheduler` and the `euler` branch
  of `wan/text2video.py`; configs `sample_steps=4`, `sample_shift=5.0`, guidance `(1.0, 1.0)` for
  all three tasks, `generate.py` default `--sample_solver euler`): base timesteps
  `np.linspace(1000, 0, steps+1, dtype=float32)` (or a given list, LightX2V's
  `denoising_step_list` [1000, 750, 500, 250], the same values), sigmas `t/1000` shifted in float32,
  the DiT is fed the float timesteps `sigma*1000` (not truncated: 1000, 937.5, 833.33, 625), and each
  step is `x + (sigma_next - sigma) * v`. diffusers' `FlowMatchEulerDiscreteScheduler(shift=1)` given
  those sigmas computes exactly this. (LightX2V's own distill scheduler instead predicts x0 and
  re-noises it with fresh noise; that stochastic sampler is not this one.)

`official_timesteps` is numpy only so `magcache-launch plan` never imports torch.
"""
from __future__ import annotations

from functools import cache
from typing import Literal, get_args

import numpy as np

Solver = Literal["unipc", "dpm++", "euler"]
#: the official Wan2.2 solvers; "euler" is Wan2.2-Lightning's (step-distilled) addition
SOLVERS: tuple[str, ...] = ("unipc", "dpm++")
ALL_SOLVERS: tuple[str, ...] = get_args(Solver)
NUM_TRAIN_TIMESTEPS = 1000
#: sigma_max of the official UniPC: its float32 training table's first entry, 1 - 1/1000, read back.
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def _validate(solver: str, steps: int, shift: float) -> None:
    if solver not in ALL_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {', '.join(ALL_SOLVERS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"sample steps must be a positive integer, got {steps!r}")
    if not np.isfinite(shift) or shift <= 0:
        raise ValueError(f"sample shift must be a positive number, got {shift!r}")


def _shifted(sigmas: np.ndarray, shift: float) -> np.ndarray:
    # Same expression and operand order as official, so the float64 results are bit-identical.
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def euler_sigmas(steps: int, shift: float, timesteps: tuple[float, ...] | None = None) -> np.ndarray:
    """Float32 sigmas of the Lightning Euler recipe, one per step (before the final 0).

    `timesteps`: base (unshifted) timesteps in (0, 1000], e.g. LightX2V's [1000, 750, 500, 250];
    None = `linspace(1000, 0, steps+1)[:-1]` as Wan2.2-Lightning's `get_timesteps`.
    """
    _validate("euler", steps, shift)
    if timesteps is None:
        base = np.linspace(NUM_TRAIN_TIMESTEPS, 0, steps + 1, dtype=np.float32)[:-1]
    else:
        base = np.asarray(timesteps, dtype=np.float32)
        if len(base) != steps:
            raise ValueError(f"{len(base)} timesteps given for {steps} steps")
    sigmas = base / np.float32(NUM_TRAIN_TIMESTEPS)
    return (np.float32(shift) * sigmas / (np.float32(1) + np.float32(shift - 1) * sigmas)).astype(np.float32)


def sampling_timesteps(solver: Solver, steps: int, shift: float,
                       timesteps: tuple[float, ...] | None = None) -> list[float]:
    """The timesteps the DiT is fed, one per step: truncated ints (UniPC, DPM++) or Euler's floats."""
    if solver == "euler":
        return [float(t) for t in euler_sigmas(steps, shift, timesteps) * np.float32(NUM_TRAIN_TIMESTEPS)]
    if timesteps is not None:
        raise ValueError("a timestep list is only used by the euler solver")
    return [float(t) for t in official_timesteps(solver, steps, shift)]


def base_sigmas(solver: Solver, steps: int) -> np.ndarray:
    """Unshifted float64 sigmas the official scheduler starts from (one per step)."""
    if solver == "unipc":
        return np.linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1]
    return np.linspace(1, 0, steps + 1)[:steps]


def official_sigmas(solver: Solver, steps: int, shift: float) -> np.ndarray:
    """Shifted float64 sigmas, one per step, before the float32 cast and the final 0."""
    _validate(solver, steps, shift)
    return _shifted(base_sigmas(solver, steps), shift)


def official_timesteps(solver: Solver, steps: int, shift: float,
                       timesteps: tuple[float, ...] | None = None) -> list[int]:
    """The int timesteps the official pipeline feeds the DiT, one per step (numpy only); for Euler
    the float timesteps truncated (what the expert switch `t >= boundary*1000` decides the same on,
    the boundaries being whole numbers)."""
    if solver == "euler":
        return [int(t) for t in sampling_timesteps("euler", steps, shift, timesteps)]
    sigmas = official_sigmas(solver, steps, shift)
    return [int(t) for t in (sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64)]


def make_scheduler(solver: Solver, steps: int, shift: float, device=None,
                   timesteps: tuple[float, ...] | None = None):
    """A diffusers scheduler whose timesteps and updates equal the official solver's.

    Exposes `.timesteps` (int64, on `device`) and `.step(model_output, t, sample,
    return_dict=False)[0]`. One deliberate difference: `begin_index` is pinned to 0.
    Official finds the first step's index by value, so when the first two int
    timesteps coincide (UniPC with >= 92 steps at shift 12, >= 251 at shift 5) it starts
    at index 1 and dies on an assertion at the last step; where official works, index 0
    is what it finds, so results are unchanged.
    """
    _validate(solver, steps, shift)
    import torch  # deferred: this module must import without torch for `plan`
    from diffusers import UniPCMultistepScheduler

    if solver == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
        sigmas = euler_sigmas(steps, shift, timesteps)
        scheduler.set_timesteps(sigmas=sigmas, device=device)
        scheduler.set_begin_index(0)
        want = torch.from_numpy(np.append(sigmas, np.float32(0)))
        if not torch.equal(scheduler.sigmas.cpu(), want) or not torch.equal(
                scheduler.timesteps.cpu(), torch.from_numpy(sigmas * np.float32(NUM_TRAIN_TIMESTEPS))):
            raise RuntimeError(f"diffusers' Euler schedule differs from Wan2.2-Lightning's for steps={steps}, "
                               f"shift={shift}; use diffusers 0.42.x")
        return scheduler
    if timesteps is not None:
        raise ValueError("a timestep list is only used by the euler solver")
    if solver == "unipc":
        scheduler = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=float(shift), solver_order=2, solver_type="bh2",
            predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
        )
        scheduler.set_timesteps(sigmas=base_sigmas("unipc", steps), device=device)
    else:
        scheduler = _sigma_list_dpm_class()(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, solver_order=2,
            prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_type="midpoint",
            lower_order_final=True, euler_at_final=False, use_flow_sigmas=True, flow_shift=1.0,
            final_sigmas_type="zero",
        )
        scheduler.set_timesteps(sigmas=official_sigmas("dpm++", steps, shift), device=device)
    scheduler.set_begin_index(0)
    _check_official(scheduler, solver, steps, shift, torch)
    return scheduler


def _check_official(scheduler, solver: Solver, steps: int, shift: float, torch) -> None:
    """Fail loudly if a diffusers version (or an extreme shift) drifts from the official table."""
    sigmas = official_sigmas(solver, steps, shift)
    want_sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    want_t = official_timesteps(solver, steps, shift)
    if not torch.equal(scheduler.sigmas.cpu(), want_sigmas) or scheduler.timesteps.tolist() != want_t:
        raise RuntimeError(
            f"diffusers' {solver} schedule differs from the official one for steps={steps}, "
            f"shift={shift}; use diffusers 0.42.x or a shift below 1000"
        )


@cache
def _sigma_list_dpm_class():
    # Built on first use: the subclass needs diffusers, which `plan` must not import.
    from diffusers import DPMSolverMultistepScheduler

    class SigmaListDPMSolver(DPMSolverMultistepScheduler):
        """DPM++ taking the official sigma list: diffusers 0.42's set_timesteps accepts no `sigmas`."""

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, **kwargs):
            if sigmas is None:
                return super().set_timesteps(num_inference_steps, device=device, **kwargs)
            import torch

            sigmas = np.asarray(sigmas, dtype=np.float64)
            super().set_timesteps(len(sigmas), device=device)  # resets the multistep state
            self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
            self.timesteps = torch.from_numpy(sigmas * self.config.num_train_timesteps).to(
                device=device, dtype=torch.int64)

    return SigmaListDPMSolver

