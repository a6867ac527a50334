"""The planner's per-phase memory MODEL (launcher.planner.memory_model, no torch) against the dry run's
per-phase device peaks for the five official recipes (benchmarks/results/dry-run-t2v-A14B.json, written
by scripts/dry_run_recipes.py): within 10% per phase, rank 0 of each recipe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.planner.layouts import with_memory_policy
from launcher.planner.memory_model import PHASES, phase_bytes
from launcher.planner.perf_model import DIMS, RankLayout, Workload
from launcher.wan.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = json.loads((ROOT / "benchmarks/results/dry-run-t2v-A14B.json").read_text())


def modelled(recipe: dict) -> dict[str, dict[str, float]]:
    """The model's phases for a recipe's flags and GPU count, as the launcher's memory policy places them."""
    flags, gpus = recipe["flags"], recipe["gpus"]
    u, cfg = flags.get("ulysses_size", 1), 2 if flags.get("cfg_parallel") else 1
    fsdp = bool(flags.get("dit_fsdp")) and u > 1
    place = RankLayout(ulysses=u, ring=1, cfg=cfg, dit_fsdp=fsdp, offload=False, ulysses_link="intra",
                       ring_link="intra", cfg_link="intra", fsdp_link="intra",
                       convert_model_dtype=bool(flags.get("convert_model_dtype")))
    offload = {"True": True, "False": False}.get(flags.get("offload_model"))
    place = with_memory_policy(place, world_size=gpus, offload_model=offload, t5_cpu=bool(flags.get("t5_cpu")))
    width, height = (int(x) for x in recipe["size"].split("*"))
    work = Workload.of(TASKS[recipe["task"]], width, height, recipe["frame_num"])
    return phase_bytes(DIMS[recipe["task"]], work, place)


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_model_agrees_with_the_dry_run_per_phase(name):
    recipe = RESULTS[name]
    model = modelled(recipe)
    measured = recipe["ranks"][0]["phases"]
    for phase in PHASES:
        m, r = model[phase]["total"], measured[phase]["device"]
        assert abs(m / r - 1) <= 0.10, (name, phase, round(m / 2**30, 2), round(r / 2**30, 2))


if __name__ == "__main__":  # the agreement table for BENCHMARKS.md
    for name, recipe in RESULTS.items():
        model = modelled(recipe)
        cells = [f"{model[p]['total'] / 2**30:.1f} / {recipe['ranks'][0]['phases'][p]['device'] / 2**30:.1f}"
                 for p in PHASES]
        print(f"| {name} | " + " | ".join(cells) + " |")
