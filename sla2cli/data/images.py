"""Image folders as class-labelled tensors in [-1, 1], resized and centre-cropped to a model's resolution.

Two layouts:

- one sub-folder per class (`DIR/<class>/...`, searched recursively). Sub-folders named by integers
  (`0/`, `7/`, `999/`) use those integers as class indices; otherwise the sorted folder names map to
  0, 1, 2, ... (torchvision's `ImageFolder` convention, so ImageNet's wnid folders get the standard indices);
- a flat folder of images, all of one class given explicitly (`class_index`).

Resizing follows JiT/ADM's `center_crop_arr`: halve with a box filter while the short side is at least
twice the target, resize the short side to the target with bicubic filtering, then crop the centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InvalidParameter, Param, SLA2Error, UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p) and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """JiT's (ADM's) centre crop: box-halve while large, bicubic resize of the short side, crop the centre."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → 3×H×W float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


@dataclass
class ImageFolder:
    """The images of a folder with their class indices; `load` and `batch` give tensors at `resolution`."""

    root: Path
    files: list[Path]
    labels: list[int]
    classes: dict[int, str]
    resolution: int

    @classmethod
    def open(cls, root, resolution: int, *, class_index: int | None = None,
             num_classes: int | None = None) -> "ImageFolder":
        """Index `root` (class sub-folders, or a flat folder with `class_index`); checks every file's header."""
        root = Path(root)
        if not root.exists():
            raise InvalidParameter("root", root, "data folder {value} does not exist")
        if not root.is_dir():
            raise InvalidParameter("root", root, "{name} {value} is a file; it needs a folder of images (one "
                                   "sub-folder per class)")
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        top_images = sorted(p for p in root.iterdir() if _is_image(p))
        kinds = ", ".join(IMAGE_EXTENSIONS)
        if class_index is not None:
            if subdirs:
                raise InvalidParameter("class_index", class_index, "{root} has sub-folders; {name} is only for a "
                                       "flat folder of images (drop it to use one sub-folder per class)", root=root)
            if num_classes is not None and not 0 <= class_index < num_classes:
                raise InvalidParameter("class_index", class_index, "{name} {value} is out of range; the model has "
                                       "classes 0-{last}", last=num_classes - 1)
            if not top_images:
                raise UsageError(f"no images in {root} (looked for {kinds})")
            files, labels, classes = top_images, [class_index] * len(top_images), {class_index: root.name}
        else:
            if top_images and subdirs:
                raise InvalidParameter("root", root, "{value} mixes images and sub-folders; use one sub-folder per "
                                       "class, or a flat folder with {class_index} N", class_index=Param("class_index"))
            if top_images:
                raise InvalidParameter("class_index", None, "{root} is a flat folder of images; pass {name} N to say "
                                       "their class (or use one sub-folder per class)", root=root)
            if not subdirs:
                raise UsageError(f"no images in {root} (looked for {kinds} and class sub-folders)")
            if all(p.name.isdigit() for p in subdirs):
                mapping = {int(p.name): p for p in subdirs}
            else:
                mapping = dict(enumerate(subdirs))
            if num_classes is not None:
                too_big = [f"{p.name} -> {i}" for i, p in mapping.items() if i >= num_classes]
                if too_big:
                    raise UsageError(f"{root} has {len(subdirs)} class folders but the model has {num_classes} "
                                     f"classes (0-{num_classes - 1}): {', '.join(too_big[:3])} is out of range")
            files, labels, classes = [], [], {}
            for index, folder in sorted(mapping.items()):
                found = _images_under(folder)
                if not found:
                    raise UsageError(f"class folder {folder} has no images (looked for {kinds})")
                files += found
                labels += [index] * len(found)
                classes[index] = folder.name
        for path in files:
            _check_header(path)
        return cls(root=root, files=files, labels=labels, classes=classes, resolution=resolution)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        """Image `index` as 3×R×R in [-1, 1]."""
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return to_tensor(center_crop(image.convert("RGB"), self.resolution))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise SLA2Error(f"cannot read image {path}: {exc}") from None

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        indices = list(indices)
        images = torch.stack([self.load(i) for i in indices]) if indices else torch.empty(
            0, 3, self.resolution, self.resolution)
        return images, torch.tensor([self.labels[i] for i in indices], dtype=torch.long)


def _check_header(path: Path) -> None:
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header is parsed on open; size proves it has one
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable image ({exc.__class__.__name__}); remove it from the data "
                         f"folder") from None
