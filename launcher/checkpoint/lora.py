"""LoRA files for Wan2.2, merged into the DiT weights while they load: no adapter runs per forward.

Formats, detected per key from the names alone (the key sets are those diffusers'
`WanLoraLoaderMixin.lora_state_dict` accepts, diffusers 0.42 `loaders/lora_pipeline.py` and
`loaders/lora_conversion_utils.py`):

- PEFT/diffusers keys with official `WanModel` module names, `diffusion_model.` prefix (also
  `model.diffusion_model.` or none, as Wan2.2-Lightning's own merge code reads them):
  `diffusion_model.blocks.N.self_attn.q.lora_A.weight` / `.lora_B.weight`, optional `.alpha`
  (`_convert_non_diffusers_wan_lora_to_diffusers`; `lora_down`/`lora_up` are accepted there too);
- the same with diffusers module names, `transformer.` prefix: `transformer.blocks.N.attn1.to_q.lora_A.weight`;
- kohya / musubi-tuner / ComfyUI: `lora_unet_blocks_N_self_attn_q.lora_down.weight` / `.lora_up.weight`
  / `.alpha`, dots of the official name written as underscores (`_convert_musubi_wan_lora_to_diffusers`);
- full-weight deltas `<module>.diff` (weight), `<module>.diff_b` (bias) and `blocks.N.diff_m`
  (`blocks.N.modulation`), as LightX2V's distill LoRAs carry for norms, biases, the head and the
  modulation tables (same converter; LightX2V `docs/EN/source/deploy_guides/lora_deploy.md` and its
  `tools/extract/lora_extractor.py`, which names `<key>.modulation` `<key>.diff_m`; a `.diff` may
  also name a bare parameter, e.g. `blocks.N.modulation.diff`).

Merge rule (every loader above, and Wan2.2-Lightning `wan/utils/utils.py::load_and_merge_lora_weight`):
`W += scale * alpha/rank * (B @ A)` with rank = rows of A (alpha defaults to rank: factor 1), and
`W += scale * diff`. Each patch is applied in float32 to the checkpoint tensor, in the order the
LoRAs were given. A patched source answers `get_slice(key, start, stop)` with `B[start:stop] @ A`,
so an FSDP2 rank merges only the rows it holds. Only safetensors are read: a pickle could run code.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from launcher.checkpoint.files import CheckpointError
from launcher.checkpoint.keymaps import wan_transformer_key_map
from launcher.checkpoint.sources import SafetensorsSource, TensorSource, WrappingSource, WeightFiles
from launcher.preflight import HeaderError, lora_header


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied: one line naming the file, exit 2, before the model loads."""


Kind = Literal["down", "up", "alpha", "diff", "diff_b", "diff_m"]
#: key suffix -> role (longest first so `.diff_b` is not read as `.diff`)
_SUFFIXES: tuple[tuple[str, Kind], ...] = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
    (".lora_up.weight", "up"), (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
_DIFFS = ("diff", "diff_b", "diff_m")
#: name prefix -> naming scheme of the module name that follows it
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "official"), ("diffusion_model.", "official"), ("transformer.", "diffusers"),
    ("lora_unet_", "kohya"), ("lora_transformer_", "kohya"),
)

# diffusers WanTransformer3DModel name -> official WanModel name (checked against diffusers' converter
# in `official_names`, so a rule that drifts is dropped rather than trusted)
_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    (r"attn1\.to_q", "self_attn.q"), (r"attn1\.to_k", "self_attn.k"), (r"attn1\.to_v", "self_attn.v"),
    (r"attn1\.to_out\.0", "self_attn.o"), (r"attn1\.norm_q", "self_attn.norm_q"), (r"attn1\.norm_k", "self_attn.norm_k"),
    (r"attn2\.to_q", "cross_attn.q"), (r"attn2\.to_k", "cross_attn.k"), (r"attn2\.to_v", "cross_attn.v"),
    (r"attn2\.to_out\.0", "cross_attn.o"), (r"attn2\.norm_q", "cross_attn.norm_q"), (r"attn2\.norm_k", "cross_attn.norm_k"),
    (r"attn2\.add_k_proj", "cross_attn.k_img"), (r"attn2\.add_v_proj", "cross_attn.v_img"),
    (r"attn2\.norm_added_k", "cross_attn.norm_k_img"),
    (r"ffn\.net\.0\.proj", "ffn.0"), (r"ffn\.net\.2", "ffn.2"), (r"norm2", "norm3"), (r"scale_shift_table", "modulation"),
)
_TOP_RULES: tuple[tuple[str, str], ...] = (
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"), (r"proj_out", "head.head"),
    (r"scale_shift_table", "head.modulation"), (r"patch_embedding", "patch_embedding"),
)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _official_guess(target: str) -> str | None:
    m = _BLOCK_RE.match(target)
    rules, rest, head = (_BLOCK_RULES, m.group(2), f"blocks.{m.group(1)}.") if m else (_TOP_RULES, target, "")
    for pattern, official in rules:
        hit = re.fullmatch(rf"{pattern}((?:\.[a-z_]+)?)", rest)
        if hit:
            return head + official + hit.group(1)
    return None


