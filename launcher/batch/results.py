"""What a batch reports: one record per item, the resume check, summary.json and the stderr table.

The resume check trusts a finished item only when its files prove it: the manifest's sha256 is
the video's, and the manifest was made from this item's prompt, seed and output-shaping flags.
Anything less (a video without manifest, a stale manifest, other flags) means "generate again".
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from launcher.config import RunConfig, config_fields
from launcher.errors import one_line  # noqa: F401 - batch and sweep report errors with it
from launcher.options import Role, flags_where
from launcher.outputs.manifest import flags_of
from launcher.outputs.atomic import manifest_path_for, sha256_of, write_json

Status = Literal["ok", "failed", "skipped"]
SUMMARY_VERSION = 1

#: RunConfig fields left out of the resume key: where files go and how the work is spread (the
#: PLACEMENT and OUTPUT flags of options.py), not what the video is, so a batch resumed on another
#: layout (more ranks, --ring_size, --offload_model...) keeps the videos it already has; and the
#: seed, which `verified_manifest` compares on its own (a drawn seed is recorded, not given).
NOT_IN_RESUME_KEY = frozenset(config_fields(flags_where(role=Role.PLACEMENT) + flags_where(role=Role.OUTPUT))
                              | {"base_seed"})


@dataclass(slots=True)
class ItemResult:
    """One row of summary.json (and of the table). Plain data: it travels between ranks."""

    index: int
    name: str
    line: int
    prompt: str
    seed: int | None
    status: Status
    error: str | None = None
    seconds: float = 0.0
    skipped_forwards: int | None = None
    video: str | None = None
    manifest: str | None = None
    sha256: str | None = None
    #: the data-parallel group that generated it (None: not generated in this run)
    dp_group: int | None = None

    @classmethod
    def from_manifest(cls, base: ItemResult, manifest: dict[str, Any], video: Path, seconds: float,
                      status: Status, dp_group: int | None = None) -> ItemResult:
        mc = manifest.get("magcache") or {}
        return cls(
            index=base.index, name=base.name, line=base.line, prompt=base.prompt, seed=manifest.get("seed"),
            status=status, seconds=round(seconds, 3), skipped_forwards=mc.get("skipped_count"),
            video=str(video), manifest=str(manifest_path_for(video)), sha256=manifest.get("sha256"), dp_group=dp_group,
        )


def resume_key(flags: dict[str, Any]) -> dict[str, Any]:
    """What must match for a finished video to count as this item's: a manifest's `flags` (or
    `flags_of(config)`) without the fields that do not change the video."""
    plain = json.loads(json.dumps(flags, default=str))  # as the manifest stores them
    return {k: v for k, v in plain.items() if k not in NOT_IN_RESUME_KEY}


def verified_manifest(config: RunConfig, seed: int | None) -> dict[str, Any] | None:
    """The manifest of `config.save_file` if video and manifest exist and belong to this item, else None.

    `seed` None means the item's seed is drawn at random: any recorded seed is then this item's.
    """
    video = config.save_file
    if video is None or not video.is_file():
        return None
    path = manifest_path_for(video)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("flags"), dict):
        return None
    if manifest.get("sha256") != sha256_of(video) or manifest.get("prompt") != config.prompt:
        return None
    if seed is not None and manifest.get("seed") != seed:
        return None
    if resume_key(manifest["flags"]) != resume_key(flags_of(config)):
        return None
    return manifest


def counts(results: list[ItemResult]) -> dict[str, int]:
    out = {"ok": 0, "skipped": 0, "failed": 0}
    for r in results:
        out[r.status] += 1
    return out


def write_summary(path: Path, results: list[ItemResult], **meta: Any) -> None:
    """Atomically, so a reader (or a resumed run) never sees half a summary."""
    payload = {
        "summary_version": SUMMARY_VERSION, **meta, "counts": counts(results),
        "items": [asdict(r) for r in sorted(results, key=lambda r: r.index)],
    }
    write_json(path, payload)


def print_table(results: list[ItemResult], *, title: str) -> None:
    """Item, seed, status, seconds, skipped forwards; then each failure's one-line error."""
    from rich.markup import escape
    from rich.table import Table

    from launcher.outputs.report import console

    style = {"ok": "green", "skipped": "cyan", "failed": "red"}
    table = Table(title=title)
    for col, justify in (("item", "left"), ("seed", "right"), ("status", "left"), ("seconds", "right"),
                         ("skipped fwd", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    ordered = sorted(results, key=lambda r: r.index)
    for r in ordered:
        table.add_row(
            r.name, "-" if r.seed is None else str(r.seed), f"[{style[r.status]}]{r.status}[/]",
            f"{r.seconds:.1f}", "-" if r.skipped_forwards is None else str(r.skipped_forwards),
        )
    console.print(table)
    c = counts(results)
    console.print(f"{c['ok']} generated, {c['skipped']} already done, {c['failed']} failed")
    for r in ordered:
        if r.status == "failed":
            console.print(f"[red]failed[/] {r.name} (line {r.line}): {escape(r.error or '')}", soft_wrap=True)
