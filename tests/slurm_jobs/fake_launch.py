"""Stand-in for `magcache-launch` in the sbatch template tests (MAGCACHE_LAUNCH_CMD).

Prints one JSON line per rank (`FAKE_LAUNCH {...}`) with its argv and rank environment, after a
gloo all_reduce that proves the ranks form one world. `--fake-fail-rank R` makes rank R exit 3
before the all_reduce, so the others block until the launcher kills them.
"""
import json
import os
import sys

import dist_env

args = sys.argv[1:]
info = dist_env.from_env()
if "--fake-fail-rank" in args and int(args[args.index("--fake-fail-rank") + 1]) == info["rank"]:
    os.write(1, f"FAKE_LAUNCH rank={info['rank']} failing on purpose\n".encode())
    sys.exit(3)
info["sum"] = dist_env.all_reduce_sum(info, info["rank"] + 1.0)
info["argv"] = args
info["python"] = sys.executable
info["env"] = {k: os.environ.get(k) for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                                              "SLURM_JOB_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
# One write per line: ranks share the job's output file and must not interleave mid-line.
os.write(1, ("FAKE_LAUNCH " + json.dumps(info, sort_keys=True) + "\n").encode())
