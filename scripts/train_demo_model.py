#!/usr/bin/env python
"""Train a class-conditional JiT shipped in `sla2cli/assets/`: `--model demo` or `--model showcase`.

The models and their architectures are `sla2cli.models.shipped`'s; RECIPES below holds each one's training
defaults (budget, batch, learning rate, warm-up, EMA).
Data: the procedural batik-like textures of `sla2cli.data.textures` (8 classes, at the model's size), a
fresh batch every step (indices step*B .. step*B+B-1 of seed 0), so the model never sees an image twice.
Objective: JiT's, exactly: x-prediction network, z = t·x + (1−t)·ε, t ~ logit-normal(−0.8, 0.8),
MSE between the velocities (x̂ − z)/(1 − t) and (x − z)/(1 − t) with 1 − t clamped at 0.05; class
labels dropped to the null class with probability 0.1 for classifier-free guidance.
AdamW (β 0.9/0.95, no weight decay), linear warm-up then cosine decay over a wall-clock budget,
gradient clipping at 1, EMA of the weights (the EMA is what ships), bf16 autocast on CUDA.

Training may be split over several calls (a device call lasts at most 10 minutes): `--call-minutes` ends
this call's training early, `--save-state` leaves the state (weights, EMA, optimiser, step, wall time
trained, RNG, loss history) in NAME-train-state/, and `--resume` continues it: the step count, the
data and the RNG stream go on as if uninterrupted, and --minutes is the budget of all calls together,
over which the cosine decays. `--compact-state` stores it in 16 bits (the showcase's then comes back from
a device call in four files of 11 MB; a full-precision resume is exact, a compact one is not).

At the end of each call it writes, to --out-dir (NAME: demo or showcase): NAME-jit.safetensors (EMA
weights, matrices in float16), NAME-samples.png (training images next to samples of the shipped file),
NAME-loss.png, NAME-train.json (every number) and a second, quick sample grid at the demo's own sampler
settings, NAME-samples-fast.png.

    # the recorded demo run (one H100, about four minutes):
    python scripts/train_demo_model.py --device cuda --minutes 3.3 --out-dir "$OUT"
    # the showcase, in two calls of 7 training minutes (bench/showcase.sh):
    python scripts/train_demo_model.py --model showcase --call-minutes 7 --save-state --compact-state --out-dir "$OUT"
    python scripts/train_demo_model.py --model showcase --call-minutes 7 --save-state --compact-state \
        --resume PREVIOUS_OUT/showcase-train-state --out-dir "$OUT"
    # a smoke test on CPU:
    python scripts/train_demo_model.py --device cpu --max-steps 2 --batch-size 2 --sample-steps 2 --out-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sla2cli import save_model
from sla2cli.checkpoints import load_model
from sla2cli.checkpoints.writing import atomic_write
from sla2cli.data.textures import CLASS_NAMES, NUM_CLASSES, TRAIN_SEED, class_batch, texture_batch
from sla2cli.diffusion import add_noise, denoising_loss, noised, sample_t, v_loss
from sla2cli.models.jit import JiT
from sla2cli.models.shipped import DEMO, SHOWCASE, ShippedModel, half_storage_copy
from sla2cli.sampling import sample
from sla2cli.seeding import PROBE_NOISE
from sla2cli.sla2.stats import attention_entropy


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A shipped model and the defaults of its training options."""

    shipped: ShippedModel
    minutes: float  # wall-clock budget of the training loop, all calls together
    batch_size: int
    lr: float
    warmup: int
    ema: float


