"""Triton kernels of SLA2's forward: linear-branch statistics, the router, and the fused attention.

Three launches per call. `_stats_kernel`: one pass over K and V giving the key-block means the router
needs and the linear branch's per-key-block statistics h_j = φ(K_j)ᵀV_j (in the input's dtype) and
z_j = Σφ(K_j); with a learned feature map φ reads k·W_k (R columns), so h_j is R×D.
`_route_kernel`: per query block, the pooled query's scores against every (projected) key block and the
top kk as an ascending index table; its programs also sum the stored h_j, z_j into the totals (`_totals`;
`_totals_kernel` alone when the routing is given), so "totals minus kept" subtracts exactly the values it
added and no torch op sits between the launches. `_sla2_fwd_kernel`: per query block, online-softmax
attention over the kept key blocks only, the kept blocks' h_j, z_j summed (one R×D read and add per kept
block) so that the linear branch over the other blocks is totals minus kept, then the α mix (per head, or
per query from the loop's log-sum-exp) and one store.
Every tensor is read through explicit strides, so the B×N×3×H×D views JiT makes need no copy.
Head dims that are not powers of two are padded in registers only (masked loads, nothing written padded);
the head dim is a compile-time constant and ROW_ALIGN states what the token strides are multiples of, so
rows load as 16-byte vectors even for D = 72.
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
def _feature_tile(f_ptr, b, hh, s_b, s_h, s_n, s_d, rows, rvalid, rcols, rmask, own, LEARNED: tl.constexpr):
    """What φ reads for these rows: a learned feature map's input (R columns of f), else `own` (the q or k
    tile already loaded, as it is: no second copy stays live in the forward's loop)."""
    if LEARNED:
        tile = tl.load(f_ptr + b * s_b + hh * s_h + _row_tile(rows, rcols, s_n, s_d, 1),
                       mask=rvalid[:, None] & rmask[None, :], other=0.0)
    else:
        tile = own
    return tile


@triton.jit
def _kept_block(t, idx_row, h_ptr, z_ptr, hz_base, h_offs, rcols, rmask, hmask, R: tl.constexpr, D: tl.constexpr):
    """h_j (R×D, fp32) and z_j (R) of the t-th kept key block in the index row."""
    jb = hz_base + tl.load(idx_row + t)
    h = tl.load(h_ptr + jb * (R * D) + h_offs, mask=hmask, other=0.0).to(tl.float32)
    return h, tl.load(z_ptr + jb * R + rcols, mask=rmask, other=0.0)


@triton.jit
def _kept_stats(idx_row, kk, h_ptr, z_ptr, hz_base, h_offs, rcols, rmask, hmask, R: tl.constexpr, D: tl.constexpr,
                R_PAD: tl.constexpr, D_PAD: tl.constexpr, UNROLL: tl.constexpr):
    """Σ h_j (R×D) and Σ z_j (R) over one query block's kept key blocks (fp32), UNROLL blocks a step (their
    index and h_j reads independent of each other, so they can be in flight together)."""
    h_kept = tl.zeros([R_PAD, D_PAD], dtype=tl.float32)
    z_kept = tl.zeros([R_PAD], dtype=tl.float32)
    for t0 in range(0, kk - UNROLL + 1, UNROLL):
        for u in tl.static_range(UNROLL):
            h, z = _kept_block(t0 + u, idx_row, h_ptr, z_ptr, hz_base, h_offs, rcols, rmask, hmask, R, D)
            h_kept += h
            z_kept += z
    for t in range(kk - kk % UNROLL, kk):
        h, z = _kept_block(t, idx_row, h_ptr, z_ptr, hz_base, h_offs, rcols, rmask, hmask, R, D)
        h_kept += h
        z_kept += z
    return h_kept, z_kept


