#!/usr/bin/env python
"""Do short jobs wait for long ones? 2 dp replicas, alternating short and long jobs, localhost only.

    python scripts/bench_serve_replicas.py                       # this checkout (a replica takes the next job when free)
    python scripts/bench_serve_replicas.py --repo /tmp/rounds    # another checkout, e.g. the round design:
        mkdir /tmp/rounds && git archive 2ee3ced | tar -x -C /tmp/rounds   # the commit before it

Builds the `--preset bench` t2v-A14B checkpoint (two ~53 M-parameter DiT experts, as
serve_load_test.py and bench_parallel.py do: a step costs more than a job's fixed work), starts `magcache-launch serve` under torchrun with 2 ranks
(2 dp replicas of one rank each, gloo, CPU) from `--repo`, submits all jobs at once, alternating
--short-steps and --long-steps (seeded; --size, --frame-num), waits for every one, and prints per kind
the mean wait (started - created, from the server's own job records) and the total time (first
submission to last job done). Same checkpoint, same jobs, same machine for each --repo: run them
back to back. Prints one JSON object; measured figures only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from serve_load_test import _maker  # noqa: E402 - the tiny-checkpoint maker, loaded as the load test does


def _call(url: str, method: str = "GET", body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def run(repo: Path, ckpt: Path, jobs: int, short: int, long: int, work: Path, size: str, frames: int) -> dict:
    jobs_dir = work / "jobs"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "launcher",
           "serve", "--ckpt_dir", str(ckpt), "--task", "t2v-A14B", "--size", size, "--frame_num", str(frames),
           "--port", "0", "--jobs-dir", str(jobs_dir), "--max-queue", "1000"]
    log = open(work / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        url = None
        while url is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{(work / 'server.log').read_text()[-3000:]}")
            info = jobs_dir / "server.json"
            try:
                if info.is_file() and _call(json.loads(info.read_text())["url"] + "/health")["state"] == "ready":
                    url = json.loads(info.read_text())["url"]
            except OSError:
                pass
            time.sleep(0.2)
        kinds = ["short" if i % 2 == 0 else "long" for i in range(jobs)]
        t0 = time.time()
        ids = [_call(url + "/jobs", "POST", {"prompt": f"job {i}", "seed": i,
                                              "sample_steps": short if kind == "short" else long})["id"]
               for i, kind in enumerate(kinds)]
        deadline = time.monotonic() + 3600
        while True:
            states = [_call(f"{url}/jobs/{i}") for i in ids]
            if all(s["state"] in ("done", "failed") for s in states):
                break
            if time.monotonic() > deadline:
                raise SystemExit("jobs not done within an hour")
            time.sleep(0.25)
        assert all(s["state"] == "done" for s in states), [s["error"] for s in states]
        out: dict = {"total_s": round(max(s["finished"] for s in states) - t0, 2)}
        for kind in ("short", "long"):
            mine = [s for s, k in zip(states, kinds) if k == kind]
            out[f"{kind}_mean_wait_s"] = round(statistics.mean(s["started"] - s["created"] for s in mine), 2)
            out[f"{kind}_mean_run_s"] = round(statistics.mean(s["finished"] - s["started"] for s in mine), 2)
        out["replicas_used"] = sorted({s["replica"] for s in states})
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, action="append", help="checkout to run the server from (repeatable; "
                        "default this one)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--short-steps", type=int, default=2)
    parser.add_argument("--long-steps", type=int, default=8)
    parser.add_argument("--size", default="128*128")
    parser.add_argument("--frame-num", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-replicas-") as tmp:
        ckpt = _maker().make_tiny_checkpoint("t2v-A14B", "official", Path(tmp) / "ckpt", preset="bench")
        results = {}
        for repo in args.repo or [ROOT]:
            work = Path(tmp) / f"run{len(results)}"
            work.mkdir()
            results[str(repo)] = run(repo.resolve(), ckpt, args.jobs, args.short_steps, args.long_steps, work,
                                     args.size, args.frame_num)
    print(json.dumps({"jobs": args.jobs, "short_steps": args.short_steps, "long_steps": args.long_steps,
                      "size": args.size, "frame_num": args.frame_num,
                      "replicas": 2, "device": "cpu (gloo), 1 thread per rank", "results": results}, indent=2))


if __name__ == "__main__":
    main()
