"""Independent reference for the official JiT / PixelGen forward pass, and checkpoint fixture builders.

Written from a reading of the official code (LTH14/JiT `model_jit.py`, `util/model_util.py`,
`util/misc.py:save_model`, `main_jit.py:get_args_parser`; PixelGen `src/models/transformer/JiT.py`),
NOT from sla2cli. Nothing here imports sla2cli: it is the yardstick sla2cli is measured against.

`official_forward(sd, x, t, y, in_context_start=...)` evaluates the official network functionally
from a plain state_dict carrying the official key names (no `net.` / `denoiser.` prefix):

    pos_embed                      (1, N, D)        fixed 2-D sin-cos table (a Parameter, so it is saved)
    in_context_posemb              (1, L, D)        only when in_context_len > 0
    t_embedder.mlp.{0,2}.{weight,bias}               Linear(256, D), SiLU, Linear(D, D)
    y_embedder.embedding_table.weight (classes+1, D) last row = null class
    x_embedder.proj1.weight        (bneck, C, p, p) bias-free conv   \\ official JiT
    x_embedder.proj2.{weight,bias} (D, bneck, 1, 1) 1x1 conv         /
    x_embedder.proj1.{weight,bias} (D, C, p, p)     single conv with bias: PixelGen (no bottleneck)
    blocks.i.norm1.weight, blocks.i.norm2.weight     RMSNorm(D), eps 1e-6
    blocks.i.attn.qkv.{weight,bias} (3D, D)          fused, layout (3, heads, head_dim)
    blocks.i.attn.q_norm.weight, k_norm.weight       RMSNorm(head_dim) per head
    blocks.i.attn.proj.{weight,bias}
    blocks.i.mlp.w12.{weight,bias} (2F, D)           SwiGLU: silu(first half) * second half
    blocks.i.mlp.w3.{weight,bias}  (D, F)            F = int(int(4 D) * 2 / 3) for the official models
    blocks.i.adaLN_modulation.1.{weight,bias} (6D, D) shift/scale/gate msa, shift/scale/gate mlp
    final_layer.norm_final.weight, final_layer.linear.{weight,bias} (p*p*C, D),
    final_layer.adaLN_modulation.1.{weight,bias} (2D, D)  shift, scale

Numerics follow the official code op for op (float32 RMSNorm that casts back, RoPE tables built
like `VisionRotaryEmbeddingFast` including its `arange(n) / n * n` positions, sdpa attention).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# architecture read from shapes
# --------------------------------------------------------------------------------------------


def infer_arch(sd: dict) -> dict:
    """Architecture facts readable from the tensors of an official state_dict."""
    w1 = sd["x_embedder.proj1.weight"]
    bottleneck = "x_embedder.proj2.weight" in sd
    depth = 0
    while f"blocks.{depth}.norm1.weight" in sd:
        depth += 1
    hidden = sd["pos_embed"].shape[-1]
    head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
    num_patches = sd["pos_embed"].shape[1]
    grid = math.isqrt(num_patches)
    assert grid * grid == num_patches
    return {
        "patch_size": w1.shape[-1],
        "in_channels": w1.shape[1],
        "bottleneck_dim": w1.shape[0] if bottleneck else None,
        "hidden_size": hidden,
        "depth": depth,
        "head_dim": head_dim,
        "num_heads": hidden // head_dim,
        "num_classes": sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        "in_context_len": sd["in_context_posemb"].shape[1] if "in_context_posemb" in sd else 0,
        "ffn_hidden": sd["blocks.0.mlp.w3.weight"].shape[1],
        "grid": grid,
        "img_size": grid * w1.shape[-1],
    }


# --------------------------------------------------------------------------------------------
# building blocks, as the official code computes them
# --------------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # official RMSNorm: to float32, x * rsqrt(mean(x^2) + eps), weight * that, back to input dtype
    in_dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return (weight * h).to(in_dtype)


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _linear(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    freqs = freqs.to(device=t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope_tables(head_dim: int, grid: int, num_prefix: int = 0, theta: float = 10000):
    """(cos, sin) of shape (num_prefix + grid*grid, head_dim), exactly as VisionRotaryEmbeddingFast.

    The module is built with dim = head_dim // 2 ('lang' frequencies over that dim), each frequency
    repeated for an interleaved pair, the row (h) half then the column (w) half of the head dim.
    Prefix (in-context) tokens get cos = 1, sin = 0: they are not rotated.
    """
    dim = head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    pos = torch.arange(grid) / grid * grid  # float32, like the official `t`
    f = pos[:, None] * inv[None, :]  # (grid, dim/2) outer product
    f = torch.stack([f, f], dim=-1).reshape(grid, -1)  # interleave: f0 f0 f1 f1 ...
    rows = f[:, None, :].expand(grid, grid, f.shape[-1])
    cols = f[None, :, :].expand(grid, grid, f.shape[-1])
    f2 = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
    cos, sin = f2.cos(), f2.sin()
    if num_prefix > 0:
        d = cos.shape[-1]
        cos = torch.cat([torch.ones(num_prefix, d, dtype=cos.dtype), cos], dim=0)
        sin = torch.cat([torch.zeros(num_prefix, d, dtype=sin.dtype), sin], dim=0)
    return cos, sin


def _rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    # pairs (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    a, b = pairs.unbind(-1)
    return torch.stack((-b, a), dim=-1).reshape(x.shape)


def _rotate_half_split(x: torch.Tensor) -> torch.Tensor:  # a WRONG convention, for mutation tests
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _apply_rope(x, cos, sin, pairing="interleaved"):
    cos = cos.to(dtype=x.dtype, device=x.device)
    sin = sin.to(dtype=x.dtype, device=x.device)
    if pairing == "interleaved":
        return x * cos + _rotate_half_interleaved(x) * sin
    if pairing == "split":
        return x * cos + _rotate_half_split(x) * sin
    if pairing == "none":
        return x
    raise ValueError(pairing)


def _attention(x, sd, pre, num_heads, cos, sin, pairing):
    B, N, C = x.shape
    qkv = _linear(x, sd, pre + "qkv").reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = _rms_norm(q, sd[pre + "q_norm.weight"])
    k = _rms_norm(k, sd[pre + "k_norm.weight"])
    q = _apply_rope(q, cos, sin, pairing)
    k = _apply_rope(k, cos, sin, pairing)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    o = o.transpose(1, 2).reshape(B, N, C)
    return _linear(o, sd, pre + "proj")


def _swiglu(x, sd, pre):
    x1, x2 = _linear(x, sd, pre + "w12").chunk(2, dim=-1)
    return _linear(F.silu(x1) * x2, sd, pre + "w3")


def _block(x, c, sd, i, num_heads, cos, sin, pairing):
    pre = f"blocks.{i}."
    mod = _linear(F.silu(c), sd, pre + "adaLN_modulation.1")
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    h = _modulate(_rms_norm(x, sd[pre + "norm1.weight"]), shift_msa, scale_msa)
    x = x + gate_msa.unsqueeze(1) * _attention(h, sd, pre + "attn.", num_heads, cos, sin, pairing)
    h = _modulate(_rms_norm(x, sd[pre + "norm2.weight"]), shift_mlp, scale_mlp)
    x = x + gate_mlp.unsqueeze(1) * _swiglu(h, sd, pre + "mlp.")
    return x


def _patch_embed(x, sd):
    if "x_embedder.proj2.weight" in sd:  # official JiT: bottleneck conv (no bias) then 1x1 conv
        w1 = sd["x_embedder.proj1.weight"]
        p = w1.shape[-1]
        h = F.conv2d(x, w1, None, stride=p)
        h = F.conv2d(h, sd["x_embedder.proj2.weight"], sd["x_embedder.proj2.bias"], stride=1)
    else:  # PixelGen PatchEmbed: one conv with bias
        w1 = sd["x_embedder.proj1.weight"]
        p = w1.shape[-1]
        h = F.conv2d(x, w1, sd["x_embedder.proj1.bias"], stride=p)
    return h.flatten(2).transpose(1, 2)


def _unpatchify(x, p, c):
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1]
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, h * p)


# --------------------------------------------------------------------------------------------
# the forward pass
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def official_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                     in_context_start: int, num_heads: int | None = None,
                     _rope_pairing: str = "interleaved") -> torch.Tensor:
    """Official JiT(x, t, y) -> x-prediction (N, C, H, W), computed from a plain state_dict.

    `num_heads` defaults to hidden // q_norm size (it is fixed by the shapes). `_rope_pairing` exists
    only so tests can check the fixtures would catch a wrong RoPE convention ("split", "none").
    """
    arch = infer_arch(sd)
    if num_heads is None:
        num_heads = arch["num_heads"]
    assert num_heads * arch["head_dim"] == arch["hidden_size"], "num_heads disagrees with q_norm size"
    p, C, L = arch["patch_size"], arch["in_channels"], arch["in_context_len"]
    grid = arch["grid"]
    assert x.shape[-1] == x.shape[-2] == grid * p, "official JiT only runs at its trained img_size"

    t_emb = _linear(F.silu(_linear(timestep_embedding(t, 256).to(x.dtype), sd, "t_embedder.mlp.0")),
                    sd, "t_embedder.mlp.2")
    y_emb = F.embedding(y, sd["y_embedder.embedding_table.weight"])
    c = t_emb + y_emb

    h = _patch_embed(x, sd)
    h = h + sd["pos_embed"]

    cos0, sin0 = rope_tables(arch["head_dim"], grid, 0)
    cos1, sin1 = rope_tables(arch["head_dim"], grid, L)
    for i in range(arch["depth"]):
        if L > 0 and i == in_context_start:
            ctx = y_emb.unsqueeze(1).repeat(1, L, 1)
            ctx = ctx + sd["in_context_posemb"]
            h = torch.cat([ctx, h], dim=1)
        cos, sin = (cos0, sin0) if i < in_context_start else (cos1, sin1)
        h = _block(h, c, sd, i, num_heads, cos, sin, _rope_pairing)

    h = h[:, L:]
    shift, scale = _linear(F.silu(c), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = _modulate(_rms_norm(h, sd["final_layer.norm_final.weight"]), shift, scale)
    h = _linear(h, sd, "final_layer.linear")
    return _unpatchify(h, p, C)


# --------------------------------------------------------------------------------------------
# fixture builders
# --------------------------------------------------------------------------------------------


def official_sincos_pos_embed(embed_dim: int, grid: int) -> torch.Tensor:
    """(1, grid*grid, embed_dim) float32: the official get_2d_sincos_pos_embed (float64 maths)."""
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)  # mesh[0] varies along w

    def one_axis(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_axis(embed_dim // 2, mesh[0]), one_axis(embed_dim // 2, mesh[1])], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


def official_ffn_hidden(hidden: int, mlp_ratio: float = 4.0) -> int:
    return int(int(hidden * mlp_ratio) * 2 / 3)


def random_official_state_dict(*, hidden: int, depth: int, heads: int, patch: int, img_size: int,
                               num_classes: int, bottleneck_dim: int | None, in_context_len: int,
                               ffn_hidden: int | None = None, in_chans: int = 3,
                               seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """A float32 state_dict in the official key order with every parameter non-zero.

    Scales keep activations O(1) and make every path matter (gates, RoPE, in-context tokens).
    `bottleneck_dim=None` gives PixelGen's single-conv patch embed.
    """
    assert hidden % heads == 0
    head_dim = hidden // heads
    assert head_dim % 4 == 0, "the official RoPE needs head_dim divisible by 4"
    assert img_size % patch == 0
    grid = img_size // patch
    F_ = ffn_hidden if ffn_hidden is not None else official_ffn_hidden(hidden)
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    def norm_w(n, spread=0.15):
        return 1.0 + rn(n, std=spread)

    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    # JiT's own parameters come first in state_dict order, then submodules in registration order
    sd["pos_embed"] = official_sincos_pos_embed(hidden, grid)
    if in_context_len > 0:
        sd["in_context_posemb"] = rn(1, in_context_len, hidden, std=0.5)
    sd["t_embedder.mlp.0.weight"] = rn(hidden, 256, std=1 / 16)
    sd["t_embedder.mlp.0.bias"] = rn(hidden, std=0.1)
    sd["t_embedder.mlp.2.weight"] = rn(hidden, hidden, std=hidden ** -0.5)
    sd["t_embedder.mlp.2.bias"] = rn(hidden, std=0.1)
    sd["y_embedder.embedding_table.weight"] = rn(num_classes + 1, hidden, std=0.5)
    fan = in_chans * patch * patch
    if bottleneck_dim is not None:
        sd["x_embedder.proj1.weight"] = rn(bottleneck_dim, in_chans, patch, patch, std=fan ** -0.5)
        sd["x_embedder.proj2.weight"] = rn(hidden, bottleneck_dim, 1, 1, std=bottleneck_dim ** -0.5)
        sd["x_embedder.proj2.bias"] = rn(hidden, std=0.1)
    else:
        sd["x_embedder.proj1.weight"] = rn(hidden, in_chans, patch, patch, std=fan ** -0.5)
        sd["x_embedder.proj1.bias"] = rn(hidden, std=0.1)
    for i in range(depth):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"] = norm_w(hidden)
        sd[b + "attn.q_norm.weight"] = norm_w(head_dim, 0.3)
        sd[b + "attn.k_norm.weight"] = norm_w(head_dim, 0.3)
        sd[b + "attn.qkv.weight"] = rn(3 * hidden, hidden, std=hidden ** -0.5)
        sd[b + "attn.qkv.bias"] = rn(3 * hidden, std=0.1)
        sd[b + "attn.proj.weight"] = rn(hidden, hidden, std=hidden ** -0.5)
        sd[b + "attn.proj.bias"] = rn(hidden, std=0.1)
        sd[b + "norm2.weight"] = norm_w(hidden)
        sd[b + "mlp.w12.weight"] = rn(2 * F_, hidden, std=hidden ** -0.5)
        sd[b + "mlp.w12.bias"] = rn(2 * F_, std=0.1)
        sd[b + "mlp.w3.weight"] = rn(hidden, F_, std=F_ ** -0.5)
        sd[b + "mlp.w3.bias"] = rn(hidden, std=0.1)
        sd[b + "adaLN_modulation.1.weight"] = rn(6 * hidden, hidden, std=0.5 * hidden ** -0.5)
        sd[b + "adaLN_modulation.1.bias"] = rn(6 * hidden, std=0.2)
    sd["final_layer.norm_final.weight"] = norm_w(hidden)
    sd["final_layer.linear.weight"] = rn(patch * patch * in_chans, hidden, std=hidden ** -0.5)
    sd["final_layer.linear.bias"] = rn(patch * patch * in_chans, std=0.1)
    sd["final_layer.adaLN_modulation.1.weight"] = rn(2 * hidden, hidden, std=0.5 * hidden ** -0.5)
    sd["final_layer.adaLN_modulation.1.bias"] = rn(2 * hidden, std=0.2)
    assert_all_nonzero(sd)
    return sd


def assert_all_nonzero(sd: dict) -> None:
    """Every tensor is non-zero; all but the sin-cos table (sin 0 = 0) have no zero entry at all."""
    for k, v in sd.items():
        assert v.abs().sum() > 0, f"{k} is all zero"
        if k != "pos_embed":
            assert bool((v != 0).all()), f"{k} has zero entries"


def perturbed(sd: dict, seed: int, rel: float = 0.1) -> "OrderedDict[str, torch.Tensor]":
    """A copy with every learned tensor scaled elementwise by (1 + rel * N(0,1)); pos_embed kept.

    pos_embed is a frozen Parameter upstream, so EMA copies of it stay equal to the table.
    """
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for k, v in sd.items():
        if k == "pos_embed":
            out[k] = v.clone()
        else:
            out[k] = v * (1 + rel * torch.randn(v.shape, generator=g))
    assert_all_nonzero(out)
    return out


def official_args(model: str = "JiT-B/16", img_size: int = 256, class_num: int = 1000,
                  **overrides) -> argparse.Namespace:
    """argparse.Namespace as main_jit.py's parser produces it (its defaults), after main() ran."""
    ns = dict(
        model=model, img_size=img_size, attn_dropout=0.0, proj_dropout=0.0,
        epochs=600, warmup_epochs=5, batch_size=128, lr=5e-5 * 1024 / 256, blr=5e-5, min_lr=0.0,
        lr_schedule="constant", weight_decay=0.0, ema_decay1=0.9999, ema_decay2=0.9996,
        P_mean=-0.8, P_std=0.8, noise_scale=1.0, t_eps=5e-2, label_drop_prob=0.1,
        seed=0, start_epoch=0, num_workers=12, pin_mem=True,
        sampling_method="heun", num_sampling_steps=50, cfg=2.9, interval_min=0.1, interval_max=1.0,
        num_images=50000, eval_freq=40, online_eval=False, evaluate_gen=False, gen_bsz=256,
        data_path="./data/imagenet", class_num=class_num, output_dir="./output_dir", resume="",
        save_last_freq=5, log_freq=100, device="cuda", world_size=8, local_rank=-1,
        dist_on_itp=False, dist_url="env://", rank=0, gpu=0, distributed=True, dist_backend="nccl",
    )
    ns.update(overrides)
    return argparse.Namespace(**ns)