RECIPES = {
    "demo": Recipe(DEMO, minutes=3.3, batch_size=256, lr=6e-4, warmup=100, ema=0.998),
    # Two device calls of 7 training minutes (bench/showcase.sh). Batch 128 of 4096-token images: about 60 GB of
    # activations by estimate (not yet run on a GPU); batch, lr and budget are first guesses, untuned.
    "showcase": Recipe(SHOWCASE, minutes=14.0, batch_size=128, lr=6e-4, warmup=100, ema=0.998),
}
DEFAULTED = [f.name for f in dataclasses.fields(Recipe) if f.name != "shipped"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=RECIPES, default="demo")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, help="wall-clock budget of the training loop, all calls together "
                   "(default: the model's recipe)")
    p.add_argument("--call-minutes", type=float, help="end this call's training after this long (default: when "
                   "the budget is spent)")
    p.add_argument("--max-steps", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--ema", type=float)
    p.add_argument("--label-drop", type=float, default=0.1)
    p.add_argument("--sample-steps", type=int, default=50, help="Heun steps of the sample grids (0: no grids)")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--eval-images", type=int, default=64, help="held-out textures of the final evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-state", action="store_true", help="write the training state to NAME-train-state/")
    p.add_argument("--compact-state", action="store_true", help="store the state's weights in float16 and "
                   "Adam's moments in bfloat16: half the size, but a resume from it is no longer exact")
    p.add_argument("--resume", type=Path, help="a NAME-train-state/ folder to continue from")
    args = p.parse_args(argv)
    recipe = RECIPES[args.model]
    for name in DEFAULTED:
        if getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name))
    args.shipped = recipe.shipped
    return args


def lr_at(step: int, frac: float, args) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def training_loss(model, x, y, t, eps, autocast: bool) -> torch.Tensor:
    z = add_noise(x, t, eps)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        x_pred = model(z, t, y)
    return v_loss(x_pred, x, z, t).mean()


# --- the training state: one file per part, each under the device's 16 MiB file limit when compact -------

STATE_FORMAT, STATE_VERSION = "sla2cli-train-state", 1
# Options a resumed run must share with the saved one: they fix the data, the noise and the schedule.
RESUME_OPTIONS = ("model", "minutes", "batch_size", "lr", "warmup", "ema", "label_drop", "seed")


def state_folder(out_dir: Path, shipped: ShippedModel) -> Path:
    return out_dir / f"{shipped.name}-train-state"


def trainable(model: JiT) -> dict[str, torch.Tensor]:
    """The parameters training changes (`pos_embed` is a fixed sin-cos table, rebuilt by the constructor)."""
    return {name: p for name, p in model.named_parameters() if name != "pos_embed"}


def _stored(tensors: dict, dtype: torch.dtype | None) -> dict:
    """CPU copies, in `dtype` where one is given."""
    return {k: v.detach().to("cpu", dtype or v.dtype) for k, v in tensors.items()}


def save_state(folder: Path, step: int, elapsed: float, calls: int, history: list, model, ema, opt, gen, args) -> None:
    """Write the state's four parts (each with the step, so parts of two different calls are never mixed)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, moments = (torch.float16, torch.bfloat16) if args.compact_state else (None, None)  # v underflows fp16
    optimizer = opt.state_dict()
    progress = {"state": {i: {"step": s["step"].cpu()} for i, s in optimizer["state"].items()},
                "param_groups": optimizer["param_groups"]}
    parts = {
        "model": {"format": STATE_FORMAT, "version": STATE_VERSION, "elapsed": elapsed, "calls": calls,
                  "history": history, "rng": gen.get_state(), "optimizer": progress,
                  "options": {k: getattr(args, k) for k in RESUME_OPTIONS},
                  "weights": _stored(trainable(model), weights)},
        "ema": {"weights": _stored(trainable(ema), weights)},
        **{m: {"moments": _stored({i: s[m] for i, s in optimizer["state"].items()}, moments)}
           for m in ("exp_avg", "exp_avg_sq")},
    }
    for name, part in parts.items():
        atomic_write(folder / f"{name}.pt", lambda tmp, part=part: torch.save({"step": step, **part}, tmp))


def load_state(folder: Path, args) -> dict:
    """The saved parts, checked to be one state of a run with this run's options; exits with the reason."""
    try:
        parts = {name: torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
                 for name in ("model", "ema", "exp_avg", "exp_avg_sq")}
    except (OSError, RuntimeError) as exc:
        sys.exit(f"cannot read the training state {folder}: {exc}")
    state = parts["model"]
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        sys.exit(f"{folder} is not a training state of this script (version {STATE_VERSION})")
    if len({part["step"] for part in parts.values()}) != 1:
        sys.exit(f"{folder} holds parts of different steps (a call ended while writing it)")
    diffs = [f"--{k.replace('_', '-')} {v} (now {getattr(args, k)})" for k, v in state["options"].items()
             if v != getattr(args, k)]
    if diffs:
        sys.exit(f"{folder} was trained with other options: {'; '.join(diffs)}")
    for i, s in state["optimizer"]["state"].items():
        s.update({m: parts[m]["moments"][i] for m in ("exp_avg", "exp_avg_sq")})
    return {**state, "ema": parts["ema"]["weights"]}


