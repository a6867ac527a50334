"""The items of a batch: read the prompt file, check names, pick a shard. Pure Python, no torch.

Everything here runs before a process group exists or a weight is read, so a malformed file
exits 2 with one line naming the bad line, in milliseconds, on every rank alike.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UsageError
from launcher.options import LINE, declarations, flags_where, value_type

#: JSONL fields a line may carry, with their type: its name, and every flag options.py lets a batch
#: line set (by the name a line uses: `seed` for --base-seed); anything not given falls back to the flags.
FIELDS: dict[str, type] = {
    "name": str,
    **{declarations()[flag].field or flag: (str if value_type(flag) is Path else value_type(flag))
       for flag in flags_where(per_video=(LINE,))},
}
#: `\w` is Unicode-aware: names in any script are fine; separators, leading dots and controls are not.
_SAFE_NAME = re.compile(r"^\w[\w.-]{0,127}$")
_SHARD_SUMMARY = re.compile(r"^summary(-shard-\d+-of-\d+)?$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One line of the prompt file. `index` counts prompts from 0 (blank lines don't count)."""

    index: int
    line: int
    prompt: str
    name: str | None = None
    image: Path | None = None
    seed: int | None = None
    size: str | None = None
    frame_num: int | None = None
    negative_prompt: str | None = None

    @property
    def stem(self) -> str:
        """File stem of the item's video and manifest: its name, else the zero-padded index."""
        return self.name if self.name is not None else f"{self.index:05d}"

    def overrides(self) -> dict[str, Any]:
        """The flags this line sets (the caller merges them over the command line's)."""
        out: dict[str, Any] = {"prompt": self.prompt, "image": self.image}
        for flag in flags_where(per_video=(LINE,)):  # the seed is the caller's (`_fixed_seed`)
            if flag not in out and flag != "base_seed" and getattr(self, flag) is not None:
                out[flag] = getattr(self, flag)
        return out


def parse_shard(shard: str | None) -> tuple[int, int]:
    """`I/N` -> (I, N); None -> (0, 1), i.e. every item."""
    if shard is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UsageError(f"--shard {shard!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def take_shard(items: list[BatchItem], shard: tuple[int, int]) -> list[BatchItem]:
    i, n = shard
    return [item for item in items if item.index % n == i]


def summary_name(shard: tuple[int, int] | None) -> str:
    """`summary.json`, or one file per shard so array tasks sharing --out-dir never clobber each other."""
    if shard is None or shard == (0, 1):
        return "summary.json"
    return f"summary-shard-{shard[0]}-of-{shard[1]}.json"


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return True
    if path.suffix.lower() == ".txt":
        return False
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    return first.startswith("{")


def _check_name(name: str, where: str) -> None:
    if not _SAFE_NAME.match(name):
        raise UsageError(
            f"{where}: name {name!r} is not a safe file name: use letters, digits, '_', '-' or '.', "
            "start with a letter or digit, at most 128 characters"
        )
    if name.lower().endswith(".mp4"):
        raise UsageError(f"{where}: name {name!r}: give it without .mp4 (the video is NAME.mp4, the manifest NAME.json)")
    if _SHARD_SUMMARY.match(name):
        raise UsageError(f"{where}: name {name!r} is reserved for the batch summary; choose another")


def _item_from_json(text: str, index: int, line: int, base: Path, where: str) -> BatchItem:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}")
    loras = [k for k in ("lora", "lora_high", "lora_low") if k in obj]
    if loras:
        # LoRAs are merged into the weights at load time: a per-item set would reload the experts per item
        raise UsageError(f"{where}: field {loras[0]!r}: one LoRA set per batch (merged into the weights once); "
                         f"give --{loras[0].replace('_', '-')} on the batch command line and split the prompt file by LoRA")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    values: dict[str, Any] = {}
    for key, kind in FIELDS.items():
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UsageError(f"{where}: field {key!r} must be a {kind.__name__}, got {json.dumps(value)}")
        values[key] = value
    prompt = values.pop("prompt", None)
    if prompt is None or not prompt.strip():
        raise UsageError(f"{where}: no \"prompt\" (each line needs a non-empty prompt)")
    if "image" in values:
        image = Path(values["image"]).expanduser()
        values["image"] = image if image.is_absolute() else base / image
    if "name" in values:
        _check_name(values["name"], where)
    return BatchItem(index=index, line=line, prompt=prompt, **values)


def read_items(path: Path) -> list[BatchItem]:
    """Every item of a JSONL or plain-text prompt file; UsageError naming the first bad line.

    Relative `image` paths are relative to the prompt file's folder, so a file and its images
    move together (and work from any submit directory under Slurm).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompt file {path}: not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"prompt file {path}: not UTF-8 text") from None
    jsonl, base = _is_jsonl(path, lines), path.resolve().parent
    items: list[BatchItem] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where, index = f"{path.name} line {number}", len(items)
        if jsonl:
            items.append(_item_from_json(text, index, number, base, where))
        else:
            items.append(BatchItem(index=index, line=number, prompt=text.strip()))
    if not items:
        raise UsageError(f"prompt file {path}: no prompts in it")
    _check_unique(items, path.name)
    return items


def _check_unique(items: list[BatchItem], file_name: str) -> None:
    """Stems must differ even ignoring case (case-insensitive file systems) and across shards."""
    seen: dict[str, BatchItem] = {}
    for item in items:
        key = item.stem.casefold()
        if key in seen:
            raise UsageError(
                f"{file_name} line {item.line}: name {item.stem!r} is already used by line {seen[key].line} "
                "(names, and the zero-padded index of unnamed lines, must be unique)"
            )
        seen[key] = item
