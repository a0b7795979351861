"""JiT, the pixel-space diffusion transformer, with the official state_dict layout.

Keys and shapes equal LTH14/JiT `model_jit.py` (and PixelGen's no-bottleneck variant), so official
weights load as they are. Unlike the original, any resolution that is a multiple of the patch size
works: RoPE tables and sin-cos positions are built for the grid in use, on the input's device.
Every block's attention goes through `Attention.core`, the one place SLA2 plugs in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameter
from ..serialization import JsonConfig


@dataclass(frozen=True)
class JiTConfig(JsonConfig):
    """Everything that fixes the architecture; `None` bottleneck means PixelGen's single-conv embed."""

    input_size: int = 256
    patch_size: int = 16
    in_channels: int = 3
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_hidden_dim: int = 2048
    num_classes: int = 1000
    bottleneck_dim: int | None = 128
    in_context_len: int = 32
    in_context_start: int = 4
    noise_scale: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    def tokens(self, layer: int, input_size: int | None = None) -> int:
        """Sequence length seen by the attention of `layer` (in-context tokens join at in_context_start)."""
        grid = (input_size or self.input_size) // self.patch_size
        extra = self.in_context_len if self.in_context_len > 0 and layer >= self.in_context_start else 0
        return grid * grid + extra



def _swiglu_hidden(hidden_size: int, mlp_ratio: float = 4.0) -> int:
    return int(int(hidden_size * mlp_ratio) * 2 / 3)


def _preset(hidden, depth, heads, bottleneck, start, patch, **extra) -> JiTConfig:
    return JiTConfig(hidden_size=hidden, depth=depth, num_heads=heads, bottleneck_dim=bottleneck,
                     in_context_start=start, patch_size=patch, ffn_hidden_dim=_swiglu_hidden(hidden), **extra)


ARCHITECTURES: dict[str, JiTConfig] = {
    "JiT-B/16": _preset(768, 12, 12, 128, 4, 16),
    "JiT-B/32": _preset(768, 12, 12, 128, 4, 32, input_size=512),
    "JiT-L/16": _preset(1024, 24, 16, 128, 8, 16),
    "JiT-L/32": _preset(1024, 24, 16, 128, 8, 32, input_size=512),
    "JiT-H/16": _preset(1280, 32, 16, 256, 10, 16),
    "JiT-H/32": _preset(1280, 32, 16, 256, 10, 32, input_size=512),
    # PixelGen-XL: no bottleneck, head_dim 72, 32 in-context tokens joining at block 8 (PixelGen configs).
    "PixelGen-XL": _preset(1152, 28, 16, None, 8, 16),
}


