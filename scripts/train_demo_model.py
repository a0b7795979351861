#!/usr/bin/env python
"""Train the small class-conditional JiT that ships as `sla2cli/assets/demo-jit.safetensors`.

Data: the procedural batik-like textures of `sla2cli.data.textures` (8 classes, 64x64), a fresh batch
every step (indices step*B .. step*B+B-1 of seed 0), so the model never sees an image twice.
Objective: JiT's, exactly: x-prediction network, z = t·x + (1−t)·ε, t ~ logit-normal(−0.8, 0.8),
MSE between the velocities (x̂ − z)/(1 − t) and (x − z)/(1 − t) with 1 − t clamped at 0.05; class
labels dropped to the null class with probability 0.1 for classifier-free guidance.
AdamW (β 0.9/0.95, no weight decay), linear warm-up then cosine decay over a wall-clock budget,
gradient clipping at 1, EMA of the weights (the EMA is what ships), bf16 autocast on CUDA.

At the end it writes, to --out-dir: demo-jit.safetensors (EMA weights, matrices in float16),
demo-samples.png (training images next to samples of the shipped file), demo-loss.png,
demo-train.json (every number) and a second, quick sample grid at the demo's own sampler settings.

    # the recorded run (one H100, about four minutes):
    python scripts/train_demo_model.py --device cuda --minutes 3.3 --out-dir "$OUT"
    # a smoke test on CPU:
    python scripts/train_demo_model.py --device cpu --max-steps 2 --batch-size 2 --sample-steps 2 --out-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sla2cli import save_model
from sla2cli.checkpoints import load_model
from sla2cli.data.textures import CLASS_NAMES, NUM_CLASSES, TRAIN_SEED, class_batch, texture_batch
from sla2cli.diffusion import add_noise, denoising_loss, noised, sample_t, v_loss
from sla2cli.models.jit import JiT
from sla2cli.models.shipped import DEMO_CONFIG, HELD_OUT_SEED, half_storage_copy
from sla2cli.sampling import sample
from sla2cli.seeding import PROBE_NOISE
from sla2cli.sla2.stats import attention_entropy


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=3.3, help="wall-clock budget of the training loop")
    p.add_argument("--max-steps", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--label-drop", type=float, default=0.1)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def lr_at(step: int, frac: float, args) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def training_loss(model, x, y, t, eps, autocast: bool) -> torch.Tensor:
    z = add_noise(x, t, eps)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        x_pred = model(z, t, y)
    return v_loss(x_pred, x, z, t).mean()


def train(args) -> tuple[JiT, dict]:
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = JiT(DEMO_CONFIG).to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=dev.type == "cuda")
    ema_params = [p for p in ema.parameters()]
    model_params = list(model.parameters())
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    autocast = dev.type == "cuda"
    B = args.batch_size
    budget = args.minutes * 60
    history, pending = [], []
    start = time.perf_counter()
    step = 0
    while step < args.max_steps:
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        lr = lr_at(step, elapsed / budget, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = texture_batch(torch.arange(step * B, (step + 1) * B, device=dev), seed=TRAIN_SEED, device=dev)
        drop = torch.rand(B, generator=gen, device=dev) < args.label_drop
        y = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
        t = sample_t(B, generator=gen, device=dev)
        eps = torch.randn(x.shape, generator=gen, device=dev)
        loss = training_loss(model, x, y, t, eps, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        pending.append(loss.detach())
        step += 1
        if step % 25 == 0 or step == args.max_steps:
            values = torch.stack(pending).float().cpu().tolist()
            history.extend(zip(range(step - len(values), step), values))
            pending = []
            if step % 250 == 0:
                print(f"step {step:5d}  loss {sum(values) / len(values):.4f}  lr {lr:.2e}  "
                      f"{time.perf_counter() - start:6.1f}s", flush=True)
    if pending:
        values = torch.stack(pending).float().cpu().tolist()
        history.extend(zip(range(step - len(values), step), values))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tail = [v for _, v in history[-200:]]
    record = {"steps": step, "batch_size": B, "images_seen": step * B, "train_seconds": round(wall, 1),
              "final_train_loss_mean_last_200": sum(tail) / max(1, len(tail)), "history": history}
    return ema, record


def evaluate(model: JiT, dev) -> dict:
    """Held-out v-loss (seed HELD_OUT_SEED) and dense attention entropy per layer."""
    x, y = texture_batch(torch.arange(64), seed=HELD_OUT_SEED, device="cpu")
    x, y = x.to(dev), y.to(dev)
    loss = denoising_loss(model, x, y, seed=1)
    fresh = JiT(DEMO_CONFIG).to(dev).eval()
    untrained = denoising_loss(fresh, x, y, seed=1)
    z, t, _ = noised(x[:8], seed=2, stream=PROBE_NOISE, t=torch.full((8,), 0.6))
    ent = attention_entropy(model, z, t.to(dev), y[:8])
    ent_fresh = attention_entropy(fresh, z, t.to(dev), y[:8])
    return {"held_out_v_loss": loss, "untrained_v_loss": untrained,
            "attention_entropy_t0.6": {i: round(e["entropy"], 4) for i, e in ent.items()},
            "untrained_attention_entropy_t0.6": {i: round(e["entropy"], 4) for i, e in ent_fresh.items()},
            "log_n": {i: round(e["log_n"], 4) for i, e in ent.items()}}


def to_uint8(images: torch.Tensor):
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def sample_grid(model: JiT, dev, path: Path, *, per_class: int, steps: int, cfg: float, title: str) -> None:
    """Rows = classes: two training images, a gap, then `per_class` samples from the model."""
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(123)
    noise = torch.randn(NUM_CLASSES * per_class, 3, 64, 64, generator=gen).to(dev)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class).to(dev)
    out = []
    for chunk in range(0, noise.shape[0], 64):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out.append(sample(model, noise[chunk:chunk + 64], labels[chunk:chunk + 64], steps=steps, cfg=cfg,
                              cfg_interval=(0.1, 1.0)).float())
    generated = to_uint8(torch.cat(out))
    s, pad, head, left = 64, 4, 22, 96
    cols = 2 + per_class
    canvas = Image.new("RGB", (left + cols * (s + pad) + 12, head + NUM_CLASSES * (s + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 4), "training data", fill=(0, 0, 0))
    draw.text((left + 2 * (s + pad) + 12, 4), title, fill=(0, 0, 0))
    for c in range(NUM_CLASSES):
        top = head + c * (s + pad)
        draw.text((4, top + s // 2 - 6), CLASS_NAMES[c], fill=(0, 0, 0))
        real = to_uint8(class_batch(c, 2, seed=HELD_OUT_SEED))
        for j in range(2):
            canvas.paste(Image.fromarray(real[j]), (left + j * (s + pad), top))
        for j in range(per_class):
            canvas.paste(Image.fromarray(generated[c * per_class + j]), (left + (2 + j) * (s + pad) + 12, top))
    canvas = canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)
    canvas.save(path)


def plot_loss(history: list, path: Path, title: str) -> None:
    steps = [s for s, _ in history]
    losses = [v for _, v in history]
    window = 50
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_loss_pil(steps, losses, smooth, path, title)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="#bbbbbb", linewidth=0.6, label="per step")
    ax.plot(steps, smooth, color="#b03020", linewidth=1.6, label=f"mean of {window} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("v-loss (MSE)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_loss_pil(steps, losses, smooth, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    W, H, m = 760, 420, 50
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    lo, hi = math.log(min(losses)), math.log(max(losses))
    span = max(hi - lo, 1e-6)
    n = max(steps[-1], 1)

    def xy(s, v):
        return m + (W - 2 * m) * s / n, H - m - (H - 2 * m) * (math.log(v) - lo) / span

    draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(190, 190, 190), width=1)
    draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(176, 48, 32), width=2)
    draw.rectangle([m, m, W - m, H - m], outline=(0, 0, 0))
    draw.text((m, 15), title, fill=(0, 0, 0))
    draw.text((m, H - m + 8), f"step 0 .. {steps[-1]}   (log-scale loss {min(losses):.3g} .. {max(losses):.3g})",
              fill=(0, 0, 0))
    img.save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ema, record = train(args)
    dst = args.out_dir / "demo-jit.safetensors"
    provenance = {
        "source": "scripts/train_demo_model.py", "trained_by": "sla2cli maintainers", "date": started,
        "data": f"sla2cli.data.textures, seed {TRAIN_SEED}, indices 0..{record['images_seen'] - 1} "
                f"({NUM_CLASSES} classes: {', '.join(CLASS_NAMES)})",
        "objective": "JiT v-loss: x-prediction, z=t*x+(1-t)*eps, t~logit-normal(-0.8,0.8), "
                     "MSE of (x_hat-z)/(1-t) vs (x-z)/(1-t), 1-t clamped at 0.05; label drop 0.1",
        "optimizer": f"AdamW lr {args.lr} betas (0.9, 0.95) wd 0, warmup {args.warmup}, cosine to 10% over "
                     f"{args.minutes} min wall clock, grad clip 1.0, bf16 autocast",
        "weights": f"EMA decay {args.ema}; matrices stored in float16",
        "steps": record["steps"], "batch_size": record["batch_size"], "train_seconds": record["train_seconds"],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
    }
    save_model(half_storage_copy(ema), dst, provenance=provenance, force=True)
    shipped, _ = load_model(dst, device=dev)  # everything below uses exactly the shipped weights
    metrics = evaluate(shipped, dev)
    provenance_out = {**{k: v for k, v in record.items() if k != "history"}, **metrics,
                      "file_bytes": dst.stat().st_size}
    print(json.dumps(provenance_out, indent=1), flush=True)
    sample_grid(shipped, dev, args.out_dir / "demo-samples.png", per_class=8, steps=args.sample_steps,
                cfg=args.cfg, title=f"samples of demo-jit.safetensors ({args.sample_steps} Heun steps, CFG {args.cfg})")
    sample_grid(shipped, dev, args.out_dir / "demo-samples-fast.png", per_class=8, steps=max(2, args.sample_steps // 5),
                cfg=1.0, title=f"samples, {max(2, args.sample_steps // 5)} Heun steps, no CFG")
    plot_loss(record["history"], args.out_dir / "demo-loss.png",
              f"demo JiT training v-loss ({record['steps']} steps x {record['batch_size']}, "
              f"{record['train_seconds']:.0f} s; held-out {metrics['held_out_v_loss']:.4f})")
    (args.out_dir / "demo-train.json").write_text(json.dumps({**provenance_out, "provenance": provenance,
                                                              "history": record["history"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
