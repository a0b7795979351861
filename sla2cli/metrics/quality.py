"""How far a converted (SLA2) model is from its dense source, in three views on the same inputs.

`quality_report` compares the model with a dense model of the same architecture (default: the model itself
with every SLA2 layer removed, which is its dense source exactly when only the router and α were trained):

- **v-loss**: JiT's training loss of both models on the same noised clean images (an image folder, or
  samples of the dense model itself as `sla2 stats --measure` draws them), and the ratio of the means;
- **paired samples**: both models sample from the same (seed, index) noise and labels (the pairing of
  `sla2 eval-fid`); PSNR, SSIM and MAE per image on the saved uint8 grid, mean and worst;
- **per layer**: each SLA2 layer's relative squared error against dense attention on the dense model's own
  q, k, v (`measure_layers`, the finetune loss) and the realised kept fraction.

Library code: nothing here prints; warnings come back in the report.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..data.images import ImageFolder
from ..diffusion import noised, v_loss
from ..errors import InvalidParameter
from ..finetune.sources import FolderSource
from ..graphs import graphed
from ..sampling import SAMPLERS, paired_inputs, sample, to_uint8
from ..seeding import PROBE_NOISE, check_seed
from ..sla2.layers import remove_sla2, sla2_layers
from ..sla2.stats import measure_layers, own_noised_batch
from .paired import compare_pairs

OWN_SAMPLING_STEPS = 8  # Heun steps of the dense model's own samples (as `sla2 stats --measure` draws them)
STRIPPED = "the model with its SLA2 layers removed"


def evaluation_images(root, config, count: int, *, seed: int, class_index: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Up to `count` images of an image folder (as `sla2 finetune --data` reads it), at the model's resolution.

    The subset is the one `sla2 finetune` evaluates on with the same seed: (x in [-1, 1], labels, description).
    """
    if count < 1:
        raise InvalidParameter("eval_samples", count, "{name} must be >= 1, got {value}")
    folder = ImageFolder.open(root, config.input_size, class_index=class_index, num_classes=config.num_classes)
    source = FolderSource(folder, seed, min(count, len(folder)))
    x, y = source.eval_images()
    return x, y, {**source.describe(), "used": len(x)}


def full_finetune_in(provenance: dict | None) -> bool:
    """Whether a model's provenance records a `--full` finetune (its dense weights moved)."""
    record = (provenance or {}).get("finetune")
    while isinstance(record, dict):
        if record.get("stage") == "full":
            return True
        record = record.get("previous")
    return False


