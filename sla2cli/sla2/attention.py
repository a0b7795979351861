"""SLA2 attention as a function (`sla2_attention`) and as a module holding its learnable parts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import InvalidParameter, UsageError
from ..serialization import JsonConfig
from .backends import Backend, qat_fallback, resolve
from .feature_maps import FEATURE_MAPS
from .reference import requires_grad
from .routing import num_blocks

# α before calibration or fine-tuning: the softmax mass a trained diffusion transformer's top 5-25% of
# key blocks typically captures. `sla2 convert --calibrate N` measures it instead; finetune learns it.
ALPHA_INIT = 0.9
# "per_query" (our extension): each query's α from evidence the kernel already has, its sparse branch's
# log-sum-exp against the log of its linear branch's mass: α = σ(logit α_h + c_h·(lse_sparse − log den)).
ALPHA_MODES = ("per_head", "per_head_query_block", "per_query")
BLOCK_SIZES = (16, 32, 64, 128)
MAX_FEATURE_RANK = 256


@dataclass(frozen=True)
class SLA2Config(JsonConfig):
    """How converted layers attend; stored in every SLA2 checkpoint's metadata."""

    topk: float = 0.15
    block_q: int = 64
    block_k: int = 64
    feature_map: str = "softmax"
    qat: bool = False
    alpha_mode: str = "per_head"
    feature_rank: int = 0  # 0: φ on the head dim (the paper); r: φ(x·W) with a learned D×r W per head (ours)

    def __post_init__(self):
        if not (isinstance(self.topk, (int, float)) and 0.0 < self.topk <= 1.0):
            raise InvalidParameter("topk", self.topk, "{name} must be in (0, 1], got {value}")
        sizes = ", ".join(map(str, BLOCK_SIZES))
        if self.block_q not in BLOCK_SIZES:
            raise InvalidParameter("block_q", self.block_q, "{name} must be one of {sizes}, got {value}", sizes=sizes)
        if self.block_k not in BLOCK_SIZES:
            raise InvalidParameter("block_k", self.block_k, "{name} must be one of {sizes}, got {value}", sizes=sizes)
        if self.feature_map not in FEATURE_MAPS:
            raise InvalidParameter("feature_map", self.feature_map, "unknown feature map {value!r}; choose one of: "
                                   "{choices}", choices=", ".join(FEATURE_MAPS))
        if not (isinstance(self.feature_rank, int) and not isinstance(self.feature_rank, bool)
                and 0 <= self.feature_rank <= MAX_FEATURE_RANK):
            raise InvalidParameter("feature_rank", self.feature_rank, "{name} must be an integer in 0.."
                                   f"{MAX_FEATURE_RANK} (0: the paper's feature map), got {{value}}")
        if self.alpha_mode not in ALPHA_MODES:
            raise InvalidParameter("alpha_mode", self.alpha_mode, "unknown alpha mode {value!r}; choose one of: "
                                   "{choices}", choices=", ".join(ALPHA_MODES))