def _adamw_state(sd: dict, seed: int, step: int = 1000) -> dict:
    """An AdamW state_dict over the learned tensors, in torch.optim's layout (as `optimizer.state_dict()`
    saves it): per-parameter step / exp_avg / exp_avg_sq, two param groups (no-decay, decay)."""
    g = torch.Generator().manual_seed(seed)
    learned = [v for k, v in sd.items() if k != "pos_embed"]  # pos_embed: requires_grad=False
    order = [i for i, v in enumerate(learned) if v.ndim == 1] + [i for i, v in enumerate(learned) if v.ndim != 1]
    state = {}
    for slot, i in enumerate(order):
        v = learned[i]
        state[slot] = {"step": torch.tensor(float(step)),
                       "exp_avg": torch.randn(v.shape, generator=g) * 1e-4,
                       "exp_avg_sq": torch.rand(v.shape, generator=g) * 1e-8}
    n_nd = sum(1 for v in learned if v.ndim == 1)
    common = dict(lr=2e-4, betas=(0.9, 0.95), eps=1e-8, amsgrad=False, foreach=None, maximize=False,
                  capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True)
    groups = [dict(common, weight_decay=0.0, params=list(range(n_nd))),
              dict(common, weight_decay=0.0, params=list(range(n_nd, len(order))))]
    return {"state": state, "param_groups": groups}


