"""`plan --gpus N --dry-run`: the launcher's own launch path at real size, with no GPU and no weights.

How, without a GPU (torchtitan's memory estimator does the same for training):
- Tensors are FakeTensors (`torch._subclasses.FakeTensorMode`): sizes, no data. The meta device is the
  GPU (placement and memory policy are those of a CUDA rank, with "meta" where "cuda:N" would be) and
  "cpu" is host memory. Not fake "cuda": a CPU build of torch cannot index one from Python (its
  getitem takes a CUDA DeviceGuard). What meta lacks is supplied here: autocast (`_Autocast`, with
  CUDA autocast's casts applied op by op), a device module for FSDP2 and DeviceMesh, the fake
  backend for meta tensors, FSDP2 adopting loaded meta shards (`_reset_sharded_param_on_meta`).
- The process group is torch's fake backend (`FakeStore`, backend "fake"): every collective returns
  at once; ranks are simulated one role at a time, so 8 ranks cost what the distinct roles cost.
  Every group the code asks for (gloo twins included) is made on that backend.
- Module skeletons built on meta before loading (and FSDP2's wrapping of them) are not counted: a
  real run's cost nothing either.
- Weights come from the checkpoint's shapes (a real folder's headers, or the official dimensions
  below for `--task` alone) through `ShapeSource`: `torch.empty` in the stored dtype.
- `_Allocations`, a TorchDispatchMode, sees every tensor an op creates and follows its storage
  until it dies: live bytes per place (device, host pageable, host pinned) and kind (weights,
  activations, communication buffers), and each phase's peak.

Attention: the dry run prices FlashAttention (torch SDPA's flash backend, which is also what the
flash-attn package allocates): the output plus a float32 log-sum-exp per query and head, no
[S, S] matrix. A CPU build of torch would pick SDPA's math backend, which materialises the score
matrix (hundreds of GiB at 720P) and is never what a CUDA run of bf16 attention uses; the dry run
calls SDPA's flash kernel for half inputs and its memory-efficient kernel for float32 ones (the VAE's
attention), as CUDA picks them (`_fused_attention`). cuDNN SDPA and FA3 keep the same O(S) outputs;
their small internal workspaces are not modelled.

Not modelled: the CUDA caching allocator's rounding and fragmentation (allocated bytes, like
`torch.cuda.max_memory_allocated`, not reserved), the CUDA context (~0.5 GiB per process), NCCL's
own buffers, and Python/host process memory beyond the tensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from launcher.checkpoint import CheckpointInfo
from launcher.checkpoint.sources import WeightFiles
from launcher.config import RunConfig
from launcher.wan.tasks import TaskSpec

PHASES = ("load", "encode", "denoise-high", "denoise-low", "denoise", "decode")
PLACES = ("device", "pageable", "pinned")
KINDS = ("weights", "activations", "comm")

#: the official checkpoints' WanModel config.json (Wan2.2 @ 42bf4cf; shared/reference/official_wanmodel_*.json)
OFFICIAL_DIT = {
    "t2v-A14B": {"dim": 5120, "ffn_dim": 13824, "freq_dim": 256, "in_dim": 16, "out_dim": 16, "num_heads": 40,
                 "num_layers": 40, "eps": 1e-6},
    "i2v-A14B": {"dim": 5120, "ffn_dim": 13824, "freq_dim": 256, "in_dim": 36, "out_dim": 16, "num_heads": 40,
                 "num_layers": 40, "eps": 1e-6},
    "ti2v-5B": {"dim": 3072, "ffn_dim": 14336, "freq_dim": 256, "in_dim": 48, "out_dim": 48, "num_heads": 24,
                "num_layers": 30, "eps": 1e-6},
}
#: umt5-xxl encoder shapes of `models_t5_umt5-xxl-enc-bf16.pth` (official_t5_umt5_xxl_encoder.json)
OFFICIAL_T5_SHAPES = {"token_embedding.weight": (256384, 4096), "blocks.0.pos_embedding.embedding.weight": (32, 64),
                      "blocks.0.attn.q.weight": (4096, 4096), "blocks.0.ffn.fc1.weight": (10240, 4096),
                      **{f"blocks.{i}.norm1.weight": (4096,) for i in range(24)}}
#: Wan VAE .pth shapes that decide its config: base dim, z dim, decoder dim (official_wan2{1,2}_vae.json)
OFFICIAL_VAE_SHAPES = {
    "2.1": {"encoder.conv1.weight": (96, 3, 3, 3, 3), "conv2.weight": (16, 16, 1, 1, 1),
            "decoder.head.2.weight": (3, 96, 3, 3, 3)},
    "2.2": {"encoder.conv1.weight": (160, 12, 3, 3, 3), "conv2.weight": (48, 48, 1, 1, 1),
            "decoder.head.2.weight": (12, 256, 3, 3, 3)},
}
#: dtypes of the official files (DiT safetensors float32, T5 .pth bfloat16, VAE .pth float32): what a read allocates
STORED_DTYPES = {"dit": torch.float32, "t5": torch.bfloat16, "vae": torch.float32}


# --------------------------------------------------------------------------- the checkpoint, shapes only

def _module_shapes(build) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shapes_only(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> WeightFiles:
    return WeightFiles(kind="shapes", locations={}, shapes=shapes, stored_dtype=dtype)


def task_checkpoint(task: TaskSpec) -> CheckpointInfo:
    """The official checkpoint of `task` as `inspect_checkpoint` would describe it, from the official
    dimensions alone; configs go through the same converters as a real official folder."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from launcher.checkpoint.layouts import official_dit_config, official_t5_config, official_vae_config

    here = Path(f"<official {task.name} dimensions>")
    dims = OFFICIAL_DIT[task.name]
    dit = official_dit_config(dims, {"text_embedding.0.weight": (dims["dim"], 4096),
                                     "patch_embedding.weight": (dims["dim"], dims["in_dim"], *task.patch_size)}, here)
    t5 = official_t5_config(OFFICIAL_T5_SHAPES, here)
    vae = official_vae_config(OFFICIAL_VAE_SHAPES[task.vae_version], task.vae_version, here)
    dit_shapes = _module_shapes(lambda: WanTransformer3DModel.from_config(dit))
    t5_shapes = _module_shapes(lambda: UMT5EncoderModel(UMT5Config(**t5)))
    vae_shapes = _module_shapes(lambda: AutoencoderKLWan.from_config(vae))
    return CheckpointInfo(
        root=here, layout="official", task=task.name,
        transformer_configs={e: dit for e in task.experts},
        transformer_weights={e: _shapes_only(dit_shapes, STORED_DTYPES["dit"]) for e in task.experts},
        num_heads=dims["num_heads"], in_channels=dims["in_dim"], out_channels=dims["out_dim"],
        t5_config=t5, t5_weights=_shapes_only(t5_shapes, STORED_DTYPES["t5"]),
        vae_version=task.vae_version, vae_config=vae, vae_weights=_shapes_only(vae_shapes, STORED_DTYPES["vae"]),
        tokenizer_dir=here,
    )


