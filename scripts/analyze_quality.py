"""Issue 14 analysis (GPU): where the SLA2 error comes from on the demo model, and which tail form fixes it.
Run from the repo root: OUT=/tmp PYTHONPATH=. python scripts/analyze_quality.py.
Writes $OUT/analysis.pt and prints tables."""
import math
import os
import time

import torch
import torch.nn.functional as F
from quality_flops import flops

from sla2cli.data.textures import texture_batch
from sla2cli.diffusion import noised, v_loss
from sla2cli.models.jit import DenseAttention
from sla2cli.models.shipped import DEMO, HELD_OUT_SEED
from sla2cli.seeding import PROBE_NOISE
from sla2cli.sla2.layers import transformer_blocks
from sla2cli.sla2.probe import record_dense_qkv
from sla2cli.sla2.routing import block_mean, num_blocks, route

dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
model, _ = DEMO.load(device=dev)
model.eval()
OUT = os.environ.get("OUT", "/tmp")
B = int(os.environ.get("B", 128))
xs, zs, ts, ys = [], [], [], []
for b in range(4):  # the protocol: 512 held-out textures, four fixed-seed batches of 128
    x, y = texture_batch(torch.arange(b * B, (b + 1) * B), seed=HELD_OUT_SEED)
    z, t, _ = noised(x, seed=b, stream=PROBE_NOISE)
    xs.append(x.to(dev))
    zs.append(z.to(dev))
    ts.append(t.to(dev))
    ys.append(y.to(dev))
layers = list(range(6))

