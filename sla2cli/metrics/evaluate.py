"""`eval-fid` as a library call: check everything, sample (resumably, on every rank), then measure on rank 0.

Order matters for the user: every input (sample count, reference, feature weights, models, folders, the
grid) is checked before the first sample is made, so a mistake costs seconds, not hours, and writes nothing.
Without a reference nothing needs feature weights: the samples are made, compared pair by pair with
`compare_to`'s (PSNR, SSIM, MAE) and drawn (`grid`), and the report says that FID was not computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import LoadInfo, file_sha256, load_model
from ..checkpoints.writing import atomic_write, check_output, check_spares_inputs
from ..distributed import ProcessGroup, barrier, init_from_env, rank_device, shutdown
from ..errors import InvalidParameter, Param
from ..sampling import SamplerSettings, sample_label, sampler_settings
from ..seeding import check_seed
from ..sla2.attention import SLA2Attention, backends_in_use, qat_reference_notice
from ..sla2.backends import check_name
from .features import FeatureSpace, create_extractor, dataset_features, feature_space
from .fid import (
    Reference,
    frechet_distance,
    inception_score,
    kernel_distance,
    reference_statistics,
    resolve_reference,
    statistics,
)
from .generate import Generation, Progress, generate_samples
from .grid import image_grid
from .paired import paired_metrics
from .samples import (
    check_pairing,
    folder_writes,
    prepare_folder,
    read_sample,
    remove_partial,
    remove_samples,
    sample_dataset,
)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
GRID_SAMPLES = 16  # the grid shows the first samples, paired column by column


@dataclass
class EvalRequest:
    """Everything `sla2 eval-fid` takes; None means the documented default (`ref` None: no FID).

    `batch_size` is the global batch: under torchrun each of K processes samples batch_size / K at a time.
    """

    model: Path
    num_samples: int
    ref: str | None = None
    features: str = "inception"
    grid: Path | None = None
    force: bool = False
    download_progress: bool = False
    out: Path | None = None
    sampler: str = "jit"
    steps: int = 50
    cfg: float | None = None
    cfg_interval: tuple[float, float] | None = None
    time_shift: float | None = None
    batch_size: int = 64
    seed: int = 0
    inception_weights: Path | None = None
    isc: bool = False
    compare_to: Path | None = None
    keep_samples: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.bfloat16
    weights: str = "auto"
    in_context_start: int | None = None
    trust_checkpoint: bool = False
    sla2_backend: str = "auto"
    compile_blocks: bool = False  # on CUDA: the blocks' non-attention work compiled (`sla2cli.graphs`)
    dense_until: float = 0.0  # evaluations at t < dense_until attend densely (`sampling.SamplerSettings`)


@dataclass
class _Subject:
    """One model to sample (or a finished sample folder) and where its samples go."""

    path: Path
    folder: Path
    model: torch.nn.Module | None = None
    info: LoadInfo | None = None
    manifest: dict | None = None
    generation: Generation | None = None
    backend: str | None = None


def _check_request(r: EvalRequest) -> None:
    if r.num_samples < 2:
        raise InvalidParameter("num_samples", r.num_samples, "{name} must be at least 2 (FID needs a covariance), "
                               "got {value}")
    if r.batch_size < 1:
        raise InvalidParameter("batch_size", r.batch_size, "{name} must be >= 1, got {value}")
    check_seed(r.seed)
    if r.dtype not in DTYPE_NAMES:
        raise InvalidParameter("dtype", r.dtype, "unsupported {name} {value}; use fp32, bf16 or fp16")
    check_name(r.sla2_backend, "sla2_backend")
    if r.compare_to is not None and not r.compare_to.exists():
        raise InvalidParameter("compare_to", r.compare_to, "{name} {value} does not exist; pass a model file or a "
                               "sample folder")
    space = feature_space(r.features)
    if r.isc and space.isc_layer is None:
        raise InvalidParameter("isc", r.isc, "{name} needs class logits of Inception: use {inception}",
                               inception=Param("features='inception'"))


def _manifest(info: LoadInfo, path: Path, settings: SamplerSettings, r: EvalRequest) -> dict:
    return {"seed": r.seed, **settings.to_dict(), "dtype": DTYPE_NAMES[r.dtype],
            "resolution": info.config.input_size, "num_classes": info.config.num_classes,
            "noise_scale": info.config.noise_scale,
            "model": {"file": path.name, "sha256": file_sha256(path), "weights": info.weights}}


def _load(path: Path, r: EvalRequest, device: torch.device) -> tuple[torch.nn.Module, LoadInfo]:
    model, info = load_model(path, weights=r.weights, in_context_start=r.in_context_start,
                             trust_checkpoint=r.trust_checkpoint)
    return model.float().to(device).eval(), info


def default_folder(r: EvalRequest, settings: SamplerSettings) -> Path:
    """Where samples go without --out: one folder per model and settings, so a re-run resumes."""
    shift = f"-shift{settings.time_shift:g}" if settings.time_shift is not None else ""
    dense = f"-dense{settings.dense_until:g}" if settings.dense_until else ""
    return Path("sla2-samples") / (f"{r.model.stem}-{settings.sampler}{shift}-{settings.steps}steps-cfg{settings.cfg:g}"
                                   f"{dense}-seed{r.seed}-{DTYPE_NAMES[r.dtype]}")


def _sla2_backend(model: torch.nn.Module, name: str, device: torch.device, dtype: torch.dtype
                  ) -> tuple[str | None, str | None]:
    """Point converted layers at an SLA2 implementation; returns the one(s) they run (None: dense) and
    `qat_reference_notice`'s line."""
    cores = [m for m in model.modules() if isinstance(m, SLA2Attention)]
    if not cores:
        return None, None
    for core in cores:
        core.backend = name
    return backends_in_use(cores, device, dtype), qat_reference_notice(cores, device, dtype)