def shapes_of(info: CheckpointInfo) -> CheckpointInfo:
    """A real checkpoint's description with every weight answered from its header's shapes (nothing read)."""
    def only(w: WeightFiles, part: str) -> WeightFiles:
        return _shapes_only(dict(w.shapes), STORED_DTYPES[part])

    from launcher.checkpoint.keymaps import T5_TIED_ALIASES

    t5 = dict(info.t5_weights.shapes)
    t5.update({alias: t5[real] for alias, real in T5_TIED_ALIASES.items() if real in t5})
    return dataclasses.replace(
        info, transformer_weights={e: only(w, "dit") for e, w in info.transformer_weights.items()},
        t5_weights=_shapes_only(t5, STORED_DTYPES["t5"]), vae_weights=only(info.vae_weights, "vae"))


# --------------------------------------------------------------------------- allocations

def pinned_bytes(nbytes: int) -> int:
    """Host bytes one `Tensor.pin_memory()` takes: torch's CachingHostAllocator rounds each block up to a
    power of two (`pinned_max_round_threshold` unset). The dry run prices whatever pins: this is the
    allocator's rule, applied to every `aten._pin_memory` the code issues."""
    return 1 << max(0, math.ceil(math.log2(max(nbytes, 1))))


_COLLECTIVE_KIND = {
    "alltoall_base_": "all_to_all", "alltoall_": "all_to_all", "all_to_all_single": "all_to_all",
    "allgather_": "all_gather", "_allgather_base_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "allreduce_": "all_reduce", "all_reduce": "all_reduce", "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter", "broadcast_": "broadcast", "send": "send", "recv_": "recv",
    "gather_": "gather", "scatter_": "scatter",
}


@dataclasses.dataclass
class _Storage:
    place: str
    nbytes: int
    kind: str


_aten = torch.ops.aten
#: CUDA autocast's lower-precision ops as they reach dispatch (linear/matmul arrive as mm/addmm/bmm)
_LOWER_PRECISION = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
                    _aten.convolution.default, _aten._scaled_dot_product_flash_attention.default}