def _atomic_save(obj, path) -> None:
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_official_pth(path, state_dict: dict, args: argparse.Namespace | None = None, *,
                       seed: int = 1, epoch: int = 599) -> dict:
    """Write an official JiT checkpoint (util/misc.py:save_model layout) and return its entries.

    File: {'model': {'net.'+k}, 'optimizer': AdamW state, 'epoch': int, 'args': Namespace,
           'model_ema1': {'net.'+k}, 'model_ema2': {'net.'+k}}.
    `model` holds `state_dict`; the two EMA entries hold distinct perturbations of it, so a test can
    tell which one was loaded. `args` defaults to official_args() with model 'JiT-T/<patch>' (no
    preset). Returns {'model': sd, 'model_ema1': sd1, 'model_ema2': sd2}
    (plain keys, no prefix).
    """
    entries = {
        "model": OrderedDict((k, v.clone()) for k, v in state_dict.items()),
        "model_ema1": perturbed(state_dict, seed * 1000 + 1),
        "model_ema2": perturbed(state_dict, seed * 1000 + 2),
    }
    if args is None:
        a = infer_arch(state_dict)
        # a JiT-style name that is NOT a preset: a tiny model must not claim a preset's in_context_start
        args = official_args(model=f"JiT-T/{a['patch_size']}", img_size=a["img_size"], class_num=a["num_classes"])

    def prefixed(sd):
        return OrderedDict(("net." + k, v) for k, v in sd.items())

    to_save = {
        "model": prefixed(entries["model"]),
        "optimizer": _adamw_state(state_dict, seed),
        "epoch": epoch,
        "args": copy.deepcopy(args),
        "model_ema1": prefixed(entries["model_ema1"]),
        "model_ema2": prefixed(entries["model_ema2"]),
    }
    _atomic_save(to_save, path)
    return entries


