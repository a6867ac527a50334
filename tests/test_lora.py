"""LoRA files in every format merge into the DiT weights exactly as the formula says, and bad ones exit 2.

`W += scale * alpha/rank * (B @ A)` (or `scale * diff`) on every weight a LoRA names and nowhere
else; rows read for an FSDP shard merge only those rows; a generation with `--lora f:0.7` equals one
from a checkpoint the test merged itself.
"""
from __future__ import annotations

import json

import pytest
import torch
from e2e_helpers import generate
from lora_helpers import FORMATS, expected_deltas, make_lora, merged_checkpoint

from launcher.checkpoint import inspect_checkpoint
from launcher.checkpoint.load import (
    build_transformer_on_meta,
    load_module,
    transformer_source,
)
from launcher.checkpoint.lora import LoraError, plan_loras, with_loras
from launcher.cli import main
from launcher.config import parse_loras
from launcher.wan.tasks import TASKS

TASK = "t2v-A14B"


@pytest.fixture(scope="module")
def info(tiny_ckpt):
    return inspect_checkpoint(tiny_ckpt(TASK), TASKS[TASK])


def _shapes(info):
    return {e: info.transformer_weights[e].shapes for e in TASKS[TASK].experts}


def _specs(tmp_path, flags):
    return parse_loras(flags, TASKS[TASK])


@pytest.mark.parametrize("fmt", FORMATS)
def test_merged_weights_equal_the_formula(info, tmp_path, fmt):
    shapes = _shapes(info)["high"]
    lora = make_lora(tmp_path / f"{fmt}.safetensors", fmt, shapes, TASK, alpha=None if fmt == "peft-diffusers" else 6.0)
    plan = plan_loras(_specs(tmp_path, {"lora_high": [f"{lora}:0.7"]}), _shapes(info), TASK)
    assert set(plan.patches) == {"high"}  # --lora-high leaves the low-noise expert alone
    want = expected_deltas(lora, fmt, 0.7, TASK)
    model = build_transformer_on_meta(info, "high")
    load_module(model, with_loras(transformer_source(info, "high"), plan, "high"), device="cpu")
    with transformer_source(info, "high") as src:
        for name, param in model.state_dict().items():
            base = src.get(name).float()
            expected = base + want[name] if name in want else base
            assert torch.equal(param, expected), name
    (report,) = plan.reports
    assert report.touched == {"high": len(want)} and report.formats == (fmt,)


def test_rows_merge_only_the_rows_asked(info, tmp_path):
    """FSDP2 ranks read rows [start, stop): the merged rows equal those of the whole merged tensor."""
    lora = make_lora(tmp_path / "l.safetensors", "kohya", _shapes(info)["low"], TASK)
    diff = make_lora(tmp_path / "d.safetensors", "diff", _shapes(info)["low"], TASK, seed=1)
    plan = plan_loras(_specs(tmp_path, {"lora": [f"{lora}:0.5", str(diff)]}), _shapes(info), TASK)
    with with_loras(transformer_source(info, "low"), plan, "low") as src:
        for key in plan.for_expert("low"):
            whole = src.get(key)
            rows = whole.shape[0]
            parts = [src.get_slice(key, a, min(a + 3, rows)) for a in range(0, rows, 3)]
            torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)


def test_two_loras_stack_in_order(info, tmp_path):
    a = make_lora(tmp_path / "a.safetensors", "peft-official", _shapes(info)["low"], TASK, seed=2)
    b = make_lora(tmp_path / "b.safetensors", "peft-diffusers", _shapes(info)["low"], TASK, seed=3)
    plan = plan_loras(_specs(tmp_path, {"lora": [f"{a}:0.3"], "lora_low": [f"{b}:-1.5"]}), _shapes(info), TASK)
    da, db = expected_deltas(a, "peft-official", 0.3, TASK), expected_deltas(b, "peft-diffusers", -1.5, TASK)
    assert {r.expert: r.touched for r in plan.reports} == {"all": {"high": len(da), "low": len(da)},
                                                           "low": {"low": len(db)}}
    with with_loras(transformer_source(info, "low"), plan, "low") as src, transformer_source(info, "low") as base:
        key = "blocks.0.attn1.to_q.weight"
        assert torch.equal(src.get(key), base.get(key).float() + da[key] + db[key])


