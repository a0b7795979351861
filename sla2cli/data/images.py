"""Image folders as class-labelled tensors in [-1, 1], resized and centre-cropped to a model's resolution.

torchvision's `ImageFolder` indexes the files (nothing is opened until it is read) and a `DataLoader`
decodes them in worker processes. Two layouts:

- one sub-folder per class (`DIR/<class>/...`, searched recursively). Sub-folders named by integers
  (`0/`, `7/`, `999/`) use those integers as class indices; otherwise the sorted folder names map to
  0, 1, 2, ... (torchvision's `ImageFolder` convention, so ImageNet's wnid folders get the standard indices);
- a flat folder of images, all of one class given explicitly (`class_index`).

Resizing follows JiT/ADM's `center_crop_arr`: halve with a box filter while the short side is at least
twice the target, resize the short side to the target with bicubic filtering, then crop the centre.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision import datasets

from ..checkpoints.reading import open_regular
from ..errors import CheckpointError, InvalidParameter, Param, UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


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


class UnreadableImage(UsageError):
    """An image that fails to decode. A DataLoader worker re-raises it as UnreadableImage(its report, which
    adds a traceback): only our own last line is kept, so the command still shows one line."""

    def __init__(self, message: str):
        super().__init__(message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1])


def _load(path: str) -> Image.Image:
    try:  # a FIFO or device named like an image is refused, never waited on
        with open_regular(Path(path)) as file, Image.open(file) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, CheckpointError) as exc:
        raise UnreadableImage(f"cannot read image {path} ({' '.join(str(exc).split())[:160]}); remove it from the "
                              "data folder") from None


class _CenterCrop:
    """The dataset's transform: JiT's centre crop at `size`, then [-1, 1] (a class: workers pickle it)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(center_crop(image, self.size))


class _Visible:
    """`is_valid_file`: an image file with no hidden part in its path below `root`."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, path: str) -> bool:
        p = Path(path)
        return p.suffix.lower() in IMAGE_EXTENSIONS and not any(
            part.startswith(".") for part in p.relative_to(self.root).parts)


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with our class indices and JiT's centre crop: item i is (3×R×R in [-1, 1], label).

    `mapping` takes each class folder's name ("" for a flat folder: the root itself) to its class index.
    """

    def __init__(self, root: Path, resolution: int, mapping: dict[str, int]):
        self.mapping, self.resolution, self.root_path = mapping, resolution, Path(root)
        super().__init__(str(root), transform=_CenterCrop(resolution), loader=_load, is_valid_file=_Visible(root),
                         allow_empty=True)
        found = set(self.targets)
        empty = [name for name, index in mapping.items() if index not in found]
        if empty:
            raise UsageError(f"class folder {self.root_path / empty[0]} has no images (looked for "
                             f"{', '.join(IMAGE_EXTENSIONS)})")

    def find_classes(self, directory):
        return sorted(self.mapping), dict(self.mapping)

    @property
    def files(self) -> list[Path]:
        return [Path(p) for p, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return self.targets

    @classmethod
    def open(cls, root, resolution: int, *, class_index: int | None = None,
             num_classes: int | None = None) -> "ImageFolder":
        """Index `root` (class sub-folders, or a flat folder with `class_index`); no image is opened here."""
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
            return cls(root, resolution, {"": class_index})
        if top_images and subdirs:
            raise InvalidParameter("root", root, "{value} mixes images and sub-folders; use one sub-folder per "
                                   "class, or a flat folder with {class_index} N", class_index=Param("class_index"))
        if top_images:
            raise InvalidParameter("class_index", None, "{root} is a flat folder of images; pass {name} N to say "
                                   "their class (or use one sub-folder per class)", root=root)
        if not subdirs:
            raise UsageError(f"no images in {root} (looked for {kinds} and class sub-folders)")
        if all(p.name.isdigit() for p in subdirs):
            mapping = {p.name: int(p.name) for p in subdirs}
        else:
            mapping = {p.name: i for i, p in enumerate(subdirs)}
        if num_classes is not None:
            too_big = [f"{name} -> {i}" for name, i in mapping.items() if i >= num_classes]
            if too_big:
                raise UsageError(f"{root} has {len(subdirs)} class folders but the model has {num_classes} "
                                 f"classes (0-{num_classes - 1}): {', '.join(too_big[:3])} is out of range")
        return cls(root, resolution, mapping)


def image_loader(folder: ImageFolder, index_batches, workers: int = 0) -> DataLoader:
    """Batches (x, labels) of `folder` for each list of indices in `index_batches`, decoded by `workers`
    processes ahead of their use (0: in this process); never more than the CPUs this process may use."""
    return DataLoader(folder, batch_sampler=index_batches, num_workers=min(workers, len(os.sched_getaffinity(0))))
