"""Triton kernels of SLA2's forward: block statistics, the router, the unkept sums and the fused attention.

Four launches per call (six with QAT's low-bit sparse branch: `_scales_kernel`, `_quantise_kernel`).
`_stats_kernel`: one pass over K and V giving the key-block means the router needs (and low bit's V block
maxima) and each key block's linear-branch statistics s_j = [h_j, z_j], h_j = φ(K_j)ᵀV_j (R×D) and z_j =
Σφ(K_j) (R), flat in one row of R·D + R values in the input's dtype; with a learned feature map φ reads k·W_k
(R columns, computed in the kernel). `_route_kernel`: per query block, the pooled query's scores against every
(projected) key block, its top kk as an ascending index table and as a kept mask (the router's projections
applied to the pooled query). `_unkept_sum_kernel`: the linear branch's statistics over the key blocks a query
block did not keep, Σ_j (1 − kept_ij)·s_j, as one tensor-core product of the complement mask with the stacked
s_j (each s_j read once per tile of query blocks instead of once per query block that keeps it; the backward
sums its per-query-block gradients for the key blocks the same way, through the transposed mask).
`_sla2_fwd_kernel`: per query block, online-softmax attention over the kept key blocks only, then the linear
branch from its unkept sums and the α mix (per head, or per query from the loop's log-sum-exp), and one store.
Every tensor is read through explicit strides, so the B×N×3×H×D views JiT makes need no copy.
Head dims that are not powers of two are padded in registers only (masked loads, nothing written padded);
the head dim is a compile-time constant and ROW_ALIGN states what the token strides are multiples of, so
rows load as 16-byte vectors even for D = 72.
"""

from __future__ import annotations

import triton
import triton.language as tl

FEATURE_IDS = {"softmax": 0, "elu": 1, "relu": 2}
LOG2_E4M3_MAX = tl.constexpr(8.807354922057604)  # log2(448): P leaves exp2 scaled to e4m3's range


@triton.jit
def _phi(x, dmask, FEATURE: tl.constexpr):
    """The linear branch's feature map over the (masked) feature dim; padded features map to 0."""
    if FEATURE == 0:
        x = tl.where(dmask[None, :], x, float("-inf"))
        e = tl.exp(x - tl.max(x, 1)[:, None])
        y = e * (1.0 / tl.sum(e, 1))[:, None]
    elif FEATURE == 1:
        y = tl.where(dmask[None, :], tl.where(x > 0, x + 1.0, tl.exp(x)), 0.0)
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _batch_and_head(bh, H):
    """The program's flat batch·head index → (batch, head), as int64 for pointer arithmetic."""
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _row_tile(rows, cols, s_n, s_d, ROW_ALIGN: tl.constexpr):
    """Offsets of rows × cols within one head of a B×H×N×D tensor read through its strides; ROW_ALIGN
    states what the token stride s_n is a multiple of (1: nothing known)."""
    return tl.multiple_of(rows.to(tl.int64) * s_n, ROW_ALIGN)[:, None] + cols[None, :] * s_d


@triton.jit
def _feature_tile(w_ptr, hh, s_wh, s_wd, s_wr, cols, dmask, rcols, rmask, own, LEARNED: tl.constexpr,
                  PREC: tl.constexpr):
    """What φ reads for these rows: with a learned feature map own·W_h (W H×D×R read through its strides,
    rounded to own's dtype as the reference's product is), so q·W_q and k·W_k never go through memory;
    else `own` (the q or k tile already loaded) as it is."""
    if LEARNED:
        w = tl.load(w_ptr + hh * s_wh + cols[:, None] * s_wd + rcols[None, :] * s_wr,
                    mask=dmask[:, None] & rmask[None, :], other=0.0)
        tile = tl.dot(own, w.to(own.dtype), input_precision=PREC).to(own.dtype)
    else:
        tile = own
    return tile


@triton.jit
def _flat_row(ptr, blk, R: tl.constexpr, D: tl.constexpr):
    """Where block blk's flat statistics row [h (R×D, row-major), z (R)] starts: the layout of s_j, of the
    unkept sums and of the backward's ds_i."""
    return ptr + blk * (R * D + R)


