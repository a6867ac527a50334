"""`launcher.engine.dryrun.task_checkpoint`: the official checkpoints described from their dimensions alone
equal, tensor for tensor, the shapes recorded from the official and diffusers/transformers modules
(tests/reference, made on the meta device); `ShapeSource` hands out tensors of those shapes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.checkpoint.sources import open_source
from launcher.engine.dryrun import pinned_bytes, task_checkpoint
from launcher.wan.tasks import TASKS

REF = Path(__file__).parent / "reference"


def _keys(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((REF / f"{name}.json").read_text())["keys"].items()}


@pytest.mark.slow  # builds each task's modules on meta (~8 s a task on the 2-core box)
@pytest.mark.parametrize("task", ["t2v-A14B", "i2v-A14B", "ti2v-5B"])
def test_official_dimensions_give_the_reference_shapes(task):
    info = task_checkpoint(TASKS[task])
    for expert in TASKS[task].experts:
        assert dict(info.transformer_weights[expert].shapes) == _keys(f"diffusers_wan_transformer_{task}")
    assert dict(info.t5_weights.shapes) == _keys("transformers_umt5_xxl_encoder")
    vae = "diffusers_autoencoderkl_wan21" if TASKS[task].vae_version == "2.1" else "diffusers_autoencoderkl_wan22"
    assert dict(info.vae_weights.shapes) == _keys(vae)
    assert info.num_heads == {"ti2v-5B": 24}.get(task, 40)


def test_shape_source_reads_nothing_and_slices_rows():
    weights = task_checkpoint(TASKS["ti2v-5B"]).transformer_weights["single"]
    with torch.device("meta"), open_source(weights) as source:
        whole = source.get("blocks.0.ffn.net.0.proj.weight")
        rows = source.get_slice("blocks.0.ffn.net.0.proj.weight", 10, 20)
    assert whole.shape == (14336, 3072) and whole.dtype == torch.float32
    assert rows.shape == (10, 3072)


def test_pinned_blocks_round_up_to_a_power_of_two():
    # an A14B expert's [13824, 5120] bf16 FFN weight: 135 MiB asked, 256 MiB pinned
    assert pinned_bytes(13824 * 5120 * 2) == 256 * 2**20
    assert pinned_bytes(4096) == 4096 and pinned_bytes(4097) == 8192