def sla2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float, alpha: torch.Tensor,
                   block_q: int = 64, block_k: int = 64, proj_q: torch.Tensor | None = None,
                   proj_k: torch.Tensor | None = None, feature_map: str = "softmax", qat: bool = False,
                   backend: str = "auto", return_stats: bool = False, routing=None,
                   feature_q: torch.Tensor | None = None, feature_k: torch.Tensor | None = None,
                   mix_scale: torch.Tensor | None = None):
    """SLA2: O = α⊙softmax-attention over the routed key blocks + (1−α)⊙linear attention over the rest.

    q, k, v: B×H×N×D after qk-norm and RoPE. alpha: (H,) or (H, n_q) in [0, 1]. proj_q / proj_k: the
    router's D×D projections (None = identity). feature_q / feature_k: H×D×r maps the linear branch
    applies before φ (None: φ of q, k themselves). mix_scale (H,): α per query, σ(logit α + c·(lse_sparse
    − log den_linear)) (None: α as given). With `return_stats` also returns an `SLA2Stats`.
    `routing` (a `Routing`) replaces the router's own decision (fine-tuning builds it itself).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one B×H×N×D shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    fn = resolve(backend, q, feature_map=feature_map, qat=qat, return_stats=return_stats, block_q=block_q,
                 block_k=block_k).fn
    extra = {} if routing is None else {"routing": routing}
    extra.update({name: t for name, t in (("feature_q", feature_q), ("feature_k", feature_k),
                                            ("mix_scale", mix_scale)) if t is not None})
    return fn(q, k, v, topk=topk, alpha=alpha, block_q=block_q, block_k=block_k, proj_q=proj_q, proj_k=proj_k,
              feature_map=feature_map, qat=qat, return_stats=return_stats, **extra)


def initial_features(heads: int, head_dim: int, rank: int) -> torch.Tensor:
    """H×D×r start of a learned feature map: the identity's first r columns (r = D: the paper's φ exactly);
    below D, an orthonormal basis from a fixed seed, so every conversion starts alike."""
    if rank >= head_dim:
        w = torch.eye(head_dim, rank)
    else:
        w = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=torch.Generator().manual_seed(rank)))[0][:, :rank]
    return w.expand(heads, head_dim, rank).clone()


# A torch.library custom op with `sla2_attention`'s maths that `sla2cli.profiling` installs while it counts
# FLOPs, so counters (torch.utils.flop_counter, fvcore) see one SLA2 op with its own formula. Only forwards
# that need no gradient go through it; training always takes the differentiable path.
_inference_op: Callable | None = None


def set_inference_op(op: Callable | None) -> Callable | None:
    """Route gradient-free `SLA2Attention` forwards through `op` (None: call `sla2_attention` directly)."""
    global _inference_op
    previous, _inference_op = _inference_op, op
    return previous


class SLA2Attention(nn.Module):
    """Drop-in `Attention.core`: holds the router projections W_q, W_k (identity at start) and the α logits.

    `prefix_tokens` (in-context class tokens that an upstream JiT or PixelGen model prepends) are moved to
    the end of the sequence for SLA2 and back afterwards, so they form their own query and key block(s)
    instead of sharing block 0 with image tokens: a head that attends mostly to them (a class "sink") then
    has one key block to find, and they are routed and mixed apart from the image rows. Attention is
    permutation-equivariant, so only the blocking changes. Our JiT appends these tokens itself and needs
    no move (two copies per layer, which cost 0.3 ms per layer at 2048 px on an H100).
    """

    def __init__(self, num_heads: int, head_dim: int, config: SLA2Config, query_blocks: int | None = None,
                 alpha_init: float = ALPHA_INIT, backend: str = "auto", prefix_tokens: int = 0):
        super().__init__()
        self.config = config
        self.backend = backend
        self.prefix_tokens = prefix_tokens
        self.proj_q = nn.Parameter(torch.eye(head_dim))
        self.proj_k = nn.Parameter(torch.eye(head_dim))
        shape = (num_heads,)
        if config.alpha_mode == "per_head_query_block":
            if query_blocks is None:
                raise UsageError("alpha per query block needs the model's resolution (a JiT config)")
            shape = (num_heads, query_blocks)
        self.alpha_logit = nn.Parameter(torch.full(shape, math.log(alpha_init / (1 - alpha_init))))
        if config.feature_rank:
            self.feature_q = nn.Parameter(initial_features(num_heads, head_dim, config.feature_rank))
            self.feature_k = nn.Parameter(initial_features(num_heads, head_dim, config.feature_rank))
        if config.alpha_mode == "per_query":
            self.mix_scale = nn.Parameter(torch.ones(num_heads))

    def learned_parts(self) -> dict[str, torch.Tensor]:
        """The optional learned tensors `sla2_attention` takes by these names (feature maps, per-query mix)."""
        return {name: getattr(self, name) for name in ("feature_q", "feature_k", "mix_scale") if hasattr(self, name)}

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit)

    def set_alpha(self, alpha: torch.Tensor) -> None:
        """Set α (broadcast to the parameter's shape), clamped away from 0 and 1 so its logit stays finite."""
        alpha = alpha.to(self.alpha_logit).clamp(1e-3, 1 - 1e-3).expand_as(self.alpha_logit)
        with torch.no_grad():
            self.alpha_logit.copy_(torch.logit(alpha))

    def query_blocks(self, tokens: int) -> int:
        return num_blocks(tokens, self.config.block_q)

    def resolve_backend(self, q: torch.Tensor, return_stats: bool = False) -> Backend:
        """The backend this layer's `backend` setting runs inputs like `q` with (see `backends.resolve`)."""
        c = self.config
        return resolve(self.backend, q, feature_map=c.feature_map, qat=c.qat, return_stats=return_stats,
                       block_q=c.block_q, block_k=c.block_k)

    def qat_fallback(self, q: torch.Tensor) -> str | None:
        """Why this layer's QAT sparse branch runs in the fake-quant reference on inputs like `q` (None: no
        QAT, or the backend's low-bit kernels run it)."""
        c = self.config
        if not c.qat:
            return None
        return qat_fallback(self.resolve_backend(q), q, feature_map=c.feature_map, block_q=c.block_q,
                            block_k=c.block_k)

    def path(self, q: torch.Tensor) -> str:
        """What this layer runs inputs like `q` on, in words: its backend and, with QAT, whether the sparse
        branch runs the low-bit kernels or the fake-quant reference (and why)."""
        name = self.resolve_backend(q).name
        if not self.config.qat:
            return name
        why = self.qat_fallback(q)
        return f"{name}, QAT low-bit" if why is None else f"{name}, QAT by the reference ({why})"

    def to_block_order(self, x: torch.Tensor) -> torch.Tensor:
        """B×H×N×D in the model's token order → SLA2's (prefix tokens last)."""
        p = self.prefix_tokens
        return x if p == 0 else torch.cat([x[:, :, p:], x[:, :, :p]], dim=2)

    def from_block_order(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_block_order`."""
        p = self.prefix_tokens
        return x if p == 0 else torch.cat([x[:, :, -p:], x[:, :, :-p]], dim=2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_stats: bool = False):
        """SLA2 on q, k, v in the model's token order; `SLA2Stats` (with `return_stats`) are in block order."""
        c = self.config
        q, k, v = (self.to_block_order(x) for x in (q, k, v))
        if _inference_op is not None and not return_stats and not requires_grad(q, k, v, *self.parameters()):
            # A meta twin (FLOP counting) holds the backend `profiling.flops.meta_twin` resolved for the real device.
            learned = self.learned_parts()
            return self.from_block_order(_inference_op(
                q, k, v, self.alpha, self.proj_q, self.proj_k, c.topk, c.block_q, c.block_k, c.feature_map, c.qat,
                self.backend if q.is_meta else self.resolve_backend(q).name, learned.get("feature_q"),
                learned.get("feature_k"), learned.get("mix_scale")))
        result = sla2_attention(q, k, v, topk=c.topk, alpha=self.alpha, block_q=c.block_q, block_k=c.block_k,
                                proj_q=self.proj_q, proj_k=self.proj_k, feature_map=c.feature_map, qat=c.qat,
                                backend=self.backend, return_stats=return_stats, **self.learned_parts())
        if return_stats:
            return self.from_block_order(result[0]), result[1]
        return self.from_block_order(result)

    def extra_repr(self) -> str:
        c = self.config
        return (f"topk={c.topk}, blocks=({c.block_q},{c.block_k}), phi={c.feature_map}, "
                f"feature_rank={c.feature_rank}, qat={c.qat}, alpha={c.alpha_mode}, prefix_tokens={self.prefix_tokens}")


def _probe(core: SLA2Attention, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(1, 1, 1, core.proj_q.shape[0], device=device, dtype=dtype)


def backends_in_use(cores: Iterable[SLA2Attention], device: torch.device, dtype: torch.dtype) -> str:
    """The backend(s) `cores` run `dtype` inputs on `device` with, comma-separated; raises where a layer's
    explicitly named backend cannot run them (so a run fails before its slow work)."""
    return ",".join(sorted({core.resolve_backend(_probe(core, device, dtype)).name for core in cores}))


def qat_reference_notice(cores: Iterable[SLA2Attention], device: torch.device, dtype: torch.dtype) -> str | None:
    """The one line a run says when its QAT layers' sparse branch runs in the fake-quant PyTorch reference
    instead of low-bit kernels (on a CPU, a GPU without FP8, ...), with the first reason; None when no layer
    has QAT or every QAT layer runs the low-bit kernels."""
    reasons = [why for core in cores if core.config.qat and (why := core.qat_fallback(_probe(core, device, dtype)))]
    if not reasons:
        return None
    return (f"QAT's sparse branch of {len(reasons)} layer(s) runs in the fake-quant PyTorch reference, not in "
            f"low-bit kernels ({reasons[0]}): correct, but slower than the same layers without QAT")