@triton.jit
def _stats_kernel(k_ptr, v_ptr, fk_ptr, h_ptr, z_ptr, kbar_ptr, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                  sf_b, sf_h, sf_n, sf_d, H, N, n_k, D: tl.constexpr, R: tl.constexpr, ROW_ALIGN: tl.constexpr,
                  BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, R_PAD: tl.constexpr, FEATURE: tl.constexpr,
                  LEARNED: tl.constexpr, PREC: tl.constexpr):
    """One key block: k's block mean (fp32), h_j = φ(F_j)ᵀV_j (stored in h's dtype) and z_j = Σφ(F_j), F the
    feature input (k itself, or k·W_k of a learned feature map: R columns)."""
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
    ft = _feature_tile(fk_ptr, b, hh, sf_b, sf_h, sf_n, sf_d, rows, rvalid, rcols, rmask, kf, LEARNED).to(tl.float32)
    phik = tl.where(rvalid[:, None], _phi(ft, rmask, FEATURE), 0.0).to(vt.dtype)
    z_j = tl.sum(phik.to(tl.float32), 0)
    h = tl.dot(tl.trans(phik), vt, input_precision=PREC)
    jb = (bh * n_k + j).to(tl.int64)
    tl.store(h_ptr + jb * (R * D) + rcols[:, None] * D + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(z_ptr + jb * R + rcols, z_j, mask=rmask)
    count = tl.minimum(N - j * BLOCK_K, BLOCK_K).to(tl.float32)
    tl.store(kbar_ptr + jb * D + cols, k_sum / count, mask=dmask)


@triton.jit
def _sum_parts(src_ptr, dst_ptr, bh, n_parts, size, lo, hi, SPAN: tl.constexpr, PARTS: tl.constexpr):
    """dst[bh, lo:hi] = Σ_p src[bh, p, lo:hi] in fp32, PARTS parts a load, in a fixed order (deterministic);
    src is B·H×n_parts×size (h or z), dst B·H×size."""
    src = src_ptr + bh.to(tl.int64) * n_parts * size
    p = tl.arange(0, PARTS)
    for s in range(lo, hi, SPAN):
        offs = s + tl.arange(0, SPAN)
        m = offs < hi
        total = tl.zeros([SPAN], dtype=tl.float32)
        for p0 in range(0, n_parts, PARTS):
            pv = p0 + p < n_parts
            x = tl.load(src + (p0 + p)[:, None].to(tl.int64) * size + offs[None, :], mask=pv[:, None] & m[None, :],
                        other=0.0)
            total += tl.sum(x.to(tl.float32), 0)
        tl.store(dst_ptr + bh.to(tl.int64) * size + offs, total, mask=m)


@triton.jit
def _totals(h_ptr, z_ptr, htot_ptr, ztot_ptr, i, n_prog, bh, n_parts, R: tl.constexpr, D: tl.constexpr,
            SPAN: tl.constexpr, PARTS: tl.constexpr):
    """Program i of n_prog (per batch·head) sums its slice of the totals H = Σ h_j and Z = Σ z_j over the
    n_parts stored key blocks (the stored h_j: "totals minus kept" subtracts what was added)."""
    per_h = tl.cdiv(R * D, n_prog)
    _sum_parts(h_ptr, htot_ptr, bh, n_parts, R * D, i * per_h, tl.minimum(i * per_h + per_h, R * D), SPAN, PARTS)
    per_z = tl.cdiv(R, n_prog)
    _sum_parts(z_ptr, ztot_ptr, bh, n_parts, R, i * per_z, tl.minimum(i * per_z + per_z, R), SPAN, PARTS)


@triton.jit
def _totals_kernel(h_ptr, z_ptr, htot_ptr, ztot_ptr, n_parts, R: tl.constexpr, D: tl.constexpr,
                   SPAN: tl.constexpr, PARTS: tl.constexpr):
    """The totals alone (when no router runs: the routing was given)."""
    _totals(h_ptr, z_ptr, htot_ptr, ztot_ptr, tl.program_id(0), tl.num_programs(0), tl.program_id(1), n_parts,
            R, D, SPAN, PARTS)


@triton.jit
def _route_kernel(q_ptr, kbar_ptr, scores_ptr, idx_ptr, h_ptr, z_ptr, htot_ptr, ztot_ptr, sq_b, sq_h, sq_n, sq_d,
                  H, N, n_q, n_k, kk, n_parts, scale, D: tl.constexpr, R: tl.constexpr, ROW_ALIGN: tl.constexpr,
                  BLOCK_Q: tl.constexpr, D_PAD: tl.constexpr, NK_PAD: tl.constexpr, CHUNK: tl.constexpr,
                  TOTALS: tl.constexpr, SPAN: tl.constexpr, PARTS: tl.constexpr):
    """Scores of one pooled query block against all key blocks, then its top kk as ascending indices.

    `kbar` holds the key blocks already mapped so that scale·q̄·kbar_j is the score (see `route_pooled`).
    Ties go to the lower block index. With TOTALS the n_q programs of a head also sum the statistics'
    parts into the totals (`_totals`), so no launch or torch op sits between statistics and router.
    """
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    if TOTALS:
        _totals(h_ptr, z_ptr, htot_ptr, ztot_ptr, pid_q, n_q, bh, n_parts, R, D, SPAN, PARTS)
    b, hh = _batch_and_head(bh, H)
    cols = tl.arange(0, D_PAD)
    dmask = cols < D
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q = tl.load(q_ptr + b * sq_b + hh * sq_h + _row_tile(rows, cols, sq_n, sq_d, ROW_ALIGN),
                mask=(rows < N)[:, None] & dmask[None, :], other=0.0)
    u = tl.sum(q.to(tl.float32), 0) * (scale / tl.minimum(N - pid_q * BLOCK_Q, BLOCK_Q).to(tl.float32))
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


@triton.jit
def _linear_out(fq, h_kept, z_kept, htot_ptr, ztot_ptr, bh, rcols, rmask, hmask, h_offs, R: tl.constexpr,
                D: tl.constexpr, FEATURE: tl.constexpr, PREC: tl.constexpr):
    """O_linear of one query block, φ(F_Q)(H − kept)/(φ(F_Q)·(Z − kept)) (0 where the denominator is 0), and
    that denominator; F_Q the query's feature input."""
    phiq = _phi(fq.to(tl.float32), rmask, FEATURE)
    h_rest = tl.load(htot_ptr + bh.to(tl.int64) * (R * D) + h_offs, mask=hmask, other=0.0) - h_kept
    z_rest = tl.load(ztot_ptr + bh.to(tl.int64) * R + rcols, mask=rmask, other=0.0) - z_kept
    num = tl.dot(phiq, h_rest, input_precision=PREC)
    den = tl.sum(phiq * z_rest[None, :], 1)
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
def _sla2_fwd_kernel(q_ptr, k_ptr, v_ptr, fq_ptr, o_ptr, idx_ptr, alpha_ptr, mix_ptr, h_ptr, z_ptr, htot_ptr,
                     ztot_ptr, os_ptr, lse_ptr,
                     sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                     sf_b, sf_h, sf_n, sf_d, so_b, so_h, so_n, so_d, sa_h, sa_i, sm_h,
                     H, N, n_q, n_k, kk, qk_scale, D: tl.constexpr, R: tl.constexpr, ROW_ALIGN: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, R_PAD: tl.constexpr,
                     FEATURE: tl.constexpr, LEARNED: tl.constexpr, LINEAR: tl.constexpr, MIX: tl.constexpr,
                     PREC: tl.constexpr, SAVE: tl.constexpr, LIN_FIRST: tl.constexpr, UNROLL: tl.constexpr):
    """One query block of one head: sparse softmax over its kk kept key blocks, linear over the rest, mixed.

    The linear branch reads φ's input from fq (q itself, or q·W_q of a learned feature map: R columns).
    α is read in its own dtype through strides sa_h, sa_i (sa_i = 0: one α per head). With MIX, α is per
    query (`_query_alpha`, scale c read from mix_ptr at stride sm_h) from the loop's log-sum-exp.
    With SAVE (autograd needs it) also writes O_sparse (B·H×N×D) and its log2-sum-exp (B·H×N). With
    LIN_FIRST the kept blocks' h_j are summed in a loop of their own and O_linear waits in the input dtype
    (scaled by 1−α unless α is per query); otherwise the sum shares the attention loop (fewer index loads,
    more registers); that loop reads UNROLL kept blocks a step (`_kept_stats`).
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
    idx_row = idx_ptr + (bh * n_q + pid_q).to(tl.int64) * kk
    if LINEAR:
        rcols = tl.arange(0, R_PAD)
        rmask = rcols < R
        hmask = rmask[:, None] & dmask[None, :]
        h_offs = rcols[:, None] * D + cols[None, :]
        hz_base = (bh * n_k).to(tl.int64)
        a = tl.load(alpha_ptr + hh * sa_h + pid_q * sa_i).to(tl.float32)
        fq = _feature_tile(fq_ptr, b, hh, sf_b, sf_h, sf_n, sf_d, rows_q, rows_q < N, rcols, rmask, q, LEARNED)
        if LIN_FIRST:
            h_kept, z_kept = _kept_stats(idx_row, kk, h_ptr, z_ptr, hz_base, h_offs, rcols, rmask, hmask, R, D,
                                         R_PAD, D_PAD, UNROLL)
            lin, den = _linear_out(fq, h_kept, z_kept, htot_ptr, ztot_ptr, bh, rcols, rmask, hmask, h_offs, R, D,
                                   FEATURE, PREC)
            lin_part = (lin if MIX else (1.0 - a) * lin).to(q.dtype)
        else:  # summed inside the attention loop
            h_kept = tl.zeros([R_PAD, D_PAD], dtype=tl.float32)
            z_kept = tl.zeros([R_PAD], dtype=tl.float32)
    for t in range(kk):
        j = tl.load(idx_row + t)
        rows_k = j * BLOCK_K + tl.arange(0, BLOCK_K)
        kvalid = rows_k < N
        kvmask = kvalid[:, None] & dmask[None, :]
        kt = tl.load(k_base + _row_tile(rows_k, cols, sk_n, sk_d, ROW_ALIGN), mask=kvmask, other=0.0)
        vt = tl.load(v_base + _row_tile(rows_k, cols, sv_n, sv_d, ROW_ALIGN), mask=kvmask, other=0.0)
        if LINEAR and not LIN_FIRST:
            jb = hz_base + j
            h_kept += tl.load(h_ptr + jb * (R * D) + h_offs, mask=hmask, other=0.0).to(tl.float32)
            z_kept += tl.load(z_ptr + jb * R + rcols, mask=rmask, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        s = tl.where(kvalid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        corr = tl.exp2(m_i - m_new)
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    if SAVE:
        row_flat = bh.to(tl.int64) * N + rows_q
        tl.store(os_ptr + row_flat[:, None] * D + cols[None, :], out.to(os_ptr.dtype.element_ty), mask=qmask)
        tl.store(lse_ptr + row_flat, m_i + tl.log2(l_i), mask=rows_q < N)
    if LINEAR:
        if not LIN_FIRST:
            lin, den = _linear_out(fq, h_kept, z_kept, htot_ptr, ztot_ptr, bh, rcols, rmask, hmask, h_offs, R, D,
                                   FEATURE, PREC)
            lin_part = lin if MIX else (1.0 - a) * lin
        if MIX:
            evidence = _mix_evidence(m_i + tl.log2(l_i), den)
            a_row = _query_alpha(a, tl.load(mix_ptr + hh * sm_h).to(tl.float32), evidence, den)[:, None]
            out = a_row * out + (1.0 - a_row) * lin_part.to(tl.float32)
        else:
            out = a * out + lin_part.to(tl.float32)
    tl.store(o_ptr + b * so_b + hh * so_h + _row_tile(rows_q, cols, so_n, so_d, ROW_ALIGN),
             out.to(o_ptr.dtype.element_ty), mask=qmask)
