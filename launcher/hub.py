"""`--ckpt_dir Wan-AI/Wan2.2-T2V-A14B`: a Hugging Face Hub repository name -> its local snapshot folder.

A folder that exists is used as it is. A name shaped `owner/repo` that is not a folder resolves
through huggingface_hub in the local Hub cache (HF_HOME / HF_HUB_CACHE; `refs/<revision>` ->
`snapshots/<commit>/`), and only with `--download` (network allowed) fetches what is missing:
only the files the task reads (`allow_patterns`, not the repo's other assets), with
huggingface_hub's progress bars. Nothing found: one line naming the repo, revision and cache path.
"""
from __future__ import annotations

import re
from pathlib import Path

from launcher.errors import InputError
from launcher.wan.tasks import TaskSpec

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(value: str | Path) -> bool:
    """`owner/name` and no such folder here."""
    text = str(value)
    return bool(_REPO_ID.match(text)) and not Path(text).exists()


def needed_files(task: TaskSpec, repo_id: str) -> list[str]:
    """The allow_patterns of what `inspect_checkpoint` and the loaders read for `task`."""
    if repo_id.endswith("-Diffusers"):
        return ["model_index.json", "transformer/*", "transformer_2/*", "text_encoder/*", "tokenizer/*", "vae/*",
                "scheduler/*"]
    experts = [f"{folder}/*" for folder in task.expert_folders.values() if folder]
    root = ["config.json", "*.safetensors", "*.safetensors.index.json"] if "" in task.expert_folders.values() else []
    return [*experts, *root, task.t5_checkpoint, task.vae_checkpoint, "google/umt5-xxl/*"]


def resolve_ckpt_dir(value: str | Path, task: TaskSpec, *, download: bool = False, revision: str | None = None) -> Path:
    """The checkpoint folder `value` names (a folder, or a Hub repository in the local cache)."""
    if not is_repo_id(value):
        return Path(value)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id = str(value)
    wanted = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=needed_files(task, repo_id),
                                      local_files_only=not download))
    except LocalEntryNotFoundError:
        how = ("the network is off (HF_HUB_OFFLINE) or unreachable" if download
               else "add --download to fetch it")
        raise InputError(f"--ckpt_dir {wanted}: not in the Hub cache {constants.HF_HUB_CACHE}; {how} "
                         f"(or give the checkpoint folder)") from None
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"--ckpt_dir {wanted}: the Hub refused ({first})") from None
