"""A model's forward replayed from CUDA graphs, so sampling pays no per-kernel launch cost on the host.

A JiT forward at 2048 px launches hundreds of kernels; with SLA2's shorter attention the host, not the
GPU, sets the pace of an eager sampler (bench/RESULTS.md, "Profile"). `Graphed` captures the forward once
per input signature (shapes, dtypes, autocast state) and replays it: the same kernels on the same inputs,
so the outputs are those of the eager forward. Inputs are copied into the graph's own buffers and the
output is copied out, so callers may keep or change what they pass and get.

With `compile_blocks`, the captured forward runs each block's non-attention work (RMSNorms, RoPE, adaLN
modulation and gates, the MLP) as torch.compile'd fused kernels, while the attention cores (cuDNN SDPA or
SLA2's kernels) run as they are. Eager, those elementwise chains cost more GPU time than attention itself
on a small-width model at 4096 tokens (the showcase: 16.5 of 19.8 ms per batch-16 forward, 3.4-4.1 compiled),
which hides what attention costs; dense and SLA2 models gain alike. The fused kernels round like the eager
ones up to the order of their float32 reductions, so samples match eager ones closely, not bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .sla2.layers import transformer_blocks

WARMUP_CALLS = 2  # eager calls on a side stream before capture: Triton compiles, cuBLAS picks its kernels
RECOMPILE_LIMIT = 64  # compiled entries per code object while capturing (torch's default, 8, is one model's worth)


class Graphed(nn.Module):
    """`model(z, t, y)` through CUDA graphs; `model` must be on CUDA, in eval mode, and not change while
    this wrapper is in use (its weights are read by the replays; their values may change, their storage not).
    `compile_blocks`: capture the blocks' non-attention work compiled (module docstring).
    """

    def __init__(self, model: nn.Module, compile_blocks: bool = False):
        super().__init__()
        self.model = model
        self.compile_blocks = compile_blocks
        self._graphs: dict[tuple, tuple | None] = {}  # None: this signature could not be captured
        self._pool = None
        self._compiled: list[tuple[nn.Module, object]] | None = None
        self.compile_error: str | None = None  # why compile_blocks was dropped, if it was

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def config(self):
        return self.model.config

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled("cuda")
        key = tuple((tuple(a.shape), a.dtype) for a in (z, t, y)) + (
            autocast, torch.get_autocast_dtype("cuda") if autocast else None)
        if key not in self._graphs:
            self._graphs[key] = self._first_capture(z, t, y, autocast)
        if self._graphs[key] is None:
            return self.model(z, t, y)
        graph, inputs, out = self._graphs[key]
        for buffer, value in zip(inputs, (z, t, y)):
            buffer.copy_(value)
        graph.replay()
        return out.clone()

    def _first_capture(self, z, t, y, autocast: bool):
        """The graph of a new signature; None keeps the eager forward (e.g. an op that synchronises with the
        host). A compile that fails (no toolchain, an op inductor cannot lower) costs only the compile: the
        wrapper drops compile_blocks, keeps the reason in `compile_error`, and captures uncompiled."""
        try:
            return self._capture(z, t, y, autocast)
        except RuntimeError as exc:  # torch's compile errors are RuntimeErrors too
            if not self.compile_blocks:
                return None
            self.compile_blocks, self.compile_error = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
            return self._first_capture(z, t, y, autocast)

    @torch.no_grad()
    def _capture(self, z, t, y, autocast: bool):
        inputs = tuple(a.detach().clone(memory_format=torch.contiguous_format) for a in (z, t, y))
        # Autocast's cast cache would hand the graph tensors it frees on exit; the casts are re-run instead.
        cast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) if autocast \
            else torch.autocast("cuda", enabled=False)
        side = torch.cuda.Stream(z.device)
        side.wait_stream(torch.cuda.current_stream(z.device))
        if self.compile_blocks:
            with torch.cuda.stream(side), cast:
                self.model(*inputs)  # eager first: the forward's caches (RoPE tables) are full before tracing
        with self._blocks_compiled():
            with torch.cuda.stream(side), cast:
                for _ in range(WARMUP_CALLS):  # the first also compiles, when compile_blocks
                    self.model(*inputs)
            torch.cuda.current_stream(z.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), cast:
                out = self.model(*inputs)
        return graph, inputs, out

    @contextmanager
    def _blocks_compiled(self):
        """While capturing: each block's forward compiled (static shapes), its attention core outside the
        compiled code (`models.jit.attend`). The compiled callables are made once and kept, so a later capture
        reuses their code; the model's own forwards are restored on exit. Blocks share their compiled code,
        guarded by input signature, core type and RoPE table (a dense and an SLA2 model at two batch sizes
        make 8 entries): the recompile limit is raised for the capture so none falls back to eager."""
        if not self.compile_blocks:
            yield
            return
        if self._compiled is None:
            self._compiled = [(block, torch.compile(block.forward, dynamic=False))
                              for block in transformer_blocks(self.model)]
        try:
            for block, forward in self._compiled:
                block.forward = forward  # an instance attribute shadows the method
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                yield
        finally:
            for block, _ in self._compiled:
                block.__dict__.pop("forward", None)


def graphed(model: nn.Module, device: torch.device | str, compile_blocks: bool = False) -> nn.Module:
    """`Graphed(model, compile_blocks)` on CUDA; the model itself elsewhere (nothing to gain on a CPU)."""
    return Graphed(model, compile_blocks) if torch.device(device).type == "cuda" else model
