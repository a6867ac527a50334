#!/usr/bin/env python
"""Does polling the server slow the denoise? Status polls at 50/s while generating, localhost only.

    python scripts/serve_load_test.py                 # 3 rounds of 3 jobs
    python scripts/serve_load_test.py --pairs 1 --steps 5 --no-save   # smoke run

Builds the `--preset bench` t2v-A14B checkpoint (two ~53 M-parameter DiT experts, as
bench_parallel.py does), starts one `magcache-launch serve` process on 127.0.0.1 (port chosen by
the OS), and runs jobs in rounds of three, order rotating (so drift from machine load hits each
alike): "quiet", no client activity; "server", a client thread sends `GET /jobs/{id}` to the
server at a fixed 50 per second (bounded: it stops when the job ends); "control", the same client
polls a separate stdlib HTTP server instead, so the cost of the polling client itself on a
shared CPU is measured apart from the server's. The denoise time of each job comes from its
manifest (`timings_s.denoise`, measured by the pipeline itself).
Writes `benchmarks/results/serve-load-cpu.json` unless --no-save.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _maker():
    from launcher.checkpoint import tiny

    return tiny


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _poller(url: str, rate: float, stop: threading.Event, latencies: list[float]) -> None:
    """GET url at a fixed rate (absolute schedule, no catch-up bursts) until `stop`."""
    period, next_t = 1.0 / rate, time.perf_counter()
    while not stop.is_set():
        t0 = time.perf_counter()
        _get(url)
        latencies.append(time.perf_counter() - t0)
        next_t += period
        time.sleep(max(0.0, next_t - time.perf_counter()))


def _run_job(base: str, body: dict, rate: float | None, mode: str = "quiet", control: str | None = None) -> dict:
    job_id = _post(f"{base}/jobs", body)["id"]
    latencies: list[float] = []
    stop = threading.Event()
    poller = None
    if rate:
        target = f"{base}/jobs/{job_id}" if mode == "server" else f"{control}/status.json"
        poller = threading.Thread(target=_poller, args=(target, rate, stop, latencies))
    started = time.perf_counter()
    if poller:
        poller.start()
    while True:  # the quiet run checks once a second only
        state = _get(f"{base}/jobs/{job_id}")["state"]
        if state in ("done", "failed", "cancelled"):
            break
        time.sleep(1.0 if not rate else 0.1)
    elapsed = time.perf_counter() - started
    stop.set()
    if poller:
        poller.join()
    assert state == "done", state
    manifest = _get(f"{base}/jobs/{job_id}/manifest")
    return {"job": job_id, "mode": mode, "denoise_s": manifest["timings_s"]["denoise"],
            "polls": len(latencies), "poll_rate": round(len(latencies) / elapsed, 1) if rate else 0.0,
            "poll_p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
            "poll_p99_ms": round(1000 * sorted(latencies)[int(0.99 * (len(latencies) - 1))], 2) if latencies else None}


def _control_server(folder: Path, env: dict) -> tuple[str, subprocess.Popen]:
    """A stdlib HTTP server in its own process: the same polls, the same client, but nothing shared
    with the ranks; the denoise slowdown it causes is what the polling client alone costs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            _get(f"{url}/status.json")
            return url, proc
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the control HTTP server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="rounds of (quiet, server, control) jobs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="128*128")
    parser.add_argument("--frame-num", type=int, default=5)
    parser.add_argument("--rate", type=float, default=50.0, help="status polls per second while generating")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    ckpt = _maker().make_tiny_checkpoint("t2v-A14B", "official", work / "ckpt", preset="bench")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "launcher", "serve", "--task", "t2v-A14B", "--ckpt_dir", str(ckpt),
           "--size", args.size, "--frame_num", str(args.frame_num), "--sample_steps", str(args.steps),
           "--host", "127.0.0.1", "--port", "0", "--jobs-dir", str(work / "jobs")]
    log = open(work / "server.log", "w")  # noqa: SIM115 - open while the server runs
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        info = work / "jobs" / "server.json"
        while not info.is_file():
            if server.poll() is not None:
                raise SystemExit(f"server exited {server.returncode}; see {work / 'server.log'}")
            time.sleep(0.2)
        base = json.loads(info.read_text())["url"]
        while _get(f"{base}/health")["state"] != "ready":
            time.sleep(0.2)
        status = _get(f"{base}/jobs")  # the control serves a status of the same size
        (work / "control").mkdir()
        (work / "control" / "status.json").write_text(json.dumps(status["jobs"][0] if status["jobs"] else {}))
        control = _control_server(work / "control", env)
        _run_job(base, {"prompt": "warm-up", "seed": 0}, None)  # first-use costs out of the comparison
        runs = []
        modes = ["quiet", "server", "control"]
        for pair in range(args.pairs):
            for mode in modes[pair % 3:] + modes[:pair % 3]:  # rotate, so drift hits every mode alike
                run = _run_job(base, {"prompt": "a lighthouse in a storm", "seed": 1},
                               None if mode == "quiet" else args.rate, mode, control[0])
                runs.append(run)
                print(json.dumps(run), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        log.close()
        if "control" in locals():
            control[1].kill()
    quiet = [r["denoise_s"] for r in runs if r["mode"] == "quiet"]
    polled = [r["denoise_s"] for r in runs if r["mode"] == "server"]
    other = [r["denoise_s"] for r in runs if r["mode"] == "control"]

    def stats(xs: list[float]) -> dict:
        return {"mean_s": round(statistics.mean(xs), 3), "stdev_s": round(statistics.stdev(xs), 3) if len(xs) > 1 else 0.0,
                "min_s": round(min(xs), 3), "max_s": round(max(xs), 3)}

    summary = {"name": "serve-load-cpu", "steps": args.steps, "size": args.size, "frame_num": args.frame_num,
               "target_rate": args.rate, "checkpoint": "t2v-A14B preset bench", "threads": env["OMP_NUM_THREADS"],
               "quiet": stats(quiet), "polled": stats(polled), "control": stats(other),
               "slowdown_pct": round(100 * (statistics.mean(polled) / statistics.mean(quiet) - 1), 2),
               "control_slowdown_pct": round(100 * (statistics.mean(other) / statistics.mean(quiet) - 1), 2),
               "runs": runs}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if not args.no_save:
        out = ROOT / "benchmarks" / "results" / "serve-load-cpu.json"
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
