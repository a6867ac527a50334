"""The five official recipes through `plan --gpus N --dry-run` (t2v-A14B, 1280*720, 81 frames), one at a time;
writes benchmarks/results/dry-run-t2v-A14B.json and prints per rank role and phase the peak device GiB
(measured by the dry run: the launcher's allocations on the meta device) next to the planner's model.

    python scripts/dry_run_recipes.py [--only NAME] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

RECIPES = {
    "1gpu-offload": (1, {"offload_model": "True", "convert_model_dtype": True, "t5_cpu": True}),
    "8gpu-ulysses8-fsdp": (8, {"ulysses_size": 8, "dit_fsdp": True, "t5_fsdp": True}),
    "4gpu-cfg2-ulysses2": (4, {"ulysses_size": 2, "cfg_parallel": True}),
    "2gpu-ulysses2": (2, {"ulysses_size": 2}),
    "8gpu-dp8": (8, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", action="append")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dry-run-t2v-A14B.json"))
    args = ap.parse_args()
    from launcher.engine.dryrun import dry_run_from_flags

    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name, (gpus, flags) in RECIPES.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        result = dry_run_from_flags({"task": "t2v-A14B", "size": "1280*720", **flags}, gpus)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        result["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        out[name] = {"flags": flags, **result}
        args.out.write_text(json.dumps(out, indent=1))
        print(f"{name}: {result['wall_s']} s, max RSS {result['max_rss_gib']} GiB", flush=True)
        for rank in result["ranks"]:
            peaks = " ".join(f"{p} {v['device'] / 2**30:.1f}" for p, v in rank["phases"].items())
            print(f"  rank {rank['rank']} ({rank['role']}): {peaks}", flush=True)


if __name__ == "__main__":
    main()
