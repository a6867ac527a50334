"""One rank of a `scripts/bench_parallel.py` job: load + generate through the product, counting comms and memory.

    torchrun --standalone --nproc-per-node N benchmarks/parallel_job.py --ckpt DIR --out DIR [--dit-fsdp]

Runs the product's own path (`run_config_from_flags` -> `inspect_checkpoint` -> `start_world` ->
`GenerationSession`) with `--ulysses_size N` (or `--ring_size R --ulysses_size N/R`), MagCache on, and writes `<out>/rank-<r>.json`:

- every torch.distributed collective this rank issued (the public `torch.distributed.<name>` functions
  are wrapped before any product module is imported, so module-level aliases see the wrapper too), with
  its phase (runtime, load, text, prepare, denoise, decode, finish), the DiT forward it belongs to, the
  payload this rank handed over and the seconds spent in the call;
- a cross-check of the wrapper: the c10d ops the dispatcher saw during the first generation's denoise
  loop (a TorchDispatchMode), which would reveal collectives issued around the public API;
- the MagCache decision sync (`World.magcache_sync`, the agree_min all-reduce): calls and seconds;
- host memory from /proc/self/status: RSS before loading, peak while loading, peak while generating
  (the peak is reset with /proc/self/clear_refs between phases), and the DiT bytes this rank holds.

Generation 0 is a short warm-up (`--warmup-steps`, both experts: FSDP lazy init, first page-in of the
weights); the driver checks that its per-forward counts equal the measured generation's.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from collections.abc import Callable
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

#: public collectives and which argument is this rank's payload
PAYLOAD_ARG = {
    "all_to_all_single": "input", "all_to_all": "input_tensor_list", "all_gather": "tensor",
    "all_gather_single": "input_tensor", "all_gather_into_tensor": "input_tensor", "all_gather_object": "obj",
    "all_reduce": "tensor", "all_reduce_coalesced": "tensors", "broadcast": "tensor",
    "broadcast_object_list": "object_list", "reduce": "tensor", "reduce_scatter": "input_list",
    "reduce_scatter_single": "input", "reduce_scatter_tensor": "input", "gather": "tensor", "scatter": "tensor",
    "gather_object": "obj", "scatter_object_list": "scatter_object_input_list", "send": "tensor",
    "recv": "tensor", "batch_isend_irecv": "p2p_op_list", "barrier": None, "monitored_barrier": None,
}
# isend/irecv stay unwrapped: `P2POp(dist.isend, ...)` must hand batch_isend_irecv the original
# function (it tells send from receive by identity); the ring's batch is counted as one call whose
# payload is what it sends; it runs one c10d op per P2POp (`CommCounter.p2p_ops` keeps how many, for
# the dispatcher check: the ring's batches hold 2, the VAE halo exchange's 2 or 4).


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
        return sum(_nbytes(v) for v in value)
    if value is None:
        return 0
    if isinstance(value, list) and all(isinstance(v, dist.P2POp) for v in value):  # the bytes sent
        return sum(_nbytes(op.tensor) for op in value if op.op is dist.distributed_c10d.isend)
    import pickle

    try:
        return len(pickle.dumps(value))
    except Exception:  # noqa: BLE001 - an unpicklable object still counts as a call
        return 0


class CommCounter:
    """Wraps torch.distributed's public collectives; one record per outermost call."""

    def __init__(self) -> None:
        self.phase = "startup"
        self.generation: int | None = None
        self.forward: int | None = None
        self.tag: str | None = None  # "sync" while the MagCache agreement runs
        self.records: list[list[Any]] = []
        #: [generation, phase, P2POps in the batch] per batch_isend_irecv call
        self.p2p_ops: list[list[Any]] = []
        self._depth = 0

    def install(self) -> None:
        for name, arg in PAYLOAD_ARG.items():
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn, arg))

    def _wrap(self, name: str, fn: Callable, arg: str | None) -> Callable:
        sig = inspect.signature(fn)

        def counted(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            bound = sig.bind_partial(*args, **kwargs).arguments
            group = bound.get("group")
            size = dist.get_world_size(group) if dist.is_initialized() else 1
            payload = _nbytes(bound.get(arg)) if arg else 0
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                self._depth -= 1
                kind = f"{name}:magcache_sync" if self.tag == "sync" else name
                if name == "batch_isend_irecv":
                    self.p2p_ops.append([self.generation, self.phase, len(bound.get(arg) or [])])
                self.records.append([self.generation, self.phase, self.forward, kind, size, payload, seconds])
        counted.__wrapped__ = fn  # type: ignore[attr-defined]
        return counted


COUNTER = CommCounter()
COUNTER.install()  # before the product imports parallel/*: parallel.cfg binds all_gather_single at import


class C10dOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the c10d ops the dispatcher runs (cross-check of the wrapper: nothing bypasses it)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


# -- memory ------------------------------------------------------------------------------------
def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM (peak since start or the last reset), RssAnon, RssFile in MiB."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def rollup() -> dict[str, float]:
    """Proportional set size (shared page-cache pages split among the processes mapping them), MiB."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("Pss", "Pss_Anon", "Pss_File", "Anonymous"):
                    out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def reset_peak() -> bool:
    """Start a new VmHWM window (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Polls /proc/self/status (and smaps_rollup) so the peak's composition and the peak PSS are known too.

    VmHWM counts a file-backed page fully in every process that maps it; PSS splits shared page-cache
    pages among the ranks mapping them, which is the fair per-rank figure for mmap-backed weights.
    """

    def __init__(self, period_s: float = 0.01) -> None:
        self.period = period_s
        self.peak: dict[str, float] = {}
        self.peak_pss: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        s = proc_status()
        if s.get("VmRSS", 0) > self.peak.get("VmRSS", -1):
            self.peak = s
        r = rollup()
        if r.get("Pss", 0) > self.peak_pss.get("Pss", -1):
            self.peak_pss = r

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def dit_bytes(experts: dict[str, Any], rank: int, world: int, sharded: bool) -> dict[str, Any]:
    """What this rank holds of each DiT (measured from the tensors) and what FSDP2 rows predict."""
    from torch.distributed.tensor import DTensor

    from parallel.fsdp import shard_rows

    out: dict[str, Any] = {}
    for name, dit in experts.items():
        held = {"blocks": 0, "root": 0}
        expect = {"blocks": 0, "root": 0}
        full = {"blocks": 0, "root": 0}
        for key, t in (*dit.model.named_parameters(), *dit.model.named_buffers()):
            part = "blocks" if key.startswith("blocks.") else "root"
            local = t.to_local() if isinstance(t, DTensor) else t
            held[part] += local.numel() * local.element_size()
            whole = t.numel() * t.element_size()
            full[part] += whole
            if sharded and part == "blocks" and t.ndim >= 1:
                start, stop = shard_rows(t.shape[0], rank, world)
                expect[part] += whole // t.shape[0] * (stop - start)
            else:
                expect[part] += whole
        out[name] = {"held": held, "expected": expect, "full": full}
    return out


# -- the run -----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--task", default="t2v-A14B")
    p.add_argument("--size", default="128*128")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--thresh", type=float, default=0.06)
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--retention", type=float, default=0.2)
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=3,
                   help="steps of generation 0 when there are several (3: both experts, computed and skipped)")
    p.add_argument("--dit-fsdp", action="store_true")
    p.add_argument("--ring", type=int, default=1, help="--ring_size (the rest of the world is Ulysses)")
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16: CPU autocast, bf16 exchanges)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def fsdp_unsharded_groups(experts: dict[str, Any]) -> int:
    """FSDP2 parameter groups left unsharded (all-gathered) at this point; 0 when reshard works."""
    count = 0
    for dit in experts.values():
        for module in dit.model.modules():
            state = getattr(module, "_get_fsdp_state", None)
            group = state()._fsdp_param_group if state is not None else None
            if group is not None and not group.is_sharded:
                count += 1
    return count


def sync_microbench(agree: Callable[[bool], bool], calls: int = 300) -> dict[str, float]:
    """The MagCache agreement back to back, ranks already aligned: its own cost without waiting for peers."""
    import statistics

    agree(True)  # align the ranks
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        agree(True)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"calls": calls, "median_us": 1e6 * statistics.median(times), "p90_us": 1e6 * times[int(0.9 * calls)]}


def malloc_trim() -> bool:
    """Hand glibc's free heap pages back to the kernel (to tell allocator caching from live memory)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class PhaseClock:
    """Seconds per phase (per generation) and the phase label the comm counter files records under."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        key = COUNTER.phase if COUNTER.generation is None else f"{COUNTER.generation}:{COUNTER.phase}"
        self.seconds[key] = self.seconds.get(key, 0.0) + now - self._mark
        self._mark = now
        COUNTER.phase = phase


def instrument(session: Any, clock: PhaseClock, sync_stats: dict[str, list]) -> tuple[list[Any], dict[str, Any]]:
    """Phase marks, forward indices, the timed MagCache sync and the block runners of `session`.

    Returns (runners made so far, a slot: put a C10dOps in slot["mode"] to count the next denoise loop).
    """
    import launcher.wan.dit as dit_module
    import launcher.wan.vae as vae_module

    world, pipe = session.world, session.pipeline
    slot: dict[str, Any] = {"mode": None}
    base_sync = world.magcache_sync()
    if base_sync is not None:
        def timed_sync(flag: bool) -> bool:
            COUNTER.tag = "sync"
            t0 = time.perf_counter()
            try:
                return base_sync(flag)
            finally:
                sync_stats["seconds"][-1] += time.perf_counter() - t0
                sync_stats["calls"][-1] += 1
                COUNTER.tag = None

    encode_text, prepare, generate = pipe.encode_text, pipe._prepare, pipe.generate

    def timed_encode_text(*a, **kw):
        clock.enter("text")
        out = encode_text(*a, **kw)
        clock.enter("prepare")
        return out

    def timed_prepare(*a, **kw):
        out = prepare(*a, **kw)
        clock.enter("denoise")
        if slot["mode"] is not None:
            slot["mode"].__enter__()
        return out

    def timed_generate(*a, **kw):
        clock.enter("text")
        try:
            return generate(*a, **kw)
        finally:
            if slot["mode"] is not None:
                slot["mode"].__exit__(None, None, None)
                slot["mode"] = None
            clock.enter("finish")
    pipe.encode_text, pipe._prepare, pipe.generate = timed_encode_text, timed_prepare, timed_generate

    decode = vae_module.decode

    def timed_decode(*a, **kw):
        clock.enter("decode")
        return decode(*a, **kw)
    vae_module.decode = timed_decode  # pipeline imports it inside generate

    run = dit_module.WanDiT.run

    def indexed_run(self, *a, index: int, **kw):
        COUNTER.forward = index
        try:
            return run(self, *a, index=index, **kw)
        finally:
            COUNTER.forward = None
    dit_module.WanDiT.run = indexed_run

    runners: list[Any] = []
    block_runner = session.block_runner

    def kept_runner(c):
        made = block_runner(c)
        if base_sync is not None and getattr(made[0], "sync", None) is not None:
            made[0].sync = timed_sync  # each new MagCacheController agrees through the timed twin
        runners.append(made[0])
        return made
    session.block_runner = kept_runner
    return runners, slot


def measure(rt: Any, cfg: Any, warmup_cfg: Any, info: Any, args: argparse.Namespace,
            clock: PhaseClock) -> dict[str, Any]:
    """Load and generate on this rank; everything that references the models dies when this returns."""
    from launcher.engine.session import GenerationSession
    from launcher.outputs.files import Outputs

    world = rt.world_size
    mem: dict[str, Any] = {"before_runtime": MEM_AT_START}
    seed = rt.broadcast_seed(42)
    mem["before_load"] = {**proc_status(), **rollup()}
    peak_reset = reset_peak()
    clock.enter("load")
    with PeakSampler() as sampler:
        session = GenerationSession(cfg, info, rt)
    mem["after_load"] = {**proc_status(), **rollup()}
    mem["load_peak_sample"] = sampler.peak
    mem["load_peak_pss"] = sampler.peak_pss
    held = dit_bytes(session.models.experts, rt.rank, world, sharded=session.parallel.dit_sharded)
    clock.enter("idle")

    sync_stats: dict[str, list] = {"calls": [], "seconds": []}
    bare_sync = rt.magcache_sync()
    runners, slot = instrument(session, clock, sync_stats)
    c10d_ops: dict[str, int] = {}
    gen_mem = []
    for g in range(args.generations):
        COUNTER.generation = g
        sync_stats["calls"].append(0)
        sync_stats["seconds"].append(0.0)
        reset_peak()
        mode = C10dOps() if g == 0 else None  # dispatcher cross-check on the warm-up's denoise (+ decode)
        slot["mode"] = mode
        with PeakSampler() as sampler:
            session.generate(warmup_cfg if g == 0 and args.generations > 1 else cfg, seed, Outputs(video=None))
        clock.enter("idle")
        COUNTER.generation = None
        if mode is not None:
            c10d_ops = dict(mode.ops)
        gen_mem.append({"end": {**proc_status(), **rollup()}, "peak_sample": sampler.peak,
                        "peak_pss": sampler.peak_pss})
    mem["generations"] = gen_mem
    clock.enter("sync-microbench")
    sync_alone = sync_microbench(bare_sync) if bare_sync is not None else None
    clock.enter("idle")
    unsharded = fsdp_unsharded_groups(session.models.experts)
    trimmed = malloc_trim()
    mem["after_generate_trimmed"] = {**proc_status(), **rollup()} if trimmed else None
    return {
        "rank": rt.rank, "world": world, "mesh": rt.mesh_shape, "dit_fsdp": args.dit_fsdp,
        "fsdp_active": session.parallel.dit_sharded, "peak_reset": peak_reset, "load_s": session.load_seconds,
        "decisions": [[[d.index, d.retained, d.skip] for d in r.decisions] for r in runners],
        "sync": sync_stats, "sync_back_to_back_us": sync_alone, "c10d_ops_denoise_gen0": c10d_ops, "mem": mem, "dit_bytes": held,
        "fsdp_unsharded_groups_after_generate": unsharded, "threads": torch.get_num_threads(),
    }


MEM_AT_START = proc_status()  # after torch is imported, before the product is


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from launcher.checkpoint import inspect_checkpoint
    from launcher.config import run_config_from_flags
    from launcher.engine.world import start_world

    def config(steps: int) -> Any:
        return run_config_from_flags({
            "task": args.task, "ckpt_dir": args.ckpt, "prompt": "a red fox runs through fresh snow at dawn",
            "size": args.size, "frame_num": args.frames, "sample_steps": steps, "base_seed": 42, "device": "cpu",
            "ulysses_size": int(os.environ.get("WORLD_SIZE", "1")) // args.ring, "ring_size": args.ring,
            "dit_fsdp": args.dit_fsdp, "use_magcache": True,
            "dtype": args.dtype,
            "magcache_thresh": args.thresh, "magcache_K": args.K, "retention_ratio": args.retention})
    cfg, warmup_cfg = config(args.steps), config(args.warmup_steps)
    info = inspect_checkpoint(cfg.ckpt_dir, cfg.task)
    clock = PhaseClock()
    clock.enter("runtime")
    rt = start_world(cfg, num_heads=info.num_heads)
    ok = False
    try:
        payload = measure(rt, cfg, warmup_cfg, info, args, clock)
        ok = True
    finally:
        clock.enter("teardown")
        rt.shutdown(clean=ok)
    import resource

    payload.update(records=COUNTER.records, p2p_ops=COUNTER.p2p_ops, clock=clock.seconds,
                   ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{payload['rank']}.json").write_text(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