def architecture_config(name: str, **overrides) -> JiTConfig:
    """The preset `name` (the `arch` of `random_model`), with `overrides`."""
    if name not in ARCHITECTURES:
        raise InvalidParameter("arch", name, "unknown {name} {value!r}; choose one of: {choices}",
                               choices=", ".join(ARCHITECTURES))
    return dataclasses.replace(ARCHITECTURES[name], **overrides)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the official code does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(embed_dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (grid*grid, embed_dim), float64 maths then float32, as upstream."""
    coords = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([axis(embed_dim // 2, coords[0]), axis(embed_dim // 2, coords[1])], axis=1)
    return torch.from_numpy(table).float()


class AxialRoPE(nn.Module):
    """2-D axial rotary embedding on interleaved pairs; the in-context tokens (which this JiT keeps after the
    image tokens) get the identity rotation.

    Tables depend only on (grid, prefix, device, dtype) and are cached, so resolution can change freely.
    """

    def __init__(self, head_dim: int, context_tokens: int = 0, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.context_tokens = context_tokens
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, grid: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, str(device), dtype)
        if key not in self._cache:
            half = self.head_dim // 2
            freqs = 1.0 / (self.theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))
            pos = torch.arange(grid) / grid * grid  # upstream's exact float expression
            angles = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)
            angles = torch.cat([angles[:, None, :].expand(grid, grid, -1),
                                angles[None, :, :].expand(grid, grid, -1)], dim=-1).reshape(grid * grid, -1)
            cos, sin = angles.cos(), angles.sin()
            if self.context_tokens:
                cos = torch.cat([cos, torch.ones(self.context_tokens, cos.shape[1])])
                sin = torch.cat([sin, torch.zeros(self.context_tokens, sin.shape[1])])
            self._cache[key] = (cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype))
        return self._cache[key]

    def forward(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        cos, sin = self.tables(grid, x.device, x.dtype)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return x * cos + rotated * sin


class _BoundRoPE:
    """A RoPE applied at a fixed grid: the `rope(t)` callable the official attention signature takes."""

    def __init__(self, rope: AxialRoPE, grid: int):
        self.rope, self.grid = rope, grid

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.rope(x, self.grid)


class DenseAttention(nn.Module):
    """softmax(q kᵀ/√D) v through PyTorch SDPA (cuDNN / flash on GPU); q, k, v are B×H×N×D."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


@torch.compiler.disable
def attend(core: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`core(q, k, v)`, never traced by torch.compile: cuDNN SDPA and SLA2's kernels run as they are inside a
    compiled block (`sla2cli.graphs`), and one function, not one per layer, is what compiled code calls."""
    return core(q, k, v)


class Attention(nn.Module):
    """Self-attention with fused qkv, per-head RMS qk-norm and RoPE; `core` does the token mixing."""

    def __init__(self, dim: int, num_heads: int, core: nn.Module | None = None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = nn.Linear(dim, dim)
        self.core = core if core is not None else DenseAttention()

    @classmethod
    def adopt(cls, foreign: nn.Module, core: nn.Module) -> "Attention":
        """Wrap another codebase's attention (qkv, q_norm, k_norm, proj) without copying its weights."""
        attn = cls.__new__(cls)
        nn.Module.__init__(attn)
        attn.num_heads = foreign.num_heads
        for name in ("qkv", "q_norm", "k_norm", "proj"):
            setattr(attn, name, getattr(foreign, name))
        attn.core = core
        return attn

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = rope(self.q_norm(q))
        k = rope(self.k_norm(k))
        x = attend(self.core, q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class JiTBlock(nn.Module):
    """RMSNorm → attention → RMSNorm → SwiGLU, each modulated and gated by adaLN-Zero."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_hidden_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLUFFN(hidden_size, ffn_hidden_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, feat_rope=None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=feat_rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class BottleneckPatchEmbed(nn.Module):
    """Patchify through a low-rank bottleneck (official JiT); `bottleneck_dim=None` is PixelGen's plain conv."""

    def __init__(self, patch_size: int, in_chans: int, bottleneck_dim: int | None, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        if bottleneck_dim is None:
            self.proj1 = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=True)
        else:
            self.proj1 = nn.Conv2d(in_chans, bottleneck_dim, patch_size, stride=patch_size, bias=False)
            self.proj2 = nn.Conv2d(bottleneck_dim, embed_dim, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj1(x)
        if hasattr(self, "proj2"):
            x = self.proj2(x)
        return x.flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size
        self._freqs: dict[str, torch.Tensor] = {}

    def frequencies(self, device: torch.device, max_period: float = 10000) -> torch.Tensor:
        """Computed on the CPU as upstream does (bit-identical), copied to each device once: no host
        transfer per forward, so the forward can be captured in a CUDA graph."""
        key = str(device)
        if key not in self._freqs:
            half = self.frequency_embedding_size // 2
            self._freqs[key] = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half
                                         ).to(device)
        return self._freqs[key]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t[:, None].float() * self.frequencies(t.device)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row: index `num_classes` is the null class used by CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class JiT(nn.Module):
    """Just image Transformer: `forward(x, t, y)` returns the x-prediction (clean image estimate).

    Upstream prepends the in-context (class) tokens; this JiT appends them. Every other operation is per
    token and attention is permutation-equivariant, so outputs are the same, but SLA2's blocks then hold
    image tokens only, with the class tokens as their own last block, and no reordering copy is needed.
    """

    in_context_first = False  # read by `sla2.layers`: models without this attribute prepend (upstream)

    def __init__(self, config: JiTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.num_classes = config.num_classes
        self.in_context_len = config.in_context_len
        self.in_context_start = config.in_context_start
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        self.x_embedder = BottleneckPatchEmbed(config.patch_size, config.in_channels, config.bottleneck_dim, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size ** 2, D), requires_grad=False)
        if config.in_context_len > 0:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, config.in_context_len, D))
        self.feat_rope = AxialRoPE(config.head_dim)
        self.feat_rope_incontext = AxialRoPE(config.head_dim, context_tokens=config.in_context_len)
        self.blocks = nn.ModuleList(
            JiTBlock(D, config.num_heads, config.ffn_hidden_dim) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.in_channels)
        self._positions: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Upstream's initialisation (xavier linears, zeroed adaLN and output), for training from scratch."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.data.copy_(sincos_pos_embed(self.config.hidden_size, self.config.grid_size).unsqueeze(0))
        for conv in (getattr(self.x_embedder, "proj1"), getattr(self.x_embedder, "proj2", None)):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
        if self.config.in_context_len > 0:
            nn.init.normal_(self.in_context_posemb, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for param in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                      self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(param)

    def positions(self, grid: int, like: torch.Tensor) -> torch.Tensor:
        """The stored sin-cos table at the trained grid; at any other grid one built once and cached."""
        if grid * grid == self.pos_embed.shape[1]:
            return self.pos_embed
        key = (grid, str(like.device), like.dtype)
        if key not in self._positions:
            self._positions[key] = sincos_pos_embed(self.config.hidden_size, grid).to(like.device, like.dtype)[None]
        return self._positions[key]

    def unpatchify(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.in_channels
        x = x.reshape(x.shape[0], grid, grid, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid * p, grid * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        p = self.config.patch_size
        if H != W or H % p:
            raise InvalidParameter("x", (H, W), "{name} must be square with a side divisible by the patch size "
                                   "{p}, got {h}x{w}", p=p, h=H, w=W)
        grid = H // p
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y)
        c = t_emb + y_emb
        x = self.x_embedder(x) + self.positions(grid, x)
        plain, incontext = _BoundRoPE(self.feat_rope, grid), _BoundRoPE(self.feat_rope_incontext, grid)
        for i, block in enumerate(self.blocks):
            if self.in_context_len > 0 and i == self.in_context_start:
                tokens = y_emb.unsqueeze(1).repeat(1, self.in_context_len, 1) + self.in_context_posemb
                x = torch.cat([x, tokens], dim=1)
            x = block(x, c, plain if i < self.in_context_start else incontext)
        x = x[:, :grid * grid]
        return self.unpatchify(self.final_layer(x, c), grid)
