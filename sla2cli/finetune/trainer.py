"""The finetune loop: stage 1 (router and α against dense attention) or stage 2 (`full`), resumable,
data-parallel under torchrun.

Order of work: check every input (nothing is written before), load or start the state, measure the
per-layer error against dense attention on a fixed evaluation batch, train, measure again, write the
output atomically (rank 0), and remove the resumable state. Ctrl-C while training raises `Interrupted`
(a KeyboardInterrupt) naming the step whose state was saved, so the caller can say how to resume.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..checkpoints import LoadInfo, check_output, file_sha256, save_model
from ..conversion import provenance_record
from ..data.images import ImageFolder
from ..distributed import ProcessGroup, barrier
from ..errors import InvalidParameter, Param, ParameterError, UsageError
from ..models.jit import JiT
from ..sla2.attention import backends_in_use, qat_reference_notice
from ..sla2.backends import kernels_unavailable
from ..sla2.layers import remove_sla2, sla2_layers
from ..sla2.probe import record_dense_qkv
from ..sla2.stats import describe_layers, measure_layers
from .config import DataSpec, FinetuneConfig
from .objectives import FullFinetune, RouterDistillation
from .schedule import EMA
from .sources import build_source
from .state import (
    Interrupted,
    check_resumable,
    claiming,
    load_state,
    restore_state,
    rng_states,
    save_state,
    state_path,
)

ROUTER_PARAMS = ("proj_q", "proj_k")
ALPHA_LR_SCALE = 10.0
MIX_PARAMS = ("alpha_logit", "mix_scale")  # what learns at ALPHA_LR_SCALE in stage 1
MEASURE_EVERY = 10  # stage 1's "distill" measures the layers' errors (not its loss) every 10th step and the last


@dataclass
class StepInfo:
    """What the loop reports after each step (global values, averaged over ranks). `per_layer`: the loss's
    parts (stage 1: each layer's error against dense attention; empty on a step that did not measure them)."""

    step: int
    steps: int
    loss: float
    topk: float
    per_layer: list[float]
    seconds: float


@dataclass
class FinetuneResult:
    output: Path
    stage: str
    layers: list[int]
    data: dict
    options: dict
    per_layer: list[dict]
    loss_history: list[float]
    steps_run: int
    resumed_from: int | None
    steps_per_second: float | None
    seconds: float
    world_size: int
    backend: str
    state_file: Path
    warnings: list[str] = field(default_factory=list)

    @property
    def mean_error_before(self) -> float:
        return _mean([r["error_before"] for r in self.per_layer])

    @property
    def mean_error_after(self) -> float:
        return _mean([r["error_after"] for r in self.per_layer])

    @property
    def error_reduction(self) -> float:
        return self.mean_error_before / max(self.mean_error_after, 1e-12)

    def to_dict(self) -> dict:
        return {"output": str(self.output), "stage": self.stage, "layers": self.layers, "data": self.data,
                "options": self.options, "steps_run": self.steps_run, "resumed_from": self.resumed_from,
                "steps_per_second": self.steps_per_second, "seconds": self.seconds, "world_size": self.world_size,
                "backend": self.backend, "mean_error_before": self.mean_error_before,
                "mean_error_after": self.mean_error_after, "error_reduction": self.error_reduction,
                "per_layer": self.per_layer, "loss_history": self.loss_history, "warnings": self.warnings}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _diverged(what: str, value: float, step: int, lr: float, saved: int | None, spath: Path) -> ParameterError:
    kept = "" if saved is None else "; the state of step {saved} in {spath} is intact ({resume} continues from it)"
    return ParameterError("lr", lr, "the {what} became {number} at step {step}; nothing was written" + kept
                          + "; lower {name} or use {fp32}", what=what, number=value, step=step, saved=saved,
                          spath=spath, resume=Param("resume=True"), fp32=Param("dtype='fp32'"))


def _data_options(spec: DataSpec) -> dict:
    if spec.kind == "folder":
        return {"source": "folder", "path": str(Path(spec.folder).resolve()), "class_index": spec.class_index}
    return {"source": spec.kind, "samples": spec.teacher_samples, "sampling_steps": spec.sampling_steps,
            "cfg": spec.cfg}


def _kernel_warnings(device: torch.device) -> list[str]:
    """On CUDA, load the Triton kernels; a warning where they cannot serve (the PyTorch reference then does)."""
    why = kernels_unavailable(device) if device.type == "cuda" else None
    return [] if why is None else [f"Triton kernels unavailable ({why}); using the PyTorch reference"]


def _trainable(model: JiT, cores, full: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """Stage 1: each converted layer's W_q, W_k, α. Stage 2: every weight but the router (and fixed positions)."""
    model.requires_grad_(False)
    if full:
        for name, p in model.named_parameters():
            if name != "pos_embed" and name.rsplit(".", 1)[-1] not in ROUTER_PARAMS:
                p.requires_grad_(True)
    else:
        for core in cores.values():
            core.requires_grad_(True)
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _param_groups(named, config: FinetuneConfig) -> list[dict]:
    """α logits learn ALPHA_LR_SCALE times faster in stage 1: a logit must travel a few units (α from its
    0.9 default to the captured mass), a router entry only a few hundredths."""
    lr = config.learning_rate
    alpha = [p for name, p in named if name.endswith(MIX_PARAMS)]
    rest = [p for name, p in named if not name.endswith(MIX_PARAMS)]
    groups = [{"params": rest, "lr": lr}] if rest else []
    if alpha:
        groups.append({"params": alpha, "lr": lr if config.full else lr * ALPHA_LR_SCALE})
    return groups


def _measure(model, z, t, y) -> dict[int, dict]:
    """Per-layer error against dense attention, always in float32: it measures SLA2, not rounding."""
    return {r["layer"]: r for r in measure_layers(model, z, t, y)}


def _set_topk(cores, topk: dict[int, float]) -> None:
    for i, core in cores.items():
        if core.config.topk != topk[i]:
            core.config = dataclasses.replace(core.config, topk=topk[i])


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _provenance(info: LoadInfo, source: Path, source_sha: str, options: dict, data: dict, rows: list[dict],
                world: int) -> dict:
    record = provenance_record(
        input=source.name, input_sha256=source_sha, stage=options["stage"], steps=options["steps"],
        batch_size=options["batch_size"], lr=options["lr"], tau=options["tau"], topk_schedule=options["topk_schedule"],
        e2e_weight=options["e2e_weight"], seed=options["seed"], dtype=options["dtype"], world_size=world, data=data,
        errors={str(r["layer"]): {"before": r["error_before"], "after": r["error_after"]} for r in rows})
    provenance = dict(info.provenance)
    if "finetune" in provenance:
        record["previous"] = provenance["finetune"]
    provenance["finetune"] = record
    return provenance


@claiming(lambda dst, _: [dst, state_path(dst)])
def run_finetune(model: JiT, info: LoadInfo, *, source: Path, dst: Path, config: FinetuneConfig, data: DataSpec,
                 device: torch.device, group: ProcessGroup = ProcessGroup(), force: bool = False,
                 resume: bool = False, backend: str | None = None, progress: Callable[[StepInfo], None] | None = None,
                 on_start: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Finetune `model` (loaded from `source`) and write it to `dst`; see the module docstring for the order.

    `backend` picks the SLA2 implementation the converted layers train with (None: as loaded, "auto").
    `on_start(summary)` is called once every input has been checked (before any slow work), `progress`
    after every step.
    """
    source, dst = Path(source), Path(dst)
    cores = sla2_layers(model)
    if not cores:
        raise UsageError(f"{source.name} has no SLA2 layers to finetune; convert it first "
                         f"(sla2 convert {source.name} -o SLA2.safetensors --layers ...)")
    if config.batch_size % group.world_size:
        raise InvalidParameter("batch_size", config.batch_size, "{name} {value} (the global batch) must be a "
                               "multiple of the {processes} processes", processes=group.world_size)
    spath = state_path(dst)
    check_output(dst, force, (source,), derived=[spath])  # the state may not be the input either, --force or not
    if resume and not spath.exists():
        raise InvalidParameter("resume", resume, "{name}: there is no saved state {path}; run without {name} to "
                               "start", path=spath)
    if not resume and spath.exists() and not force:
        raise InvalidParameter("resume", resume, "{path} holds the state of an interrupted finetune; pass {resume} "
                               "to continue it, or {force} to start over", path=spath, resume=Param("resume=True"),
                               force=Param("force=True"))
    if data.kind == "trajectory" and config.full and config.objective != "distill":
        raise InvalidParameter("objective", config.objective, "{name} {value!r} needs clean images; the sampler's "
                               "trajectory {states} has none: use {distill}", states=Param("states"),
                               distill=Param("objective='distill'"))
    folder = None
    if data.kind == "folder":
        folder = ImageFolder.open(data.folder, model.config.input_size, class_index=data.class_index,
                                  num_classes=model.config.num_classes)
    source_sha = file_sha256(source)
    options = {**config.to_dict(), "stage": config.stage, "data": _data_options(data)}
    state = load_state(spath) if resume else None
    if state is not None:
        check_resumable(state, options, source_sha, spath)

    if on_start is not None:
        on_start({"stage": config.stage, "layers": sorted(cores),
                  "resume_step": None if state is None else state["step"],
                  "data": _data_options(data), "world_size": group.world_size})
    warnings = _kernel_warnings(device)
    if backend is not None:
        for core in cores.values():
            core.backend = backend
    compute_dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
    backend_used = backends_in_use(cores.values(), device, compute_dtype)
    if notice := qat_reference_notice(cores.values(), device, compute_dtype):
        warnings.append(notice)
    layers = sorted(cores)
    stored_dtype = next(model.parameters()).dtype
    model.to(device=device, dtype=torch.float32)  # fp32 master weights; --dtype bf16 computes under autocast
    autocast = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=config.dtype == "bf16")
    target = {i: config.topk_schedule.end if config.topk_schedule else cores[i].config.topk for i in layers}
    _set_topk(cores, target)
    teacher = None
    if config.full and (config.e2e_weight > 0 or "distill" in config.objective):
        teacher = copy.deepcopy(model)
        remove_sla2(teacher)
        teacher.requires_grad_(False)
    named = _trainable(model, cores, config.full)
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(_param_groups(named, config), weight_decay=0.0,
                                  betas=(0.9, 0.95) if config.full else (0.9, 0.999))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    ema = EMA(params, config.ema)

    per_rank = config.batch_size // group.world_size
    src = build_source(model, data, seed=config.seed, eval_samples=config.eval_samples, device=device,
                       batch_size=per_rank, group=group, autocast=autocast, folder=folder)
    z_eval, t_eval, y_eval = src.eval_states(device)

    start, history, before = 0, [], None
    if state is not None:
        start, history, before = restore_state(state, spath, named, optimizer, ema, layers, device)
    elif group.is_main:
        before = _measure(model, z_eval, t_eval, y_eval)

    module = (FullFinetune(model, teacher, config.objective) if config.full
              else RouterDistillation(model, cores, config.objective))
    runner = module
    if group.distributed:
        runner = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step: int) -> None:
        if group.is_main:
            save_state(spath, {
                "step": step, "options": options, "source_sha256": source_sha, "history": history,
                "errors_before": before, "weights": {name: p.detach().cpu() for name, p in named},
                "optimizer": optimizer.state_dict(), "ema": ema.state_dict(), "rng": rng_states(device)})
        barrier(group)

    began = time.perf_counter()
    after_first = None
    saved = start if state is not None else None
    step = start
    # this rank's slice of each global batch, by position; the source reads them ahead of the steps
    slices = [range(k * config.batch_size + group.rank * per_rank, k * config.batch_size + (group.rank + 1) * per_rank)
              for k in range(start, config.steps)]
    batches = src.train_batches(slices, device)
    try:
        for step in range(start, config.steps):
            topk = {i: config.topk_at(step, target[i]) for i in layers}
            x, z, t, y = next(batches)
            if config.full:
                _set_topk(cores, topk)
                loss, parts, e2e = runner(x, z, t, y, config.e2e_weight, autocast)
            else:
                with autocast():
                    qkv, teacher_out = record_dense_qkv(model, layers, z, t, y)
                measure = (step + 1) % MEASURE_EVERY == 0 or step + 1 == config.steps
                loss, parts, e2e = runner(qkv, topk, config.tau, config.e2e_weight, z, t, y, teacher_out, autocast,
                                          measure)
            report = torch.cat([loss.detach().float()[None], parts.float(), e2e.float()[None]])
            if group.distributed:
                dist.all_reduce(report)
                report /= group.world_size
            if not torch.isfinite(report).all():
                raise _diverged("loss", report[0].item(), step + 1, config.learning_rate, saved, spath)
            loss.backward()
            norm = _grad_norm(params)
            if not torch.isfinite(norm):
                raise _diverged("gradients", norm.item(), step + 1, config.learning_rate, saved, spath)
            factor = config.lr_schedule.factor(step, config.steps)
            for group_, base in zip(optimizer.param_groups, base_lrs):
                group_["lr"] = base * factor
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update()
            history.append(report[0].item())
            done = step + 1
            if after_first is None:
                after_first = time.perf_counter()
            if config.save_every and done % config.save_every == 0 and done < config.steps:
                save(done)
                saved = done
            if progress is not None:
                progress(StepInfo(step=done, steps=config.steps, loss=history[-1],
                                  topk=sum(topk.values()) / len(topk),
                                  per_layer=report[1:1 + len(parts)].tolist(), seconds=time.perf_counter() - began))
    except KeyboardInterrupt:  # the state of step `saved` (written at a step boundary) is what a resume uses
        raise Interrupted(step + 1, config.steps, saved, spath) from None
    ended = time.perf_counter()
    steps_run = config.steps - start
    rate = None
    if steps_run >= 2:
        rate = (steps_run - 1) / (ended - after_first)
    elif steps_run == 1:
        rate = 1 / (ended - began)

    _set_topk(cores, target)
    ema.copy_to_params()
    model.requires_grad_(False)
    rows = []
    if group.is_main:
        after = _measure(model, z_eval, t_eval, y_eval)
        rows = [{**r, "error_before": before[r["layer"]]["relative_squared_error"],
                 "error_after": after[r["layer"]]["relative_squared_error"],
                 "captured_mass": after[r["layer"]]["captured_mass"]}
                for r in describe_layers(model) if r["converted"]]
        model.to(dtype=stored_dtype)
        provenance = _provenance(info, source, source_sha, options, src.describe(), rows, group.world_size)
        save_model(model, dst, provenance=provenance, force=force, sources=(source,))
        spath.unlink(missing_ok=True)
    barrier(group)
    return FinetuneResult(
        output=dst, stage=config.stage, layers=layers, data=src.describe(), options=options, per_layer=rows,
        loss_history=history, steps_run=steps_run, resumed_from=start if state is not None else None,
        steps_per_second=rate, seconds=ended - began, world_size=group.world_size,
        backend=backend_used, state_file=spath, warnings=warnings)
