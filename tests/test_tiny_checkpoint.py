"""The tiny checkpoint maker: official file names, diffusers pipeline index, size, speed, determinism."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launcher.wan.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "reference"
SCRIPT = ROOT / "scripts" / "make_tiny_checkpoint.py"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _load_maker():
    from launcher.checkpoint import tiny

    return tiny


def test_script_runs_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--task", "ti2v-5B", "--layout", "diffusers", "--out", str(out),
                           "--seed", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ti2v-5B (diffusers, seed 3)" in proc.stdout and "MB in" in proc.stdout
    assert (out / "model_index.json").is_file()


@pytest.mark.parametrize("layout", ["official", "diffusers"])
@pytest.mark.parametrize("task", list(TASKS))
def test_checkpoint_is_small_and_quick(tmp_path: Path, task: str, layout: str) -> None:
    t0 = time.perf_counter()
    out = _load_maker().make_tiny_checkpoint(task, layout, tmp_path / "ckpt")
    elapsed = time.perf_counter() - t0
    size = _size(out)
    print(f"tiny {task} {layout}: {size / 1e6:.2f} MB in {elapsed:.2f} s")
    assert size < 20e6


@pytest.mark.parametrize("task", list(TASKS))
def test_official_layout_uses_the_official_names(tiny_ckpt, task: str) -> None:
    spec, root = TASKS[task], tiny_ckpt(task)
    assert (root / spec.t5_checkpoint).is_file() and (root / spec.vae_checkpoint).is_file()
    assert (root / spec.t5_tokenizer / "tokenizer.json").is_file()
    reference = json.loads((REF / f"official_wanmodel_{task}.json").read_text())
    for folder in spec.expert_folders.values():
        config = json.loads((root / folder / "config.json").read_text())
        assert set(config) == set(reference["config_json_as_save_pretrained_writes"])
        assert (config["_class_name"], config["model_type"], config["in_dim"]) == ("WanModel", spec.mode,
                                                                                   spec.dit_in_channels)
        index = root / folder / "diffusion_pytorch_model.safetensors.index.json"
        assert index.is_file() == (spec.experts != ("single",))  # A14B sharded with an index, ti2v one file


@pytest.mark.parametrize("task, pipeline, boundary, has_second", [
    ("t2v-A14B", "WanPipeline", 0.875, True),
    ("i2v-A14B", "WanImageToVideoPipeline", 0.9, True),
    ("ti2v-5B", "WanPipeline", None, False),
])
def test_diffusers_layout_has_a_pipeline_index(tiny_ckpt, task: str, pipeline: str, boundary, has_second) -> None:
    root = tiny_ckpt(task, "diffusers")
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == pipeline and index["boundary_ratio"] == boundary
    assert (index["transformer_2"][0] is not None) == has_second
    assert index.get("expand_timesteps", False) == (task == "ti2v-5B")
    for folder in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert (root / folder).is_dir()
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "UniPCMultistepScheduler" and scheduler["use_flow_sigmas"]


def test_seed_decides_the_weights(tmp_path: Path, tiny_ckpt) -> None:
    maker = _load_maker()
    again = maker.make_tiny_checkpoint("ti2v-5B", "official", tmp_path / "again", seed=0)
    other = maker.make_tiny_checkpoint("ti2v-5B", "official", tmp_path / "other", seed=1)
    name = "diffusion_pytorch_model.safetensors"
    base = load_file(tiny_ckpt("ti2v-5B") / name)
    assert (again / name).read_bytes() == (tiny_ckpt("ti2v-5B") / name).read_bytes()
    assert not any((load_file(other / name)[k] == v).all() for k, v in base.items() if v.numel() > 1)


def test_non_empty_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").write_text("keep me")
    assert _load_maker().main(["--task", "ti2v-5B", "--layout", "official", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "x").read_text() == "keep me"
