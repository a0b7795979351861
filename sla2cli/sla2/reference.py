"""SLA2 in plain PyTorch: the reference every kernel is checked against, and the CPU backend.

Memory stays bounded: queries are processed a chunk of query blocks at a time, the sparse branch
gathers only the kept key blocks, and the linear branch uses per-key-block statistics
h_j = φ(K_j)ᵀV_j and z_j = Σφ(K_j), summed over the blocks a query block did not keep. Nothing of
size N×N is ever built. Differentiable end to end (autograd), for fine-tuning on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import quant
from .feature_maps import FEATURE_MAPS
from .routing import Routing, compute_dtype, num_blocks, route

# Elements of the largest intermediate per chunk (scores or gathered statistics): 2^25 floats = 128 MiB.
CHUNK_ELEMENTS = 1 << 25


@dataclass
class SLA2Stats:
    """What the router kept and how much of the true softmax mass that captures.

    kept: B×H×n_q×n_k boolean map; captured_mass: B×H×n_q, the mean over each query block's tokens of
    the softmax probability that falls on kept keys (1.0 means the sparse branch alone is exact);
    alpha: B×H×n_q, the mean α applied to those tokens (per query with `mix_scale`).
    """

    kept: torch.Tensor
    captured_mass: torch.Tensor
    alpha: torch.Tensor

    @property
    def kept_fraction(self) -> float:
        return self.kept.float().mean().item()


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Pad the token dim to whole blocks and split it: B×H×N×D → B×H×n_b×block×D."""
    n = x.shape[-2]
    return F.pad(x, (0, 0, 0, num_blocks(n, block) * block - n)).unflatten(-2, (-1, block))


def _valid(n: int, block: int, device) -> torch.Tensor:
    """n_b×block mask of the real (not padding) tokens."""
    return (torch.arange(num_blocks(n, block) * block, device=device) < n).view(-1, block)


def _alpha_per_block(alpha: torch.Tensor, n_q: int, dtype) -> torch.Tensor:
    """α of shape (H,) or (H, n_q) as an H×n_q table."""
    alpha = alpha.to(dtype)
    if alpha.dim() == 1:
        return alpha[:, None].expand(-1, n_q)
    if alpha.shape[1] != n_q:
        raise ValueError(f"alpha has {alpha.shape[1]} query blocks but the input has {n_q}")
    return alpha


