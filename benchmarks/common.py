"""Helpers every benchmark script shares: where it ran, with what, and how results are kept.

A benchmark figure is only worth something next to the machine, the library versions, the
thread count and the flags that produced it, so every script writes one JSON file per named
run (`benchmarks/results/<name>.json`, always the latest run of that name) and re-renders its
section of BENCHMARKS.md from *all* its JSON files. The markdown is therefore never edited by
hand and never older than the JSON beside it.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
#: packages whose version changes a figure (kernels, schedulers, model code)
PACKAGES = ("torch", "diffusers", "transformers", "numpy", "accelerate", "safetensors")
#: thread-related variables that change CPU figures even when torch's own setting is fixed
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KMP_AFFINITY", "OMP_PROC_BIND")


# -- where and with what ----------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where the file lacks them (VMs, macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, package = set(), "0"
    for line in text.splitlines():
        if line.startswith("physical id"):
            package = line.split(":", 1)[1].strip()
        elif line.startswith("core id"):
            cores.add((package, line.split(":", 1)[1].strip()))
    return len(cores) or None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS, load average and GPUs, as far as this process can see them."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def git_revision() -> dict[str, Any]:
    """The commit the code ran at and whether the tree had local changes (a dirty tree is not that commit)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["magcache-launch"] = git_revision()
    return out


def now_utc() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# -- numbers ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Summary:
    """Median and spread of repeated timings; the median is the figure, min/max say how noisy it was."""

    n: int
    median: float
    min: float
    max: float
    mean: float
    stdev: float

    @property
    def spread_pct(self) -> float:
        """(max - min) / median in percent: how far apart the repeats were."""
        return 100.0 * (self.max - self.min) / self.median if self.median else 0.0

    def to_json(self) -> dict[str, float]:
        return {**{k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()},
                "spread_pct": round(self.spread_pct, 2)}


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summarize needs at least one value")
    vals = [float(v) for v in values]
    return Summary(n=len(vals), median=statistics.median(vals), min=min(vals), max=max(vals),
                   mean=statistics.fmean(vals), stdev=statistics.stdev(vals) if len(vals) > 1 else 0.0)


# -- results ----------------------------------------------------------------------------------
def result_record(*, benchmark: str, name: str, flags: dict[str, Any], figures: dict[str, Any],
                  **sections: Any) -> dict[str, Any]:
    """The common envelope of a result file: what ran, where, when, with which versions."""
    return {"benchmark": benchmark, "name": name, "date": now_utc(), "machine": machine_info(),
            "versions": versions(), "flags": flags, "figures": figures, **sections}


def write_result(record: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write `<results_dir>/<name>.json` atomically (a reader never sees half a file)."""
    name = record["name"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"result name {name!r}: use letters, digits, '.', '_' and '-' only")
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def load_results(benchmark: str, results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every result file of one benchmark, newest first (unreadable or foreign files are skipped)."""
    records = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("benchmark") == benchmark:
            records.append(record)
    return sorted(records, key=lambda r: r.get("date", ""), reverse=True)


# -- markdown ---------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub table; `align` is one of l/r/c per column (default: first left, others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def replace_section(path: Path, section: str, body: str) -> None:
    """Replace the text between `<!-- BEGIN section -->` and `<!-- END section -->` in `path`.

    Missing markers get a new section appended, so a new benchmark needs no hand edit first.
    """
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def save_or_skip(record: dict[str, Any], *, no_save: bool, results_dir: Path, markdown: Path,
                 update_markdown: Callable[[Path, Path], None], log: Callable[[str], None]) -> int:
    """End of a benchmark run: write its JSON and re-render its BENCHMARKS.md section (or not)."""
    if no_save:
        log(f"done in {record['total_runtime_s']:.0f} s (--no-save: nothing written)")
        return 0
    path = write_result(record, results_dir)
    update_markdown(markdown, results_dir)
    log(f"wrote {path} and {markdown} in {record['total_runtime_s']:.0f} s")
    return 0


# -- one run's bookkeeping --------------------------------------------------------------------
#: flags of every benchmark that say where results go, not what was measured
_BOOKKEEPING_FLAGS = ("results_dir", "markdown", "render_only", "no_save")


class BenchRun:
    """The prologue and epilogue every benchmark's `main()` shares: `--render-only` re-renders the
    markdown and stops; otherwise a log, the start time and the machine's load before the run (other
    users' load: ours has not started), and at the end one result record, saved or not."""

    def __init__(self, args: Any, update_markdown: Callable[[Path, Path], None]) -> None:
        self.args = args
        self.update_markdown = update_markdown
        self.t_start = time.perf_counter()
        self.load_at_start = [round(x, 2) for x in os.getloadavg()]

    @classmethod
    def start(cls, args: Any, update_markdown: Callable[[Path, Path], None]) -> BenchRun | None:
        """The run, or None after `--render-only` rendered the markdown (the caller returns 0)."""
        if args.render_only:
            update_markdown(args.markdown, args.results_dir)
            print(f"rendered {args.markdown}")
            return None
        return cls(args, update_markdown)

    @staticmethod
    def log(line: str) -> None:
        print(line, flush=True)

    def checkpoint(self, work: Path, what: str, build: Callable[[Path], None]) -> Path:
        """--ckpt-dir when given, else a random checkpoint `build` writes under `work`."""
        if self.args.ckpt_dir is not None:
            return self.args.ckpt_dir
        ckpt = work / "ckpt"
        self.log(f"building a random --preset bench {what} checkpoint in {ckpt}")
        build(ckpt)
        return ckpt

    def flags(self, *drop: str) -> dict[str, Any]:
        """The run's flags as the record keeps them (paths as text), without the bookkeeping ones."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()
                if k not in _BOOKKEEPING_FLAGS + drop}

    def record(self, *, benchmark: str, figures: dict[str, Any], flags: dict[str, Any] | None = None,
               **sections: Any) -> dict[str, Any]:
        record = result_record(benchmark=benchmark, name=self.args.name, flags=self.flags() if flags is None else flags,
                               figures=figures, total_runtime_s=time.perf_counter() - self.t_start, **sections)
        record["machine"]["load_avg_at_start"] = self.load_at_start
        return record

    def save(self, record: dict[str, Any]) -> int:
        return save_or_skip(record, no_save=self.args.no_save, results_dir=self.args.results_dir,
                            markdown=self.args.markdown, update_markdown=self.update_markdown, log=self.log)
