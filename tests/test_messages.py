"""Messages that send the user the right way (issue 27 item 6): each names what is really wrong."""
from __future__ import annotations

import pytest
import torch

from launcher.checkpoint.files import read_pth
from launcher.config import UsageError, parse_size, run_config_from_flags
from launcher.wan.tasks import TASKS


def _flags(tmp_path, **over):
    flags = {"task": "t2v-A14B", "size": "64*64", "frame_num": 5, "ckpt_dir": str(tmp_path), "prompt": "a cat",
             "sample_steps": 2, "save_file": str(tmp_path / "v.mp4")}
    flags.update(over)
    return flags


def test_a_size_off_the_stride_suggests_the_nearest_that_runs():
    with pytest.raises(UsageError) as e:
        parse_size("100*100", TASKS["ti2v-5B"])
    assert "multiples of 32" in str(e.value) and "nearest that runs: 96*96" in str(e.value)
    assert "trained sizes: 704*1280, 1280*704" in str(e.value)
    with pytest.raises(UsageError, match=r"nearest that runs: 16\*480"):
        parse_size("5*475", TASKS["t2v-A14B"])


def test_a_save_file_that_is_not_mp4_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"--save_file .*out\.avi: the video is written as MP4 \(H\.264\); use a \.mp4"):
        run_config_from_flags(_flags(tmp_path, save_file=str(tmp_path / "out.avi")))
    assert run_config_from_flags(_flags(tmp_path, save_file=str(tmp_path / "OUT.MP4"))).save_file.name == "OUT.MP4"


def test_negative_and_zero_lora_scales_are_said(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")  # parse_lora checks the path; the header is read later
    config = run_config_from_flags(_flags(tmp_path, lora=[f"{lora}:-1"], lora_low=[f"{lora}:0"]))
    [neg] = [w for w in config.warnings if ":-1:" in w]
    assert neg == (f"--lora {lora}:-1: a negative scale subtracts the LoRA (steers away from what it learned); "
                   "give a positive scale to apply it")
    assert any(w.startswith(f"--lora-low {lora}:0: scale 0 changes no weight") for w in config.warnings)
    assert not [w for w in run_config_from_flags(_flags(tmp_path, lora=[f"{lora}:0.8"])).warnings if "LoRA" in w]


def test_a_truncated_pth_says_truncated_and_re_download(tmp_path):
    whole = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"w": torch.zeros(64, 64)}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:3000])
    with pytest.raises(Exception) as e:
        read_pth(cut)
    assert str(e.value) == f"{cut}: truncated (3000 bytes, the end of the archive is missing); re-download it"
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x02not a pickle at all, just bytes" * 20)
    with pytest.raises(Exception) as e:
        read_pth(junk)
    detail = str(e.value).split("weights_only=True (")[1].split(")")[0]
    assert detail and not detail.endswith(("If yo", " ")), str(e.value)  # torch's text whole, not cut mid-word


def test_plan_says_where_the_experts_switch(capsys):
    from launcher.cli import main

    assert main(["plan", "--task", "t2v-A14B"]) == 0
    out = capsys.readouterr().out
    assert "experts switch at forward 52, step 26" in out and "split at" not in out
    assert main(["plan", "--task", "ti2v-5B"]) == 0
    assert "experts switch" not in capsys.readouterr().out  # one expert