def write_pixelgen_ckpt(path, state_dict: dict, *, seed: int = 2, global_step: int = 40000) -> dict:
    """Write a PixelGen / Lightning checkpoint and return {'denoiser': sd, 'ema_denoiser': sd_ema}.

    File: {'state_dict': {'denoiser.'+k, 'ema_denoiser.'+k (different weights), other modules' keys
    (vae., conditioner., diffusion_trainer. ...)}, 'epoch', 'global_step',
    'pytorch-lightning_version', 'optimizer_states': [AdamW state], 'lr_schedulers': [], ...}.
    The other modules include a key ending like a JiT key, which a loader must still ignore.
    """
    entries = {
        "denoiser": OrderedDict((k, v.clone()) for k, v in state_dict.items()),
        "ema_denoiser": perturbed(state_dict, seed * 1000 + 7),
    }
    g = torch.Generator().manual_seed(seed)
    full = OrderedDict()
    full["vae.scale"] = torch.tensor(1.0)
    full["conditioner.null_condition"] = torch.tensor(1000)
    for k, v in entries["denoiser"].items():
        full["denoiser." + k] = v
    for k, v in entries["ema_denoiser"].items():
        full["ema_denoiser." + k] = v
    # a perceptual-loss / REPA encoder inside the trainer, with JiT-looking key suffixes
    full["diffusion_trainer.encoder.pos_embed"] = torch.randn(1, 5, 8, generator=g)
    full["diffusion_trainer.encoder.blocks.0.attn.qkv.weight"] = torch.randn(24, 8, generator=g)
    full["diffusion_trainer.proj.0.weight"] = torch.randn(16, 8, generator=g)
    ckpt = {
        "epoch": 79,
        "global_step": global_step,
        "pytorch-lightning_version": "2.5.1",
        "state_dict": full,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 80, "completed": 79}}}},
        "callbacks": {},
        "optimizer_states": [_adamw_state(state_dict, seed)],
        "lr_schedulers": [],
    }
    _atomic_save(ckpt, path)
    return entries
