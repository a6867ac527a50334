"""Messages that send the user the right way (issue 27 item 6): each names what is really wrong."""
from __future__ import annotations

import re
import struct

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
    lora.write_bytes(struct.pack("<Q", 2) + b"{}")  # an empty but valid safetensors file
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


# -- item 7: what headers can refuse, refused before torch or diffusers is imported ----------------

#: runs the console entry point, then says which heavy modules the refusal had imported
_PROBE = ("import sys; from launcher.cli import main; rc = main(sys.argv[1:]); "
          "print('heavy:', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)); sys.exit(rc)")


def _refusal(*args: str) -> tuple[str, str]:
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=cli_env(),
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (proc.returncode, proc.stderr)
    return proc.stderr.strip(), proc.stdout.strip()


def test_header_errors_exit_before_torch_is_imported(tiny_ckpt, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt("t2v-A14B"), ckpt)
    lora = tmp_path / "style.pt"
    lora.write_bytes(b"PK\x03\x04 a torch zip pickle")
    args = ["generate", "--task", "t2v-A14B", "--size", "64*64", "--frame_num", "5", "--prompt", "a cat",
            "--sample_steps", "2", "--save_file", str(tmp_path / "v.mp4")]
    err, heavy = _refusal(*args, "--ckpt_dir", str(ckpt), "--lora", str(lora))
    assert f"error: {lora}: a pickle" in err and heavy == "heavy: []"
    shards = sorted((ckpt / "high_noise_model").glob("*-of-*.safetensors"))
    assert len(shards) >= 2, "the tiny official checkpoint is sharded"
    shards[-1].write_bytes(shards[-1].read_bytes()[:-10])
    err, heavy = _refusal(*args, "--ckpt_dir", str(ckpt))
    assert err.startswith(f"error: {shards[-1]}: truncated (") and err.endswith("re-download it") and heavy == "heavy: []"
    shards[-1].unlink()
    err, heavy = _refusal(*args, "--ckpt_dir", str(ckpt))
    assert err == (f"error: {shards[-1]}: shard listed in diffusion_pytorch_model.safetensors.index.json is missing; "
                   "download the missing shard") and heavy == "heavy: []"


def test_help_keeps_every_flag_name_whole_at_80_columns():
    """Every flag of every command, each spelling, appears whole in `--help` on an 80-column terminal."""
    import subprocess
    import sys

    import typer

    from conftest import ROOT, cli_env
    from launcher.cli import app

    group = typer.main.get_command(app)
    script = ("import sys; from launcher.cli import main\nfor c in sys.argv[1:]:\n"
              "    print('=== ' + c, flush=True); main([c, '--help'])")
    proc = subprocess.run([sys.executable, "-c", script, *group.commands], capture_output=True, text=True,
                          env=cli_env(COLUMNS="80", TERM="xterm"), cwd=ROOT, timeout=300)
    sections = dict(part.split("\n", 1) for part in proc.stdout.split("=== ")[1:])
    for name, command in group.commands.items():
        text = sections[name]
        assert max(len(ln) for ln in text.splitlines()) <= 80, name
        checked = 0
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:  # typer vendors its own click
                for flag in param.opts:
                    assert re.search(rf"(^|[ ,]){re.escape(flag)}([ ,]|$)", text, re.M), (name, flag)
                    checked += 1
        assert checked >= 2, name