#: CUDA autocast's float32 ops (a half input is computed, and returned, in float32)
_FLOAT32 = {_aten.native_layer_norm.default, _aten.native_group_norm.default, _aten._softmax.default,
            _aten._log_softmax.default, _aten.pow.Tensor_Scalar, _aten.rsqrt.default, _aten.exp.default,
            _aten.log.default, _aten.sum.dim_IntList, _aten.mean.dim}


class _Allocations(TorchDispatchMode):
    """Live bytes per (place, kind), each phase's peaks, and bytes per collective kind; sees every op."""

    #: (enabled, dtype) of the meta autocast regions entered, innermost last (`_Autocast`)
    autocast: list[tuple[bool, torch.dtype | None]] = []

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, _Storage] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.totals = {(p, k): 0 for p in PLACES for k in KINDS}
        self.kind = "activations"
        self.phase = "setup"
        self.peaks: dict[str, dict[str, Any]] = {}
        self.collectives: dict[str, dict[str, int]] = {}
        #: building modules on meta (their skeletons hold no memory on a real run either): nothing counted
        self.paused = False
        #: storage id -> (shape, dtype, device, phase) of its first tensor, when debugging
        self.debug: dict[int, tuple] | None = None

    # -- bookkeeping
    def _place_total(self, place: str) -> int:
        return sum(self.totals[(place, k)] for k in KINDS)

    def _add(self, st: torch.UntypedStorage, place: str, nbytes: int, kind: str) -> None:
        key = id(st)
        if key in self.live:
            old = self.live[key]
            self.totals[(old.place, old.kind)] -= old.nbytes
            old.nbytes, old.place = nbytes, place
            self.totals[(old.place, old.kind)] += nbytes
            return
        self.live[key] = _Storage(place, nbytes, kind)
        self.totals[(place, kind)] += nbytes

        def gone(_ref: object, key: int = key) -> None:
            entry = self.live.pop(key, None)
            self._refs.pop(key, None)
            if entry is not None:
                self.totals[(entry.place, entry.kind)] -= entry.nbytes

        self._refs[key] = weakref.ref(st, gone)

    def retag(self, t: torch.Tensor, kind: str, *, only_from: str | None = None) -> None:
        t = getattr(t, "_local_tensor", t)  # a DTensor's shard
        entry = self.live.get(id(t.untyped_storage()))
        if entry is None or (only_from is not None and entry.kind != only_from) or entry.kind == kind:
            return
        self.totals[(entry.place, entry.kind)] -= entry.nbytes
        entry.kind = kind
        self.totals[(entry.place, entry.kind)] += entry.nbytes

    def mark_weights(self, modules) -> None:
        for module in modules:
            for t in (*module.parameters(), *module.buffers()):
                self.retag(t, "weights")

    def pin_in_place(self, t: torch.Tensor) -> int:
        """`residency.register_in_place` in the dry run: the storage becomes pinned, its bytes unchanged
        (cudaHostRegister pins what is there, no copy and no rounding); returns them as the real one does."""
        st = t.untyped_storage()
        entry = self.live.get(id(st))
        if entry is not None:
            self._add(st, "pinned", entry.nbytes, entry.kind)
            self._update_peaks()
        return st.nbytes()

    def resized(self, st: torch.UntypedStorage) -> None:
        entry = self.live.get(id(st))
        if entry is not None:
            self.totals[(entry.place, entry.kind)] += st.nbytes() - entry.nbytes
            entry.nbytes = st.nbytes()
            self._update_peaks()

    def uncounted(self, fn):
        """`fn` with nothing it allocates counted: the meta skeletons a real run builds before loading."""
        def call(*args, **kwargs):
            saved, self.paused = self.paused, True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = saved

        return call

    @contextlib.contextmanager
    def empty_weights(self) -> Iterator[None]:
        """accelerate's `init_empty_weights`, uncounted (a module built on meta, filled later)."""
        from accelerate import init_empty_weights

        saved, self.paused = self.paused, True
        try:
            with init_empty_weights():
                yield
        finally:
            self.paused = saved

    @contextlib.contextmanager
    def counting_as(self, kind: str) -> Iterator[None]:
        saved, self.kind = self.kind, kind
        try:
            yield
        finally:
            self.kind = saved

    def largest(self, place: str, n: int = 8) -> list[tuple]:
        """The n largest live storages of a place (debugging a peak)."""
        rows = sorted(((e.nbytes, e.kind, (self.debug or {}).get(k)) for k, e in self.live.items() if e.place == place),
                      key=lambda r: -r[0])
        return rows[:n]

    def start(self, phase: str) -> None:
        self.phase = phase
        self.peaks[phase] = self._snapshot()
        self.collectives.setdefault(phase, {})

    def _snapshot(self) -> dict[str, Any]:
        return {"device": self._place_total("device"),
                "device_by_kind": {k: self.totals[("device", k)] for k in KINDS},
                "host_pageable": self._place_total("pageable"), "host_pinned": self._place_total("pinned")}

    def _update_peaks(self) -> None:
        peak = self.peaks.get(self.phase)
        if peak is None:
            return
        device = self._place_total("device")
        if device > peak["device"]:
            peak["device"] = device
            peak["device_by_kind"] = {k: self.totals[("device", k)] for k in KINDS}
        peak["host_pageable"] = max(peak["host_pageable"], self._place_total("pageable"))
        peak["host_pinned"] = max(peak["host_pinned"], self._place_total("pinned"))

    # -- the dispatch hook
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func is torch.ops.aten._fused_sdp_choice.default:
            from torch.nn.attention import SDPBackend

            return int(SDPBackend.FLASH_ATTENTION)
        if func is torch.ops.aten.is_pinned.default:
            entry = self.live.get(id(args[0].untyped_storage()))
            return entry is not None and entry.place == "pinned"
        half = _autocast_dtype()
        if half is not None and func in _LOWER_PRECISION:
            args, kwargs = self._cast(args, kwargs, lambda t: t.is_floating_point() and t.dtype != half, half)
        elif half is not None and func in _FLOAT32:
            args, kwargs = self._cast(args, kwargs, lambda t: t.dtype in (torch.float16, torch.bfloat16), torch.float32)
        # FakeTensorMode has no pin_memory: a fresh host tensor of the same layout, counted as pinned below
        out = torch.empty_like(args[0]) if func is torch.ops.aten._pin_memory.default else func(*args, **kwargs)
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace in ("c10d", "_c10d_functional"):
            self._collective(name, args)
        self._record(out, pinned=func is torch.ops.aten._pin_memory.default)
        return out

    def _cast(self, args, kwargs, which, dtype):
        """Autocast's input casts: each a new tensor, counted like any other (autocast allocates them too)."""
        def cast(t):
            if isinstance(t, torch.Tensor) and which(t):
                c = torch.ops.aten._to_copy.default(t, dtype=dtype)
                self._record(c)
                return c
            return t

        from torch.utils._pytree import tree_map

        return tree_map(cast, args), tree_map(cast, kwargs)

    def _record(self, out, *, pinned: bool = False) -> None:
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or type(t).__name__ == "DTensor":
                continue
            st = t.untyped_storage()
            if t.device.type in ("cuda", "meta"):
                place, nbytes = "device", st.nbytes()
            elif pinned:
                place, nbytes = "pinned", pinned_bytes(st.nbytes())
            else:
                place, nbytes = "pageable", st.nbytes()
            entry = self.live.get(id(st))
            if entry is None:
                self._add(st, place, nbytes, self.kind)
                if self.debug is not None:
                    self.debug[id(st)] = (tuple(t.shape), str(t.dtype), str(t.device), self.phase)
            elif entry.place != "pinned" and entry.nbytes != st.nbytes():  # a view keeps its storage's place
                self._add(st, entry.place, st.nbytes(), entry.kind)
        self._update_peaks()

    def _collective(self, name: str, args: tuple) -> None:
        kind = _COLLECTIVE_KIND.get(name, name)
        tensors = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        if not tensors:
            return
        # what this rank puts on the wire: the input side (the first tensor argument for in-place ops
        # like all_reduce/broadcast/send; the last for the "_base"/"into" forms that take (out, in))
        sent = tensors[-1] if name in ("alltoall_base_", "_allgather_base_", "_reduce_scatter_base_") else tensors[0]
        if name == "allgather_into_tensor_coalesced_" or name == "reduce_scatter_tensor_coalesced_":
            half = len(tensors) // 2
            nbytes = sum(t.numel() * t.element_size() for t in tensors[half:])
        elif name in ("allgather_", "alltoall_"):
            nbytes = sum(t.numel() * t.element_size() for t in tensors[len(tensors) // 2:])
        else:
            nbytes = sent.numel() * sent.element_size()
        phase = self.collectives.setdefault(self.phase, {})
        phase[kind] = phase.get(kind, 0) + nbytes
        for t in tensors:
            if t.device.type in ("cuda", "meta"):
                self.retag(t, "comm", only_from="activations")


@contextlib.contextmanager
def _swappable(fake_mode) -> Iterator[None]:
    """`Module.to()` swaps FakeTensor parameters (`torch.utils.swap_tensors`), which refuses a tensor
    that FakeTensorMode's conversion memo holds a weak reference to: drop the memo (a cache) first."""
    from unittest import mock

    original = torch.utils.swap_tensors
    memo = fake_mode.fake_tensor_converter.meta_converter.tensor_memo

    def swap(t1, t2):
        memo.clear()
        return original(t1, t2)

    with mock.patch.object(torch.utils, "swap_tensors", swap):
        yield


@contextlib.contextmanager
def _tracked_resizes(alloc: _Allocations) -> Iterator[None]:
    """FSDP2 frees and re-allocates unsharded parameters with `UntypedStorage.resize_`, outside dispatch."""
    original = torch.UntypedStorage.resize_

    def resize_(self, size):
        result = original(self, size)
        alloc.resized(self)
        return result

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


# --------------------------------------------------------------------------- the simulated world

class _MetaDeviceModule:
    """`torch.meta`, the device module FSDP2 and DeviceMesh ask a device type for (torch.cuda's part they use)."""

    Stream = torch.cpu.Stream
    Event = torch.cpu.Event
    current_stream = staticmethod(torch.cpu.current_stream)
    stream = staticmethod(torch.cpu.stream)

    @staticmethod
    def current_device() -> None:
        return None  # torch.device("meta", None): the one meta device

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(_device: object) -> None:
        pass

    @staticmethod
    def synchronize(_device: object = None) -> None:
        pass


def _reset_sharded_param_on_meta():
    """FSDP2's `FSDPParam.reset_sharded_param`, which adopts the loaded shard as its sharded storage,
    without its early return for meta shards (here the loaded shards are meta): else FSDP2 would keep
    its construction-time padded copy beside the loaded one and the dry run would count both."""
    import inspect
    import textwrap

    from torch.distributed.fsdp._fully_shard import _fsdp_param

    source = textwrap.dedent(inspect.getsource(_fsdp_param.FSDPParam.reset_sharded_param))
    guard = "    if local_tensor.is_meta:\n        return\n"
    if guard not in source:
        raise RuntimeError("FSDP2's reset_sharded_param changed in this torch; update launcher.engine.dryrun")
    namespace: dict[str, Any] = {}
    exec(compile(source.replace(guard, ""), _fsdp_param.__file__, "exec"), vars(_fsdp_param).copy(), namespace)
    return namespace["reset_sharded_param"]


_sdpa = torch.nn.functional.scaled_dot_product_attention


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as a CUDA GPU runs it: the flash kernel for half inputs, memory-efficient attention for
    float32 (the VAE's), both O(S) memory. torch picks the S x S math backend for meta tensors."""
    if attn_mask is not None or enable_gqa:
        return _sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    if q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, dropout_p, is_causal,
                                                                  scale=scale)[0]


class _Autocast:
    """`torch.autocast` for the meta device (which torch refuses): the state goes to `_Allocations`,
    which applies CUDA autocast's casting rules to each op; other devices get the real autocast."""

    real = torch.autocast

    def __init__(self, device_type: str, dtype: torch.dtype | None = None, enabled: bool = True,
                 cache_enabled: bool | None = None) -> None:
        self.meta = device_type == "meta"
        self.inner = None if self.meta else self.real(device_type, dtype=dtype, enabled=enabled,
                                                           cache_enabled=cache_enabled)
        self.state = (enabled, dtype)

    def __enter__(self):
        if self.meta:
            _Allocations.autocast.append(self.state)
            return self
        return self.inner.__enter__()

    def __exit__(self, *exc):
        if self.meta:
            _Allocations.autocast.pop()
            return False
        return self.inner.__exit__(*exc)


def _autocast_dtype() -> torch.dtype | None:
    """The half dtype the innermost meta autocast region casts to (None: off)."""
    for enabled, dtype in reversed(_Allocations.autocast):
        return (dtype or torch.bfloat16) if enabled else None
    return None


@contextlib.contextmanager
def _meta_gpu() -> Iterator[None]:
    """The meta device as the GPU: a device module for FSDP2/DeviceMesh, FSDP2's materialisation check
    off (its parameters are meta by design here), and autocast for meta."""
    from unittest import mock

    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    real_enabled, real_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

    def is_enabled(*args):
        if args and str(args[0]) == "meta":
            return _autocast_dtype() is not None
        return real_enabled(*args)

    def get_dtype(device_type):
        return (_autocast_dtype() or torch.bfloat16) if str(device_type) == "meta" else real_dtype(device_type)

    from torch.distributed.fsdp._fully_shard import _fsdp_init
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    def move_states(params, buffers, device):
        # FSDP2 moves host-built tensors to its device with `t.data = t.to(device)`, which a CPU tensor
        # allows onto CUDA but not onto meta: swap them instead (the same move)
        for t in (*params, *buffers):
            if t.device.type != "meta":
                moved = t.to(device)
                torch.utils.swap_tensors(t, torch.nn.Parameter(moved, requires_grad=False)
                                         if isinstance(t, torch.nn.Parameter) else moved)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(FSDPParam, "reset_sharded_param", _reset_sharded_param_on_meta()))
        stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention))
        stack.enter_context(mock.patch.object(_fsdp_init, "_move_states_to_device", move_states))
        stack.enter_context(mock.patch.object(torch, "meta", _MetaDeviceModule, create=True))
        stack.enter_context(mock.patch.object(FSDPParamGroup, "_validate_no_meta_params", lambda self: None))
        stack.enter_context(mock.patch.object(torch, "autocast", _Autocast))
        stack.enter_context(mock.patch.object(torch, "is_autocast_enabled", is_enabled))
        stack.enter_context(mock.patch.object(torch, "get_autocast_dtype", get_dtype))
        yield