@triton.jit
def _load_flat(row, rcols, rmask, cols, dmask, R: tl.constexpr, D: tl.constexpr):
    """h (R×D) and z (R) of one flat statistics row, in its dtype."""
    h = tl.load(row + rcols[:, None] * D + cols[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    return h, tl.load(row + R * D + rcols, mask=rmask, other=0.0)


@triton.jit
def _store_flat(row, h, z, rcols, rmask, cols, dmask, R: tl.constexpr, D: tl.constexpr):
    """Write h (R×D) and z (R) as one flat statistics row, in the row's dtype."""
    tl.store(row + rcols[:, None] * D + cols[None, :], h.to(row.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(row + R * D + rcols, z.to(row.dtype.element_ty), mask=rmask)


@triton.jit
def _int8(x):
    """Round half to even (as torch.round) and clamp to ±127, as int8: (x + 1.5·2²³) − 1.5·2²³ rounds an
    fp32 |x| < 2²² to an integer in the hardware's default mode, the same on a GPU and in the interpreter."""
    return tl.minimum(tl.maximum((x + 12582912.0) - 12582912.0, -127.0), 127.0).to(tl.int8)


@triton.jit
def _stats_kernel(k_ptr, v_ptr, wk_ptr, s_ptr, kbar_ptr, vmax_ptr, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                  sw_h, sw_d, sw_r, H, N, n_k, D: tl.constexpr, R: tl.constexpr, ROW_ALIGN: tl.constexpr,
                  BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, R_PAD: tl.constexpr, FEATURE: tl.constexpr,
                  LEARNED: tl.constexpr, PREC: tl.constexpr, V_MAX: tl.constexpr):
    """One key block: k's block mean (fp32) and s_j = [h_j, z_j] (in s's dtype), h_j = φ(F_j)ᵀV_j and
    z_j = Σφ(F_j), F the feature input (k itself, or k·W_k of a learned feature map W_k: R columns); with
    V_MAX also the block's max |v| per channel (fp32), from which low bit's V scales follow without a pass
    of their own."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b, hh = _batch_and_head(bh, H)
    cols = tl.arange(0, D_PAD)
    dmask = cols < D
    rcols = tl.arange(0, R_PAD)
    rmask = rcols < R
    rows = j * BLOCK_K + tl.arange(0, BLOCK_K)
    rvalid = rows < N
    mask = rvalid[:, None] & dmask[None, :]
    kt = tl.load(k_ptr + b * sk_b + hh * sk_h + _row_tile(rows, cols, sk_n, sk_d, ROW_ALIGN), mask=mask, other=0.0)
    vt = tl.load(v_ptr + b * sv_b + hh * sv_h + _row_tile(rows, cols, sv_n, sv_d, ROW_ALIGN), mask=mask, other=0.0)
    kf = kt.to(tl.float32)
    k_sum = tl.sum(kf, 0)  # the column sums before the product, so no fp32 tile stays live across it (spills)
    ft = _feature_tile(wk_ptr, hh, sw_h, sw_d, sw_r, cols, dmask, rcols, rmask, kt, LEARNED, PREC).to(tl.float32)
    phik = tl.where(rvalid[:, None], _phi(ft, rmask, FEATURE), 0.0).to(vt.dtype)
    z_j = tl.sum(phik.to(tl.float32), 0)
    h = tl.dot(tl.trans(phik), vt, input_precision=PREC)
    jb = (bh * n_k + j).to(tl.int64)
    _store_flat(_flat_row(s_ptr, jb, R, D), h, z_j, rcols, rmask, cols, dmask, R, D)
    count = tl.minimum(N - j * BLOCK_K, BLOCK_K).to(tl.float32)
    tl.store(kbar_ptr + jb * D + cols, k_sum / count, mask=dmask)
    if V_MAX:
        tl.store(vmax_ptr + jb * D + cols, tl.max(tl.abs(vt.to(tl.float32)), 0), mask=dmask)


@triton.jit
def _scales_kernel(kbar_ptr, vmax_ptr, kmean_ptr, vscale_ptr, N, n_k, D: tl.constexpr, BLOCK_K: tl.constexpr,
                   D_PAD: tl.constexpr, CHUNK: tl.constexpr, V_DIV: tl.constexpr):
    """One head: K's mean over all tokens from `_stats_kernel`'s block means (each weighted by its token
    count) and V's scale per channel, max |v| / V_DIV, from its block maxima: a read of B·H×n_k×D values
    instead of a pass over K and V."""
    bh = tl.program_id(0)
    cols = tl.arange(0, D_PAD)
    dmask = cols < D
    k_sum = tl.zeros((D_PAD,), dtype=tl.float32)
    v_max = tl.zeros((D_PAD,), dtype=tl.float32)
    for j0 in range(0, n_k, CHUNK):
        blocks = j0 + tl.arange(0, CHUNK)
        mask = (blocks < n_k)[:, None] & dmask[None, :]
        at = (bh * n_k + blocks).to(tl.int64)[:, None] * D + cols[None, :]
        count = tl.minimum(N - blocks * BLOCK_K, BLOCK_K).to(tl.float32)
        k_sum += tl.sum(tl.load(kbar_ptr + at, mask=mask, other=0.0) * count[:, None], 0)
        v_max = tl.maximum(v_max, tl.max(tl.load(vmax_ptr + at, mask=mask, other=0.0), 0))
    tl.store(kmean_ptr + bh * D + cols, k_sum / N, mask=dmask)
    tl.store(vscale_ptr + bh * D + cols, tl.math.div_rn(tl.maximum(v_max, 1e-12), V_DIV), mask=dmask)


@triton.jit
def _quantise_kernel(k_ptr, v_ptr, kmean_ptr, vscale_ptr, kq_ptr, kscale_ptr, vq_ptr, sk_b, sk_h, sk_n, sk_d,
                     sv_b, sv_h, sv_n, sv_d, H, N, n_k, D: tl.constexpr, ROW_ALIGN: tl.constexpr,
                     BLOCK_K: tl.constexpr, D_PAD: tl.constexpr):
    """One key block for the low-bit sparse branch (`sla2.quant`'s scales): K minus its mean over all tokens
    in INT8 with one scale per block (B·H×N_PAD×D_PAD, N_PAD = n_k·BLOCK_K, and B·H×n_k), V in FP8 e4m3
    with one scale per channel, stored transposed (B·H×D_PAD×N_PAD: the P·V product's second operand
    contiguous along its reduction, as Hopper's FP8 MMA reads it). Rows past N and padded channels are
    written as zeros."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b, hh = _batch_and_head(bh, H)
    cols = tl.arange(0, D_PAD)
    dmask = cols < D
    rows = j * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & dmask[None, :]
    kt = tl.load(k_ptr + b * sk_b + hh * sk_h + _row_tile(rows, cols, sk_n, sk_d, ROW_ALIGN), mask=mask, other=0.0)
    ks = tl.where(mask, kt.to(tl.float32) - tl.load(kmean_ptr + bh * D + cols, mask=dmask, other=0.0)[None, :], 0.0)
    k_scale = tl.math.div_rn(tl.maximum(tl.max(tl.max(tl.abs(ks), 1), 0), 1e-12), 127.0)
    N_PAD = n_k * BLOCK_K
    out = bh.to(tl.int64) * N_PAD * D_PAD
    tl.store(kq_ptr + out + rows[:, None] * D_PAD + cols[None, :], _int8(ks * tl.math.div_rn(1.0, k_scale)))
    tl.store(kscale_ptr + bh * n_k + j, k_scale)
    vt = tl.load(v_ptr + b * sv_b + hh * sv_h + _row_tile(rows, cols, sv_n, sv_d, ROW_ALIGN), mask=mask, other=0.0)
    v_scale = tl.load(vscale_ptr + bh * D + cols, mask=dmask, other=1.0)
    v8 = (vt.to(tl.float32) * tl.math.div_rn(1.0, v_scale)[None, :]).to(tl.float8e4nv)
    tl.store(vq_ptr + out + cols[None, :] * N_PAD + rows[:, None], v8)


@triton.jit
def _route_kernel(q_ptr, kbar_ptr, pq_ptr, pk_ptr, scores_ptr, idx_ptr, kept_ptr, sq_b, sq_h, sq_n, sq_d,
                  sp_r, sp_c, H, N, n_q, n_k, kk, scale, D: tl.constexpr, ROW_ALIGN: tl.constexpr,
                  BLOCK_Q: tl.constexpr, D_PAD: tl.constexpr, NK_PAD: tl.constexpr, CHUNK: tl.constexpr,
                  PROJ: tl.constexpr, PROJ_ROWS: tl.constexpr):
    """Scores of one pooled query block against all key blocks, then its top kk as ascending indices and as
    a kept mask (one byte per key block).

    The score of key block j is scale·(q̄ W_qᵀ)·(k̄_j W_kᵀ) = scale·(q̄ W_qᵀ W_k)·k̄_j: with PROJ the pooled
    query goes through both D×D projections (strides sp_r, sp_c; PROJ_ROWS rows at a time), so the key-block
    means `kbar` are read as `_stats_kernel` wrote them. Ties go to the lower block index.
    """
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b, hh = _batch_and_head(bh, H)
    cols = tl.arange(0, D_PAD)
    dmask = cols < D
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q = tl.load(q_ptr + b * sq_b + hh * sq_h + _row_tile(rows, cols, sq_n, sq_d, ROW_ALIGN),
                mask=(rows < N)[:, None] & dmask[None, :], other=0.0)
    u = tl.sum(q.to(tl.float32), 0) * (scale / tl.minimum(N - pid_q * BLOCK_Q, BLOCK_Q).to(tl.float32))
    if PROJ:
        mapped = tl.zeros([D_PAD], dtype=tl.float32)
        for e0 in range(0, D, PROJ_ROWS):
            es = e0 + tl.arange(0, PROJ_ROWS)
            pmask = (es < D)[:, None] & dmask[None, :]
            offs = es[:, None] * sp_r + cols[None, :] * sp_c
            a = tl.sum(tl.load(pq_ptr + offs, mask=pmask, other=0.0).to(tl.float32) * u[None, :], 1)  # (q̄ W_qᵀ)_e
            mapped += tl.sum(tl.load(pk_ptr + offs, mask=pmask, other=0.0).to(tl.float32) * a[:, None], 0)
        u = mapped
    row = (bh * n_q + pid_q).to(tl.int64)
    kbar_base = kbar_ptr + (bh * n_k).to(tl.int64) * D
    for c0 in range(0, n_k, CHUNK):
        blocks = c0 + tl.arange(0, CHUNK)
        kb = tl.load(kbar_base + blocks[:, None] * D + cols[None, :], mask=(blocks < n_k)[:, None] & dmask[None, :],
                     other=0.0)
        tl.store(scores_ptr + row * n_k + blocks, tl.sum(kb * u[None, :], 1), mask=blocks < n_k)
    tl.debug_barrier()
    offs = tl.arange(0, NK_PAD)
    s = tl.load(scores_ptr + row * n_k + offs, mask=offs < n_k, other=float("-inf"))
    chosen = offs < 0
    for _ in range(kk):
        hit = offs == tl.argmax(s, 0, tie_break_left=True)
        chosen = chosen | hit
        s = tl.where(hit, float("-inf"), s)
    pos = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(idx_ptr + row * kk + pos, offs, mask=chosen)
    tl.store(kept_ptr + row * n_k + offs, chosen.to(tl.uint8), mask=offs < n_k)


@triton.jit
def _unkept_sum_kernel(kept_ptr, src_ptr, out_ptr, sk_bh, sk_row, sk_red, n_rows, n_red, C,
                       TILE_M: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr, PREC: tl.constexpr):
    """out[bh, r, c] = Σ_j (1 − kept[bh, r, j])·src[bh, j, c], accumulated in fp32 and stored in out's dtype:
    a tile of rows r (query blocks, or key blocks through the transposed mask) by a tile of the C flat
    statistics columns. src is B·H×n_red×C and contiguous, out B·H×n_rows×C; kept is read as bytes
    through its strides.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    rows = pid_m * TILE_M + tl.arange(0, TILE_M)
    cols = pid_n * TILE_N + tl.arange(0, TILE_N)
    rvalid = rows < n_rows
    cvalid = cols < C
    acc = tl.zeros([TILE_M, TILE_N], dtype=tl.float32)
    for j0 in range(0, n_red, TILE_K):
        js = j0 + tl.arange(0, TILE_K)
        jvalid = js < n_red
        kept = tl.load(kept_ptr + bh * sk_bh + rows[:, None] * sk_row + js[None, :] * sk_red,
                       mask=rvalid[:, None] & jvalid[None, :], other=1)
        stats = tl.load(src_ptr + (bh * n_red + js)[:, None] * C + cols[None, :],
                        mask=jvalid[:, None] & cvalid[None, :], other=0.0)
        acc += tl.dot(tl.where(kept == 0, 1.0, 0.0).to(stats.dtype), stats, input_precision=PREC)
    tl.store(out_ptr + (bh * n_rows + rows)[:, None] * C + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rvalid[:, None] & cvalid[None, :])


@triton.jit
def _linear_out(fq, h_rest, z_rest, rmask, FEATURE: tl.constexpr, PREC: tl.constexpr):
    """O_linear of one query block, φ(F_Q)·H_rest/(φ(F_Q)·Z_rest) (0 where the denominator is 0), and that
    denominator; F_Q the query's feature input, H_rest and Z_rest the unkept blocks' sums. The product takes
    φ(F_Q) in H_rest's dtype (16-bit sums give a 16-bit product, fp32 accumulation)."""
    phiq = _phi(fq.to(tl.float32), rmask, FEATURE)
    num = tl.dot(phiq.to(h_rest.dtype), h_rest, input_precision=PREC)
    den = tl.sum(phiq * z_rest.to(tl.float32)[None, :], 1)
    return tl.where(den[:, None] > 0, num / tl.where(den > 0, den, 1.0)[:, None], 0.0), den


@triton.jit
def _mix_evidence(lse2, den):
    """lse − log den per query row (`sla2.reference.query_alpha`'s evidence); lse2 in log2 units."""
    return lse2 * 0.6931471805599453 - tl.log(tl.where(den > 0, den, 1.0))


@triton.jit
def _query_alpha(a, c, evidence, den):
    """α per query (`sla2.reference.query_alpha`): σ(logit a + c·evidence), 1 where den = 0."""
    return tl.where(den > 0, 1.0 / (1.0 + tl.exp(-(tl.log(a / (1.0 - a)) + c * evidence))), 1.0)


@triton.jit
def _sla2_fwd_kernel(q_ptr, k_ptr, v_ptr, wq_ptr, o_ptr, idx_ptr, alpha_ptr, mix_ptr, rest_ptr, os_ptr, lse_ptr,
                     kq_ptr, kscale_ptr, vq_ptr, vscale_ptr,
                     sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                     sw_h, sw_d, sw_r, so_b, so_h, so_n, so_d, sa_h, sa_i, sm_h,
                     H, N, n_q, n_k, kk, qk_scale, D: tl.constexpr, R: tl.constexpr, ROW_ALIGN: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, R_PAD: tl.constexpr,
                     FEATURE: tl.constexpr, LEARNED: tl.constexpr, LINEAR: tl.constexpr, MIX: tl.constexpr,
                     PREC: tl.constexpr, SAVE: tl.constexpr, QUANT: tl.constexpr):
    """One query block of one head: sparse softmax over its kk kept key blocks, linear over the rest, mixed.

    The linear branch reads the block's unkept sums from rest (`_unkept_sum_kernel`) after the attention
    loop, and φ's input is q itself, or q·W_q of a learned feature map W_q (wq_ptr, H×D×R: R columns). α is read in its
    own dtype through strides sa_h, sa_i (sa_i = 0: one α per head). With MIX, α is per query
    (`_query_alpha`, scale c read from mix_ptr at stride sm_h) from the loop's log-sum-exp. With SAVE
    (autograd needs it) also writes O_sparse (B·H×N×D) and its log2-sum-exp (B·H×N). With QUANT the sparse
    branch runs in low bit (`sla2.quant`'s QAT forward): this query block in INT8 with one scale, Q·Kᵀ as an
    INT8 product against `_quantise_kernel`'s K, and P (exp(s − running max), scaled by 448) in FP8 e4m3
    against its FP8 Vᵀ, accumulated in fp32; the linear branch is unchanged.
    """
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b, hh = _batch_and_head(bh, H)
    cols = tl.arange(0, D_PAD)
    dmask = cols < D
    rows_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = (rows_q < N)[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b * sq_b + hh * sq_h + _row_tile(rows_q, cols, sq_n, sq_d, ROW_ALIGN), mask=qmask, other=0.0)
    k_base = k_ptr + b * sk_b + hh * sk_h
    v_base = v_ptr + b * sv_b + hh * sv_h
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, D_PAD], dtype=tl.float32)
    blk = (bh * n_q + pid_q).to(tl.int64)
    idx_row = idx_ptr + blk * kk
    if QUANT:
        qf = q.to(tl.float32)
        q_scale = tl.math.div_rn(tl.maximum(tl.max(tl.max(tl.abs(qf), 1), 0), 1e-12), 127.0)
        q8 = _int8(qf * tl.math.div_rn(1.0, q_scale))
        N_PAD = n_k * BLOCK_K  # `_quantise_kernel`'s padded rows
        kq_base = kq_ptr + bh.to(tl.int64) * N_PAD * D_PAD
        vq_base = vq_ptr + bh.to(tl.int64) * N_PAD * D_PAD
    for t in range(kk):
        j = tl.load(idx_row + t)
        rows_k = j * BLOCK_K + tl.arange(0, BLOCK_K)
        if QUANT:
            k8 = tl.load(kq_base + rows_k[:, None] * D_PAD + cols[None, :])
            scale = q_scale * tl.load(kscale_ptr + bh * n_k + j) * qk_scale
            s = tl.dot(q8, tl.trans(k8)).to(tl.float32)
            shift = LOG2_E4M3_MAX
        else:
            kvmask = (rows_k < N)[:, None] & dmask[None, :]
            kt = tl.load(k_base + _row_tile(rows_k, cols, sk_n, sk_d, ROW_ALIGN), mask=kvmask, other=0.0)
            vt = tl.load(v_base + _row_tile(rows_k, cols, sv_n, sv_d, ROW_ALIGN), mask=kvmask, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC)
            scale = qk_scale
            shift = 0.0
        if (j + 1) * BLOCK_K > N:  # only the last key block has rows past N
            s = tl.where((rows_k < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)  # scale > 0: the max of the scaled scores
        p = tl.exp2(s * scale - (m_new - shift)[:, None])  # one FMA per score; low bit: 448·P, for e4m3
        corr = tl.exp2(m_i - m_new)
        l_i = l_i * corr + tl.sum(p, 1)
        if QUANT:
            v8t = tl.load(vq_base + cols[:, None] * N_PAD + rows_k[None, :])
            acc = acc * corr[:, None] + tl.dot(p.to(tl.float8e4nv), tl.trans(v8t))
        else:
            acc = acc * corr[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    if QUANT:
        l_i = l_i / 448.0
        acc = acc * (tl.load(vscale_ptr + bh * D + cols, mask=dmask, other=0.0) / 448.0)[None, :]
    out = acc / l_i[:, None]
    if SAVE:
        row_flat = bh.to(tl.int64) * N + rows_q
        tl.store(os_ptr + row_flat[:, None] * D + cols[None, :], out.to(os_ptr.dtype.element_ty), mask=qmask)
        tl.store(lse_ptr + row_flat, m_i + tl.log2(l_i), mask=rows_q < N)
    if LINEAR:
        rcols = tl.arange(0, R_PAD)
        rmask = rcols < R
        h_rest, z_rest = _load_flat(_flat_row(rest_ptr, blk, R, D), rcols, rmask, cols, dmask, R, D)
        fq = _feature_tile(wq_ptr, hh, sw_h, sw_d, sw_r, cols, dmask, rcols, rmask, q, LEARNED, PREC)
        lin, den = _linear_out(fq, h_rest, z_rest, rmask, FEATURE, PREC)
        a = tl.load(alpha_ptr + hh * sa_h + pid_q * sa_i).to(tl.float32)
        if MIX:
            evidence = _mix_evidence(m_i + tl.log2(l_i), den)
            a_row = _query_alpha(a, tl.load(mix_ptr + hh * sm_h).to(tl.float32), evidence, den)[:, None]
            out = a_row * out + (1.0 - a_row) * lin
        else:
            out = a * out + (1.0 - a) * lin
    tl.store(o_ptr + b * so_b + hh * so_h + _row_tile(rows_q, cols, so_n, so_d, ROW_ALIGN),
             out.to(o_ptr.dtype.element_ty), mask=qmask)
