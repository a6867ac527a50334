"""The solvers reproduce the official Wan2.2 UniPC / DPM++ schedules and updates.

The reference trajectories below are written from the math of the official
`wan/utils/fm_solvers_unipc.py` and `wan/utils/fm_solvers.py`, in float64 numpy, with no
diffusers, so a wrong scheduler config (sigmas, order, corrector, final step) shows up here.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.wan.solvers import (
    SOLVERS,
    UNIPC_SIGMA_MAX,
    make_scheduler,
    official_sigmas,
    official_timesteps,
)

# ---------------------------------------------------------------- official schedule, from scratch


def official_training_sigma_max() -> float:
    """sigma_max exactly as FlowUniPCMultistepScheduler.__init__ derives it (shift=1)."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    sigmas = torch.from_numpy(1.0 - alphas).to(dtype=torch.float32)
    sigmas = 1 * sigmas / (1 + (1 - 1) * sigmas)
    return sigmas[0].item()


def reference_schedule(solver: str, steps: int, shift: float) -> tuple[np.ndarray, list[int]]:
    """(float32 sigmas incl. the final 0, int timesteps) as the official set_timesteps builds them."""
    if solver == "unipc":
        s = np.linspace(official_training_sigma_max(), 0.0, steps + 1).copy()[:-1]
        s = shift * s / (1 + (shift - 1) * s)
    else:
        s = np.linspace(1, 0, steps + 1)[:steps]
        s = shift * s / (1 + (shift - 1) * s)  # get_sampling_sigmas
        s = 1 * s / (1 + (1 - 1) * s)  # set_timesteps with the scheduler's own shift=1
    timesteps = torch.from_numpy(s * 1000).to(dtype=torch.int64).tolist()
    return np.concatenate([s, [0]]).astype(np.float32), timesteps


def test_unipc_sigma_max_is_the_float32_training_value():
    assert UNIPC_SIGMA_MAX == official_training_sigma_max() == 0.9990000128746033
    # plain 0.999 would give different ints here (999, 665, 332; the official ones are 999, 666, 333):
    assert official_timesteps("unipc", 3, 1.0) == [999, 666, 333]
    assert reference_schedule("unipc", 3, 1.0)[1] == [999, 666, 333]


@settings(max_examples=60, deadline=None)
@given(
    solver=st.sampled_from(SOLVERS),
    steps=st.integers(1, 160),
    shift=st.sampled_from([1.0, 2.0, 3.0, 5.0, 7.5, 8.0, 12.0, 16.0, 20.0])
    | st.floats(0.5, 30.0, allow_nan=False),
)
def test_schedule_equals_official(solver, steps, shift):
    want_sigmas, want_t = reference_schedule(solver, steps, shift)
    assert official_timesteps(solver, steps, shift) == want_t
    np.testing.assert_array_equal(official_sigmas(solver, steps, shift).astype(np.float32), want_sigmas[:-1])
    scheduler = make_scheduler(solver, steps, shift, "cpu")
    assert scheduler.timesteps.dtype == torch.int64
    assert scheduler.timesteps.tolist() == want_t
    np.testing.assert_array_equal(scheduler.sigmas.numpy(), want_sigmas)


def test_pinned_timesteps():
    assert official_timesteps("unipc", 40, 12.0) == [
        999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941,
        936, 929, 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631,
        571, 492, 386, 235,
    ]
    dpm = official_timesteps("dpm++", 40, 12.0)
    assert dpm[:4] == [1000, 997, 995, 993] and dpm[-4:] == [571, 493, 387, 235]
    assert dpm[14] == 957  # UniPC has 956 there: its base sigmas start at 0.999, not 1
    unipc5 = official_timesteps("unipc", 50, 5.0)
    assert unipc5[:3] == [999, 995, 991] and unipc5[-2:] == [172, 92]
    assert official_timesteps("unipc", 1, 5.0) == [999]
    assert official_timesteps("dpm++", 1, 5.0) == [1000]


def test_official_timesteps_needs_no_torch():
    code = (
        "import sys; from launcher.wan.solvers import official_timesteps as f; "
        "assert f('unipc', 40, 12.0)[0] == 999 and f('dpm++', 50, 5.0)[0] == 1000; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("args", "msg"),
    [(("heun", 40, 5.0), "unknown solver"), (("unipc", 0, 5.0), "positive integer"),
     (("dpm++", 40, 0.0), "positive number"), (("unipc", 40, float("nan")), "positive number")],
)
def test_bad_arguments_are_one_line_errors(args, msg):
    for fn in (official_timesteps, make_scheduler):
        with pytest.raises(ValueError, match=msg) as err:
            fn(*args)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- official updates, from scratch


def _lam(sigma: float) -> float:
    with np.errstate(divide="ignore"):
        return float(np.log(np.float64(1.0 - sigma)) - np.log(np.float64(sigma)))