def requires_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will need a backward through any of these (None skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_features(feature_q: torch.Tensor | None, feature_k: torch.Tensor | None) -> None:
    """Learned feature maps W_q, W_k (H×D×r) come together, with one rank."""
    if (feature_q is None) != (feature_k is None) or (
            feature_q is not None and feature_q.shape[-1] != feature_k.shape[-1]):
        raise ValueError("feature_q and feature_k come together, with one rank: got "
                         f"{None if feature_q is None else tuple(feature_q.shape)} and "
                         f"{None if feature_k is None else tuple(feature_k.shape)}")


def feature_inputs(q: torch.Tensor, k: torch.Tensor, feature_q: torch.Tensor | None,
                   feature_k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What φ is applied to: q·W_q and k·W_k (B×H×N×r) with learned feature maps, else q and k."""
    check_features(feature_q, feature_k)
    if feature_q is not None:
        q = torch.einsum("bhnd,hdr->bhnr", q, feature_q.to(q.dtype))
    if feature_k is not None:
        k = torch.einsum("bhnd,hdr->bhnr", k, feature_k.to(k.dtype))
    return q, k


def query_alpha(alpha: torch.Tensor, mix_scale: torch.Tensor, lse_sparse: torch.Tensor,
                den: torch.Tensor) -> torch.Tensor:
    """α per query: σ(logit α + c·(lse_sparse − log den)); 1 where the linear branch has no mass (den = 0).

    The true share of the kept keys is σ(lse_kept − lse_rest); log den stands in for lse_rest, up to the
    learned scale c and the bias logit α (both per head)."""
    ok = den > 0
    evidence = lse_sparse - torch.log(torch.where(ok, den, 1.0))
    return torch.where(ok, torch.sigmoid(torch.logit(alpha) + mix_scale * evidence), 1.0)


def _gather_blocks(blocks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """blocks B×H×n_k×b×D, indices B×H×c×kk → B×H×c×kk×b×D."""
    B, H, n_k, b, D = blocks.shape
    c, kk = indices.shape[-2:]
    flat = indices.reshape(B, H, c * kk, 1, 1).expand(-1, -1, -1, b, D)
    return blocks.gather(2, flat).view(B, H, c, kk, b, D)


def _captured_mass(qb: torch.Tensor, k: torch.Tensor, lse_kept: torch.Tensor, q_valid: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of exp(lse over kept keys − lse over all keys), per query block."""
    scale = 1.0 / math.sqrt(qb.shape[-1])
    lse_all = torch.logsumexp(torch.einsum("bhcqd,bhnd->bhcqn", qb, k) * scale, dim=-1)
    mass = torch.exp(lse_kept - lse_all) * q_valid
    return mass.sum(-1) / q_valid.sum(-1)


def sla2_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float, alpha: torch.Tensor,
                   block_q: int = 64, block_k: int = 64, proj_q: torch.Tensor | None = None,
                   proj_k: torch.Tensor | None = None, feature_map: str = "softmax", qat: bool = False,
                   routing: Routing | None = None, return_stats: bool = False,
                   feature_q: torch.Tensor | None = None, feature_k: torch.Tensor | None = None,
                   mix_scale: torch.Tensor | None = None):
    """O = α⊙O_sparse + (1−α)⊙O_linear for q, k, v of shape B×H×N×D (see the package docs for the math).

    `routing` may be passed in (fine-tuning builds it with a soft mask); otherwise the router runs here.
    feature_q / feature_k (H×D×r) map q, k before φ; `mix_scale` makes α per query (`sla2_attention`).
    """
    if qat and requires_grad(q, k, v, alpha, proj_q, proj_k, feature_q, feature_k, mix_scale,
                             routing and routing.scores):
        return quant.straight_through_qat(
            sla2_reference, q, k, v, topk=topk, alpha=alpha, block_q=block_q, block_k=block_k, proj_q=proj_q,
            proj_k=proj_k, feature_map=feature_map, routing=routing, return_stats=return_stats, feature_q=feature_q,
            feature_k=feature_k, mix_scale=mix_scale)
    B, H, N, D = q.shape
    dtype = compute_dtype(q)
    scale = 1.0 / math.sqrt(D)
    phi = FEATURE_MAPS[feature_map]
    if routing is None:
        routing = route(q, k, topk=topk, block_q=block_q, block_k=block_k, proj_q=proj_q, proj_k=proj_k)
    n_q, n_k, kk = routing.mask.shape[-2], routing.mask.shape[-1], routing.kept_per_query_block
    alpha_table = _alpha_per_block(alpha, n_q, dtype)

    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    k_valid = _valid(N, block_k, q.device).to(dtype)  # n_k×b_k
    q_valid = _valid(N, block_q, q.device).to(dtype)  # n_q×b_q
    k_sparse, v_sparse = kf, vf
    if qat:
        k_sparse = kf - kf.mean(dim=-2, keepdim=True)  # softmax is invariant to it; INT8 range is not
        v_sparse = quant.fp8_e4m3(vf, reduce_dims=(-2,))
    k_blocks, v_blocks = _blocks(k_sparse, block_k), _blocks(v_sparse, block_k)
    if qat:
        k_blocks = quant.int8_per_block(k_blocks, block_dims=(-2, -1))

    all_kept = kk == n_k
    if not all_kept:
        fq, fk = feature_inputs(qf, kf, feature_q, feature_k)
        R = fk.shape[-1]
        phi_k = phi(_blocks(fk, block_k)) * k_valid[..., None]  # padding tokens contribute nothing
        h = torch.einsum("bhntr,bhnte->bhnre", phi_k, _blocks(vf, block_k)).flatten(-2)  # B×H×n_k×(R·D)
        z = phi_k.sum(-2)  # B×H×n_k×R
        fq_blocks = _blocks(fq, block_q)

    R = D if feature_k is None else feature_k.shape[-1]
    per_block = B * H * max(block_q * kk * block_k, R * D, block_q * N if return_stats else 0)
    chunk = max(1, CHUNK_ELEMENTS // per_block)
    q_blocks_all = _blocks(qf, block_q)
    outputs, masses, alphas = [], [], []
    for i0 in range(0, n_q, chunk):
        i1 = min(n_q, i0 + chunk)
        qb = q_blocks_all[:, :, i0:i1]  # B×H×c×b_q×D
        idx = routing.indices[:, :, i0:i1]
        qs = quant.int8_per_block(qb, block_dims=(-2, -1)) if qat else qb
        kb, vb = _gather_blocks(k_blocks, idx), _gather_blocks(v_blocks, idx)
        s = torch.einsum("bhcqd,bhcjtd->bhcqjt", qs, kb).flatten(-2) * scale
        key_ok = _valid(N, block_k, q.device)[idx].flatten(-2)  # B×H×c×(kk·b_k)
        s = s.masked_fill(~key_ok[..., None, :], float("-inf"))
        if qat:
            p = quant.fp8_online_probabilities(s.unflatten(-1, (idx.shape[-1], block_k)))
        else:
            p = torch.softmax(s, dim=-1)
        if mix_scale is not None and not all_kept:
            lse_sparse = torch.logsumexp(s, dim=-1)  # B×H×c×b_q
        o = torch.einsum("bhcqn,bhcnd->bhcqd", p, vb.flatten(-3, -2))
        if return_stats:
            kb_exact = _gather_blocks(_blocks(kf, block_k), idx)
            lse_kept = torch.logsumexp(torch.einsum("bhcqd,bhcjtd->bhcqjt", qb, kb_exact).flatten(-2) * scale
                                       + torch.where(key_ok, 0.0, float("-inf")).to(dtype)[..., None, :], dim=-1)
            masses.append(_captured_mass(qb, kf, lse_kept, q_valid[i0:i1]))
        if not all_kept:
            unkept = (~routing.mask[:, :, i0:i1]).to(dtype)  # B×H×c×n_k
            h_rest = (unkept @ h).unflatten(-1, (R, D))
            z_rest = unkept @ z
            phi_q = phi(fq_blocks[:, :, i0:i1])
            num = torch.einsum("bhcqr,bhcre->bhcqe", phi_q, h_rest)
            den = torch.einsum("bhcqr,bhcr->bhcq", phi_q, z_rest)[..., None]
            o_linear = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
            a = alpha_table[None, :, i0:i1, None, None]
            if mix_scale is not None:
                a = query_alpha(a[..., 0], mix_scale.to(dtype)[None, :, None, None], lse_sparse, den[..., 0])[..., None]
            o = a * o + (1 - a) * o_linear
        else:
            a = torch.ones_like(o[..., :1])
        if return_stats:
            valid = q_valid[i0:i1]
            alphas.append((a[..., 0] * valid).sum(-1).expand(B, H, -1) / valid.sum(-1))
        outputs.append(o)
    out = torch.cat(outputs, dim=2).flatten(2, 3)[:, :, :N].to(q.dtype)
    if not return_stats:
        return out
    return out, SLA2Stats(kept=routing.mask, captured_mass=torch.cat(masses, dim=2), alpha=torch.cat(alphas, dim=2))
