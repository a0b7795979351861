"""Sample grids as PNG: one row per model, one column per sample, every label measured so none overlaps.

Columns are as wide as the widest column label (or the image, if wider) and the row-name margin as
wide as the widest row name, so long class names ("mega-mendung") never run into their neighbours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

GAP = 10  # pixels between columns, rows and labels


def image_grid(rows: Sequence[tuple[str, np.ndarray]], column_labels: Sequence[str], path: Path,
               scale: int = 2) -> Path:
    """Write a grid of uint8 images (each row: a name and N×H×W×3) under `column_labels`; upscaled `scale`x
    by nearest neighbour so pixels stay visible."""
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    h, w = rows[0][1].shape[1:3]
    text_h = max(probe.textbbox((0, 0), t)[3] for t in [*column_labels, *(name for name, _ in rows)])
    column = max([w, *(int(probe.textlength(t)) for t in column_labels)]) + GAP
    left = max(int(probe.textlength(name)) for name, _ in rows) + GAP
    head = text_h + GAP
    canvas = Image.new("RGB", (left + len(column_labels) * column, head + len(rows) * (h + GAP)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(column_labels):
        draw.text((left + j * column + (column - int(probe.textlength(label))) // 2, GAP // 2), label,
                  fill=(0, 0, 0))
    for i, (name, images) in enumerate(rows):
        top = head + i * (h + GAP)
        draw.text((GAP // 2, top + (h - text_h) // 2), name, fill=(0, 0, 0))
        for j, image in enumerate(images):
            canvas.paste(Image.fromarray(np.ascontiguousarray(image)), (left + j * column + (column - w) // 2, top))
    canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST).save(path, format="PNG")
    return Path(path)
