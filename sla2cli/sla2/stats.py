"""What a converted model holds (α, router drift, sparsity) and what it does on real inputs.

`describe_layers` reads parameters only. `measure_layers` runs a batch and compares every converted
layer with dense attention on the dense model's own q, k, v. `calibrate_alpha` sets α to the softmax
mass the kept blocks capture, which is exactly α for a perfect linear branch. `attention_entropy`
says how far from uniform a model's dense attention is (how much there is for sparsity to skip);
`attention_concentration` adds the softmax mass the top-k key blocks would capture, layer by layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import noised
from ..sampling import sample
from ..seeding import PROBE_NOISE, PROBE_SAMPLES, generator
from .attention import SLA2Attention, SLA2Config
from .layers import layer_prefix_tokens, layer_tokens, sla2_layers, transformer_blocks
from .probe import dense_cores, record_dense_qkv
from .routing import keep_count, num_blocks


def _drift(w: torch.Tensor) -> float:
    eye = torch.eye(w.shape[0], dtype=torch.float32, device=w.device)
    return ((w.detach().float() - eye).norm() / eye.norm()).item()


def describe_layers(model: nn.Module, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> list[dict]:
    """One record per block: converted or dense, and for SLA2 layers their settings, α and router drift, and
    with a `device` (and `dtype`) the path they run there (`SLA2Attention.path`)."""
    converted = sla2_layers(model)
    records = []
    for i, block in enumerate(transformer_blocks(model)):
        tokens = layer_tokens(model, i)
        heads = block.attn.num_heads
        record = {"layer": i, "tokens": tokens, "heads": heads,
                  "head_dim": block.attn.qkv.weight.shape[1] // heads, "converted": i in converted}
        core = converted.get(i)
        if isinstance(core, SLA2Attention):
            c = core.config
            n_k = num_blocks(tokens, c.block_k) if tokens else None
            kk = keep_count(c.topk, n_k) if n_k else None
            alpha = core.alpha.detach().float().cpu()
            per_head = alpha if alpha.dim() == 1 else alpha.mean(dim=1)
            record.update({
                "topk": c.topk, "block_q": c.block_q, "block_k": c.block_k, "feature_map": c.feature_map,
                "feature_rank": c.feature_rank, "qat": c.qat, "alpha_mode": c.alpha_mode, "kept_blocks": kk,
                "key_blocks": n_k,
                "nominal_sparsity": None if n_k is None else 1 - kk / n_k,
                "alpha_mean": alpha.mean().item(), "alpha_min": alpha.min().item(), "alpha_max": alpha.max().item(),
                "alpha_per_head": per_head.tolist(), "alpha": alpha.tolist(),
                "router_drift_q": _drift(core.proj_q), "router_drift_k": _drift(core.proj_k),
            })
            if device is not None:
                record["path"] = core.path(torch.empty(1, heads, 1, record["head_dim"], device=device, dtype=dtype))
        records.append(record)
    return records


@torch.no_grad()
def own_noised_batch(model: nn.Module, batch_size: int, *, t: float | None = None, resolution: int | None = None,
                     sampling_steps: int = 8, seed: int = 0, device="cpu") -> tuple[torch.Tensor, ...]:
    """Noised inputs from the model's own distribution: dense samples (random labels), re-noised at t.

    t=None draws t from JiT's logit-normal training distribution. Returns (z, t, labels).
    """
    cfg = model.config
    size = resolution or cfg.input_size
    gen = generator(seed, PROBE_SAMPLES)
    labels = torch.randint(0, cfg.num_classes, (batch_size,), generator=gen).to(device)
    dtype = next(model.parameters()).dtype
    noise = torch.randn(batch_size, cfg.in_channels, size, size, generator=gen).to(device, dtype) * cfg.noise_scale
    with dense_cores(model):
        x = sample(model, noise, labels, steps=sampling_steps)
    tt = None if t is None else torch.full((batch_size,), float(t))
    z, tt, _ = noised(x, seed=seed, stream=PROBE_NOISE, noise_scale=cfg.noise_scale, t=tt)
    return z, tt, labels


def relative_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample (dim 0): ‖out − target‖² / ‖target‖², in float32 (the finetune loss and its reported error)."""
    out, target = out.float(), target.float()
    err = (out - target).flatten(1).square().sum(1)
    return err / target.flatten(1).square().sum(1).clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def measure_layers(model: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Per converted layer: realised kept fraction, captured softmax mass and the output's error against dense:
    `relative_error` ‖O − O_dense‖ / ‖O_dense‖ over the batch, `relative_squared_error` the per-sample
    mean of its square (what finetuning minimises)."""
    converted = sla2_layers(model)
    qkv, _ = record_dense_qkv(model, list(converted), z, t, y)
    results = []
    for i, core in converted.items():
        q, k, v = qkv[i]
        dense = F.scaled_dot_product_attention(q, k, v).float()
        out, stats = core(q, k, v, return_stats=True)
        err = ((out.float() - dense).norm() / dense.norm()).item()
        results.append({"layer": i, "kept_fraction": stats.kept_fraction,
                        "captured_mass": stats.captured_mass.mean().item(),
                        "alpha_applied": stats.alpha.mean().item(),
                        "relative_error": err,
                        "relative_squared_error": relative_squared_error(out, dense).mean().item()})
    return results


PER_QUERY_CALIBRATION_ROUNDS = 4


@torch.no_grad()
def calibrate_alpha(model: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> dict[int, torch.Tensor]:
    """Set each converted layer's α to the captured softmax mass (per head, or per head and query block).

    With α per query the bias logit is moved until the mean α applied equals the mean captured mass
    (a few fixed-point rounds in logit space: the mean of σ(b + evidence) rises monotonically with b).
    """
    converted = sla2_layers(model)
    qkv, _ = record_dense_qkv(model, list(converted), z, t, y)
    chosen = {}
    for i, core in converted.items():
        _, stats = core(*qkv[i], return_stats=True)
        mass = stats.captured_mass.mean(dim=0)  # H×n_q
        target = mass.mean(dim=1) if core.alpha_logit.dim() == 1 else mass
        core.set_alpha(target)
        if core.config.alpha_mode == "per_query":
            for _ in range(PER_QUERY_CALIBRATION_ROUNDS):
                applied = core(*qkv[i], return_stats=True)[1].alpha.mean(dim=(0, 2)).clamp(1e-4, 1 - 1e-4)
                core.set_alpha(torch.sigmoid(core.alpha_logit + torch.logit(target.clamp(1e-4, 1 - 1e-4))
                                             - torch.logit(applied)))
        chosen[i] = core.alpha.detach().cpu()
    return chosen


def _head_log_probs(q: torch.Tensor, k: torch.Tensor):
    """Each head's dense softmax attention as B×N×N log-probabilities, one head at a time (B×N×N stays small)."""
    q, k = q.float(), k.float()
    for head in range(q.shape[1]):
        yield torch.log_softmax(q[:, head] @ k[:, head].transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def _entropy(q: torch.Tensor, k: torch.Tensor) -> dict:
    """Mean entropy (nats) of each query's softmax attention, per head and overall, with log N."""
    n = k.shape[-2]
    per_head = torch.stack([-(logp.exp() * logp).sum(-1).mean(dim=(0, 1)) for logp in _head_log_probs(q, k)])
    return {"tokens": n, "log_n": math.log(n), "entropy": per_head.mean().item(), "entropy_per_head": per_head.tolist()}


def _mass_ceiling(q: torch.Tensor, k: torch.Tensor, kept_tokens: list[int]) -> list[float]:
    """For each count: the mean softmax mass of each query's own `count` heaviest keys, the most any router
    (any block order or block size) can keep with that many keys; the linear branch must carry the rest."""
    totals = [0.0] * len(kept_tokens)
    heads = q.shape[1]
    for logp in _head_log_probs(q, k):
        ordered = logp.exp().sort(dim=-1, descending=True).values.cumsum(-1)
        for j, count in enumerate(kept_tokens):
            totals[j] += ordered[..., count - 1].mean().item() / heads
    return totals


def _all_layers(model: nn.Module, layers: list[int] | None) -> list[int]:
    return list(range(len(transformer_blocks(model)))) if layers is None else layers


@torch.no_grad()
def attention_entropy(model: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      layers: list[int] | None = None) -> dict[int, dict]:
    """Per layer: mean entropy (nats) of each query's dense softmax attention, and log N for reference.

    Uniform attention has entropy log N; a layer that attends locally or to a few tokens is far below.
    """
    layers = _all_layers(model, layers)
    qkv, _ = record_dense_qkv(model, layers, z, t, y)
    return {i: _entropy(*qkv[i][:2]) for i in layers}


# The topk values `attention_concentration` reports by default: the presets' (max-speed, balanced, quality).
CONCENTRATION_TOPKS = (0.05, 0.15, 0.25)


@torch.no_grad()
def attention_concentration(model: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                            topks=CONCENTRATION_TOPKS, block_k: int = 64, layers: list[int] | None = None
                            ) -> list[dict]:
    """Per layer of a model run dense: how much its attention leaves for block sparsity to skip.

    `entropy_ratio` is the entropy of its attention over log N (`attention_entropy`: 1.0 is uniform);
    `captured_mass[topk]` the softmax mass the key blocks SLA2 would keep at that topk capture (router at
    identity, as right after conversion: what `calibrate_alpha` would set α to); `mass_ceiling[topk]` the most
    any router could capture with as many keys (each query's own heaviest keys, no blocks): where it is far
    below 1 the attention is diffuse and the linear branch carries the rest whatever the router learns.
    Blocks of `block_k` tokens.
    """
    layers = _all_layers(model, layers)
    qkv, _ = record_dense_qkv(model, layers, z, t, y)
    rows = []
    for i in layers:
        q, k, v = qkv[i]
        entropy = _entropy(q, k)
        mass = {}
        for topk in topks:
            core = SLA2Attention(q.shape[1], q.shape[-1], SLA2Config(topk=topk, block_q=block_k, block_k=block_k),
                                 prefix_tokens=layer_prefix_tokens(model, i)).to(q.device)
            mass[topk] = core(q, k, v, return_stats=True)[1].captured_mass.mean().item()
        n, n_k = entropy["tokens"], num_blocks(entropy["tokens"], block_k)
        kept = {topk: keep_count(topk, n_k) for topk in topks}
        ceiling = _mass_ceiling(q, k, [min(n, kept[topk] * block_k) for topk in topks])
        rows.append({"layer": i, "tokens": n, "key_blocks": n_k, "block_k": block_k,
                     "entropy_ratio": entropy["entropy"] / entropy["log_n"], "kept_blocks": kept,
                     "captured_mass": mass, "mass_ceiling": dict(zip(topks, ceiling))})
    return rows