def evaluate(r: EvalRequest, progress: Progress | None = None) -> dict | None:
    """Run the whole evaluation; returns the report on rank 0 and None on the other ranks."""
    started = time.perf_counter()
    _check_request(r)
    space = feature_space(r.features)
    reference = weights = None
    if r.ref is not None:
        reference = resolve_reference(r.ref, space)
        weights = space.resolve(r.inception_weights, True, r.download_progress)  # read once: tensors, not paths
    group: ProcessGroup = init_from_env(r.device)
    try:
        if r.batch_size % group.world_size:
            raise InvalidParameter("batch_size", r.batch_size, "{name} {value} (the global batch) must be a "
                                   "multiple of the {processes} processes", processes=group.world_size)
        return _evaluate(r, space, reference, weights, group, rank_device(r.device, group), progress, started)
    finally:
        shutdown(group)


def _evaluate(r: EvalRequest, space: FeatureSpace, reference: Reference | None, weights: tuple[Path, dict] | None,
              group: ProcessGroup, device: torch.device, progress: Progress | None, started: float) -> dict | None:
    per_process = r.batch_size // group.world_size
    main = _Subject(path=r.model, folder=Path())
    main.model, main.info = _load(r.model, r, device)
    settings = sampler_settings(r.sampler, steps=r.steps, cfg=r.cfg, cfg_interval=r.cfg_interval,
                                time_shift=r.time_shift, preset=main.info.preset, dense_until=r.dense_until)
    main.folder = r.out if r.out is not None else default_folder(r, settings)
    main.manifest = _manifest(main.info, r.model, settings, r)
    main.backend, qat_notice = _sla2_backend(main.model, r.sla2_backend, device, r.dtype)
    keep = r.keep_samples or r.out is not None

    other: _Subject | None = None
    warnings: list[str] = [f"{r.model.name}: {qat_notice}"] if qat_notice else []
    if r.compile_blocks and device.type != "cuda":
        warnings.append(f"compiling the blocks needs CUDA graphs: sampling on {device} runs uncompiled")
    if r.compare_to is not None and r.compare_to.is_dir():
        if main.folder.exists() and r.compare_to.resolve() == main.folder.resolve():
            raise InvalidParameter("compare_to", r.compare_to, "{name} {value} is this run's own sample folder; "
                                   "pass another one")
        other = _Subject(path=r.compare_to, folder=r.compare_to)
        warnings += check_pairing(r.compare_to, r.num_samples, main.manifest)
    elif r.compare_to is not None:
        other = _Subject(path=r.compare_to, folder=main.folder / f"compare-{r.compare_to.stem}")
        other.model, other.info = _load(r.compare_to, r, device)
        a, b = main.info.config, other.info.config
        if (a.input_size, a.num_classes, a.in_channels) != (b.input_size, b.num_classes, b.in_channels):
            raise InvalidParameter("compare_to", r.compare_to, "{name} {value} makes {b}px images over {bc} classes, "
                                   "{model} {a}px over {ac}: they cannot be paired", b=b.input_size,
                                   bc=b.num_classes, model=r.model.name, a=a.input_size, ac=a.num_classes)
        other.manifest = _manifest(other.info, r.compare_to, settings, r)
        other.backend, qat_notice = _sla2_backend(other.model, r.sla2_backend, device, r.dtype)
        if qat_notice:
            warnings.append(f"{r.compare_to.name}: {qat_notice}")

    subjects = [main] + ([other] if other is not None and other.model is not None else [])
    inputs = [Path(p) for p in (r.model, r.compare_to, r.ref, weights and weights[0]) if p and Path(p).exists()]
    for s in subjects:  # no sample, manifest or folder we write (or remove) may be an input
        check_spares_inputs(folder_writes(s.folder, inputs), inputs, "out", s.folder)
    if r.grid is not None:
        check_output(r.grid, r.force, tuple(inputs))
    for s in subjects:  # check every folder before writing into any
        prepare_folder(s.folder, s.manifest, create=False)
    if group.is_main:
        for s in subjects:
            prepare_folder(s.folder, s.manifest, create=True)
            remove_partial(s.folder)
    barrier(group)

    for s in subjects:
        task = "sampling" if s is main else f"sampling {s.path.name}"
        s.generation = generate_samples(s.model, s.folder, r.num_samples, settings=settings, seed=r.seed,
                                        batch_size=per_process, device=device, dtype=r.dtype, group=group,
                                        progress=progress, task=task, compile_blocks=r.compile_blocks)
        if s.generation.compile_error:
            warnings.append(f"compiling the blocks failed ({s.generation.compile_error}); {s.path.name} was "
                            "sampled from uncompiled CUDA graphs")
    if not group.is_main:
        return None

    report = {
        "model": str(r.model), "weights": main.info.weights, "preset": main.info.preset,
        "converted_layers": main.info.sla2_layers, "sla2_backend": main.backend,
        "samples": r.num_samples, "resolution": main.info.config.input_size, **settings.to_dict(),
        "seed": r.seed, "dtype": DTYPE_NAMES[r.dtype], "device": str(device), "world_size": group.world_size,
        "batch_size": r.batch_size, "batch_per_process": per_process,
        "compile_blocks": r.compile_blocks and device.type == "cuda" and main.generation.compile_error is None,
        "fid": None, "kid": None, "isc": None, "reference": None, "features": None, "torch_fidelity": None,
        "notes": [], "out": str(main.folder), "kept_samples": keep,
        "generation": main.generation.to_dict(),
        "images_per_second": main.generation.images_per_second,
        "compare": None, "grid": None, "warnings": warnings,
    }
    if other is not None:
        report["compare"] = {
            "other": str(other.path), "kind": "model" if other.model is not None else "folder",
            "converted_layers": other.info.sla2_layers if other.info else None,
            "sla2_backend": other.backend, "fid_between": None, "fid_other": None,
            **paired_metrics(main.folder, other.folder, r.num_samples),
            "generation": other.generation.to_dict() if other.generation else None,
        }
    if reference is None:
        report["notes"].append(f"{space.metric} not computed: no reference (--ref) given")
    else:
        _measure(report, r, space, reference, weights, main.folder, other and other.folder, device, per_process,
                 progress)
    if r.grid is not None:
        report["grid"] = str(_write_grid(r, main, other))
    if not keep:
        if other is not None and other.model is not None:
            remove_samples(other.folder)
        remove_samples(main.folder)
        if r.out is None:
            try:
                main.folder.parent.rmdir()  # sla2-samples/, when nothing else is in it
            except OSError:
                pass
    report["wall_s"] = time.perf_counter() - started
    return report