def official_names(target_keys: Iterable[str]) -> dict[str, str]:
    """Official `WanModel` parameter name -> our (diffusers) parameter name, for the keys given.

    Built backwards from our names, then kept only where diffusers' own official -> diffusers
    converter (`launcher.checkpoint.keymaps.wan_transformer_key_map`) gives the same pair back.
    """
    guesses = {g: t for t in target_keys if (g := _official_guess(t)) is not None}
    try:
        forward = wan_transformer_key_map(list(guesses))
    except ValueError:
        forward = {}
    return {g: t for g, t in guesses.items() if forward.get(g) == t}


@dataclass(frozen=True, slots=True)
class Patch:
    """One change to one model tensor: `factor * (up @ down)` or `factor * diff`."""

    file: Path
    kind: Literal["lowrank", "diff"]
    #: lowrank: the B (up) and A (down) keys in the file; diff: the delta's key (down None)
    up: str
    down: str | None
    factor: float


@dataclass(frozen=True, slots=True)
class LoraFileReport:
    """What the manifest records for one LoRA."""

    file: Path
    scale: float
    expert: str
    formats: tuple[str, ...]
    #: expert -> model tensors this LoRA changed
    touched: dict[str, int]

    def to_json(self, sha256: str | None = None) -> dict[str, Any]:
        return {"file": str(self.file), "sha256": sha256, "scale": self.scale, "expert": self.expert,
                "formats": list(self.formats), "touched": dict(self.touched),
                "weights_touched": sum(self.touched.values())}


@dataclass(frozen=True, slots=True)
class LoraPlan:
    """Every patch per expert and model tensor, resolved from the files' headers (no weight read)."""

    patches: dict[str, dict[str, list[Patch]]] = field(default_factory=dict)
    reports: tuple[LoraFileReport, ...] = ()

    def for_expert(self, expert: str) -> dict[str, list[Patch]]:
        return self.patches.get(expert, {})


# -- reading a file's header ------------------------------------------------------------------

def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) from a safetensors header; anything else is refused in one line."""
    try:
        return lora_header(path)
    except HeaderError as e:
        raise LoraError(str(e)) from None


def _source(path: Path, header: Mapping[str, tuple[str, tuple[int, ...]]]) -> SafetensorsSource:
    return SafetensorsSource(WeightFiles(kind="safetensors", locations={k: (path, k) for k in header},
                                         shapes={k: shape for k, (_, shape) in header.items()}))


# -- names -> our parameters ------------------------------------------------------------------

class _Names:
    """Resolves a LoRA module name in any of the schemes to one of our parameter names."""

    def __init__(self, target_keys: Iterable[str]) -> None:
        self.targets = set(target_keys)
        self.official = official_names(self.targets)
        underscored: dict[str, str | None] = {}
        for name, target in (*((t, t) for t in self.targets), *self.official.items()):
            key = name.replace(".", "_")
            underscored[key] = target if underscored.get(key, target) == target else None  # ambiguous: drop
        self.underscored = {k: v for k, v in underscored.items() if v is not None}

    def resolve(self, module: str, scheme: str, kind: Kind) -> tuple[str, str] | None:
        """(our parameter, naming scheme) for `module`'s weight (or bias for diff_b), else None."""
        suffixes = {"diff_b": (".bias",), "diff": (".weight", ""), "diff_m": (".modulation", ".scale_shift_table")
                    }.get(kind, (".weight",))
        for suffix in suffixes:
            name = module + suffix
            if scheme == "kohya":
                hit = self.underscored.get(name.replace(".", "_"))
                if hit is not None:
                    return hit, "kohya"
                continue
            if scheme in ("diffusers", "bare") and name in self.targets:
                return name, "peft-diffusers"
            if scheme in ("official", "bare") and name in self.official:
                return self.official[name], "peft-official"
        return None


