"""Issue 14 screening (GPU): stage-1 variants of the demo model (its weights frozen) with α per query and learned
feature maps, in a dense-matrix PyTorch model of the same maths (N = 1032 fits), before they entered the package.
Prints the table of bench/RESULTS.md ("Learned feature maps and α per query"). Run from the repo root:

    PYTHONPATH=. python scripts/screen_learned_parts.py                                  # every variant
    PYTHONPATH=. python scripts/screen_learned_parts.py "lse,proj16 16/16@4|1000|1e-2"   # NAME|STEPS|LR[|shared]

The router stays at identity (section 2 of docs/quality-analysis.md: it is not the limit); stage 1 distils the
model's velocity on fresh training textures (batch 32, Adam, 5% warm-up, cosine); held-out v-loss on the issue's
512 textures of HELD_OUT_SEED (four fixed-seed batches of 128).
"""
import math
import os
import sys
import time

import torch
from torch import nn

from sla2cli.data.textures import TRAIN_SEED, texture_batch
from sla2cli.diffusion import noised, v_loss
from sla2cli.models.jit import DenseAttention
from sla2cli.models.shipped import DEMO, HELD_OUT_SEED
from sla2cli.seeding import PROBE_NOISE
from sla2cli.sla2.layers import transformer_blocks
from sla2cli.sla2.routing import num_blocks, route

DEV = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = int(os.environ.get("STEPS", 400))
BATCH = int(os.environ.get("BATCH", 32))
EVAL_BATCH = int(os.environ.get("EB", 128))
EVAL_BATCHES = int(os.environ.get("NEVAL", 4))
torch.backends.cuda.matmul.allow_tf32 = True
MODEL, _ = DEMO.load(device=DEV)
MODEL.eval().requires_grad_(False)
BLOCKS = transformer_blocks(MODEL)
H, D = BLOCKS[0].attn.num_heads, BLOCKS[0].attn.qkv.weight.shape[1] // BLOCKS[0].attn.num_heads
HELD = []
for b in range(EVAL_BATCHES):
    x, y = texture_batch(torch.arange(b * EVAL_BATCH, (b + 1) * EVAL_BATCH), seed=HELD_OUT_SEED)
    z, t, _ = noised(x, seed=b, stream=PROBE_NOISE)
    HELD.append((x.to(DEV), z.to(DEV), t.to(DEV), y.to(DEV)))


@torch.no_grad()
def held_loss() -> float:
    return sum(v_loss(MODEL(z, t, y), x, z, t).mean().item() for x, z, t, y in HELD) / len(HELD)


class Core(nn.Module):
    """SLA2 written densely: kept blocks by the identity router, φ = softmax(x·W) (W None: the paper's φ),
    α per head ("head") or per query from the sparse log-sum-exp against log of the linear mass ("lse")."""

    def __init__(self, block_q, block_k, keep, mix, rank, shared=False):
        super().__init__()
        self.block_q, self.block_k, self.keep, self.mix = block_q, block_k, keep, mix
        self.alpha_logit = nn.Parameter(torch.zeros(H))
        self.scale, self.bias = nn.Parameter(torch.ones(H)), nn.Parameter(torch.zeros(H))
        self.wq = self.wk = None
        if rank:
            w = torch.eye(D)[:, :rank] if rank == D else torch.linalg.qr(torch.randn(D, D))[0][:, :rank]
            self.wq = nn.Parameter(w.expand(H, D, rank).clone())
            self.wk = self.wq if shared else nn.Parameter(w.expand(H, D, rank).clone())
        self.calibrate = False

    @staticmethod
    def phi(x, w):
        return torch.softmax(x if w is None else torch.einsum("bhnd,hdr->bhnr", x, w), -1)

    def forward(self, q, k, v):
        q, k, v = q.float(), k.float(), v.float()
        n = q.shape[2]
        with torch.no_grad():
            topk = min(1.0, self.keep / num_blocks(n, self.block_k) + 1e-6)
            mask = route(q, k, topk=topk, block_q=self.block_q, block_k=self.block_k).mask
        rows, keys = torch.arange(n, device=q.device) // self.block_q, torch.arange(n, device=q.device) // self.block_k
        kept = mask[:, :, rows][..., keys]
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s_kept = s.masked_fill(~kept, -float("inf"))
        lse = torch.logsumexp(s_kept, -1, keepdim=True)
        o_s = torch.exp(s_kept - lse) @ v
        w = (self.phi(q, self.wq) @ self.phi(k, self.wk).transpose(-1, -2)).masked_fill(kept, 0)
        den = w.sum(-1, keepdim=True).clamp_min(1e-30)
        o_l = (w @ v) / den
        if self.calibrate:  # α's mean to the captured mass, per head
            with torch.no_grad():
                mass = torch.exp(lse - torch.logsumexp(s, -1, keepdim=True)).mean(dim=(0, 2, 3)).clamp(1e-3, 1 - 1e-3)
                self.alpha_logit.copy_(torch.logit(mass))
                self.bias.copy_(torch.logit(mass) - (lse - den.log()).mean(dim=(0, 2, 3)))
        if self.mix == "head":
            a = torch.sigmoid(self.alpha_logit).view(1, -1, 1, 1)
        else:
            a = torch.sigmoid(self.scale.view(1, -1, 1, 1) * (lse - den.log()) + self.bias.view(1, -1, 1, 1))
        return a * o_s + (1 - a) * o_l


