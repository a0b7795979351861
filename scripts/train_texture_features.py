#!/usr/bin/env python
"""Train the texture feature network that ships as `sla2cli/assets/texture-features.safetensors`.

`sla2cli.metrics.texture_features.TextureNet` learns to classify the eight procedural textures of
`sla2cli.data.textures`; its penultimate layer is the feature space of `sla2 eval-fid --features textures`
(the demo's "texture Fréchet distance"). Data: a fresh batch every step (indices step*B .. step*B+B-1 of
seed 0, the demo model's training seed), saved to uint8 as samples are, so the network sees exactly the
kind of input it will measure. Half the images are turned grey: every class has its own palette, and a
network that could rely on colour alone would learn features blind to the motifs' structure.
Adam with cosine decay; accuracy is measured on textures of the demo's held-out and reference seeds.

    # the recorded run (2 shared CPU cores, 161 s):
    OMP_NUM_THREADS=2 python scripts/train_texture_features.py --out sla2cli/assets/texture-features.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from sla2cli.data.textures import REFERENCE_SEED, texture_batch
from sla2cli.metrics.texture_features import TextureNet
from sla2cli.models.shipped import HELD_OUT_SEED
from sla2cli.sampling import to_uint8

TRAIN_SEED = 0
GREY = torch.tensor([0.299, 0.587, 0.114])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def batch(indices: torch.Tensor, seed: int, generator: torch.Generator | None = None):
    """uint8 textures as samples are saved; with a generator, half of them grey."""
    x, y = texture_batch(indices, seed=seed)
    images = to_uint8(x)
    if generator is not None:
        grey = torch.rand(len(images), generator=generator) < 0.5
        luma = (images.float() * GREY[None, :, None, None]).sum(1, keepdim=True).round().to(torch.uint8)
        images = torch.where(grey[:, None, None, None], luma.expand_as(images), images)
    return images, y


@torch.no_grad()
def accuracy(net: TextureNet, seed: int, count: int = 512) -> float:
    images, labels = batch(torch.arange(count), seed)
    return (net(net.prepare(images))[1].argmax(1) == labels).float().mean().item()


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = TextureNet().train()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    B = args.batch_size
    start = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        images, labels = batch(torch.arange(step * B, (step + 1) * B), TRAIN_SEED, gen)
        loss = F.cross_entropy(net(net.prepare(images))[1], labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 20 == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    seconds = time.perf_counter() - start
    net.eval()
    record = {"steps": args.steps, "batch_size": B, "lr": args.lr, "train_seconds": round(seconds, 1),
              "threads": torch.get_num_threads(), "train_seed": TRAIN_SEED,
              "accuracy_held_out": accuracy(net, HELD_OUT_SEED), "accuracy_reference": accuracy(net, REFERENCE_SEED),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    print(json.dumps(record, indent=1))
    from safetensors.torch import save_file
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out),
              metadata={"format": "sla2cli-texture-features", "training": json.dumps(record)})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
