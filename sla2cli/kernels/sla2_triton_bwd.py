"""Triton kernels of SLA2's backward: one pass per query block, then one per key block.

With G = dO, the mix gives dO_s = αG, dO_l = (1−α)G and dα = Σ G⊙(O_s − O_l). `_bwd_query_kernel`
(per query block) recomputes the linear branch from its unkept sums (`_unkept_sum_kernel`, run again
rather than kept from the forward), differentiates it (dq's linear part, and ds_i = [dH_i, dz_i],
dH_i = φ(Q_i)ᵀ·dnum_i, the gradient that query block sends to the statistics it used, flat like s_j),
and runs the flash-attention dq loop over its kept key blocks from the forward's log-sum-exp.
The linear branch's small products take 16-bit operands for 16-bit inputs (fp32 accumulation), which
keeps both kernels inside the shared memory of one SM at D = 128.
`_bwd_key_kernel` (per key block) walks the query blocks that kept it (a reverse index built in torch)
for the flash dk, dv, and reads the block's statistics gradient, the sum of ds_i over the query blocks
that did not keep it (each key block's s_j feeds exactly those; `_unkept_sum_kernel` through the
transposed mask), then goes back through h_j = φ(K_j)ᵀV_j and φ. With a learned feature map the linear
branch's gradients go to its inputs F_Q = q·W_q and F_K = k·W_k (recomputed in the kernels, as in the
forward; fp32 buffers that `sla2_backward` takes on to q, k and W). No atomics: every output element is
written by one program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sla2_triton import (
    _batch_and_head,
    _feature_tile,
    _flat_row,
    _load_flat,
    _mix_evidence,
    _phi,
    _query_alpha,
    _row_tile,
    _store_flat,
)


@triton.jit
def _phi_backward(x, y, dy, dmask, FEATURE: tl.constexpr):
    """dL/dx for y = φ(x), given dL/dy; padded features get 0."""
    if FEATURE == 0:
        dx = y * (dy - tl.sum(dy * y, 1)[:, None])
    elif FEATURE == 1:
        dx = tl.where(dmask[None, :], dy * tl.where(x > 0, 1.0, tl.exp(x)), 0.0)
    else:
        dx = tl.where(x > 0, dy, 0.0)
    return dx


@triton.jit
def _bwd_query_kernel(q_ptr, k_ptr, v_ptr, wq_ptr, do_ptr, os_ptr, lse_ptr, idx_ptr, alpha_ptr, mix_ptr, rest_ptr,
                      dq_ptr, dfq_ptr, ds_ptr, dalpha_ptr, dmix_ptr, arow_ptr, delta_ptr,
                      sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                      sw_h, sw_d, sw_r, sg_b, sg_h, sg_n, sg_d, sa_h, sa_i, sm_h,
                      H, N, n_q, kk, qk_scale, sm_scale,
                      D: tl.constexpr, R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                      D_PAD: tl.constexpr, R_PAD: tl.constexpr, FEATURE: tl.constexpr, LEARNED: tl.constexpr,
                      LINEAR: tl.constexpr, MIX: tl.constexpr, PREC: tl.constexpr):
    """One query block: Δ, dα, the linear branch's gradients and dq (dF_Q apart with a learned feature map).

    With α per query (MIX) α_t = σ(logit α + c·(lse_t − log den_t)) sends dlogit_t·c into lse_t (which
    shifts Δ: ds = p·(dp − Δ + dlse)) and −dlogit_t·c/den_t into den_t; each row's α is stored for the
    key pass, and the block's sums of dlogit/(α(1−α)) and dlogit·evidence give dα and dc."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b, hh = _batch_and_head(bh, H)
    cols = tl.arange(0, D_PAD)
    dmask = cols < D
    rows_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rvalid = rows_q < N
    qmask = rvalid[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b * sq_b + hh * sq_h + _row_tile(rows_q, cols, sq_n, sq_d, 1), mask=qmask, other=0.0)
    g = tl.load(do_ptr + b * sg_b + hh * sg_h + _row_tile(rows_q, cols, sg_n, sg_d, 1), mask=qmask,
                other=0.0).to(tl.float32)
    row_flat = bh.to(tl.int64) * N + rows_q
    o_s = tl.load(os_ptr + row_flat[:, None] * D + cols[None, :], mask=qmask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row_flat, mask=rvalid, other=0.0)
    idx_row = idx_ptr + (bh * n_q + pid_q).to(tl.int64) * kk
    dq = tl.zeros([BLOCK_Q, D_PAD], dtype=tl.float32)
    blk = (bh * n_q + pid_q).to(tl.int64)
    g_lse = tl.zeros([BLOCK_Q], dtype=tl.float32)
    if LINEAR:
        a = tl.load(alpha_ptr + hh * sa_h + pid_q * sa_i).to(tl.float32)
        rcols = tl.arange(0, R_PAD)
        rmask = rcols < R
        h_rest, z_rest = _load_flat(_flat_row(rest_ptr, blk, R, D), rcols, rmask, cols, dmask, R, D)
        ff = _feature_tile(wq_ptr, hh, sw_h, sw_d, sw_r, cols, dmask, rcols, rmask, q, LEARNED, PREC).to(tl.float32)
        phiq = tl.where(rvalid[:, None], _phi(ff, rmask, FEATURE), 0.0)
        num = tl.dot(phiq.to(q.dtype), h_rest.to(q.dtype), input_precision=PREC)
        den = tl.sum(phiq * z_rest[None, :], 1)
        ok = den > 0
        inv = tl.where(ok, 1.0 / tl.where(ok, den, 1.0), 0.0)
        o_l = num * inv[:, None]
        d_alpha_row = tl.sum(g * (o_s - o_l), 1)
        if MIX:
            c = tl.load(mix_ptr + hh * sm_h).to(tl.float32)
            evidence = _mix_evidence(lse, den)
            a_row = _query_alpha(a, c, evidence, den)
            d_logit = tl.where(ok & rvalid, d_alpha_row * a_row * (1.0 - a_row), 0.0)
            tl.store(dalpha_ptr + blk, tl.sum(d_logit, 0) / (a * (1.0 - a)))
            tl.store(dmix_ptr + blk, tl.sum(d_logit * evidence, 0))
            tl.store(arow_ptr + row_flat, a_row, mask=rvalid)
            g_lse = d_logit * c
            d_den_mix = -d_logit * c * inv
        else:
            a_row = tl.zeros([BLOCK_Q], dtype=tl.float32) + a
            tl.store(dalpha_ptr + blk, tl.sum(d_alpha_row, 0))
            d_den_mix = tl.zeros([BLOCK_Q], dtype=tl.float32)
        d_ol = (1.0 - a_row)[:, None] * g
        d_num = d_ol * inv[:, None]
        d_den = -tl.sum(d_ol * o_l, 1) * inv + d_den_mix
        d_phiq = (tl.dot(d_num.to(q.dtype), tl.trans(h_rest.to(q.dtype)), input_precision=PREC)
                  + d_den[:, None] * z_rest[None, :])
        d_ff = _phi_backward(ff, phiq, d_phiq, rmask, FEATURE)
        if LEARNED:
            tl.store(dfq_ptr + row_flat[:, None] * R + rcols[None, :], d_ff, mask=rvalid[:, None] & rmask[None, :])
        else:
            dq += d_ff
        d_h = tl.dot(tl.trans(phiq.to(q.dtype)), d_num.to(q.dtype), input_precision=PREC)
        _store_flat(_flat_row(ds_ptr, blk, R, D), d_h, tl.sum(phiq * d_den[:, None], 0), rcols, rmask, cols, dmask,
                    R, D)
        d_os = a_row[:, None] * g
    else:
        d_os = g
    delta = tl.sum(d_os * o_s, 1) - g_lse
    tl.store(delta_ptr + row_flat, delta, mask=rvalid)
    d_os = d_os.to(q.dtype)
    k_base = k_ptr + b * sk_b + hh * sk_h
    v_base = v_ptr + b * sv_b + hh * sv_h
    for t in range(kk):
        j = tl.load(idx_row + t)
        rows_k = j * BLOCK_K + tl.arange(0, BLOCK_K)
        kvalid = rows_k < N
        kvmask = kvalid[:, None] & dmask[None, :]
        kt = tl.load(k_base + _row_tile(rows_k, cols, sk_n, sk_d, 1), mask=kvmask, other=0.0)
        vt = tl.load(v_base + _row_tile(rows_k, cols, sv_n, sv_d, 1), mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        p = tl.where(kvalid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(d_os, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC) * sm_scale
    tl.store(dq_ptr + row_flat[:, None] * D + cols[None, :], dq.to(dq_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _bwd_key_kernel(q_ptr, k_ptr, v_ptr, wk_ptr, do_ptr, lse_ptr, delta_ptr, alpha_ptr, arow_ptr, rev_off_ptr,
                    rev_q_ptr, drest_ptr, dk_ptr, dv_ptr, dfk_ptr,
                    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                    sw_h, sw_d, sw_r, sg_b, sg_h, sg_n, sg_d, sa_h, sa_i,
                    H, N, n_q, n_k, qk_scale, sm_scale,
                    D: tl.constexpr, R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                    D_PAD: tl.constexpr, R_PAD: tl.constexpr, FEATURE: tl.constexpr, LEARNED: tl.constexpr,
                    LINEAR: tl.constexpr, MIX: tl.constexpr, PREC: tl.constexpr):
    """One key block: dk, dv from the query blocks that kept it, plus its linear-statistics gradient (the
    unkept sum of the query blocks' ds_i, read from drest; into dF_K apart with a learned feature map)."""
    pid_k = tl.program_id(0)
    bh = tl.program_id(1)
    b, hh = _batch_and_head(bh, H)
    cols = tl.arange(0, D_PAD)
    dmask = cols < D
    rows_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kvalid = rows_k < N
    kvmask = kvalid[:, None] & dmask[None, :]
    kt = tl.load(k_ptr + b * sk_b + hh * sk_h + _row_tile(rows_k, cols, sk_n, sk_d, 1), mask=kvmask, other=0.0)
    vt = tl.load(v_ptr + b * sv_b + hh * sv_h + _row_tile(rows_k, cols, sv_n, sv_d, 1), mask=kvmask, other=0.0)
    dk = tl.zeros([BLOCK_K, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_K, D_PAD], dtype=tl.float32)
    start = tl.load(rev_off_ptr + bh * n_k + pid_k)
    end = tl.load(rev_off_ptr + bh * n_k + pid_k + 1)
    for t in range(start, end):
        i = tl.load(rev_q_ptr + t)
        rows_q = i * BLOCK_Q + tl.arange(0, BLOCK_Q)
        rvalid = rows_q < N
        qmask = rvalid[:, None] & dmask[None, :]
        q = tl.load(q_ptr + b * sq_b + hh * sq_h + _row_tile(rows_q, cols, sq_n, sq_d, 1), mask=qmask, other=0.0)
        g = tl.load(do_ptr + b * sg_b + hh * sg_h + _row_tile(rows_q, cols, sg_n, sg_d, 1), mask=qmask, other=0.0)
        row_flat = bh.to(tl.int64) * N + rows_q
        lse = tl.load(lse_ptr + row_flat, mask=rvalid, other=0.0)
        delta = tl.load(delta_ptr + row_flat, mask=rvalid, other=0.0)
        if LINEAR:
            if MIX:
                a_row = tl.load(arow_ptr + row_flat, mask=rvalid, other=0.0)
                d_os = (a_row[:, None] * g.to(tl.float32)).to(q.dtype)
            else:
                a = tl.load(alpha_ptr + hh * sa_h + i * sa_i).to(tl.float32)
                d_os = (a * g.to(tl.float32)).to(q.dtype)
        else:
            d_os = g.to(q.dtype)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        p = tl.where(kvalid[None, :] & rvalid[:, None], tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(q.dtype)), d_os, input_precision=PREC)
        dp = tl.dot(d_os, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * sm_scale
    out = (bh.to(tl.int64) * N + rows_k)[:, None] * D + cols[None, :]
    if LINEAR:
        rcols = tl.arange(0, R_PAD)
        rmask = rcols < R
        dh, dz = _load_flat(_flat_row(drest_ptr, (bh * n_k + pid_k).to(tl.int64), R, D), rcols, rmask, cols, dmask,
                            R, D)
        ff = _feature_tile(wk_ptr, hh, sw_h, sw_d, sw_r, cols, dmask, rcols, rmask, kt, LEARNED, PREC).to(tl.float32)
        phik = tl.where(kvalid[:, None], _phi(ff, rmask, FEATURE), 0.0)
        d_phik = tl.dot(vt, tl.trans(dh.to(vt.dtype)), input_precision=PREC) + dz[None, :]
        dv += tl.dot(phik.to(vt.dtype), dh.to(vt.dtype), input_precision=PREC)
        d_ff = _phi_backward(ff, phik, d_phik, rmask, FEATURE)
        if LEARNED:
            rows_out = (bh.to(tl.int64) * N + rows_k)[:, None] * R + rcols[None, :]
            tl.store(dfk_ptr + rows_out, d_ff, mask=kvalid[:, None] & rmask[None, :])
        else:
            dk += d_ff
    tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=kvmask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kvmask)