def _architecture_difference(a, b) -> str | None:
    da, db = a.to_dict(), b.to_dict()
    diff = [f"{k} {da.get(k)} vs {db.get(k)}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
    return ", ".join(diff) or None


def _hwc(images: torch.Tensor) -> np.ndarray:
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def _check(eval_samples: int, samples: int, steps: int, cfg: float, seed: int, batch_size: int,
           images: torch.Tensor | None, labels: torch.Tensor | None) -> None:
    if images is None and eval_samples < 1:
        raise InvalidParameter("eval_samples", eval_samples, "{name} must be >= 1, got {value}")
    if images is not None and len(images) < 1:
        raise InvalidParameter("eval_samples", 0, "{name} must be >= 1, got {value}")
    if images is not None and (labels is None or len(labels) != len(images)):
        raise ValueError("images need one label each")
    if samples < 0:
        raise InvalidParameter("samples", samples, "{name} must be >= 0 (0: no paired samples), got {value}")
    if steps < 1:
        raise InvalidParameter("steps", steps, "{name} must be >= 1, got {value}")
    if not math.isfinite(cfg) or cfg < 0:
        raise InvalidParameter("cfg", cfg, "{name} must be a finite number >= 0 (1.0 turns guidance off), "
                               "got {value}")
    if batch_size < 1:
        raise InvalidParameter("batch_size", batch_size, "{name} must be >= 1, got {value}")
    check_seed(seed)


@torch.no_grad()
def held_out_v_loss(model: nn.Module, dense: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, seed: int,
                    dtype: torch.dtype = torch.float32) -> tuple[dict, tuple[torch.Tensor, ...]]:
    """JiT's v-loss of `model` and `dense` on the same clean images noised from (seed, PROBE_NOISE, index);
    the ratio of the means, and the noised inputs (z in `dtype`, t, labels) for further measurements."""
    device = next(model.parameters()).device
    x, y = images.to(device, torch.float32), labels.to(device)
    z, t, _ = noised(x, seed=seed, stream=PROBE_NOISE, noise_scale=model.config.noise_scale)
    zin = z.to(dtype)
    out_model, out_dense = model(zin, t, y), dense(zin, t, y)
    loss_model, loss_dense = v_loss(out_model, x, z, t), v_loss(out_dense, x, z, t)
    m, d = loss_model.mean().item(), loss_dense.mean().item()
    diff = (out_model.float() - out_dense.float()).norm() / out_dense.float().norm().clamp_min(1e-30)
    losses = {"model": m, "dense": d, "ratio": m / d if d > 0 else None,
              "output_relative_error": diff.item(), "t": t.tolist(),
              "model_per_sample": loss_model.tolist(), "dense_per_sample": loss_dense.tolist()}
    return losses, (zin, t, y)


@torch.no_grad()
def _paired_samples(model: nn.Module, dense: nn.Module, samples: int, *, steps: int, cfg: float, seed: int,
                    device: torch.device, batch_size: int, say: Callable[[str], None]) -> dict:
    cfgm = model.config
    shape = (cfgm.in_channels, cfgm.input_size, cfgm.input_size)
    a, b = [], []
    net, dense_net = graphed(model, device), graphed(dense, device)  # CUDA graphs on a GPU: same samples, faster
    for i0 in range(0, samples, batch_size):
        indices = range(i0, min(samples, i0 + batch_size))
        say(f"paired samples {i0 + 1}-{indices[-1] + 1} of {samples}")
        noise, lab = paired_inputs(seed, indices, shape, cfgm.num_classes, cfgm.noise_scale)
        noise, lab = noise.to(device), lab.to(device)
        a.append(_hwc(sample(net, noise, lab, steps=steps, cfg=cfg)))
        b.append(_hwc(sample(dense_net, noise, lab, steps=steps, cfg=cfg)))
    return compare_pairs(zip(np.concatenate(a), np.concatenate(b)))


def quality_report(model: nn.Module, dense: nn.Module | None = None, *, images: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, data: dict | None = None, eval_samples: int = 8,
                   samples: int = 8, steps: int = 50, cfg: float = 2.0, seed: int = 0, device="cpu",
                   dtype: torch.dtype = torch.float32, batch_size: int = 16, provenance: dict | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Compare `model` with `dense` (default: a copy of `model` with every SLA2 layer removed); see the module.

    `images` (N×C×H×W in [-1, 1]) and `labels` are the clean held-out images of the v-loss (all of them are
    used; `data` describes where they came from); without them, `eval_samples` samples of the dense model
    itself (8 Heun steps, random labels: `own_noised_batch`). Both are noised by `diffusion.noised` from
    (seed, PROBE_NOISE, index) and run as one batch. `samples` paired samples (0: none; `paired` is None) are
    drawn with JiT's sampler (`steps` Heun steps, guidance `cfg` on t in (0.1, 1)), `batch_size` at a time.
    Both models are moved to `device` and `dtype`. `provenance` (the model file's) lets the report warn when a
    full finetune moved the dense weights, so that the default dense reference is not the source.
    """
    _check(eval_samples, samples, steps, cfg, seed, batch_size, images, labels)
    say = progress or (lambda _message: None)
    device = torch.device(device)
    warnings = []
    converted = sorted(sla2_layers(model))
    if dense is None:
        dense = copy.deepcopy(model)
        remove_sla2(dense)
        reference = {"source": "stripped", "description": STRIPPED,
                     "note": "the dense source exactly when only the router and α were trained (stage 1); after "
                             "a full finetune, compare with the original dense checkpoint"}
        if full_finetune_in(provenance):
            warnings.append("this model went through a full finetune (its dense weights moved): the model with "
                            "its SLA2 layers removed is not its dense source; compare with the original "
                            "checkpoint instead")
    else:
        difference = _architecture_difference(model.config, dense.config)
        if difference:
            raise InvalidParameter("dense", difference, "{name} is another architecture than the model ({value}); "
                                   "compare with the dense checkpoint the model was converted from")
        reference = {"source": "given", "description": "the dense model given",
                     "converted_layers": sorted(sla2_layers(dense))}
    if not converted:
        warnings.append("no layer is converted: the model is dense"
                        + (", so it matches its dense reference exactly" if reference["source"] == "stripped" else ""))
    model.to(device, dtype).eval()
    dense.to(device, dtype).eval()

    # (a) v-loss of both models on the same noised clean images
    if images is None:
        say(f"sampling {eval_samples} images of the dense model")
        # t = 1 leaves the samples clean (z = 1·x + 0·ε); they are noised below like any other images
        x, _, labels = own_noised_batch(dense, eval_samples, t=1.0, sampling_steps=OWN_SAMPLING_STEPS,
                                        seed=seed, device=device)
        data = {"source": "dense samples", "used": eval_samples, "sampling_steps": OWN_SAMPLING_STEPS,
                "sampler": "heun", "labels": "uniform random"}
    else:
        x = images
        data = {"source": "images", "used": len(images), **(data or {})}
    say("v-loss and per-layer error")
    losses, (zin, t, y) = held_out_v_loss(model, dense, x, labels, seed=seed, dtype=dtype)
    # (c) each converted layer against dense attention on the same inputs
    per_layer = measure_layers(model, zin, t, y) if converted else []

    # (b) paired samples from the same (seed, index) noise and labels (none: `paired` is None)
    paired = _paired_samples(model, dense, samples, steps=steps, cfg=cfg, seed=seed, device=device,
                             batch_size=batch_size, say=say) if samples else None

    settings = {"eval_samples": len(x), "samples": samples, "steps": steps, "cfg": float(cfg), "sampler": "jit",
                "cfg_interval": list(SAMPLERS["jit"].cfg_interval), "seed": seed, "device": str(device),
                "dtype": str(dtype).removeprefix("torch.")}
    return {"converted_layers": converted, "dense": reference, "data": data, "settings": settings,
            "v_loss": losses, "paired": paired, "per_layer": per_layer, "warnings": warnings}