def _measure(report: dict, r: EvalRequest, space: FeatureSpace, reference: Reference, weights: tuple[Path, dict],
             folder: Path, other_folder: Path | None, device: torch.device, batch_size: int,
             progress: Progress | None) -> None:
    """FID (and KID, IS) of the samples in `space`, and of the other set where there is one, into `report`."""
    task = f"{space.name} features"
    if progress:
        progress(task, 0, 1)
    layers = [space.layer] + ([space.isc_layer] if r.isc else [])
    extractor = create_extractor(weights[1], layers, device, space.name)
    feats = dataset_features(sample_dataset(folder, r.num_samples), extractor, device, batch_size)
    stats = statistics(feats[space.layer])
    ref_stats = reference_statistics(reference, space, extractor, device, batch_size)
    report.update({
        "fid": frechet_distance(stats, ref_stats),
        "kid": kernel_distance(feats[space.layer], reference.features) if reference.features is not None else None,
        "isc": inception_score(feats[space.isc_layer]) if r.isc else None,
        "reference": reference.describe(), "features": space.describe(weights[0]),
        "torch_fidelity": _torch_fidelity_version(),
    })
    if other_folder is not None:
        other_stats = statistics(dataset_features(sample_dataset(other_folder, r.num_samples), extractor, device,
                                                  batch_size)[space.layer])
        report["compare"].update(fid_between=frechet_distance(stats, other_stats),
                                 fid_other=frechet_distance(other_stats, ref_stats))
    if progress:
        progress(task, 1, 1)


def _write_grid(r: EvalRequest, main: _Subject, other: _Subject | None) -> Path:
    """The first GRID_SAMPLES samples, the model's above `compare_to`'s, each column labelled with its class."""
    count = min(r.num_samples, GRID_SAMPLES)
    num_classes = main.info.config.num_classes
    labels = [f"#{i} class {sample_label(r.seed, i, num_classes)}" for i in range(count)]
    rows = [(s.path.name, np.stack([read_sample(s.folder, i) for i in range(count)]))
            for s in (main, other) if s is not None]
    atomic_write(r.grid, lambda tmp: image_grid(rows, labels, tmp))
    return r.grid


def _torch_fidelity_version() -> str:
    import torch_fidelity
    return torch_fidelity.__version__
