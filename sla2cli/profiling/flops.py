"""FLOPs counted, not estimated: `torch.utils.flop_counter` or fvcore over a meta-device twin of the model.

Both counters report FLOPs = 2 per multiply-add of matrix products (fvcore's own unit is one per
multiply-add: its totals are doubled here). SLA2 layers run as the custom op `sla2cli::sla2_attention`,
which both counters charge with the formula of what it executes (`ops.sla2_flops`). The twin lives on
the meta device, so counting JiT-H at 2048 px takes milliseconds and no memory; FLOPs do not depend on
weights (the router decides which blocks, never how many).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameter, SLA2Error
from ..models.jit import JiT
from ..sla2.layers import apply_sla2, sla2_layers
from ..sla2.probe import dense_cores
from .ops import FVCORE_HANDLES, through_custom_op

FLOP_CONVENTION = ("FLOPs = 2 per multiply-add of matrix products (linear, conv, attention); softmax, norms "
                   "and element-wise work are not counted; SLA2 counts what it executes: kept blocks of the "
                   "sparse branch, the linear branch and the router, blocks counted whole")


@dataclass
class FlopCount:
    """Total FLOPs of one forward and the FLOPs spent inside each named module."""

    counter: str
    total: int
    modules: dict[str, int]


def count_torch(model: nn.Module, inputs: tuple, names: list[str]) -> FlopCount:
    """`torch.utils.flop_counter.FlopCounterMode`, attributed to modules by forward hooks."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    modules = dict(model.named_modules())
    counts = {name: 0 for name in names}
    started: dict[str, int] = {}
    handles = []
    def enter(name):
        started[name] = mode.get_total_flops()

    def leave(name):
        counts[name] += mode.get_total_flops() - started[name]

    for name in names:
        module = modules[name]
        handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: enter(name)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o, name=name: leave(name)))
    try:
        with torch.no_grad(), through_custom_op(), mode:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return FlopCount("torch", int(mode.get_total_flops()), counts)


class _PatchLinear(nn.Module):
    """A patchifying convolution (kernel = stride, no padding) as patch extraction + linear.

    The same multiply-adds; TorchScript's tracer cannot run a convolution on the meta device, this it can.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias, self.patch = conv.weight, conv.bias, conv.kernel_size[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        out = F.linear(patches, self.weight.reshape(self.weight.shape[0], -1), self.bias)
        return out.transpose(1, 2).reshape(B, -1, H // p, W // p)


def _patchify_convs(model: nn.Module) -> dict:
    """Swap every patchifying Conv2d for `_PatchLinear`; returns what to put back."""
    swapped = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if (isinstance(child, nn.Conv2d) and child.kernel_size == child.stride
                    and child.kernel_size[0] == child.kernel_size[1] and child.padding == (0, 0)
                    and child.groups == 1 and child.dilation == (1, 1)):
                swapped[(module, child_name)] = child
                setattr(module, child_name, _PatchLinear(child))
    return swapped


def count_fvcore(model: nn.Module, inputs: tuple, names: list[str]) -> FlopCount:
    """fvcore's `FlopCountAnalysis` (a TorchScript trace) with handles for SDPA and the SLA2 op.

    On the meta device patchifying convolutions are traced as the equivalent patch linear (same FLOPs).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from fvcore.nn import FlopCountAnalysis
        except ImportError:
            raise SLA2Error("the fvcore FLOP counter needs fvcore: pip install fvcore (or count with torch)") from None
    swapped = _patchify_convs(model) if inputs[0].device.type == "meta" else {}
    try:
        with torch.no_grad(), through_custom_op(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, inputs)
            for op, handle in FVCORE_HANDLES.items():
                analysis.set_op_handle(op, handle)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            by_module = analysis.by_module()
    finally:
        for (module, child_name), child in swapped.items():
            setattr(module, child_name, child)
    return FlopCount("fvcore", int(round(2 * by_module[""])), {n: int(round(2 * by_module.get(n, 0))) for n in names})


COUNTERS: dict[str, Callable[[nn.Module, tuple, list[str]], FlopCount]] = {
    "torch": count_torch,
    "fvcore": count_fvcore,
}


def meta_twin(model: JiT, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> JiT:
    """The same architecture and SLA2 layers on the meta device.

    Each SLA2 layer's backend is resolved for `device`/`dtype` (where the model will really run), so the
    formula charges what that backend executes there.
    """
    with torch.device("meta"):
        twin = JiT(model.config)
    for i, core in sla2_layers(model).items():
        backend = core.backend
        if device is not None:
            probe = torch.empty(1, 1, 1, core.proj_q.shape[0], device=device, dtype=dtype)
            backend = core.resolve_backend(probe).name
        apply_sla2(twin, [i], core.config, backend=backend)
    return twin.requires_grad_(False).eval()


def meta_inputs(config, batch_size: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.empty(batch_size, config.in_channels, resolution, resolution, device="meta")
    t = torch.empty(batch_size, device="meta")
    y = torch.empty(batch_size, dtype=torch.long, device="meta")
    return x, t, y


@dataclass
class ModelFlops:
    """Per-layer attention and rest-of-block FLOPs of the model as converted and of its dense twin."""

    counter: str
    total: int  # the model as converted (SLA2 where converted)
    dense_total: int  # every layer dense
    attention: list[int]  # per layer, executed (SLA2 op where converted)
    dense_attention: list[int]  # per layer, dense SDPA
    rest_of_block: list[int]  # per layer: projections, qk-norm, RoPE, MLP, adaLN

    @property
    def outside_blocks(self) -> int:
        """Embeddings and the final layer."""
        return self.dense_total - sum(self.dense_attention) - sum(self.rest_of_block)


def flop_counter(counter: str) -> Callable[[nn.Module, tuple, list[str]], FlopCount]:
    """The FLOP counter called `counter`."""
    if counter not in COUNTERS:
        raise InvalidParameter("counter", counter, "unknown {name} {value!r}; choose one of: {choices}",
                               choices=", ".join(COUNTERS))
    return COUNTERS[counter]


def model_flops(model: JiT, *, batch_size: int, resolution: int, counter: str = "torch",
                device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> ModelFlops:
    """Count one forward of `model` at `resolution` with `counter`, converted and all-dense."""
    count = flop_counter(counter)
    twin = meta_twin(model, device, dtype)
    inputs = meta_inputs(model.config, batch_size, resolution)
    depth = len(twin.blocks)
    names = [f"blocks.{i}" for i in range(depth)] + [f"blocks.{i}.attn.core" for i in range(depth)]
    converted = count(twin, inputs, names)
    with dense_cores(twin):
        dense = count(twin, inputs, names)
    attention = [converted.modules[f"blocks.{i}.attn.core"] for i in range(depth)]
    dense_attention = [dense.modules[f"blocks.{i}.attn.core"] for i in range(depth)]
    rest = [dense.modules[f"blocks.{i}"] - dense_attention[i] for i in range(depth)]
    return ModelFlops(counter, converted.total, dense.total, attention, dense_attention, rest)