def restore(state: dict, model: JiT, ema: JiT, opt, gen) -> None:
    with torch.no_grad():
        for target, saved in ((model, state["weights"]), (ema, state["ema"])):
            params = trainable(target)
            if sorted(params) != sorted(saved):
                sys.exit("the training state holds another architecture's weights")
            for name, p in params.items():
                p.copy_(saved[name])
    opt.load_state_dict(state["optimizer"])  # moments back to float32 on the parameters' device
    gen.set_state(state["rng"])


def train(args) -> tuple[JiT, dict]:
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = JiT(args.shipped.config).to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=dev.type == "cuda")
    ema_params = [p for p in ema.parameters()]
    model_params = list(model.parameters())
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    autocast = dev.type == "cuda"
    B, size = args.batch_size, args.shipped.config.input_size
    budget = args.minutes * 60
    call_budget = math.inf if args.call_minutes is None else args.call_minutes * 60
    history, pending = [], []
    step, calls, trained_before = 0, 1, 0.0
    if args.resume:
        state = load_state(args.resume, args)
        restore(state, model, ema, opt, gen)
        step, calls, trained_before, history = state["step"], state["calls"] + 1, state["elapsed"], state["history"]
        print(f"resumed at step {step} after {trained_before:.1f} s of training", flush=True)
    call_start = time.perf_counter()
    start = call_start - trained_before  # elapsed time counts every call's training
    while step < args.max_steps:
        now = time.perf_counter()
        elapsed = now - start
        if elapsed > budget or now - call_start >= call_budget:
            break
        lr = lr_at(step, elapsed / budget, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = texture_batch(torch.arange(step * B, (step + 1) * B, device=dev), seed=TRAIN_SEED, size=size,
                             device=dev)
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
    if args.save_state:
        save_state(state_folder(args.out_dir, args.shipped), step, wall, calls, history, model, ema, opt, gen, args)
    tail = [v for _, v in history[-200:]]
    record = {"steps": step, "batch_size": B, "images_seen": step * B, "train_seconds": round(wall, 1),
              "calls": calls, "final_train_loss_mean_last_200": sum(tail) / max(1, len(tail)), "history": history}
    return ema, record


def evaluate(model: JiT, shipped: ShippedModel, dev, images: int) -> dict:
    """Held-out v-loss (the model's held-out seed) and dense attention entropy per layer."""
    x, y = texture_batch(torch.arange(images), seed=shipped.held_out_seed, size=shipped.config.input_size,
                         device="cpu")
    x, y = x.to(dev), y.to(dev)
    loss = denoising_loss(model, x, y, seed=1)
    fresh = JiT(shipped.config).to(dev).eval()
    untrained = denoising_loss(fresh, x, y, seed=1)
    n = min(8, images)
    z, t, _ = noised(x[:n], seed=2, stream=PROBE_NOISE, t=torch.full((n,), 0.6))
    ent = attention_entropy(model, z, t.to(dev), y[:n])
    ent_fresh = attention_entropy(fresh, z, t.to(dev), y[:n])
    return {"held_out_v_loss": loss, "untrained_v_loss": untrained,
            "attention_entropy_t0.6": {i: round(e["entropy"], 4) for i, e in ent.items()},
            "untrained_attention_entropy_t0.6": {i: round(e["entropy"], 4) for i, e in ent_fresh.items()},
            "log_n": {i: round(e["log_n"], 4) for i, e in ent.items()}}


def to_uint8(images: torch.Tensor):
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def sample_grid(model: JiT, held_out_seed: int, dev, path: Path, *, per_class: int, steps: int, cfg: float,
                title: str) -> None:
    """Rows = classes: two held-out images, a gap, then `per_class` samples from the model; small images
    are shown twice their size."""
    from PIL import Image, ImageDraw

    s = model.config.input_size
    gen = torch.Generator().manual_seed(123)
    noise = torch.randn(NUM_CLASSES * per_class, 3, s, s, generator=gen).to(dev)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class).to(dev)
    out = []
    for chunk in range(0, noise.shape[0], 64):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out.append(sample(model, noise[chunk:chunk + 64], labels[chunk:chunk + 64], steps=steps, cfg=cfg,
                              cfg_interval=(0.1, 1.0)).float())
    generated = to_uint8(torch.cat(out))
    pad, head, left, zoom = 4, 22, 96, max(1, 128 // s)
    cols = 2 + per_class
    canvas = Image.new("RGB", (left + cols * (s + pad) + 12, head + NUM_CLASSES * (s + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 4), "training data", fill=(0, 0, 0))
    draw.text((left + 2 * (s + pad) + 12, 4), title, fill=(0, 0, 0))
    for c in range(NUM_CLASSES):
        top = head + c * (s + pad)
        draw.text((4, top + s // 2 - 6), CLASS_NAMES[c], fill=(0, 0, 0))
        real = to_uint8(class_batch(c, 2, seed=held_out_seed, size=s))
        for j in range(2):
            canvas.paste(Image.fromarray(real[j]), (left + j * (s + pad), top))
        for j in range(per_class):
            canvas.paste(Image.fromarray(generated[c * per_class + j]), (left + (2 + j) * (s + pad) + 12, top))
    canvas = canvas.resize((canvas.width * zoom, canvas.height * zoom), Image.NEAREST)
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
    shipped, name = args.shipped, args.model
    args.out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ema, record = train(args)
    dst = args.out_dir / shipped.path.name
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
        "calls": record["calls"],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
    }
    save_model(half_storage_copy(ema), dst, provenance=provenance, force=True)
    model, _ = load_model(dst, device=dev)  # everything below uses exactly the shipped weights
    metrics = evaluate(model, shipped, dev, args.eval_images)
    provenance_out = {**{k: v for k, v in record.items() if k != "history"}, **metrics,
                      "file_bytes": dst.stat().st_size}
    print(json.dumps(provenance_out, indent=1), flush=True)
    if args.sample_steps:
        fast = max(2, args.sample_steps // 5)
        sample_grid(model, shipped.held_out_seed, dev, args.out_dir / f"{name}-samples.png", per_class=8,
                    steps=args.sample_steps, cfg=args.cfg,
                    title=f"samples of {dst.name} ({args.sample_steps} Heun steps, CFG {args.cfg})")
        sample_grid(model, shipped.held_out_seed, dev, args.out_dir / f"{name}-samples-fast.png", per_class=8,
                    steps=fast, cfg=1.0, title=f"samples, {fast} Heun steps, no CFG")
    plot_loss(record["history"], args.out_dir / f"{name}-loss.png",
              f"{name} JiT training v-loss ({record['steps']} steps x {record['batch_size']}, "
              f"{record['train_seconds']:.0f} s; held-out {metrics['held_out_v_loss']:.4f})")
    (args.out_dir / f"{name}-train.json").write_text(json.dumps({**provenance_out, "provenance": provenance,
                                                                 "history": record["history"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
