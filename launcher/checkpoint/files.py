"""Reading checkpoint files without reading weights, and the one error type for a bad checkpoint.

Every failure becomes a `CheckpointError` whose one-line message names the file and says what to
do, so the CLI can print it and exit 2 before anything heavy happens.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from launcher.errors import InputError
from launcher.preflight import check_pth_whole
from launcher.safetensors_header import NotSafetensors, read_header
from launcher.checkpoint.keymaps import KeyMapError
from launcher.checkpoint.sources import WeightFiles, load_pth_state_dict

#: file key -> (file, shape)
StoredTensors = dict[str, tuple[Path, tuple[int, ...]]]


class CheckpointError(InputError):
    """The checkpoint is missing, corrupt, unsafe or of another task; the message says what to do.

    An InputError, so the CLI prints its one line and exits 2 wherever it is raised.
    """


def require_dir(path: Path, what: str, todo: str) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path}: {what} not found; {todo}")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found; download the complete checkpoint or fix --ckpt_dir")
    return path


def read_json(path: Path) -> dict[str, Any]:
    require_file(path, path.name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({type(e).__name__}); re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object; re-download it")
    return data


def _read_shard(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        return read_header(path).shapes()
    except (NotSafetensors, OSError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: unreadable safetensors ({detail}); the file is truncated or corrupt, "
                              "re-download it") from None


def read_safetensors(folder: Path, stem: str) -> StoredTensors:
    """Headers of `<stem>.safetensors`, or of every shard named by `<stem>.safetensors.index.json`."""
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map; re-download the checkpoint")
        stored: StoredTensors = {}
        for name in sorted(set(weight_map.values())):
            shard = folder / name
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {index.name} is missing; download the missing shard")
            for key, shape in _read_shard(shard).items():
                stored[key] = (shard, shape)
        for key, name in weight_map.items():
            if key not in stored or stored[key][0].name != name:
                raise CheckpointError(f"{folder / name}: tensor {key!r} listed in {index.name} is not in that shard; "
                                      "re-download the checkpoint")
        return stored
    if single.is_file():
        return {k: (single, shape) for k, shape in _read_shard(single).items()}
    raise CheckpointError(f"{single}: not found (nor {index.name}); download the complete checkpoint or fix --ckpt_dir")


def read_pth(path: Path) -> StoredTensors:
    """Shapes of a `.pth` state dict, loaded mmap + weights_only: a pickle that would run code is refused."""
    require_file(path, path.name)
    check_pth_whole(path)
    try:
        state = load_pth_state_dict(path)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad or unsafe pickles
        detail = str(e).splitlines()[0].split(". ")[0][:120] if str(e) else type(e).__name__  # whole words
        raise CheckpointError(f"{path}: not a plain tensor state dict loadable with weights_only=True ({detail}); "
                              "refusing to unpickle it, re-download the file from the official source") from None
    return {k: (path, tuple(v.shape)) for k, v in state.items()}


def check_tokenizer_dir(path: Path) -> Path:
    require_dir(path, "tokenizer folder", "download the complete checkpoint or fix --ckpt_dir")
    markers = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
    if not any((path / m).is_file() for m in markers):
        raise CheckpointError(f"{path}: tokenizer folder has none of {', '.join(markers)}; "
                              "download the complete checkpoint")
    return path


def weight_files(kind: str, stored: StoredTensors, key_map: Mapping[str, str] | None, what: Path) -> WeightFiles:
    """Header facts under target names; `key_map` None means the file already uses target names."""
    try:
        names = {k: (key_map[k] if key_map is not None else k) for k in stored}
    except KeyError as e:
        raise CheckpointError(f"{what}: no target for key {e.args[0]!r}; re-download the checkpoint") from None
    return WeightFiles(
        kind=kind,  # type: ignore[arg-type]
        locations={names[k]: (path, k) for k, (path, _) in stored.items()},
        shapes={names[k]: shape for k, (_, shape) in stored.items()},
    )


def mapped(mapper: Callable[[list[str]], dict[str, str]], keys: list[str], what: Path) -> dict[str, str]:
    """Apply a `launcher.checkpoint.keymaps` function, turning its error into a `CheckpointError` naming the file."""
    try:
        return mapper(keys)
    except KeyMapError as e:
        raise CheckpointError(f"{what}: {e}") from None
