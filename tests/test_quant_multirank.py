"""--quantize fp8/int8 end to end on every task: alone, and on 2 ranks (Ulysses 2 + --dit_fsdp, where
each rank quantizes its own rows and the 8-bit rows are all-gathered, or CFG-parallel) equal to one
process with MagCache on (same skips, relative L2 < 1e-5 in float32 compute).

Each (task, mode) pair runs alone once; four of them also run on 2 ranks, each layout under both
modes and every task, with a precision schedule (steps and blocks) on the A14B cases."""
from __future__ import annotations

import json

import pytest
from e2e_helpers import generate, make_image
from safetensors.torch import load_file
from test_multirank import MAGCACHE, STEPS, assert_equal_to_reference, torchrun

pytestmark = pytest.mark.slow

SCHEDULE = ["--quantize-steps", "1:-1", "--quantize-blocks", "1:"]
LAYOUTS = {"u2-fsdp": ["--ulysses_size", "2", "--dit_fsdp"], "cfg": ["--cfg-parallel"]}
#: (task, mode) -> the 2-rank layout it also runs under (None: alone only)
CASES = {
    ("t2v-A14B", "fp8"): "u2-fsdp", ("t2v-A14B", "int8"): None,
    ("i2v-A14B", "fp8"): None, ("i2v-A14B", "int8"): "cfg",
    ("ti2v-5B", "fp8"): "cfg", ("ti2v-5B", "int8"): "u2-fsdp",
}


def _flags(task: str, mode: str, image) -> list[str]:
    schedule = SCHEDULE if task != "ti2v-5B" else []
    return ["--quantize", mode, *schedule, *MAGCACHE, *(["--image", str(image)] if image else [])]


@pytest.mark.parametrize("task, mode", list(CASES), ids=[f"{t}-{m}" for t, m in CASES])
def test_quantized_run_alone_and_on_two_ranks(tiny_ckpt, tmp_path, task, mode):
    image = make_image(tmp_path / "in.png") if task == "i2v-A14B" else None
    flags = _flags(task, mode, image)
    single = generate(tiny_ckpt(task), tmp_path / "single", task, *flags, steps=STEPS)
    assert single["flags"]["quantization"]["quantize"] == mode
    layout = CASES[(task, mode)]
    if layout is None:  # alone: against the unquantized run
        plain = generate(tiny_ckpt(task), tmp_path / "plain", task, *flags[2:], steps=STEPS)
        a, b = single["_latents"], plain["_latents"]
        rel = ((a - b).norm() / b.norm()).item()
        assert 1e-4 < rel < 0.2, rel  # really quantized, still the same video
        return
    video = tmp_path / "mr.mp4"
    args = ["generate", "--task", task, "--size", "64*64", "--frame_num", "5", "--ckpt_dir", str(tiny_ckpt(task)),
            "--prompt", "a red car drives through a snowy city at night", "--base_seed", "7",
            "--sample_steps", str(STEPS), "--save_file", str(video), "--save-latents", str(tmp_path / "mr.safetensors"),
            *flags, *LAYOUTS[layout]]
    proc = torchrun(2, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(video.with_suffix(".json").read_text())
    sharded["_latents"] = load_file(tmp_path / "mr.safetensors")["latents"]
    assert_equal_to_reference(sharded, single, 2)