def _split(key: str) -> tuple[str, str, Kind] | None:
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            for prefix, scheme in _PREFIXES:
                if module.startswith(prefix):
                    return module[len(prefix):], scheme, kind
            return module, "bare", kind
    return None


@dataclass
class _Entry:
    keys: dict[Kind, str] = field(default_factory=dict)


def _shape_error(path: Path, key: str, shape: Sequence[int], target: str, want: Sequence[int], what: str) -> LoraError:
    return LoraError(f"{path}: {key!r} has shape {list(shape)} but the model's {target!r} is {list(want)} ({what}); "
                     "this LoRA was trained for another Wan model")


def _resolve_file(path: Path, header: Mapping[str, tuple[str, tuple[int, ...]]], names: _Names,
                  task: str) -> tuple[dict[str, _Entry], set[str]]:
    """Our parameter -> the file's keys for it; raises on keys that match nothing."""
    entries: dict[str, _Entry] = {}
    formats: set[str] = set()
    unmatched: list[str] = []
    for key in header:
        parts = _split(key)
        hit = None if parts is None else names.resolve(parts[0], parts[1], parts[2])
        if hit is None:
            unmatched.append(key)
            continue
        target, fmt = hit
        kind: Kind = parts[2]
        if kind in _DIFFS:
            fmt, kind = "diff", "diff"  # one full delta per tensor, whichever suffix named it
        formats.add(fmt)
        slot = (target, "diff") if kind == "diff" else (target, "lowrank")
        entry = entries.setdefault(f"{slot[0]}\0{slot[1]}", _Entry())
        if kind in entry.keys:
            raise LoraError(f"{path}: keys {entry.keys[kind]!r} and {key!r} both change {target!r}; "
                            "the file mixes formats")
        entry.keys[kind] = key
    if unmatched:
        matched = len(header) - len(unmatched)
        what = "no key matches" if matched == 0 else f"{len(unmatched)} of {len(header)} keys match no"
        raise LoraError(f"{path}: {what} weight of the {task} DiT, e.g. {', '.join(unmatched[:3])}; "
                        "is it a LoRA for another model?")
    if not header:
        raise LoraError(f"{path}: the file holds no tensors; give a Wan2.2 LoRA")
    return entries, formats


def _patch_for(path: Path, slot: str, entry: _Entry, header: Mapping[str, tuple[str, tuple[int, ...]]],
               shapes: Mapping[str, tuple[int, ...]], scale: float, alphas: Mapping[str, float]) -> tuple[str, Patch]:
    target, kind = slot.split("\0")
    want = tuple(shapes[target])
    keys = entry.keys
    if kind == "diff":
        key = keys["diff"]
        if header[key][1] != want:
            raise _shape_error(path, key, header[key][1], target, want, "a full delta must match exactly")
        return target, Patch(file=path, kind="diff", up=key, down=None, factor=scale)
    if "down" not in keys or "up" not in keys:
        have, lack = ("down", "up") if "down" in keys else ("up", "down")
        raise LoraError(f"{path}: {keys.get(have) or keys.get('alpha')!r} has no matching {lack} (lora_B/lora_up "
                        "or lora_A/lora_down) matrix; the file is incomplete")
    down, up = header[keys["down"]][1], header[keys["up"]][1]
    rank = down[0] if down else 0
    in_features = math.prod(want[1:]) if len(want) > 1 else 0
    if len(want) < 2:
        raise _shape_error(path, keys["down"], down, target, want, "a low-rank pair needs a matrix")
    if len(up) < 2 or up[0] != want[0] or math.prod(up[2:]) != 1:
        raise _shape_error(path, keys["up"], up, target, want, f"lora_B must be [{want[0]}, rank]")
    if rank == 0 or up[1] != rank or math.prod(down[1:]) != in_features:
        raise _shape_error(path, keys["down"], down, target, want,
                           f"lora_A must be [{up[1]}, {in_features}] for lora_B {list(up)}")
    alpha = alphas.get(keys["alpha"], float(rank)) if "alpha" in keys else float(rank)
    return target, Patch(file=path, kind="lowrank", up=keys["up"], down=keys["down"], factor=scale * (alpha / rank))