def reference_unipc(x: np.ndarray, model, sig: np.ndarray, ts: list[int], corrector=True) -> list:
    """Official UniPC bh2, predict_x0, order 2, lower_order_final, corrector from step 1."""
    n = len(ts)
    out, m_hist, orders, last = [], [], [], None
    for i in range(n):
        m = x - sig[i] * model(x, ts[i])  # x0 prediction of the sample the model saw
        if i > 0 and corrector:
            q, s_t, s_0 = orders[-1], sig[i], sig[i - 1]
            h = _lam(s_t) - _lam(s_0)
            hh = -h
            phi1 = np.expm1(hh)
            b_h = np.expm1(hh)
            m0 = m_hist[-1]
            if q == 1:
                corr = 0.5 * (m - m0)
            else:
                rk = (_lam(sig[i - 2]) - _lam(s_0)) / h
                d1 = (m_hist[-2] - m0) / rk
                phik = phi1 / hh - 1
                b1 = phik / b_h
                b2 = (phik / hh - 0.5) * 2 / b_h
                r0 = (b1 - b2) / (1 - rk)  # solves [[1, 1], [rk, 1]] @ r = [b1, b2]
                r1 = b1 - r0
                corr = r0 * d1 + r1 * (m - m0)
            x = s_t / s_0 * last - (1 - s_t) * phi1 * m0 - (1 - s_t) * b_h * corr
        m_hist.append(m)
        p = min(2, n - i, i + 1)
        orders.append(p)
        last = x
        s_t, s_0 = sig[i + 1], sig[i]
        h = _lam(s_t) - _lam(s_0)
        phi1 = np.expm1(-h)
        x_next = s_t / s_0 * x - (1 - s_t) * phi1 * m
        if p == 2:
            rk = (_lam(sig[i - 1]) - _lam(s_0)) / h
            x_next = x_next - (1 - s_t) * phi1 * 0.5 * ((m_hist[-2] - m) / rk)
        x = x_next
        out.append(x)
    return out


def reference_dpmpp(x: np.ndarray, model, sig: np.ndarray, ts: list[int]) -> list:
    """Official DPM++ 2M (midpoint): first order at step 0 and at the last (final sigma 0)."""
    n = len(ts)
    out, prev = [], None
    for i in range(n):
        x0 = x - sig[i] * model(x, ts[i])
        s_t, s_0 = sig[i + 1], sig[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            h = _lam(s_t) - _lam(s_0)
            coef = (1 - s_t) * (np.exp(-h) - 1.0)
            if i == 0 or i == n - 1:
                d = x0
            else:
                r0 = (_lam(s_0) - _lam(sig[i - 1])) / h
                d = x0 + 0.5 * ((1.0 / r0) * (x0 - prev))
        x = (s_t / s_0) * x - coef * d
        prev = x0
        out.append(x)
    return out


def _fake_model():
    """A fixed linear map of the sample plus a timestep term: deterministic, cheap, non-trivial."""
    g = torch.Generator().manual_seed(1234)
    shape = (1, 4, 3, 5)
    a = (torch.rand(shape, generator=g) * 0.8 - 0.2).float()
    b = torch.randn(shape, generator=g).float()
    x_init = torch.randn(shape, generator=g).float()

    def torch_model(x, t):
        return a * x + b * (float(t) / 1000)

    a64, b64 = a.double().numpy(), b.double().numpy()

    def np_model(x, t):
        return a64 * x + b64 * (t / 1000)

    return x_init, torch_model, np_model


def _run(solver, steps, shift):
    x_init, torch_model, np_model = _fake_model()
    scheduler = make_scheduler(solver, steps, shift, "cpu")
    got, x = [], x_init.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(torch_model(x, t), t, x, return_dict=False)[0]
        got.append(x.double().numpy())
    sig, ts = reference_schedule(solver, steps, shift)
    sig = sig.astype(np.float64)  # the official update runs on the stored float32 sigmas
    ref_fn = reference_unipc if solver == "unipc" else reference_dpmpp
    return got, ref_fn(x_init.double().numpy(), np_model, sig, ts), (x_init, np_model, sig, ts)


def _rel_err(got, ref):
    return max(np.abs(g - r).max() for g, r in zip(got, ref)) / max(np.abs(r).max() for r in ref)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(("steps", "shift"), [(40, 12.0), (50, 5.0), (7, 3.0), (2, 5.0), (1, 5.0)])
def test_trajectory_equals_official_update_equations(solver, steps, shift):
    got, ref, _ = _run(solver, steps, shift)
    assert len(got) == len(ref) == steps
    assert _rel_err(got, ref) < 2e-6


def test_reference_is_sensitive_to_the_corrector():
    """Negative control: the comparison above would catch a missing UniC corrector."""
    got, _, (x_init, np_model, sig, ts) = _run("unipc", 40, 12.0)
    no_corr = reference_unipc(x_init.double().numpy(), np_model, sig, ts, corrector=False)
    assert _rel_err(got, no_corr) > 1e-4  # 250x the tolerance above


def test_duplicate_first_timesteps_run_every_step_from_index_zero():
    """UniPC at 100 steps, shift 12 starts 999, 999: official would start at index 1 and crash."""
    assert official_timesteps("unipc", 100, 12.0)[:2] == [999, 999]
    got, ref, _ = _run("unipc", 100, 12.0)
    assert len(got) == 100
    assert _rel_err(got, ref) < 2e-6
