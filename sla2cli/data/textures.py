"""Class-conditional procedural textures: batik-like motifs at any size, in [-1, 1], no download.

Every image is a pure function of `(seed, index)`: the class is `index % NUM_CLASSES`, and the
motif's parameters (scale, rotation, phase, palette jitter, cell jitter) come from an integer hash of
`(seed, index)`. The hash is exact integer arithmetic, so the same call gives the same parameters on
any device; the rendering is vectorised float maths over the whole batch (thousands of 64x64 images
per second on one CPU core).

Each class has its own motif and palette and mixes structure at several scales (a lattice or bands of
10-30 px, fine dots, rings or lines of 2-5 px, and for some classes one motif the size of the image),
so a denoiser trained on them learns attention that is far from uniform.

    from sla2cli.data.textures import texture_batch, CLASS_NAMES
    images, labels = texture_batch(range(64), seed=0)   # 64×3×64×64 in [-1, 1], labels 0..7
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

CLASS_NAMES = ("kawung", "parang", "ceplok", "truntum", "mega-mendung", "lereng", "tartan", "mandala")
NUM_CLASSES = len(CLASS_NAMES)

_MASK32 = 0xFFFFFFFF
_PARAMS = 12  # uniform draws per image


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing hash (int64 tensors holding values < 2^32; products stay below 2^59)."""
    x = x & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def _uniform(*keys: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1) from integer keys (broadcast together), hashed in sequence."""
    h = torch.zeros((), dtype=torch.int64)
    for k in keys:
        h = _hash32(h * 31 + 0x9E3779B + k.to(torch.int64))
    return h.double().div(2.0 ** 32).float()


def texture_params(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """The per-image random draws, B × 12 uniforms in [0, 1), from (seed, index) alone."""
    k = torch.arange(_PARAMS, dtype=torch.int64, device=indices.device)
    s = torch.tensor(seed, dtype=torch.int64, device=indices.device)
    return _uniform(s, indices[:, None], k[None, :])


def _rgb(*colours: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(colours, dtype=torch.float32) / 255.0


# Palettes (background first), in the spirit of sogan brown, indigo, cream and red batik dyes.
_PALETTES = {
    "kawung": _rgb((110, 62, 28), (236, 222, 190), (40, 24, 14)),
    "parang": _rgb((238, 226, 196), (72, 40, 22), (30, 40, 90)),
    "ceplok": _rgb((26, 36, 92), (240, 236, 220), (170, 40, 30)),
    "truntum": _rgb((20, 18, 30), (236, 220, 170), (200, 150, 60)),
    "mega-mendung": _rgb((150, 30, 30), (40, 70, 150), (170, 200, 235)),
    "lereng": _rgb((40, 80, 50), (220, 190, 80), (110, 60, 30)),
    "tartan": _rgb((30, 70, 40), (170, 30, 40), (15, 15, 20)),
    "mandala": _rgb((240, 228, 200), (120, 20, 40), (200, 150, 40)),
}


def _soft(d: torch.Tensor, width: float = 0.6) -> torch.Tensor:
    """Anti-aliased mask from a signed distance in pixels (positive inside)."""
    return torch.sigmoid(d / width)


def _cell(a: torch.Tensor, period: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset from the nearest lattice centre in pixels, integer cell index) along one axis."""
    u = a / period
    idx = torch.floor(u + 0.5)
    return (u - idx) * period, idx