def variant(q, k, v, kind, bq, bk, kk, bias=0.0, stats=None):
    Bn, H, N, D = q.shape
    sc = 1 / math.sqrt(D)
    s = (q @ k.transpose(-1, -2)) * sc
    nk, nq = num_blocks(N, bk), num_blocks(N, bq)
    kid = torch.arange(N, device=q.device) // bk
    qid = torch.arange(N, device=q.device) // bq
    if kind.startswith("oracle"):
        p = s.softmax(-1)
        bm = torch.zeros(Bn, H, N, nk, device=q.device).index_add_(-1, kid, p)
        qm = torch.zeros(Bn, H, nq, nk, device=q.device).index_add_(2, qid, bm)
        idx = qm.topk(kk, -1).indices
        mask = torch.zeros(Bn, H, nq, nk, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
        kind = kind[len("oracle_"):]
    else:
        mask = route(q, k, topk=kk / nk + 1e-6, block_q=bq, block_k=bk).mask
    tmask = mask[:, :, qid]  # B H N nk
    kmask = tmask[..., kid]
    s_kept = s.masked_fill(~kmask, -float("inf"))
    lse_k = torch.logsumexp(s_kept, -1, keepdim=True)
    o_s = torch.exp(s_kept - lse_k) @ v
    lse_all = torch.logsumexp(s, -1, keepdim=True)
    m = torch.exp(lse_k - lse_all)
    if stats is not None:
        stats["mass"] = m[..., 0]
    a_head = m.mean(dim=(0, 2, 3)).view(1, H, 1, 1)
    s_t = s.masked_fill(kmask, -float("inf"))
    o_t_exact = torch.exp(s_t - torch.logsumexp(s_t, -1, keepdim=True)) @ v
    if kind == "sparse":
        return o_s
    if kind == "exacttail_alphahead":
        return a_head * o_s + (1 - a_head) * o_t_exact
    phq, phk = q.softmax(-1), k.softmax(-1)
    w = (phq @ phk.transpose(-1, -2)).masked_fill(kmask, 0)
    o_l = (w @ v) / w.sum(-1, keepdim=True).clamp_min(1e-30)
    if kind == "linear_alphahead":
        return a_head * o_s + (1 - a_head) * o_l
    if kind == "linear_exactmix":
        return m * o_s + (1 - m) * o_l
    kb, vb = block_mean(k, bk), block_mean(v, bk)
    cnt = torch.full((nk,), float(bk), device=q.device)
    cnt[-1] = N - (nk - 1) * bk
    if kind.startswith("pooledblk"):  # tail per query block: q̄_i against centroids (router-cost)
        qb = block_mean(q, bq)
        st = ((qb @ kb.transpose(-1, -2)) * sc + cnt.log()).masked_fill(mask, -float("inf"))  # B H nq nk
        o_t = (st.softmax(-1) @ vb)[:, :, qid]
        lse_t = torch.logsumexp(st, -1, keepdim=True)[:, :, qid]
    else:
        st = ((q @ kb.transpose(-1, -2)) * sc + cnt.log()).masked_fill(tmask, -float("inf"))
        lse_t = torch.logsumexp(st, -1, keepdim=True)
        o_t = torch.exp(st - lse_t) @ vb
    if kind.endswith("_alphahead"):
        return a_head * o_s + (1 - a_head) * o_t
    if kind.endswith("_exactmix"):
        return m * o_s + (1 - m) * o_t
    if kind.endswith("_lse"):  # data-dependent weight: exact sparse LSE vs estimated tail LSE, + per-head bias
        w_s = torch.sigmoid(lse_k - lse_t + bias)
        return w_s * o_s + (1 - w_s) * o_t
    if kind.endswith("_lselin"):  # LSE weight from the pooled estimate, tail output from linear attention
        w_s = torch.sigmoid(lse_k - lse_t + bias)
        return w_s * o_s + (1 - w_s) * o_l
    raise ValueError(kind)

def rel2(o, d):
    return ((o - d).flatten(1).pow(2).sum(1) / d.flatten(1).pow(2).sum(1))

# dense q, k, v of every layer on batch 0 (layer-local analysis)
t0 = time.time()
qkv, dense_out = record_dense_qkv(model, layers, zs[0], ts[0], ys[0])
dense_loss = sum(v_loss(model(zs[b], ts[b], ys[b]), xs[b], zs[b], ts[b]).mean().item() for b in range(4)) / 4
print(f"dense held-out v-loss {dense_loss:.5f}")
kinds = ["sparse", "exacttail_alphahead", "linear_alphahead", "linear_exactmix", "pooled_exactmix",
         "pooled_alphahead", "pooled_lse", "pooledblk_lse", "pooled_lselin", "oracle_linear_alphahead",
         "oracle_pooled_lse"]
cfgs = [(32, 32, 3), (32, 32, 2), (64, 64, 1), (64, 64, 2), (32, 32, 1), (16, 16, 6), (16, 16, 3)]
cfgs = cfgs[: int(os.environ.get("NCFG", len(cfgs)))]
save = {"layer_local": {}, "per_t": {}, "mass": {}, "model": {}, "bias": {}}
print("layer-local relative squared error (mean over 128 samples); flops = fraction of dense")
for (bq, bk, kk) in cfgs:
    print(f"-- blocks {bq}/{bk}, keep {kk}")
    for kind in kinds:
        errs = []
        for i in layers:
            q, k, v = (a.float() for a in qkv[i])
            d = F.scaled_dot_product_attention(q, k, v)
            st = {}
            if kind.endswith("_lse") or kind.endswith("_lselin"):  # the bias stage 1 would learn: best per layer
                best = min(((rel2(variant(q, k, v, kind, bq, bk, kk, b), d).mean().item(), b)
                            for b in (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)))
                save["bias"][(bq, bk, kk, kind, i)] = best[1]
                e = rel2(variant(q, k, v, kind, bq, bk, kk, best[1], st), d)
            else:
                e = rel2(variant(q, k, v, kind, bq, bk, kk, stats=st), d)
            errs.append(e.mean().item())
            save["per_t"][(bq, bk, kk, kind, i)] = e.cpu()
            if kind == "sparse":
                save["mass"][(bq, bk, kk, i)] = st["mass"].mean(0).cpu()  # H×N
        N, D = qkv[0][0].shape[-2:]
        save["layer_local"][(bq, bk, kk, kind)] = errs
        print(f"  {kind:24s} flops {flops(kind, N, D, bq, bk, kk):.3f}  " + " ".join(f"{e:.4f}" for e in errs)
              + f"  mean {sum(errs)/len(errs):.4f}")
save["t"] = ts[0].cpu()
print(f"layer-local done {time.time()-t0:.0f}s")

class Var(torch.nn.Module):
    def __init__(self, kind, bq, bk, kk, bias):
        super().__init__()
        self.a = (kind, bq, bk, kk, bias)
    def forward(self, q, k, v):
        kind, bq, bk, kk, bias = self.a
        return variant(q.float(), k.float(), v.float(), kind, bq, bk, kk, bias).to(q.dtype)

@torch.no_grad()
def model_loss(assign):
    for i, blk in enumerate(transformer_blocks(model)):
        blk.attn.core = assign.get(i, DenseAttention())
    loss = sum(v_loss(model(zs[b], ts[b], ys[b]), xs[b], zs[b], ts[b]).mean().item() for b in range(4)) / 4
    for blk in transformer_blocks(model):
        blk.attn.core = DenseAttention()
    return loss / dense_loss

print("model-level held-out v-loss vs dense (all 6 layers converted)")
for (bq, bk, kk) in cfgs:
    row = []
    for kind in kinds:
        assign = {i: Var(kind, bq, bk, kk, save["bias"].get((bq, bk, kk, kind, i), 0.0)) for i in layers}
        r = model_loss(assign)
        save["model"][(bq, bk, kk, kind)] = r
        row.append(f"{kind}={r:.3f}")
    print(f"  {bq}/{bk} keep {kk}: " + " ".join(row))
print("single-layer sensitivity: v-loss ratio with only layer i converted (32/32 keep 3), vs layer-local error")
for kind in ("linear_alphahead", "pooled_lse"):
    for i in layers:
        r = model_loss({i: Var(kind, 32, 32, 3, save["bias"].get((32, 32, 3, kind, i), 0.0))})
        save["model"][("single", kind, i)] = r
        print(f"  {kind} L{i}: v-loss {r:.4f}x  layer-local {save['layer_local'][(32, 32, 3, kind)][i]:.4f}")
torch.save(save, f"{OUT}/analysis.pt")
print(f"total {time.time()-t0:.0f}s")