def install(cores):
    for block, core in zip(BLOCKS, cores):
        block.attn.core = core if core is not None else DenseAttention()


def flops(n, block_q, block_k, keep, rank):
    """Attention FLOPs over dense, as `sla2 profile` counts the Triton path (router projections included)."""
    n_q, n_k = num_blocks(n, block_q), num_blocks(n, block_k)
    r = rank or D
    linear = 2 * n_k * block_k * r * D + 2 * n_q * block_q * r * (D + 1) + (2 * (n_q * block_q + n_k * block_k)
                                                                           * D * r if rank else 0)
    router = 2 * n_q * n_k * D + 2 * (n_q + n_k) * D * D
    return (4 * n_q * block_q * keep * block_k * D + linear + router) / (4 * n * n * D)


def run(name, block_q, block_k, keep, mix, rank, steps=STEPS, lr=3e-3, shared=False):
    torch.manual_seed(0)
    cores = [Core(block_q, block_k, keep, mix, rank, shared).to(DEV) for _ in BLOCKS]
    install(cores)
    x, y = texture_batch(torch.arange(10**6, 10**6 + 64), seed=TRAIN_SEED)
    z, t, _ = noised(x.to(DEV), seed=99, stream=PROBE_NOISE)
    with torch.no_grad():
        for core in cores:
            core.calibrate = True
        MODEL(z, t, y.to(DEV))
        for core in cores:
            core.calibrate = False
    converted = held_loss()
    mixing = [p for c in cores for n, p in c.named_parameters() if n in ("alpha_logit", "scale", "bias")]
    maps = [p for c in cores for n, p in c.named_parameters() if n.startswith("w")]
    opt = torch.optim.Adam([{"params": mixing, "lr": 1e-2}, {"params": maps, "lr": lr}])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / (0.05 * steps)) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    began = time.time()
    for step in range(steps):
        idx = torch.arange(step * BATCH, (step + 1) * BATCH)
        x, y = texture_batch(idx, seed=TRAIN_SEED)
        x, y = x.to(DEV), y.to(DEV)
        z, t, _ = noised(x, idx.tolist(), seed=1234, stream=PROBE_NOISE)
        install([None] * len(BLOCKS))
        with torch.no_grad():
            teacher = MODEL(z, t, y)
        install(cores)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEV == "cuda"):
            pred = MODEL(z, t, y)
        loss = v_loss(pred, teacher, z, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if DEV == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - began
    tuned = held_loss()
    install([None] * len(BLOCKS))
    print(f"| {name} | {block_q}/{block_k} keep {keep} | {flops(1032, block_q, block_k, keep, rank):.3f} | "
          f"{converted / DENSE:.4f} | {tuned / DENSE:.4f} | {seconds:.0f} |", flush=True)


VARIANTS = {  # block_q, block_k, kept key blocks, α mode, feature rank (0: the paper's φ)
    "paper(head,softmax)": (32, 32, 3, "head", 0),
    "lse,softmax": (32, 32, 3, "lse", 0),
    "head,proj64": (32, 32, 3, "head", 64),
    "lse,proj64": (32, 32, 3, "lse", 64),
    "lse,proj16": (32, 32, 3, "lse", 16),
    "lse,proj32": (32, 32, 3, "lse", 32),
    "paper@1": (32, 32, 1, "head", 0),
    "lse,proj64@1": (32, 32, 1, "lse", 64),
    "lse,proj16@2": (32, 32, 2, "lse", 16),
    "lse,proj16 16/16@4": (16, 16, 4, "lse", 16),
    "lse,proj16 16/16@1": (16, 16, 1, "lse", 16),
    "lse,proj16 32/32@1": (32, 32, 1, "lse", 16),
}
DENSE = held_loss()
print(f"dense held-out v-loss {DENSE:.5f}")
print("| variant | blocks | FLOPs/dense | converted | stage 1 | s |")
for spec in sys.argv[1:] or list(VARIANTS):
    name, *rest = spec.split("|")
    options = {}
    if rest:
        options["steps"] = int(rest[0])
    if len(rest) > 1:
        options["lr"] = float(rest[1])
    if len(rest) > 2:
        options["shared"] = rest[2] == "shared"
    run(name, *VARIANTS[name], **options)