def _read_alphas(path: Path, header: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, float]:
    keys = [k for k in header if k.endswith(".alpha")]
    if not keys:
        return {}
    with _source(path, header) as src:
        out = {}
        for k in keys:
            value = src.get(k)
            if value.numel() != 1:
                raise LoraError(f"{path}: {k!r} has shape {list(value.shape)}; an alpha is one number")
            out[k] = float(value.float().item())
        return out


def plan_loras(specs: Sequence[Any], experts: Mapping[str, Mapping[str, tuple[int, ...]]], task: str) -> LoraPlan:
    """Resolve every LoRA (`config.LoraSpec`s) against each expert's tensor shapes, reading headers only.

    `experts`: expert name -> our parameter name -> shape (`CheckpointInfo.transformer_weights[e].shapes`).
    Raises `LoraError` (exit 2) naming the file on the first problem.
    """
    patches: dict[str, dict[str, list[Patch]]] = {e: {} for e in experts}
    reports: list[LoraFileReport] = []
    names_by_expert = {e: _Names(shapes) for e, shapes in experts.items()}
    for spec in specs:
        path = Path(spec.path)
        targets = [e for e in experts if spec.applies_to(e)]
        if not targets:
            raise LoraError(f"{spec.flag} {path}: {task} has no {spec.expert}-noise expert; use --lora")
        header = read_header(path)
        alphas = _read_alphas(path, header)
        touched: dict[str, int] = {}
        formats: set[str] = set()
        for expert in targets:
            shapes = experts[expert]
            entries, fmts = _resolve_file(path, header, names_by_expert[expert], task)
            formats |= fmts
            for slot, entry in entries.items():
                target, patch = _patch_for(path, slot, entry, header, shapes, spec.scale, alphas)
                patches[expert].setdefault(target, []).append(patch)
            touched[expert] = len({slot.split("\0")[0] for slot in entries})
        reports.append(LoraFileReport(file=path, scale=spec.scale, expert=spec.expert,
                                      formats=tuple(sorted(formats)), touched=touched))
    return LoraPlan(patches={e: p for e, p in patches.items() if p}, reports=tuple(reports))


# -- merging while loading --------------------------------------------------------------------

class LoraSource(WrappingSource):
    """A tensor source whose patched tensors come back merged (float32); rows merge only the rows asked."""

    def __init__(self, base: TensorSource, patches: Mapping[str, list[Patch]]) -> None:
        super().__init__(base)
        self._patches = patches
        self._files: dict[Path, SafetensorsSource] = {}

    def close(self) -> None:
        for src in self._files.values():
            src.close()
        self._files.clear()

    def quantized_rows(self, key: str, start: int | None, stop: int | None, mode: str):
        """A pre-quantized weight no LoRA touches passes through as stored (quant.source); a merged one
        is quantized again from its merged float32 rows."""
        stored = getattr(self._base, "quantized_rows", None)
        return None if key in self._patches or stored is None else stored(key, start, stop, mode)

    def _file(self, path: Path) -> SafetensorsSource:
        if path not in self._files:
            self._files[path] = _source(path, read_header(path))
        return self._files[path]

    def _merged(self, key: str, value: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        patches = self._patches.get(key)
        if not patches:
            return value
        out = value.float()
        for p in patches:
            src = self._file(p.file)
            up = src.get(p.up) if rows is None else src.get_slice(p.up, *rows)
            if p.kind == "diff":
                out = out + p.factor * up.float()
                continue
            down = src.get(p.down).float()
            delta = up.float().reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            out = out + p.factor * delta.reshape(out.shape)
        return out

    def get(self, key: str) -> torch.Tensor:
        return self._merged(key, self._base.get(key), None)

    def get_slice(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._merged(key, self._base.get_slice(key, start, stop), (start, stop))


def with_loras(source: TensorSource, plan: LoraPlan | None, expert: str) -> TensorSource:
    """`source` itself when no LoRA touches this expert, else the merging wrapper."""
    patches = plan.for_expert(expert) if plan is not None else {}
    return LoraSource(source, patches) if patches else source