# -- bad input: one line, exit 2, nothing written ------------------------------------------------

def _run(tiny_ckpt, tmp_path, capsys, *extra, task=TASK):
    out = tmp_path / "v.mp4"
    code = main(["generate", "--task", task, "--size", "64*64", "--frame_num", "5", "--ckpt_dir",
                 str(tiny_ckpt(task)), "--prompt", "a cat", "--sample_steps", "2", "--save_file", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    assert not out.exists() and not out.with_suffix(".json").exists()
    return err[0]


def test_bad_loras_exit_2(tiny_ckpt, info, tmp_path, capsys):
    from safetensors.torch import save_file

    stranger = tmp_path / "stranger.safetensors"
    save_file({f"lora_te_text_model_encoder_layers_{i}_mlp_fc1.lora_down.weight": torch.zeros(2, 4) for i in range(4)},
              str(stranger))
    line = _run(tiny_ckpt, tmp_path, capsys, "--lora", str(stranger))
    assert str(stranger) in line and "no key matches" in line and line.count("lora_te_text_model") == 3

    wrong = tmp_path / "wrong.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 48),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 2)}, str(wrong))
    line = _run(tiny_ckpt, tmp_path, capsys, "--lora-low", f"{wrong}:0.5")
    assert "'diffusion_model.blocks.0.self_attn.q.lora_A.weight'" in line and "[2, 48]" in line and "[64, 64]" in line

    pickle = tmp_path / "style.pt"
    torch.save({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 64)}, pickle)
    line = _run(tiny_ckpt, tmp_path, capsys, "--lora", str(pickle))
    assert str(pickle) in line and "pickle" in line

    line = _run(tiny_ckpt, tmp_path, capsys, "--lora", str(tmp_path / "missing.safetensors:0.5"))
    assert "missing.safetensors: file not found" in line

    pair = tmp_path / "pair"
    pair.mkdir()
    stranger.rename(pair / "high_noise_model.safetensors")
    line = _run(tiny_ckpt, tmp_path, capsys, "--lora", f"{pair}:0.5")
    assert "is a directory; give one .safetensors file in it (high_noise_model.safetensors)" in line

    line = _run(tiny_ckpt, tmp_path, capsys, "--lora", f"{wrong}:abc")
    assert f"{wrong}:abc: scale 'abc' is not a number" in line and "not found" not in line

    good = make_lora(tmp_path / "good.safetensors", "peft-official", _shapes(info)["high"], TASK)
    line = _run(tiny_ckpt, tmp_path, capsys, "--lora-high", str(good), task="ti2v-5B")
    assert "--lora-high" in line and "ti2v-5B has one expert" in line


@pytest.mark.slow
def test_a_bad_lora_exits_2_before_any_rendezvous(tiny_ckpt, tmp_path):
    """Rank 0 of a 2-rank torchrun job whose rank 1 never starts: the LoRA header is checked
    before the World, so the rank exits 2 instead of waiting --dist-timeout (900 s, longer than
    this test's 300 s limit) for a peer."""
    import socket
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    pickle = tmp_path / "style.pt"
    torch.save({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 64)}, pickle)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = cli_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    proc = subprocess.run([sys.executable, "-m", "launcher", "generate", "--task", TASK, "--size", "64*64",
                           "--frame_num", "5", "--ckpt_dir", str(tiny_ckpt(TASK)), "--prompt", "a cat",
                           "--save_file", str(tmp_path / "v.mp4"), "--dist-timeout", "900", "--lora", str(pickle)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "pickle" in proc.stderr, proc.stderr[-2000:]


# -- a LoRA run equals a run on a checkpoint the test merged --------------------------------------

@pytest.mark.slow
def test_generation_with_lora_equals_premerged_checkpoint(tiny_ckpt, info, tmp_path, capsys):
    lora = make_lora(tmp_path / "style.safetensors", "kohya", _shapes(info)["high"], TASK)
    diff = make_lora(tmp_path / "delta.safetensors", "diff", _shapes(info)["low"], TASK, seed=4)
    deltas = {"high": expected_deltas(lora, "kohya", 0.7, TASK), "low": {}}
    for key, d in expected_deltas(lora, "kohya", 0.7, TASK).items():
        deltas["low"][key] = d.clone()
    for key, d in expected_deltas(diff, "diff", 1.0, TASK).items():
        deltas["low"][key] = deltas["low"].get(key, 0) + d
    merged = merged_checkpoint(tiny_ckpt(TASK), tmp_path / "merged", TASK, TASKS[TASK].expert_folders, deltas)
    capsys.readouterr()
    with_lora = generate(tiny_ckpt(TASK), tmp_path / "a", TASK, "--lora", f"{lora}:0.7", "--lora-low", str(diff))
    said = capsys.readouterr().err  # the console says what was merged, where
    assert f"merged LoRA {lora} at scale 0.7: 6 weights of high, 6 weights of low" in said
    assert f"merged LoRA {diff} at scale 1: 6 weights of low" in said
    premerged = generate(merged, tmp_path / "b", TASK)
    a, b = with_lora["_latents"], premerged["_latents"]
    assert (a - b).abs().max().item() < 1e-6
    plain = generate(tiny_ckpt(TASK), tmp_path / "c", TASK)
    assert (plain["_latents"] - a).abs().max().item() > 1e-3  # the LoRA changed the video
    records = with_lora["loras"]
    assert [(r["file"], r["scale"], r["expert"]) for r in records] == [(str(lora), 0.7, "all"), (str(diff), 1.0, "low")]
    assert records[0]["touched"] == {"high": 6, "low": 6} and records[1]["touched"] == {"low": 6}
    import hashlib

    assert records[0]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert json.loads(json.dumps(with_lora["flags"]["loras"]))[1] == {"file": str(diff), "scale": 1.0, "expert": "low"}


def test_ti2v_lora_merges_into_the_single_expert(tiny_ckpt, tmp_path):
    task = "ti2v-5B"
    info5 = inspect_checkpoint(tiny_ckpt(task), TASKS[task])
    shapes = info5.transformer_weights["single"].shapes
    lora = make_lora(tmp_path / "k.safetensors", "kohya", shapes, task, seed=7)
    plan = plan_loras(parse_loras({"lora": [f"{lora}:1.25"]}, TASKS[task]), {"single": shapes}, task)
    want = expected_deltas(lora, "kohya", 1.25, task)
    with with_loras(transformer_source(info5, "single"), plan, "single") as src, \
            transformer_source(info5, "single") as base:
        for key, delta in want.items():
            assert torch.equal(src.get(key), base.get(key).float() + delta), key
    assert plan.reports[0].touched == {"single": len(want)}


def test_other_spellings_in_the_wild(info, tmp_path):
    """PEFT's adapter-named keys (`.lora_A.default.weight`) and bare official names (what
    Wan2.2-Lightning's own merge reads) resolve; two keys for one weight are refused."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    spelled = tmp_path / "spelled.safetensors"
    save_file({"transformer.blocks.0.attn1.to_k.lora_A.default.weight": a,
               "transformer.blocks.0.attn1.to_k.lora_B.default.weight": b,
               "blocks.1.cross_attn.v.lora_down.weight": a.clone(), "blocks.1.cross_attn.v.lora_up.weight": b.clone()},
              str(spelled))
    plan = plan_loras(parse_loras({"lora_low": [str(spelled)]}, TASKS[TASK]), _shapes(info), TASK)
    assert sorted(plan.for_expert("low")) == ["blocks.0.attn1.to_k.weight", "blocks.1.attn2.to_v.weight"]
    twice = tmp_path / "twice.safetensors"
    save_file({"diffusion_model.blocks.0.modulation.diff": torch.zeros(1, 6, 64),
               "diffusion_model.blocks.0.diff_m": torch.zeros(1, 6, 64)}, str(twice))
    with pytest.raises(LoraError, match="both change 'blocks.0.scale_shift_table'"):
        plan_loras(parse_loras({"lora": [str(twice)]}, TASKS[TASK]), _shapes(info), TASK)