@contextlib.contextmanager
def _fake_groups(rank: int, world_size: int) -> Iterator[None]:
    """torch's fake process group for the world, and every sub-group (gloo twins too) on that backend."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from unittest import mock
    from torch.testing._internal.distributed.fake_pg import FakeStore

    original = c10d._new_process_group_helper

    def on_fake(group_size, group_rank, global_ranks, _backend, *args, **kwargs):
        return original(group_size, group_rank, global_ranks, dist.Backend("fake"), *args, **kwargs)

    # the meta device is the GPU here: the fake backend serves its tensors too
    capability = {**dist.Backend.backend_capability, "fake": ["cpu", "cuda", "meta"]}
    with mock.patch.object(c10d, "_new_process_group_helper", on_fake), \
            mock.patch.object(dist.Backend, "backend_capability", capability):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            yield
        finally:
            if dist.is_initialized():  # World.shutdown has normally destroyed it already
                dist.destroy_process_group()


def _world(config: RunConfig, rank: int, world_size: int, num_heads: int):
    """The World `start_world` builds for this rank, on the fake group and the simulated GPU."""
    from launcher.engine.placement import placement_for
    from launcher.engine.world import World, _Groups
    from parallel.dist import DistContext
    from parallel.launch import LaunchEnv
    from parallel.mesh import ParallelDims, check_heads

    check_heads(num_heads, config.ulysses_size)
    dims = ParallelDims.from_world(world_size, ulysses=config.ulysses_size, cfg=2 if config.cfg_parallel else 1,
                                   ring=config.ring_size)
    local = rank % 8
    # the policy of a CUDA rank (memory_policy, dtypes), with the meta device where the GPU would be
    cuda_placement = placement_for(config, local_rank=local, world_size=world_size, sp=dims.sp,
                                   device=torch.device("cuda", local))
    meta = torch.device("meta")
    placement = dataclasses.replace(cuda_placement, device=meta, text_device=(
        meta if cuda_placement.text_device.type == "cuda" else cuda_placement.text_device))
    if world_size == 1:
        return World(placement=placement), dims
    import torch.distributed as dist

    env = LaunchEnv(kind="torchrun", rank=rank, world_size=world_size, local_rank=local, master_addr="dry-run",
                    master_port=29500)
    ctx = DistContext(env=env, device=meta, backend="fake", timeout=timedelta(seconds=60),
                      cpu_group=dist.group.WORLD)
    mesh = dims.build(ctx)
    world = World(placement=placement,
                  rank=rank, world_size=world_size, launch_kind="torchrun", dp_size=dims.dp, cfg_size=dims.cfg,
                  sp_size=dims.sp, ring_size=dims.ring, dp_rank=mesh.dp_rank,
                  is_output_rank=mesh.cfg_rank == 0 and mesh.sp_rank == 0, _groups=_Groups(ctx=ctx, mesh=mesh))
    return world, dims


def rank_roles(world_size: int, config: RunConfig) -> list[tuple[int, str]]:
    """One rank per distinct role (dp replicas and sp ranks past the first two are alike)."""
    from parallel.mesh import ParallelDims

    dims = ParallelDims.from_world(world_size, ulysses=config.ulysses_size, cfg=2 if config.cfg_parallel else 1,
                                   ring=config.ring_size)
    roles = [(0, "output rank" + (", cond half" if dims.cfg > 1 else ""))]
    if dims.sp > 1:
        roles.append((1, "sequence rank" + (", cond half" if dims.cfg > 1 else "")))
    if dims.cfg > 1:
        roles.append((dims.sp, "uncond half"))
    return roles


class _ForcedSchedule:
    """The MagCache schedule interface with the dry run's decisions: compute, except `skip`."""

    def __init__(self, skip: set[int]) -> None:
        self.skip = skip

    def reset(self) -> None:
        pass

    def propose(self, index: int):
        from magcache.schedule import Proposal

        return Proposal(retained=index not in self.skip, may_skip=index in self.skip)

    def commit(self, index: int, skip: bool):
        return self.propose(index)


