"""The whole recipe in one call: stage 1 (router and α), then stage 2 (every weight but the router, the model's
own training continued on `recipe_stage2_data`), with the held-out v-loss of the model against its dense
source before and after and, on request, of a dense control trained by the same stage 2.

Stage 1 writes `DST.stage1.safetensors` next to the output; stage 2 starts from it and it is removed at the
end unless `keep_stage1` (stage 1 alone is what a user who cannot retrain the weights would ship). A killed
run resumes across the boundary: with `resume`, a finished stage 1 (its file there, its state gone) is not
run again, and each stage continues from its own `.resume.pt`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints import LoadInfo, load_model
from ..checkpoints.writing import check_spares_inputs
from ..distributed import ProcessGroup, barrier
from ..errors import InvalidParameter
from ..models.jit import JiT
from ..sla2.layers import remove_sla2, sla2_layers
from .config import DataSpec, FinetuneConfig, recipe_stage2_data
from .state import claiming, state_path
from .trainer import FinetuneResult, StepInfo, run_finetune


def stage1_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".stage1.safetensors")


def control_path(dst: Path) -> Path:
    return dst.with_name(dst.stem + ".control" + dst.suffix)


def recipe_outputs(dst: Path, control: bool = False) -> list[Path]:
    """Every file the recipe writes: the output, stage 1's model, the control's (`control`), each one's state."""
    models = [dst, stage1_path(dst)] + ([control_path(dst)] if control else [])
    return [path for model in models for path in (model, state_path(model))]


@dataclass
class RecipeResult:
    router: FinetuneResult | None  # None: stage 1 had finished in an earlier, interrupted run
    full: FinetuneResult
    held_out: dict  # v-loss against the dense source: "converted", "stage1", "finetuned" (and "control")
    control: FinetuneResult | None = None

    def to_dict(self) -> dict:
        return {"stage1": None if self.router is None else self.router.to_dict(), "stage2": self.full.to_dict(),
                "control": None if self.control is None else self.control.to_dict(), "held_out": self.held_out}


def _held_out_images(dense: JiT, data: DataSpec, count: int, seed: int, device) -> tuple[torch.Tensor, ...]:
    from ..metrics.quality import OWN_SAMPLING_STEPS, evaluation_images
    from ..sla2.stats import own_noised_batch

    if data.kind == "folder":
        x, y, _ = evaluation_images(data.folder, dense.config, count, seed=seed, class_index=data.class_index)
        return x, y
    x, _, y = own_noised_batch(dense, count, t=1.0, sampling_steps=OWN_SAMPLING_STEPS, seed=seed, device=device)
    return x, y


def _ratio(model: JiT, dense: JiT, images, labels, seed: int) -> dict:
    from ..metrics.quality import held_out_v_loss

    losses, _ = held_out_v_loss(model, dense, images, labels, seed=seed)
    return {k: losses[k] for k in ("model", "dense", "ratio")}


@claiming(lambda dst, options: recipe_outputs(dst, options.get("control", False)))
def run_recipe(model: JiT, info: LoadInfo, *, source: Path, dst: Path, router: FinetuneConfig,
               full: FinetuneConfig, data: DataSpec, device: torch.device, group: ProcessGroup = ProcessGroup(),
               force: bool = False, resume: bool = False, backend: str | None = None, control: bool = False,
               progress: Callable[[str, StepInfo], None] | None = None,
               on_start: Callable[[dict], None] | None = None, keep_stage1: bool = False) -> RecipeResult:
    """Stage 1 with `router` (not full) on `data`, then stage 2 with `full` (full) on `recipe_stage2_data(data)`,
    `model` loaded from `source`."""
    if router.full or not full.full:
        raise InvalidParameter("full", full.full, "the recipe runs stage 1 (router) then stage 2 (full): pass a "
                               "router configuration and a full one")
    source, dst = Path(source), Path(dst)
    mid = stage1_path(dst)
    check_spares_inputs(recipe_outputs(dst, control), (source,), value=dst)
    dense = copy.deepcopy(model)
    remove_sla2(dense)
    dense.to(device).eval()
    images, labels = _held_out_images(dense, data, full.eval_samples, full.seed, device)
    held_out = {"eval_samples": len(images), "converted": _ratio(model.to(device), dense, images, labels, full.seed)}

    def stage_progress(stage: str):
        return None if progress is None else (lambda info_: progress(stage, info_))

    first = None
    if not (resume and mid.exists() and not state_path(mid).exists()):
        first = run_finetune(model, info, source=source, dst=mid, config=router, data=data, device=device,
                             group=group, force=force, resume=resume and state_path(mid).exists(), backend=backend,
                             progress=stage_progress("stage 1"), on_start=on_start)
    model, info = load_model(mid)
    held_out["stage1"] = _ratio(model.to(device), dense, images, labels, full.seed)
    model.cpu()
    stage2_data = recipe_stage2_data(data)
    second = run_finetune(model, info, source=mid, dst=dst, config=full, data=stage2_data, device=device, group=group,
                          force=force, resume=resume and state_path(dst).exists(), backend=backend,
                          progress=stage_progress("stage 2"))
    # run_finetune trains in place and writes what it holds: no need to read the output back
    held_out["finetuned"] = _ratio(model, dense, images, labels, full.seed)
    ctrl = None
    if control:
        cpath = control_path(dst)
        # the control: every layer keeps every key block (topk 1: exact attention), same stage 2
        ctrl_model, ctrl_info = load_model(source)
        for core in sla2_layers(ctrl_model).values():
            core.config = dataclasses.replace(core.config, topk=1.0)
        ctrl = run_finetune(ctrl_model, ctrl_info, source=source, dst=cpath, config=full, data=stage2_data,
                            device=device, group=group, force=force, resume=resume and state_path(cpath).exists(),
                            backend=backend, progress=stage_progress("dense control"))
        held_out["control"] = _ratio(ctrl_model, dense, images, labels, full.seed)
        held_out["finetuned_vs_control"] = held_out["finetuned"]["model"] / held_out["control"]["model"]
    if group.is_main and not keep_stage1:
        mid.unlink(missing_ok=True)
    barrier(group)
    return RecipeResult(router=first, full=second, held_out=held_out, control=ctrl)
