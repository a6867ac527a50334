"""`/metrics` in the Prometheus text format (prometheus_client), kept by the HTTP process.

The queue, the jobs by state and each replica's busy fraction are read from the JobStore when
scraped; what a finished job measured (denoise seconds, computed and skipped DiT forwards, its
peak device memory) arrives with the ranks' report of it (`Outcome.stats`, from its manifest).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from launcher.serve.jobs import STATES, JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def job_stats(manifest: dict[str, Any]) -> dict[str, Any]:
    """What /metrics keeps of one finished job's manifest."""
    mc = manifest.get("magcache") or {}
    peaks = manifest.get("peak_memory_mb") or []
    cuda = [p["cuda_allocated_mb"] for p in peaks if "cuda_allocated_mb" in p]
    return {"denoise_s": (manifest.get("timings_s") or {}).get("denoise"),
            "computed": mc.get("computed_forwards"), "skipped": mc.get("skipped_count"),
            "peak_mb": max(cuda) if cuda else max((p.get("host_rss_mb", 0) for p in peaks), default=None),
            "memory": "cuda" if cuda else "host"}


class _FromStore:
    """Gauges computed at scrape time from the store."""

    def __init__(self, store: JobStore, replicas: int, started: float) -> None:
        self.store, self.replicas, self.started = store, replicas, started

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.counts()
        yield GaugeMetricFamily("magcache_queue_length", "jobs waiting to run", value=counts["queued"])
        jobs = GaugeMetricFamily("magcache_jobs", "jobs known to the server, by state", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], counts[state])
        yield jobs
        now = time.time()
        busy = self.store.busy_seconds(since=self.started, now=now)
        fraction = GaugeMetricFamily("magcache_replica_busy_fraction",
                                     "share of the time since start each dp replica ran a job", labels=["replica"])
        for replica in range(self.replicas):
            fraction.add_metric([str(replica)], busy.get(replica, 0.0) / max(now - self.started, 1e-9))
        yield fraction


class Metrics:
    def __init__(self, store: JobStore, *, replicas: int, started: float) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_FromStore(store, replicas, started))
        self.denoise = Histogram("magcache_denoise_seconds", "denoise time of each finished job",
                                 registry=self.registry,
                                 buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 2400, float("inf")))
        self.forwards = Counter("magcache_forwards", "DiT forwards of finished jobs, computed or skipped by MagCache",
                                ["kind"], registry=self.registry)
        self.peak = Histogram("magcache_job_peak_memory_mb", "peak memory of each finished job (MiB, the "
                              "replica's largest rank; device memory on CUDA, host RSS on CPU)", ["memory"],
                              registry=self.registry,
                              buckets=(256, 1024, 4096, 8192, 16384, 32768, 49152, 65536, 81920, 98304, 147456,
                                       float("inf")))
        for kind in ("computed", "skipped"):
            self.forwards.labels(kind)  # present (at 0) before the first job ends

    def job_finished(self, stats: dict[str, Any] | None) -> None:
        if not stats:
            return
        if stats.get("denoise_s") is not None:
            self.denoise.observe(stats["denoise_s"])
        for kind in ("computed", "skipped"):
            if stats.get(kind):
                self.forwards.labels(kind).inc(stats[kind])
        if stats.get("peak_mb") is not None:
            self.peak.labels(stats["memory"]).observe(stats["peak_mb"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
