"""Real Slurm across two hosts (network namespaces): slurmctld + slurmd on node0, slurmd on node1.

`sbatch --nodes 2` of both templates (generate.sbatch: srun, one task per rank, MASTER_ADDR from
the node list; generate-torchrun.sbatch: one torchrun per node, c10d rendezvous on node0) equals
the single-process run; a batch array lands one task on each node and writes the same videos as
one process; a node whose ranks die mid-denoise fails the job (FAILED, not hung). No test sets
GLOO_SOCKET_IFNAME. See tests/netns_hosts.py and tests/netns_slurm.py for the harness.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT
from e2e_helpers import MULTINODE_MAGCACHE, MULTINODE_STEPS, single_process  # noqa: F401 (fixture)
from netns_hosts import NetnsUnavailable, hosts
from netns_slurm import netns_slurm
from safetensors.torch import load_file
from slurm_helpers import REPO, slurm_cluster  # noqa: F401 (fixture: installs Slurm, or skips with the reason)

from launcher.cli import main

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS, MAGCACHE = MULTINODE_STEPS, MULTINODE_MAGCACHE
SLURM = REPO / "scripts" / "slurm"


@pytest.fixture(scope="module")
def cluster(slurm_cluster):  # noqa: F811 (fixture)
    # not under pytest's tmp dir: that one is private to root, and munged runs as user munge
    state = Path(tempfile.mkdtemp(prefix="magcache-netns-slurm-"))
    try:
        with hosts(2) as made, netns_slurm(made, state) as c:
            yield c
    except NetnsUnavailable as e:
        pytest.skip(f"two-node Slurm needs network namespaces and Slurm: {e}")
    finally:
        shutil.rmtree(state, ignore_errors=True)


def job_env(**extra: str) -> dict[str, str]:
    env = {"MAGCACHE_VENV": sys.prefix, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
           **extra}
    return env


def clean_environ() -> None:
    for var in ("MAGCACHE_LAUNCH_CMD", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.pop(var, None)


def generate_args(ckpt: Path, out: Path, *flags: str, steps: int = STEPS) -> list[str]:
    return ["--task", "t2v-A14B", "--size", "64*64", "--frame_num", "5", "--ckpt_dir", str(ckpt),
            "--prompt", "a red car drives through a snowy city at night", "--base_seed", "7",
            "--sample_steps", str(steps), "--save_file", str(out / "v.mp4"),
            "--save-latents", str(out / "v.safetensors"), *flags]


TEMPLATES = {
    # 2 nodes x 2 srun tasks, ulysses 4
    "srun": ("generate.sbatch", ["--nodes=2", "--ntasks-per-node=2"], {}, ["--ulysses_size", "4"], "slurm"),
    # 2 nodes x 1 torchrun x 2 ranks, cfg 2 x ulysses 2
    "torchrun": ("generate-torchrun.sbatch", ["--nodes=2", "--cpus-per-task=2"],
                 {"MAGCACHE_NPROC_PER_NODE": "2", "MAGCACHE_RDZV_PORT": "29612"},
                 ["--cfg-parallel", "--ulysses_size", "2"], "torchrun"),
}


@pytest.mark.parametrize("launch", list(TEMPLATES))
def test_two_node_sbatch_equals_one_process(cluster, tiny_ckpt, single_process, tmp_path, launch):
    clean_environ()
    template, sbatch_args, extra_env, layout, kind = TEMPLATES[launch]
    out = tmp_path / "out"
    t0 = time.monotonic()
    job = cluster.submit([*sbatch_args, str(SLURM / template), *generate_args(tiny_ckpt("t2v-A14B"), out, *MAGCACHE,
                                                                               *layout)],
                         tmp_path / "job.out", job_env(**extra_env))
    state, code, nodes = cluster.wait(job, timeout=420)
    seconds = time.monotonic() - t0
    text = (tmp_path / "job.out").read_text(errors="replace")
    assert (state, code) == ("COMPLETED", 0), text[-4000:]
    assert nodes == "node[0-1]", nodes
    print(f"sbatch --nodes 2 {template} {' '.join(layout)}: {seconds:.1f} s from submit to COMPLETED "
          f"(single process: {single_process['_seconds']:.1f} s in-process)")
    assert "Traceback" not in text and "terminate called" not in text, text[-3000:]
    manifest = json.loads((out / "v.json").read_text())
    assert manifest["world"]["size"] == 4 and manifest["world"]["launch"] == kind, manifest["world"]
    latents = load_file(out / "v.safetensors")["latents"]
    ref = single_process
    rel = ((latents - ref["_latents"]).norm() / ref["_latents"].norm()).item()
    assert rel < 1e-5, rel
    assert manifest["magcache"]["skipped_forwards"] == ref["magcache"]["skipped_forwards"]
    assert [d["skip"] for d in manifest["magcache"]["decisions"]] == [d["skip"] for d in ref["magcache"]["decisions"]]
    # each node found its interface: node1 by the route to node0, node0 by the route back to node1
    h0, h1 = cluster.hosts[0], cluster.hosts[1]
    assert re.search(rf"\] rendezvous node0 \({h0.addr}\):\d+, interface {h1.ifname} {h1.addr} \(route to MASTER_ADDR\)",
                     text), text[-3000:]
    assert re.search(rf"\[rank 0\] rendezvous node0 \(127\.0\.1\.1\):\d+, interface {h0.ifname} {h0.addr} "
                     r"\(route to a peer\)", text), text[-3000:]


def test_batch_array_spreads_over_both_nodes(cluster, tiny_ckpt, tmp_path):
    """Two array tasks, each taking a whole node (4 CPUs): one runs on node0, one on node1, at once."""
    clean_environ()
    prompts = tmp_path / "prompts.jsonl"
    items = [{"prompt": "a red car at night", "seed": 1}, {"prompt": "a cat surfing", "name": "cat", "seed": 2}]
    prompts.write_text("".join(json.dumps(i) + "\n" for i in items))
    flags = ["--task", "ti2v-5B", "--size", "64*64", "--frame_num", "5", "--sample_steps", "2",
             "--ckpt_dir", str(tiny_ckpt("ti2v-5B"))]
    single = tmp_path / "single"
    # at one thread, as the array's tasks run (job_env's OMP_NUM_THREADS=1; conftest.one_thread)
    assert main(["batch", str(prompts), "--out-dir", str(single), *flags]) == 0
    out = tmp_path / "out"
    job = cluster.submit(["--array=0-1", "--cpus-per-task=4", str(SLURM / "batch-array.sbatch"), str(prompts),
                          "--out-dir", str(out), *flags], tmp_path / "job-%a.out", job_env())
    placed = {}
    for task in ("0", "1"):
        state, code, nodes = cluster.wait(f"{job}_{task}", timeout=300)
        text = (tmp_path / f"job-{task}.out").read_text(errors="replace")
        assert (state, code) == ("COMPLETED", 0), text[-3000:]
        placed[task] = nodes
    assert sorted(placed.values()) == ["node0", "node1"], placed
    want = json.loads((single / "summary.json").read_text())
    got = [json.loads((out / f"summary-shard-{k}-of-2.json").read_text()) for k in (0, 1)]
    shas = {i["name"]: i["sha256"] for s in got for i in s["items"]}
    assert shas == {i["name"]: i["sha256"] for i in want["items"]}
    assert all(i["status"] == "ok" for s in got for i in s["items"])


def test_node_whose_ranks_die_fails_the_job(cluster, tiny_ckpt, tmp_path):
    """node1's ranks are SIGKILLed mid-denoise: node0's ranks say so in one line, the job ends FAILED."""
    clean_environ()
    out = tmp_path / "out"
    log = tmp_path / "job.out"
    job = cluster.submit(["--nodes=2", "--ntasks-per-node=2", str(SLURM / "generate.sbatch"),
                          *generate_args(tiny_ckpt("t2v-A14B"), out, "--ulysses_size", "4", "--dist-timeout", "30",
                                         steps=3000)], log, job_env())
    deadline = time.monotonic() + 240
    while "denoising" not in (log.read_text(errors="replace") if log.exists() else ""):
        assert time.monotonic() < deadline, "rank 0 never started denoising"
        state, _, _ = cluster.job_state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, log.read_text(errors="replace")[-3000:])
        time.sleep(0.3)
    time.sleep(1.0)
    host = cluster.hosts[1]
    victims = [pid for pid in host.pids() if b"launcher" in host.cmdline(pid) or b"magcache-launch" in host.cmdline(pid)]
    assert len(victims) >= 2, victims
    t0 = time.monotonic()
    for pid in victims:
        os.kill(pid, 9)
    state, code, _ = cluster.wait(job, timeout=30 + 60)
    seconds = time.monotonic() - t0
    text = log.read_text(errors="replace")
    print(f"node1's ranks killed: job {state} (exit {code}) {seconds:.1f} s later (--dist-timeout 30)")
    assert state == "FAILED" and code != 0, text[-3000:]
    assert seconds < 30 + 30, text[-3000:]
    assert "Traceback" not in text and "terminate called" not in text, text[-3000:]
    lost = [ln for ln in text.splitlines() if ln.startswith("error: rank ")]
    assert any("lost contact with another rank (it failed or was killed) while generating" in ln for ln in lost), \
        text[-3000:]
    assert not any(out.glob("*")) if out.exists() else True