def _frame(p: torch.Tensor, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates centred on the image, rotated by angle p[:, 0] and shifted by p[:, 1:3] (B×H×W)."""
    r = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    theta, sx, sy = p[:, 0, None, None], p[:, 1, None, None], p[:, 2, None, None]
    c, s = torch.cos(theta), torch.sin(theta)
    return c * xx - s * yy + sx, s * xx + c * yy + sy


def _lerp(lo: float, hi: float, u: torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * u


def _kawung(u, x, y, size):
    """Four-petal ovals on a diagonal lattice with a dark seed in each oval and a dot at each centre."""
    P = _lerp(16, 24, u[:, 3])[:, None, None]
    a, b = (x + y) / math.sqrt(2), (x - y) / math.sqrt(2)
    ca, _ = _cell(a, P)
    cb, _ = _cell(b, P)
    petals, seeds = torch.zeros_like(x), torch.zeros_like(x)
    for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        pa, pb = ca - da * P / 4, cb - db * P / 4
        along = pa * da + pb * db
        across = pa * db - pb * da
        r = torch.sqrt((along / (0.23 * P)) ** 2 + (across / (0.13 * P)) ** 2)
        petals = torch.maximum(petals, _soft((1 - r) * 0.13 * P))
        seeds = torch.maximum(seeds, _soft((0.35 - r) * 0.13 * P))
    centre = _soft(1.6 - torch.sqrt(ca ** 2 + cb ** 2))
    return petals, torch.maximum(seeds, centre)


def _parang(u, x, y, size):
    """Diagonal bands with S-shaped edges, a thin cream line between them and a row of dots on it."""
    P = _lerp(14, 20, u[:, 3])[:, None, None]
    wave = _lerp(2.0, 3.5, u[:, 4])[:, None, None]
    w = (x + y) / math.sqrt(2) + wave * torch.sin(2 * math.pi * (x - y) / (math.sqrt(2) * P))
    cw, _ = _cell(w, P)
    band = _soft(P * 0.32 - cw.abs())
    t = (x - y) / math.sqrt(2)
    ct, _ = _cell(t, P / 3)
    edge = (cw.abs() - P / 2).abs()
    dots = _soft(1.3 - torch.sqrt(ct ** 2 + edge ** 2))
    return band, dots


def _ceplok(u, x, y, size):
    """Eight-pointed star rosettes on a square lattice, each with a red heart and a thin ring."""
    P = _lerp(18, 26, u[:, 3])[:, None, None]
    cx, _ = _cell(x, P)
    cy, _ = _cell(y, P)
    r = torch.sqrt(cx ** 2 + cy ** 2) + 1e-6
    phi = torch.atan2(cy, cx)
    star = _soft(P * 0.36 * (0.6 + 0.4 * torch.cos(8 * phi) ** 2) - r)
    ring = _soft(0.9 - (r - P * 0.46).abs())
    heart = _soft(P * 0.09 - r)
    return torch.maximum(star - heart, ring), heart


def _truntum(u, x, y, size):
    """Small five-petal flowers scattered on a jittered lattice over a dark ground, gold centres."""
    P = _lerp(10, 13, u[:, 3])[:, None, None]
    key = (u[:, 5] * 2 ** 20).long()[:, None, None]
    gx, gy = x / P, y / P
    ix, iy = torch.floor(gx), torch.floor(gy)
    jx = _uniform(key, ix.long(), iy.long(), torch.tensor(1))
    jy = _uniform(key, ix.long(), iy.long(), torch.tensor(2))
    size_j = _uniform(key, ix.long(), iy.long(), torch.tensor(3))
    cx = (gx - ix - (0.3 + 0.4 * jx)) * P
    cy = (gy - iy - (0.3 + 0.4 * jy)) * P
    r = torch.sqrt(cx ** 2 + cy ** 2) + 1e-6
    phi = torch.atan2(cy, cx)
    radius = (0.18 + 0.12 * size_j) * P
    flower = _soft(radius * (0.65 + 0.35 * torch.cos(5 * phi)) - r)
    return flower, _soft(0.25 * radius - r)


def _mega_mendung(u, x, y, size):
    """Layered cloud outlines: concentric wobbly rings around two large centres, light to dark."""
    d = torch.full_like(x, 1e9)
    for j in range(2):
        px = _lerp(-0.45, 0.45, u[:, 3 + 2 * j])[:, None, None] * size
        py = _lerp(-0.45, 0.45, u[:, 4 + 2 * j])[:, None, None] * size
        dx, dy = x - px, y - py
        r = torch.sqrt(dx ** 2 + dy ** 2) + 1e-6
        phi = torch.atan2(dy, dx)
        d = torch.minimum(d, r * (1 + 0.18 * torch.sin(3 * phi + 6.28 * u[:, 7 + j, None, None])))
    P = _lerp(7, 9, u[:, 9])[:, None, None]
    cd, ring = _cell(d, P)
    outer = _soft(P * 0.5 * 4.6 - d)  # the cloud body: about five rings
    lines = _soft(P * 0.28 - cd.abs()) * outer
    light = outer * (1 - lines) * (ring.remainder(2) < 1).float()
    return lines, light


def _lereng(u, x, y, size):
    """Zig-zag chevron bands cycling through three dyes, with a fine dotted line along each edge."""
    P = _lerp(12, 18, u[:, 3])[:, None, None]
    amp = _lerp(3, 6, u[:, 4])[:, None, None]
    tri = (2 * (x / P - torch.floor(x / P + 0.5))).abs()  # 0..1 triangle wave
    w = y + amp * tri
    period = P * 0.9
    cw, idx = _cell(w, period)
    phase = idx.remainder(3)
    dots_x, _ = _cell(x, torch.full_like(P, 4.0))
    dots = _soft(1.1 - torch.sqrt(dots_x ** 2 + (cw.abs() - period / 2) ** 2))
    return (phase == 1).float() + dots * (phase != 1).float(), (phase == 2).float()


def _tartan(u, x, y, size):
    """Crossing stripes of two widths (a wide sett and fine pin-stripes); overlaps darken."""
    P = _lerp(20, 30, u[:, 3])[:, None, None]
    cx, _ = _cell(x, P)
    cy, _ = _cell(y, P)
    wide = 0.5 * (_soft(P * 0.18 - cx.abs()) + _soft(P * 0.18 - cy.abs()))
    fx, _ = _cell(x + P / 2, P / 4)
    fy, _ = _cell(y + P / 2, P / 4)
    fine = torch.maximum(_soft(0.7 - fx.abs()), _soft(0.7 - fy.abs()))
    return wide, fine * (1 - wide)


def _mandala(u, x, y, size):
    """One image-sized radial motif: petal rings of different counts around the centre."""
    x0 = x - _lerp(-4, 4, u[:, 4])[:, None, None]
    y0 = y - _lerp(-4, 4, u[:, 5])[:, None, None]
    r = torch.sqrt(x0 ** 2 + y0 ** 2) + 1e-6
    phi = torch.atan2(y0, x0)
    k = torch.floor(_lerp(6, 10, u[:, 3]))[:, None, None]
    R = size * 0.42
    petals = _soft(R * (0.55 + 0.45 * torch.cos(k * phi).abs()) - r) * _soft(r - R * 0.3)
    inner = _soft(R * 0.25 * (0.7 + 0.3 * torch.cos(2 * k * phi)) - r)
    rings = _soft(0.8 - (r - R * 1.08).abs()) + _soft(0.8 - (r - R * 0.3).abs())
    dots_phi = torch.cos(2 * k * phi)
    dots = _soft(1.4 - (r - R * 1.2).abs()) * _soft((dots_phi - 0.8) * 8)
    return torch.clamp(petals + rings, 0, 1), torch.clamp(inner + dots, 0, 1)


_MOTIFS: dict[str, Callable] = {
    "kawung": _kawung, "parang": _parang, "ceplok": _ceplok, "truntum": _truntum,
    "mega-mendung": _mega_mendung, "lereng": _lereng, "tartan": _tartan, "mandala": _mandala,
}
# Classes whose motif is fixed to the image frame (no rotation, no shift): the mandala is centred.
_ROTATE = {"kawung": 0.25, "parang": 0.15, "ceplok": 0.25, "truntum": 3.14, "mega-mendung": 0.0,
           "lereng": 0.1, "tartan": 0.2, "mandala": 0.0}


def render(labels: torch.Tensor, params: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Render B textures (B×3×size×size in [-1, 1]) from class labels and B×12 uniform parameters."""
    device = params.device
    out = torch.empty(labels.shape[0], 3, size, size, device=device)
    for c, name in enumerate(CLASS_NAMES):
        sel = (labels == c).nonzero().flatten()
        if sel.numel() == 0:
            continue
        u = params[sel]
        frame = torch.stack([(u[:, 0] * 2 - 1) * _ROTATE[name],
                             u[:, 1] * 64 * (name not in ("mandala", "mega-mendung")),
                             u[:, 2] * 64 * (name not in ("mandala", "mega-mendung"))], dim=1)
        x, y = _frame(frame, size, device)
        m1, m2 = _MOTIFS[name](u, x, y, size)
        palette = _PALETTES[name].to(device)
        jitter = (1 + 0.16 * (u[:, 10, None, None] - 0.5)) * (1 + 0.08 * (u[:, 11, None, None] - 0.5))
        cols = (palette[None] * jitter).clamp(0, 1)  # n×3 colours×3 channels
        m1, m2 = m1.clamp(0, 1)[:, None], m2.clamp(0, 1)[:, None]
        img = cols[:, 0, :, None, None] * (1 - m1) + cols[:, 1, :, None, None] * m1
        img = img * (1 - m2) + cols[:, 2, :, None, None] * m2
        out[sel] = img * 2 - 1
    return out


def texture_batch(indices: Iterable[int] | torch.Tensor, seed: int = 0, size: int = 64,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B×3×size×size, float32 in [-1, 1]) and labels (B, int64) for the given indices."""
    idx = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices,
                          dtype=torch.int64, device=device).flatten()
    labels = idx.remainder(NUM_CLASSES)
    return render(labels, texture_params(idx, seed), size), labels


def class_batch(label: int, n: int, seed: int = 0, size: int = 64, device="cpu") -> torch.Tensor:
    """n images of one class (indices label, label + 8, ...): n×3×size×size in [-1, 1]."""
    idx = torch.arange(n, device=device) * NUM_CLASSES + label
    return texture_batch(idx, seed=seed, size=size, device=device)[0]


# The demo's reference set: these images, regenerated on the spot (nothing is stored).
TRAIN_SEED = 0  # the shipped demo model's training images (scripts/train_demo_model.py)
REFERENCE_SEED = 20_260_001


def reference_set(n: int = 256, size: int = 64, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation reference: indices 0..n-1 of seed REFERENCE_SEED (the training run used seed 0)."""
    return texture_batch(torch.arange(n), seed=REFERENCE_SEED, size=size, device=device)
