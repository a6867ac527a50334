"""`magcache-launch quantize`: write a quantized copy of a checkpoint once, so later loads skip the work.

The copy keeps the source's layout: every file but the DiT weights is hard-linked (copied across
file systems), and each expert's DiT becomes one `diffusion_pytorch_model.safetensors` with the
scheduled linears as 8-bit `weight` plus a per-output-channel float32 `weight_scale` (the tensors
keep the source's names; `launcher.checkpoint.quantized` reads them back as stored). LoRAs given
are merged before quantizing. `quantization.json` records the quantization, the block and expert
schedule, the LoRAs and the sha256 of every source file read and every file written.
`--quantize-steps` is a run-time choice (the dequantized weights serve high-precision steps) and is
not baked in.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from launcher.checkpoint import CheckpointInfo
from launcher.checkpoint.load import build_transformer_on_meta, transformer_source
from launcher.checkpoint.lora import LoraPlan, with_loras
from launcher.config import UsageError
from launcher.outputs.atomic import sha256_of
from launcher.wan.quantize import QuantSpec, quantized_linears
from quant.source import quantizing, scale_key

DIT_FILE = "diffusion_pytorch_model.safetensors"


def _dit_files(info: CheckpointInfo) -> set[Path]:
    """Every file holding DiT weights (shards, index, pre-quantized scales), resolved."""
    out: set[Path] = set()
    for expert, weights in info.transformer_weights.items():
        out.update(p.resolve() for p in weights.files)
        pre = info.prequantized.get(expert)
        if pre is not None:
            out.update(p.resolve() for p in pre.scales.files)
        folder = weights.files[0].parent
        out.update(p.resolve() for p in folder.glob("diffusion_pytorch_model*.safetensors*"))
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_quantized_checkpoint(info: CheckpointInfo, spec: QuantSpec, out: Path, *,
                               loras: LoraPlan | None = None, lora_records: list[dict[str, Any]] | None = None,
                               overwrite: bool = False) -> dict[str, Any]:
    """Write the quantized copy of `info` to `out`; returns the manifest written as quantization.json."""
    if not spec.enabled:
        raise UsageError("quantize: give --quantize fp8 or --quantize int8")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite or choose another folder")
    if out.resolve() == info.root.resolve():
        raise UsageError(f"--out {out} is the source checkpoint; choose another folder")
    root = info.root
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    dit_files = _dit_files(info)
    sources: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if path.resolve() in dit_files:
            sources[str(rel)] = sha256_of(path)
            continue
        _link_or_copy(path, partial / rel)
    written: dict[str, str] = {}
    counts: dict[str, int] = {}
    for expert, weights in info.transformer_weights.items():
        targets = {f"{n}.weight": spec.mode
                   for n in quantized_linears(build_transformer_on_meta(info, expert), spec, expert)}
        counts[expert] = len(targets)
        stored_name = {key: stored for key, (_, stored) in weights.locations.items()}
        tensors = {}
        with quantizing(with_loras(transformer_source(info, expert), loras, expert), targets) as source:
            for key in source.keys():
                name = stored_name.get(key) or scale_key(stored_name[key[: -len("_scale")]])
                tensors[name] = source.get(key).contiguous()
        rel = weights.files[0].parent.relative_to(root) / DIT_FILE
        (partial / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, partial / rel, metadata={"quantization": spec.mode, "producer": "magcache-launch"})
        written[str(rel)] = sha256_of(partial / rel)
    manifest = {**spec.describe(), "steps": "chosen at run time (--quantize-steps)", "layout": info.layout,
                "task": info.task, "quantized_linears": counts, "loras": lora_records or [],
                "source": {"dir": str(root), "files": sources}, "written": written}
    (partial / "quantization.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return manifest
