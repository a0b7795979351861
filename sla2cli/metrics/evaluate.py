"""`eval-fid` as a library call: check everything, sample (resumably, on every rank), then measure on rank 0.

Order matters for the user: every input (sample count, reference, Inception weights, models, folders)
is checked before the first sample is made, so a mistake costs seconds, not hours, and writes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import LoadInfo, file_sha256, load_model
from ..checkpoints.writing import check_spares_inputs
from ..distributed import ProcessGroup, barrier, init_from_env, rank_device, shutdown
from ..errors import InvalidParameter
from ..sampling import SamplerSettings, sampler_settings
from ..seeding import check_seed
from ..sla2.attention import SLA2Attention, backends_in_use
from ..sla2.backends import check_name
from .fid import Reference, frechet_distance, inception_score, reference_statistics, resolve_reference, statistics
from .generate import Generation, Progress, generate_samples
from .inception import FEATURE_EXTRACTOR, FID_LAYER, ISC_LAYER, create_extractor, dataset_features, resolve_state
from .paired import paired_metrics
from .samples import check_pairing, folder_writes, prepare_folder, remove_partial, remove_samples, sample_dataset

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class EvalRequest:
    """Everything `sla2 eval-fid` takes; None means the documented default."""

    model: Path
    num_samples: int
    ref: str
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
    return Path("sla2-samples") / (f"{r.model.stem}-{settings.sampler}{shift}-{settings.steps}steps-cfg{settings.cfg:g}"
                                   f"-seed{r.seed}-{DTYPE_NAMES[r.dtype]}")


def _sla2_backend(model: torch.nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Point converted layers at an SLA2 implementation; returns the one(s) they run (None: dense)."""
    cores = [m for m in model.modules() if isinstance(m, SLA2Attention)]
    if not cores:
        return None
    for core in cores:
        core.backend = name
    return backends_in_use(cores, device, dtype)


def evaluate(r: EvalRequest, progress: Progress | None = None) -> dict | None:
    """Run the whole evaluation; returns the report on rank 0 and None on the other ranks."""
    started = time.perf_counter()
    _check_request(r)
    reference: Reference = resolve_reference(r.ref)
    weights_file, inception = resolve_state(r.inception_weights)  # read once: the tensors go on, never the path
    group: ProcessGroup = init_from_env(r.device)
    try:
        return _evaluate(r, reference, (weights_file, inception), group, rank_device(r.device, group), progress,
                         started)
    finally:
        shutdown(group)


def _evaluate(r: EvalRequest, reference: Reference, weights: tuple[Path, dict], group: ProcessGroup,
              device: torch.device, progress: Progress | None, started: float) -> dict | None:
    weights_file, inception = weights
    main = _Subject(path=r.model, folder=Path())
    main.model, main.info = _load(r.model, r, device)
    settings = sampler_settings(r.sampler, steps=r.steps, cfg=r.cfg, cfg_interval=r.cfg_interval,
                                time_shift=r.time_shift, preset=main.info.preset)
    main.folder = r.out if r.out is not None else default_folder(r, settings)
    main.manifest = _manifest(main.info, r.model, settings, r)
    main.backend = _sla2_backend(main.model, r.sla2_backend, device, r.dtype)
    keep = r.keep_samples or r.out is not None

    other: _Subject | None = None
    warnings: list[str] = []
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
        other.backend = _sla2_backend(other.model, r.sla2_backend, device, r.dtype)

    subjects = [main] + ([other] if other is not None and other.model is not None else [])
    inputs = [p for p in (r.model, r.compare_to, Path(r.ref), weights_file) if p is not None and p.exists()]
    for s in subjects:  # no sample, manifest or folder we write (or remove) may be an input
        check_spares_inputs(folder_writes(s.folder, inputs), inputs, "out", s.folder)
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
                                        batch_size=r.batch_size, device=device, dtype=r.dtype, group=group,
                                        progress=progress, task=task)
    if not group.is_main:
        return None

    if progress:
        progress("Inception features", 0, 1)
    layers = [FID_LAYER] + ([ISC_LAYER] if r.isc else [])
    extractor = create_extractor(inception, layers, device)
    feats = dataset_features(sample_dataset(main.folder, r.num_samples), extractor, device, r.batch_size)
    stats = statistics(feats[FID_LAYER])
    ref_stats = reference_statistics(reference, extractor, device, r.batch_size)
    report = {
        "model": str(r.model), "weights": main.info.weights, "preset": main.info.preset,
        "converted_layers": main.info.sla2_layers, "sla2_backend": main.backend,
        "samples": r.num_samples, "resolution": main.info.config.input_size, **settings.to_dict(),
        "seed": r.seed, "dtype": DTYPE_NAMES[r.dtype], "device": str(device), "world_size": group.world_size,
        "batch_size": r.batch_size,
        "fid": frechet_distance(stats, ref_stats),
        "isc": inception_score(feats[ISC_LAYER]) if r.isc else None,
        "reference": reference.describe(),
        "feature_extractor": FEATURE_EXTRACTOR, "inception_weights": str(weights_file),
        "torch_fidelity": _torch_fidelity_version(),
        "out": str(main.folder), "kept_samples": keep,
        "generation": main.generation.to_dict(),
        "images_per_second": main.generation.images_per_second,
        "compare": None, "warnings": warnings,
    }
    if other is not None:
        other_feats = dataset_features(sample_dataset(other.folder, r.num_samples), extractor, device,
                                       r.batch_size)[FID_LAYER]
        other_stats = statistics(other_feats)
        report["compare"] = {
            "other": str(other.path), "kind": "model" if other.model is not None else "folder",
            "converted_layers": other.info.sla2_layers if other.info else None,
            "sla2_backend": other.backend,
            "fid_between": frechet_distance(stats, other_stats),
            "fid_other": frechet_distance(other_stats, ref_stats),
            **paired_metrics(main.folder, other.folder, r.num_samples),
            "generation": other.generation.to_dict() if other.generation else None,
        }
    if progress:
        progress("Inception features", 1, 1)
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


def _torch_fidelity_version() -> str:
    import torch_fidelity
    return torch_fidelity.__version__
