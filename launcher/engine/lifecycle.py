"""The one lifecycle of every command that loads the model: generate, calibrate, batch, sweep, serve.

`open_engine(config)` is the one constructor (vLLM's `LLMEngine.from_engine_args` is the pattern),
in a fixed order on every rank: inspect the checkpoint and resolve every LoRA from its header (a
bad one exits 2 before any rendezvous) -> the World (`open_world`: layout checks, process group,
always torn down) -> the caller's work, which asks the Engine for its session. What this rank is
doing is tracked as it goes, so a dead or silent peer ends the run with one line naming that
stage instead of a C++ traceback (exit 1; the launcher names the dead rank).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.config import RunConfig, run_config_from_flags
from launcher.wan.tasks import TASKS

if TYPE_CHECKING:
    from launcher.checkpoint import CheckpointInfo
    from launcher.checkpoint.lora import LoraPlan
    from launcher.engine.session import GenerationSession
    from launcher.engine.world import World


@dataclass(slots=True)
class Engine:
    """A started run: its checkpoint, its LoRAs, its World, and where this rank is (`stage`)."""

    config: RunConfig
    info: "CheckpointInfo"
    loras: "LoraPlan"
    world: "World"
    #: what this rank is doing now, for the dead-peer message ("while generating")
    stage: str = "while joining the other ranks"
    _session: "GenerationSession | None" = field(default=None, repr=False)

    def session(self) -> "GenerationSession":
        """The loaded models (loaded on first use, once): every request of this run goes through it."""
        if self._session is None:
            from launcher.engine.session import GenerationSession

            self.stage = "while loading the model"
            self._session = GenerationSession(self.config, self.info, self.world, loras=self.loras)
        return self._session

    def at(self, stage: str) -> None:
        """Say what this rank does next (`while generating`, `while serving`...)."""
        self.stage = stage

    def close_session(self) -> None:
        """Drop the models before the World's teardown (their groups must go first)."""
        self._session = None


@dataclass(frozen=True, slots=True)
class Inputs:
    """What a run reads before its World starts: the checkpoint's description and the LoRAs' plan."""

    info: "CheckpointInfo"
    loras: "LoraPlan"


def probe_config(flags: dict[str, Any]) -> RunConfig:
    """The command line of a many-video command (batch, sweep, serve) checked alone, before its
    items or requests are known, so a bad flag is one exit 2, not N failures."""
    from launcher.planner.schedule import resolve_config

    spec = TASKS.get(flags.get("task", ""))
    stand_in = Path("image-from-the-prompt-file.png") if spec is not None and spec.image == "required" else None
    return resolve_config(run_config_from_flags(dict(flags, prompt="(batch)", image=stand_in), check_paths=False))


def check_inputs(config: RunConfig) -> Inputs:
    """The checkpoint inspected (no weights read) and every LoRA resolved from its header: bad
    input exits 2 here, on every rank alike, before any rendezvous."""
    from launcher.checkpoint import inspect_checkpoint
    from launcher.checkpoint.lora import plan_loras

    info = inspect_checkpoint(config.ckpt_dir, config.task)
    loras = plan_loras(config.loras, {e: info.transformer_weights[e].shapes for e in config.task.experts},
                       config.task.name)
    return Inputs(info=info, loras=loras)


@contextlib.contextmanager
def open_engine(config: RunConfig, *, data_parallel: bool = False, inputs: Inputs | None = None) -> Iterator[Engine]:
    """Inputs checked, World joined, always torn down; a dead peer becomes one line with its stage.

    `data_parallel`: spare ranks become replicas (batch, sweep, serve) instead of an error.
    `inputs`: `check_inputs(config)` when the caller ran it earlier (before its own checks).
    """
    from launcher.engine.world import open_world
    from launcher.errors import peer_lost

    inputs = inputs if inputs is not None else check_inputs(config)
    engine: Engine | None = None
    try:
        with open_world(config, num_heads=inputs.info.num_heads, allow_data_parallel=data_parallel) as world:
            engine = Engine(config=config, info=inputs.info, loras=inputs.loras, world=world)
            try:
                yield engine
            finally:
                engine.close_session()
    except Exception as e:
        lost = peer_lost(e, engine.stage if engine is not None else "while joining the other ranks")
        if lost is None:
            raise
        raise lost from None
