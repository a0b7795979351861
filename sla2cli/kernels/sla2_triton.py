"""Triton kernels of SLA2's forward: block pooling, per-key-block linear statistics, and the fused attention.

Three launches per call: `_pool_kernel` (block means of q for the router), `_stats_kernel` (one pass over
K and V giving the router's key-block means and the linear branch's h_j = φ(K_j)ᵀV_j, z_j = Σφ(K_j) and
their per-program partial totals), and `_sla2_fwd_kernel` (per query block: online-softmax attention over
the kept key blocks only, the linear branch as totals minus the kept blocks' statistics, the α mix and
one store). Every tensor is read through explicit strides, so the B×N×3×H×D views JiT makes need no copy.
Head dims that are not powers of two are padded in registers only (masked loads, nothing written padded).
"""

from __future__ import annotations

import triton
import triton.language as tl

FEATURE_IDS = {"softmax": 0, "elu": 1, "relu": 2}


@triton.jit
def _phi(x, dmask, FEATURE: tl.constexpr):
    """The linear branch's feature map over the (masked) feature dim; padded features map to 0."""
    if FEATURE == 0:
        x = tl.where(dmask[None, :], x, float("-inf"))
        e = tl.exp(x - tl.max(x, 1)[:, None])
        y = e / tl.sum(e, 1)[:, None]
    elif FEATURE == 1:
        y = tl.where(dmask[None, :], tl.where(x > 0, x + 1.0, tl.exp(x)), 0.0)
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _pool_kernel(x_ptr, out_ptr, s_b, s_h, s_n, s_d, H, N, D, n_blocks,
                 BLOCK: tl.constexpr, D_PAD: tl.constexpr):
    """Mean of each block of BLOCK tokens (a partial last block averages its real tokens), fp32 out."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    base = x_ptr + (bh // H).to(tl.int64) * s_b + (bh % H).to(tl.int64) * s_h
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    x = tl.load(base + rows[:, None].to(tl.int64) * s_n + cols[None, :] * s_d, mask=mask, other=0.0)
    count = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x.to(tl.float32), 0) / count
    tl.store(out_ptr + (bh * n_blocks + blk).to(tl.int64) * D + cols, mean, mask=cols < D)


@triton.jit
def _stats_kernel(k_ptr, v_ptr, h_ptr, z_ptr, hpart_ptr, zpart_ptr, kbar_ptr,
                  sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                  H, N, D, n_k, n_parts,
                  GROUP: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
                  FEATURE: tl.constexpr, PREC: tl.constexpr):
    """For GROUP consecutive key blocks: h_j, z_j, the block mean of k, and the group's partial totals."""
    part = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    hh = (bh % H).to(tl.int64)
    cols = tl.arange(0, D_PAD)
    dmask = cols < D
    dmask2 = dmask[:, None] & dmask[None, :]
    h_acc = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
    z_acc = tl.zeros([D_PAD], dtype=tl.float32)
    for g in range(GROUP):
        j = part * GROUP + g
        rows = j * BLOCK_K + tl.arange(0, BLOCK_K)
        rvalid = rows < N  # also false for the whole block when j >= n_k
        dvalid = dmask & ((cols * 0 + j) < n_k)
        mask = rvalid[:, None] & dmask[None, :]
        r64 = rows[:, None].to(tl.int64)
        kt = tl.load(k_ptr + b * sk_b + hh * sk_h + r64 * sk_n + cols[None, :] * sk_d, mask=mask, other=0.0)
        vt = tl.load(v_ptr + b * sv_b + hh * sv_h + r64 * sv_n + cols[None, :] * sv_d, mask=mask, other=0.0)
        kf = kt.to(tl.float32)
        phik = tl.where(rvalid[:, None], _phi(kf, dmask, FEATURE), 0.0)
        h = tl.dot(tl.trans(phik), vt.to(tl.float32), input_precision=PREC)
        z = tl.sum(phik, 0)
        jb = (bh * n_k + j).to(tl.int64)
        count = tl.maximum(tl.minimum(N - j * BLOCK_K, BLOCK_K), 1).to(tl.float32)
        tl.store(kbar_ptr + jb * D + cols, tl.sum(kf, 0) / count, mask=dvalid)
        tl.store(h_ptr + jb * D * D + cols[:, None] * D + cols[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=dvalid[:, None] & dvalid[None, :])
        tl.store(z_ptr + jb * D + cols, z, mask=dvalid)
        h_acc += h
        z_acc += z
    pb = (bh * n_parts + part).to(tl.int64)
    tl.store(hpart_ptr + pb * D * D + cols[:, None] * D + cols[None, :], h_acc, mask=dmask2)
    tl.store(zpart_ptr + pb * D + cols, z_acc, mask=dmask)


@triton.jit
def _sla2_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, alpha_ptr, h_ptr, z_ptr, htot_ptr, ztot_ptr,
                     sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                     so_b, so_h, so_n, so_d, sa_h, sa_i,
                     H, N, D, n_q, n_k, kk, qk_scale,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
                     FEATURE: tl.constexpr, LINEAR: tl.constexpr, PREC: tl.constexpr, LIN_PREC: tl.constexpr):
    """One query block of one head: sparse softmax over its kk kept key blocks, linear over the rest, mixed."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    hh = (bh % H).to(tl.int64)
    cols = tl.arange(0, D_PAD)
    dmask = cols < D
    rows_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = (rows_q < N)[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b * sq_b + hh * sq_h + rows_q[:, None].to(tl.int64) * sq_n + cols[None, :] * sq_d,
                mask=qmask, other=0.0)
    k_base = k_ptr + b * sk_b + hh * sk_h
    v_base = v_ptr + b * sv_b + hh * sv_h
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, D_PAD], dtype=tl.float32)
    if LINEAR:
        dmask2 = dmask[:, None] & dmask[None, :]
        h_kept = tl.zeros([D_PAD, D_PAD], dtype=tl.float32)
        z_kept = tl.zeros([D_PAD], dtype=tl.float32)
        hz_base = (bh * n_k).to(tl.int64)
    idx_row = idx_ptr + (bh * n_q + pid_q).to(tl.int64) * kk
    for t in range(kk):
        j = tl.load(idx_row + t)
        rows_k = j * BLOCK_K + tl.arange(0, BLOCK_K)
        kvalid = rows_k < N
        kvmask = kvalid[:, None] & dmask[None, :]
        r64 = rows_k[:, None].to(tl.int64)
        kt = tl.load(k_base + r64 * sk_n + cols[None, :] * sk_d, mask=kvmask, other=0.0)
        vt = tl.load(v_base + r64 * sv_n + cols[None, :] * sv_d, mask=kvmask, other=0.0)
        if LINEAR:
            jb = hz_base + j
            h_kept += tl.load(h_ptr + jb * D * D + cols[:, None] * D + cols[None, :], mask=dmask2,
                              other=0.0).to(tl.float32)
            z_kept += tl.load(z_ptr + jb * D + cols, mask=dmask, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        s = tl.where(kvalid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        corr = tl.exp2(m_i - m_new)
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    if LINEAR:
        phiq = _phi(q.to(tl.float32), dmask, FEATURE)
        h_rest = tl.load(htot_ptr + bh.to(tl.int64) * D * D + cols[:, None] * D + cols[None, :], mask=dmask2,
                         other=0.0) - h_kept
        z_rest = tl.load(ztot_ptr + bh.to(tl.int64) * D + cols, mask=dmask, other=0.0) - z_kept
        num = tl.dot(phiq, h_rest, input_precision=LIN_PREC)
        den = tl.sum(phiq * z_rest[None, :], 1)
        lin = tl.where(den[:, None] > 0, num / tl.where(den > 0, den, 1.0)[:, None], 0.0)
        a = tl.load(alpha_ptr + hh * sa_h + pid_q * sa_i)
        out = a * out + (1.0 - a) * lin
    tl.store(o_ptr + b * so_b + hh * so_h + rows_q[:, None].to(tl.int64) * so_n + cols[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=qmask)
