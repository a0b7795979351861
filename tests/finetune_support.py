"""A small JiT whose attention is not uniform, for the finetune tests, and helpers around it.

`structured_model()` is a tiny JiT trained here for a few steps on class-conditional stripes, checkers
and rings: fast enough for the tests of resuming, data loading, errors and DDP. The test of the error
reduction itself runs on the packaged demo model (`DEMO`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from conftest import nonzero_model

from sla2cli import save_model
from sla2cli.diffusion import add_noise, sample_t, velocity
from sla2cli.models.jit import JiT, JiTConfig

# 12x12 patches + 16 in-context tokens = 160 tokens = 10 key blocks of 16: topk 0.1 keeps 1 (90% sparsity).
STRUCTURED = JiTConfig(input_size=24, patch_size=2, hidden_size=64, depth=3, num_heads=2, ffn_hidden_dim=128,
                       num_classes=4, bottleneck_dim=16, in_context_len=16, in_context_start=1)
CONVERT_ARGS = ("--layers", "all", "--topk", "0.1", "--block-q", "16", "--block-k", "16")
DEMO = Path(__file__).resolve().parent.parent / "sla2cli" / "assets" / "demo-jit.safetensors"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy machine the threads' spinning costs
    several times the work. Every finetune test file imports this fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def structured_images(n: int, size: int, generator: torch.Generator, classes: int = 4):
    """Class-conditional patterns in [-1, 1]: horizontal / vertical stripes, checkers, rings; random
    frequency, phase, centre and two colours per image."""
    labels = torch.randint(0, classes, (n,), generator=generator)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    freq = 2 * math.pi / (4 + 8 * torch.rand(n, 1, 1, generator=generator))
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
    cx, cy = (size * torch.rand(n, 2, 1, 1, generator=generator)).unbind(1)
    patterns = torch.stack([
        torch.sin(yy * freq + phase), torch.sin(xx * freq + phase),
        torch.sign(torch.sin(xx * freq + phase) * torch.sin(yy * freq + phase)),
        torch.sin(((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() * freq + phase)], 1)
    weight = (patterns[torch.arange(n), labels % 4][:, None] + 1) / 2
    colours = torch.rand(n, 2, 3, generator=generator) * 2 - 1
    return colours[:, 0, :, None, None] * weight + colours[:, 1, :, None, None] * (1 - weight), labels


@lru_cache(maxsize=1)
def _trained_state(steps: int = 100, batch: int = 8, lr: float = 3e-3) -> dict:
    """JiT's v-loss on the patterns for a few steps: enough for attention that is far from uniform."""
    torch.manual_seed(0)
    model = JiT(STRUCTURED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = structured_images(batch, STRUCTURED.input_size, gen)
        t = sample_t(batch, generator=gen)
        z = add_noise(x, t, torch.randn(x.shape, generator=gen))
        loss = (velocity(model(z, t, y), z, t) - velocity(x, z, t)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _tiny_trained_model() -> JiT:
    model = JiT(STRUCTURED)
    model.load_state_dict(_trained_state())
    return model.eval()


def structured_model() -> JiT:
    """The dense model the finetune tests start from."""
    return _tiny_trained_model()


def random_model() -> JiT:
    """The same architecture with random non-zero weights: for tests that need no trained attention."""
    return nonzero_model(STRUCTURED)


def converted_file(cli, tmp_path: Path, *convert_args: str, name: str = "sla2.safetensors", model=None) -> Path:
    """A dense model (default: `structured_model()`) saved, then converted by `sla2 convert` (no calibration)."""
    dense = tmp_path / "dense.safetensors"
    if not dense.exists():
        save_model(model if model is not None else structured_model(), dense, provenance={"source": "finetune tests"})
    dst = tmp_path / name
    code, _, err = cli("convert", dense, "-o", dst, *(convert_args or CONVERT_ARGS), "--in-context-start",
                       str(STRUCTURED.in_context_start))
    assert code == 0, err
    return dst


def demo_held_out(before, after, count: int = 16) -> tuple[dict, dict]:
    """Held-out v-loss (`held_out_v_loss` records) of two SLA2 versions of the demo model against it, on
    `count` textures of HELD_OUT_SEED (never trained on)."""
    from sla2cli import load_model
    from sla2cli.data.textures import texture_batch
    from sla2cli.metrics.quality import held_out_v_loss
    from sla2cli.models.shipped import HELD_OUT_SEED

    dense, _ = load_model(DEMO)
    x, y = texture_batch(torch.arange(count), seed=HELD_OUT_SEED)
    with torch.no_grad():
        return tuple(held_out_v_loss(m.eval(), dense.eval(), x, y, seed=0)[0] for m in (before, after))
