"""parallel.attention: which kernel `--attention` runs, and the one-line refusals.

Only SDPA is importable on this CPU machine; the selection is a function of what the host offers
(device, dtype, compute capability, importable packages, cuDNN), so every branch is exercised
here with those facts given, and the kernels that run here are compared with plain SDPA.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel.attention import (
    AUTO_ORDER,
    AttentionBackendError,
    Host,
    attend,
    attend_with_lse,
    check_self_attention,
    resolve,
)

H100 = Host("cuda", half=True, capability=(9, 0))
A100 = Host("cuda", half=True, capability=(8, 0))


def probes(*installed: str, cudnn: bool = True):
    return dict(importable=lambda m: m in installed, cudnn=lambda: cudnn)


@pytest.mark.parametrize("host, installed, cudnn, expected", [
    (H100, ("flash_attn_interface", "flash_attn"), True, "flash3"),
    (H100, ("flash_attn",), True, "cudnn"),        # no FA3 wheel: cuDNN before FA2
    (H100, ("flash_attn",), False, "flash2"),
    (H100, (), False, "sdpa"),
    (A100, ("flash_attn_interface", "flash_attn"), True, "cudnn"),  # FA3 is Hopper-only
    (Host("cuda", half=False, capability=(9, 0)), ("flash_attn_interface",), True, "sdpa"),  # float32
    (Host("cpu", half=True), ("flash_attn_interface", "flash_attn"), True, "sdpa"),
])
def test_auto_takes_the_first_kernel_that_can_run(host, installed, cudnn, expected):
    assert AUTO_ORDER == ("flash3", "cudnn", "flash2", "sdpa")
    assert resolve("auto", host, **probes(*installed, cudnn=cudnn)) == expected


@pytest.mark.parametrize("name, host, installed, fragment", [
    ("flash3", A100, ("flash_attn_interface",), "FlashAttention-3 runs on Hopper (sm90) and this GPU is sm80"),
    ("flash3", H100, (), "the flash_attn_interface package is not installed"),
    ("flash2", Host("cpu", half=False), ("flash_attn",), "it runs on CUDA only and this run is on cpu"),
    ("flash2", Host("cuda", half=False, capability=(9, 0)), ("flash_attn",), "computes in float32"),
    ("cudnn", H100, (), "no cuDNN attention"),
])
def test_a_named_kernel_that_cannot_run_is_refused_in_one_line(name, host, installed, fragment):
    with pytest.raises(AttentionBackendError) as info:
        resolve(name, host, **probes(*installed, cudnn=False))
    msg = str(info.value)
    assert fragment in msg and f"--attention {name} cannot run here" in msg and "use --attention auto or sdpa" in msg
    assert "\n" not in msg


def test_on_this_machine_sdpa_is_what_runs():
    host = Host.of(torch.device("cpu"), torch.float32)
    assert resolve("auto", host) == resolve("sdpa", host) == "sdpa"
    for name in ("flash2", "flash3", "cudnn"):
        with pytest.raises(AttentionBackendError, match=f"--attention {name} cannot run here"):
            resolve(name, host)
    with pytest.raises(AttentionBackendError, match="choose one of auto, sdpa, flash2, flash3, cudnn"):
        resolve("xformers", host)


def test_sdpa_with_lse_is_sdpa_and_its_logsumexp():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=gen) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    out, lse = attend_with_lse(q, k, v, "sdpa")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(attend(q, k, v, "sdpa"), ref, rtol=0, atol=0)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-5, atol=1e-5)


def test_the_self_attention_checks_ring_and_ulysses_share():
    q = torch.zeros(1, 4, 2, 8)
    assert check_self_attention(q, q, q, None, 8) == 8 and check_self_attention(q, q, q, 5, 8) == 5
    with pytest.raises(ValueError, match="valid_len 9 must be in 1..8"):
        check_self_attention(q, q, q, 9, 8)
    with pytest.raises(ValueError, match="one shape"):
        check_self_attention(q, q[:, :2], q, None, 8)


def test_cli_refuses_a_kernel_that_cannot_run_before_loading(tiny_ckpt, tmp_path, capsys):
    from launcher.cli import main

    code = main(["generate", "--task", "t2v-A14B", "--size", "64*64", "--frame_num", "1", "--ckpt_dir",
                 str(tiny_ckpt("t2v-A14B")), "--prompt", "a cat", "--attention", "flash3",
                 "--save_file", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--attention flash3 cannot run here: it runs on CUDA only and this run is on cpu" in err[0]
    assert not (tmp_path / "v.mp4").exists()
