"""Run under `srun -nN`: a gloo all_reduce of (rank + 1) over the step's tasks.

Prints one line per rank: `ALLREDUCE rank=R world=W sum=S master=HOST:PORT`.
"""
import os

import dist_env

info = dist_env.from_env()
total = dist_env.all_reduce_sum(info, info["rank"] + 1.0)
os.write(1, f"ALLREDUCE rank={info['rank']} world={info['world']} sum={total:g} "
            f"master={info['master_addr']}:{info['master_port']}\n".encode())  # one write per line