def _simulate(config: RunConfig, info: CheckpointInfo, rank: int, world_size: int,
              dit_dtype: torch.dtype | None, debug: bool = False) -> dict[str, Any]:
    """One rank's phases; returns its peaks and collective bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from launcher.engine import models as models_module
    from launcher.engine.models import load_models
    from launcher.wan import conditioning as cond
    from launcher.wan.dit import pad_context
    from launcher.wan.pipeline import WanPipeline
    from magcache.controller import MagCacheController

    alloc = _Allocations()
    alloc.debug = {} if debug else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(_meta_gpu())
        if world_size > 1:
            stack.enter_context(_fake_groups(rank, world_size))
        world, dims = _world(config, rank, world_size, info.num_heads)
        placement = world.placement
        if dit_dtype is not None:
            placement = dataclasses.replace(placement, dit_param_dtype=dit_dtype)
        if world.mesh is not None and (config.dit_fsdp or config.t5_fsdp):
            world.mesh.fsdp_mesh()  # its DeviceMesh holds real rank tensors: built before fake mode, as a run does it first
        fake_mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(_swappable(fake_mode))
        stack.enter_context(alloc)
        stack.enter_context(_tracked_resizes(alloc))
        stack.enter_context(torch.no_grad())
        # the tokenizer only turns text into ids; the dry run feeds text_len ids (the longest prompt)
        stack.enter_context(_patched(models_module, "load_tokenizer", lambda _info: None))
        for skeleton in ("build_transformer_on_meta", "build_text_encoder_on_meta", "set_meta_dtypes", "parallelize_wan"):
            stack.enter_context(_patched(models_module, skeleton, alloc.uncounted(getattr(models_module, skeleton))))
        from launcher.checkpoint import load as load_module

        stack.enter_context(_patched(load_module, "init_empty_weights", alloc.empty_weights))
        # the host is the target node's, not this machine's: pin as a GPU run that fits pins (in place,
        # the storage's own bytes), with no check against this machine's free memory
        from launcher.engine.host_memory import module_bytes
        from launcher.wan import residency

        stack.enter_context(_patched(models_module, "plan_host_memory", lambda _config, _placement, modules: (
            True, sum(module_bytes(m) for m in modules))))
        stack.enter_context(_patched(residency, "register_in_place", alloc.pin_in_place))
        stack.enter_context(_patched(residency, "_unregister", lambda _ptrs: None))  # nothing was registered

        alloc.kind = "weights"
        alloc.start("load")
        models, par = load_models(config, info, placement, world.mesh, None)
        if debug:
            print({p: [(round(b / 2**30, 2), k, d) for b, k, d in alloc.largest(p)] for p in PLACES})
        alloc.mark_weights([models.text_encoder, models.vae, *(d.model for d in models.experts.values())])
        alloc.kind = "activations"
        pipeline = WanPipeline(models, exchange=par.exchange, decode=world.is_output_rank,
                               split_decode=par.split_decode)
        task = config.task

        alloc.start("encode")
        ids = torch.zeros((2, task.text_len), dtype=torch.long)
        hidden = pipeline.encode_ids(ids, torch.ones_like(ids))
        ctx = {b: pad_context(hidden.select(0, b), task.text_len) for b in (0, 1)}

        latent = torch.empty(cond.latent_shape(task, config.frame_num, config.height, config.width),
                             device=placement.device)
        y = (torch.empty((info.in_channels - latent.shape[0], *latent.shape[1:]), device=placement.device)
             if info.in_channels > latent.shape[0] else None)
        seq_len = cond.seq_len(*latent.shape[1:], task.patch_size, 1)
        experts = task.experts
        branches = pipeline.exchange.branches
        # forward indices: the first step of each expert computed, then the next step of the last expert skipped
        first_step = {e: (i if e == "high" or len(experts) == 1 else 1) for i, e in enumerate(experts)}
        skipped_step = first_step[experts[-1]] + 1
        runner = MagCacheController(_ForcedSchedule({2 * skipped_step + b for b in branches}))
        text_states: dict = {}
        forwards: dict[str, int] = {}
        for expert in experts:
            phase = "denoise" if len(experts) == 1 else f"denoise-{expert}"
            steps = [first_step[expert]] + ([skipped_step] if expert == experts[-1] else [])
            for i in steps:
                if i == steps[0]:
                    alloc.start(phase)
                with alloc.counting_as("weights"):
                    dit = pipeline._activate(expert)
                if i == steps[0]:
                    # the phase is what stays resident while this expert denoises, plus its work: it
                    # starts again once the switch is done (the moment before an eviction, with the
                    # experts as loading left them, is the load phase's own peak)
                    alloc.start(phase)
                model_in = latent if y is None else torch.cat([latent, y])
                ts = torch.full((1,), 999.0 if expert == "high" else 500.0, device=placement.device)
                g = config.guide_scale[1] if expert == "high" else config.guide_scale[0]
                pipeline.forward_step(dit, expert, i, model_in, ts, ctx, text_states, runner, g,
                                      cond_only=expert in config.cond_only_experts)
            forwards[phase] = len(branches) * (len(steps) - (1 if expert == experts[-1] else 0))
        if models.park_dit_before_decode:
            for name in models.experts:
                models.expert_to(name, "cpu")
        if debug:
            print({p: [(round(b / 2**30, 2), k, d) for b, k, d in alloc.largest(p)] for p in PLACES})
        alloc.start("decode")
        del text_states, ctx, hidden, runner
        if pipeline.split_decode is not None:
            pipeline.split_decode(models.vae, latent)
        elif pipeline.decode:
            from launcher.wan.vae import decode

            decode(models.vae, latent)
        report = {
            "rank": rank, "is_output_rank": world.is_output_rank, "memory_policy": dataclasses.asdict(placement.memory),
            "phases": {p: alloc.peaks[p] for p in PHASES if p in alloc.peaks},
            "collectives": {p: c for p, c in alloc.collectives.items() if c and p in PHASES},
            "computed_forwards": forwards, "seq_len": seq_len,
        }
        del models, par, pipeline, latent, y
        world.shutdown(clean=False)
    return report


@contextlib.contextmanager
def _patched(obj: object, name: str, value: object) -> Iterator[None]:
    from unittest import mock

    with mock.patch.object(obj, name, value):
        yield


def dry_run(config: RunConfig, gpus: int, *, info: CheckpointInfo | None = None,
            dit_dtype: torch.dtype | None = None, only_ranks: tuple[int, ...] | None = None,
            debug: bool = False) -> dict[str, Any]:
    """Every rank role of a `gpus`-rank run of `config`, simulated; the `dry_run` JSON object.

    `info`: a real checkpoint (its shapes are used, nothing read); None: the official dimensions of the
    task. `dit_dtype`: store the DiT weights in this dtype instead of the placement's (a quantized dtype
    to price, e.g. torch.float8_e4m3fn). `only_ranks`: simulate only these of the role ranks (tests).
    """
    info = task_checkpoint(config.task) if info is None else shapes_of(info)
    ranks = []
    for rank, role in rank_roles(gpus, config):
        if only_ranks is not None and rank not in only_ranks:
            continue
        report = _simulate(config, info, rank, gpus, dit_dtype, debug)
        ranks.append({"role": role, **report,
                      "peak_bytes": {p: v["device"] for p, v in report["phases"].items()}})
    return {"gpus": gpus, "task": config.task.name, "size": f"{config.width}*{config.height}",
            "frame_num": config.frame_num, "attention_workspace": "flash (output + float32 LSE; no S x S matrix)",
            "pinning": "expert host homes registered in place (cudaHostRegister: their own bytes); any "
                       "Tensor.pin_memory(): CachingHostAllocator, blocks rounded up to a power of two",
            "ranks": ranks}


def dry_run_from_flags(flags: dict[str, Any], gpus: int) -> dict[str, Any]:
    """`plan`'s flags -> `dry_run`: a real --ckpt_dir is read for shapes only; without one, the task's
    official dimensions; no prompt or image is needed (the longest prompt, text_len tokens, is priced)."""
    from launcher.checkpoint import inspect_checkpoint
    from launcher.config import run_config_from_flags

    given = dict(flags)
    ckpt = given.get("ckpt_dir")
    given.update(prompt=given.get("prompt") or "dry run", ckpt_dir=ckpt or ".",
                 image=given.get("image") or ("dry-run.png" if _needs_image(given) else None))
    config = run_config_from_flags(given, check_paths=False)
    info = inspect_checkpoint(ckpt, config.task) if ckpt else None
    return dry_run(config, gpus, info=info)


def _needs_image(flags: dict[str, Any]) -> bool:
    from launcher.wan.tasks import TASKS

    spec = TASKS.get(flags.get("task") or "")
    return spec is not None and spec.image == "required"
