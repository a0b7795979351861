"""FLOPs of the tail variants of scripts/analyze_quality.py, as a fraction of dense attention (shared by the
analysis and its plots; 2 FLOPs per multiply-add, as `sla2 profile` counts)."""

from sla2cli.sla2.routing import num_blocks


def flops(kind, N, D, bq, bk, kk):
    nq, nk = num_blocks(N, bq), num_blocks(N, bk)
    dense = 4 * N * N * D
    sparse = 4 * nq * bq * kk * bk * D
    router = 2 * nq * nk * D + 2 * (nq + nk) * D * D
    if "linear" in kind or kind.endswith("lselin"):
        tail = 2 * nk * bk * D * D + 2 * nq * bq * D * (D + 1)
        if kind.endswith("lselin"):
            tail += 2 * nq * bq * nk * D
    elif "pooledblk" in kind:
        tail = 4 * nq * nk * D
    elif "pooled" in kind:
        tail = 4 * nq * bq * nk * D
    else:
        tail = 0 if kind == "sparse" else dense
    return (sparse + router + tail) / dense
