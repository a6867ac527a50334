"""The --quantize flags, parsed: which mode, steps, blocks and experts (torch-free, so the flags are
checked with the rest before torch is imported; `launcher.wan.quantize` applies them to a model)."""
from __future__ import annotations

from dataclasses import dataclass

#: the 8-bit modes `quant.linear` runs (it checks this list against its own)
MODES: tuple[str, ...] = ("fp8", "int8")
QUANTIZE_CHOICES = ("none", *MODES)
EXPERT_CHOICES = ("both", "high", "low")


class QuantizeSpecError(ValueError):
    """A malformed --quantize-* value; the message names the flag and a valid example."""


def parse_slice(text: str, flag: str) -> tuple[int | None, int | None]:
    """'A:B' (either side may be empty, negatives count from the end) -> (start, stop)."""
    parts = str(text).replace(" ", "").split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p else None for p in parts)
    except ValueError:
        raise QuantizeSpecError(f"{flag} {text!r}: give START:STOP like a Python slice, e.g. 2:-2 or : "
                                "(all)") from None
    return start, stop


def slice_indices(bounds: tuple[int | None, int | None], count: int) -> range:
    return range(count)[slice(*bounds)]


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """--quantize, --quantize-steps, --quantize-blocks, --quantize-experts, parsed."""

    mode: str = "none"
    steps: tuple[int | None, int | None] = (None, None)
    blocks: tuple[int | None, int | None] = (None, None)
    experts: str = "both"

    @classmethod
    def from_flags(cls, mode: str, steps: str, blocks: str, experts: str, task_experts: tuple[str, ...]) -> "QuantSpec":
        if mode not in QUANTIZE_CHOICES:
            raise QuantizeSpecError(f"--quantize {mode!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
        if experts not in EXPERT_CHOICES:
            raise QuantizeSpecError(f"--quantize-experts {experts!r}: choose one of {', '.join(EXPERT_CHOICES)}")
        if experts != "both" and experts not in task_experts:
            raise QuantizeSpecError(f"--quantize-experts {experts}: this task has one expert; use both")
        return cls(mode=mode, steps=parse_slice(steps, "--quantize-steps"),
                   blocks=parse_slice(blocks, "--quantize-blocks"), experts=experts)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def quantizes_expert(self, expert: str) -> bool:
        return self.enabled and self.experts in ("both", expert)

    def quantized_blocks(self, num_blocks: int) -> range:
        return slice_indices(self.blocks, num_blocks)

    def low_steps(self, steps: int) -> range:
        return slice_indices(self.steps, steps)

    @property
    def all_steps(self) -> bool:
        return self.steps == (None, None)

    def describe(self) -> dict[str, object]:
        """For the manifest: the flags as given, slices as text."""
        fmt = lambda b: f"{'' if b[0] is None else b[0]}:{'' if b[1] is None else b[1]}"  # noqa: E731
        return {"quantize": self.mode, "steps": fmt(self.steps), "blocks": fmt(self.blocks), "experts": self.experts}
