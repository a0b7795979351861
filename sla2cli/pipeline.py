"""`sla2 demo`'s pipeline over a JiT shipped inside the package (`models.shipped`: "demo", or "showcase" on a GPU).

The demo (the `step_*` functions, which `sla2 demo` runs in order) converts it with the balanced preset,
calibrates α, measures every converted layer against dense attention, runs fine-tuning and profiling,
samples dense and SLA2 from the same seeds, measures a texture Fréchet distance and, on a GPU, times
sampling end to end. Each step returns plain data; the command renders it. Evaluation data are textures
of the model's held-out seed (calibration and measurement, never seen in training) and the reference set
`textures.reference_set` (regenerated on the spot; nothing stored), at the model's image size.

Library code: nothing here prints.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .budget import convert_within_budget
from .checkpoints import load_model
from .conversion import MIN_KEY_BLOCKS_TO_PAY_OFF, convert_model, sla2_settings, write_converted
from .data.textures import CLASS_NAMES, REFERENCE_SEED, TRAIN_SEED, reference_set, texture_batch
from .diffusion import noised, v_loss
from .errors import InvalidParameter
from .graphs import graphed
from .metrics.grid import image_grid
from .models.jit import JiT
from .models.shipped import DEMO, SHIPPED_MODELS, ShippedModel
from .sampling import paired_inputs, sample, to_uint8
from .seeding import PROBE_NOISE
from .sla2.attention import SLA2Config
from .sla2.backends import kernels_unavailable
from .sla2.layers import apply_sla2, dense_twin
from .sla2.routing import num_blocks
from .sla2.stats import attention_entropy, describe_layers, measure_layers

if TYPE_CHECKING:  # the finetune package loads its trainer: imported where a step finetunes
    from .finetune import DataSpec

MANIFEST = "sla2-demo.json"
# The recipe's learned parts (a rank-16 feature map and α per query, trained by stage 1; bench/RESULTS.md,
# "Quality recipe"), on top of every demo conversion's preset.
DEMO_LEARNED = {"feature_rank": 16, "alpha_mode": "per_query"}
# The showcase's per-layer error budget: 0.02 relative squared error keeps 2-5 of 65 key blocks where its
# attention is concentrated and up to 16 where it is diffuse, 90% block sparsity in all (bench/RESULTS.md,
# "Showcase model", session 7).
SHOWCASE_MAX_ERROR = 0.02


@dataclass(frozen=True)
class DemoConversion:
    """How the demo converts a shipped model: `preset` with DEMO_LEARNED on top, QAT as the preset says unless
    `qat` is given, and with `max_error` each layer's topk chosen within that error budget (`sla2 convert
    --max-error`) instead of the preset's."""

    preset: str = "balanced"
    qat: bool | None = None
    max_error: float | None = None

    def settings(self) -> SLA2Config:
        return sla2_settings(self.preset, qat=self.qat, **DEMO_LEARNED)

    def describe(self) -> str:
        parts = [f"{self.preset} preset"] + (["no QAT"] if self.qat is False else [])
        return ", ".join(parts + ([f"per-layer error <= {self.max_error:g}"] if self.max_error is not None else []))


DEMO_CONVERSIONS = {
    "demo": DemoConversion(),  # a CPU's three minutes leave no room for the budget's search
    # On a GPU, the recipe as measured: without QAT (its low-bit kernels are slower than bf16 at head dim 64 on
    # an H200, bench/RESULTS.md "Low bit"), each layer as sparse as its error budget allows.
    "showcase": DemoConversion(qat=False, max_error=SHOWCASE_MAX_ERROR),
}
CALIBRATION_OFFSET = 1_000  # calibration images are indices 1000.. of the held-out seed; measurement uses 0..
SPEED_CFG = 2.0  # guidance of the sampling-speed step (the quality protocol's, bench/quality.sh)
# The showcase's finetune on a GPU: the recipe's stage 1 as bench/quality.sh runs it (100 steps of 32 at the
# router's learning rate, bf16, 2,048 training textures; 93 s on an H200), on t drawn among the sampler's first
# steps ("early"), where SLA2's error costs the samples most: a uniform 95% conversion's texture FD from 93.4 to
# 11.8 (dense 4.45; on JiT's t: 17.3). Then the recipe's stage 2 (JiT's v-loss at JiT's t, lr 1.5e-4, EMA), which
# took a 95% stage-1 model's FD (512 samples) to 3.96 where the dense model scores 4.39, in 400 steps, 87 s
# (bench/RESULTS.md, "Showcase model", sessions 10 and 17).
SHOWCASE_FINETUNE = {"finetune_steps": 100, "finetune_batch": 32, "finetune_lr": None, "finetune_dtype": "bf16",
                     "finetune_t": "early", "train_textures": 2048, "stage2_steps": 400}


def demo_conversion(shipped: ShippedModel = DEMO) -> DemoConversion:
    return DEMO_CONVERSIONS[shipped.name]


def demo_settings(shipped: ShippedModel = DEMO) -> SLA2Config:
    """The demo's SLA2 settings for `shipped` (a budgeted conversion replaces their topk layer by layer)."""
    return demo_conversion(shipped).settings()


@dataclass(frozen=True)
class DemoPlan:
    """How much work each step does. `--fast` (for tests) trades the numbers' precision for time; on CUDA
    there is time for more of everything."""

    fast: bool
    eval_images: int  # held-out noised textures for calibration, and again for measurement
    samples: int  # paired dense / SLA2 samples (the grid, the paired comparison)
    sample_steps: int  # Heun steps of the demo's sampler (no guidance)
    sample_before_finetune: bool  # also sample the converted model before finetuning
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float | None  # None: stage 1's default rate (finetune.config.ROUTER_LR)
    finetune_dtype: str  # "fp32", or "bf16" where the Triton kernels train (a GPU)
    finetune_t: str  # where stage 1's training t lie (`finetune --t-distribution`); stage 2's are the recipe's
    train_textures: int  # the finetune's image folder: textures of the model's training seed
    profile_ms: float  # time per latency measurement
    fid_samples: int
    speed_batch: int  # end-to-end sampling speed, dense vs SLA2, at this batch (0: not measured)
    speed_steps: int  # its Heun steps, with guidance (SPEED_CFG) and bf16
    dense_until: float = 0.0  # the SLA2 model's samples (FID, speed) attend densely at t < dense_until
    stage2_steps: int = 0  # then the recipe's stage 2 (every weight; 0: stage 1 only)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_for(fast: bool, device: torch.device, shipped: ShippedModel = DEMO) -> DemoPlan:
    """The demo's budget: under 3 minutes on a 2-core CPU (`--fast`: under one), 30 s on a GPU for the demo
    model. Sampling speed is measured on a GPU only, where forwards replay from CUDA graphs (on a CPU the
    PyTorch reference of SLA2 is never faster).

    The finetune is stage 1 of the recipe (router, α and learned feature maps against the dense velocity) on
    textures of the training distribution, which lowers the held-out v-loss within a few steps where stage 2
    (every weight) first makes it worse (bench/RESULTS.md, "Quality recipe"): on a CPU 12 steps of batch 4 take
    the conversion from 1.215x to 1.161x dense on 12 held-out textures (16 steps: 1.154x, 19 s more; about
    half of a step is the router's SoftTop-k gradient). The showcase's (`shipped`) full GPU run takes the
    recipe's stage 1 as `bench/quality.sh` runs it, on t among the sampler's first steps, then its stage 2
    (SHOWCASE_FINETUNE).
    """
    if device.type == "cuda":
        plan = DemoPlan(fast=fast, eval_images=16, samples=8, sample_steps=10 if fast else 20,
                        sample_before_finetune=True, finetune_steps=20 if fast else 60, finetune_batch=8,
                        finetune_lr=1e-3, finetune_dtype="fp32", finetune_t="jit", train_textures=256,
                        profile_ms=10.0 if fast else 30.0, fid_samples=32 if fast else 128, speed_batch=8,
                        speed_steps=10 if fast else 50)
        return dataclasses.replace(plan, **SHOWCASE_FINETUNE) if shipped.name == "showcase" and not fast else plan
    if fast:
        return DemoPlan(fast=True, eval_images=2, samples=4, sample_steps=3, sample_before_finetune=False,
                        finetune_steps=2, finetune_batch=2, finetune_lr=1e-3, finetune_dtype="fp32",
                        finetune_t="jit", train_textures=8, profile_ms=1.0, fid_samples=4, speed_batch=0, speed_steps=0)
    return DemoPlan(fast=False, eval_images=12, samples=4, sample_steps=5, sample_before_finetune=True,
                    finetune_steps=12, finetune_batch=4, finetune_lr=1e-3, finetune_dtype="fp32", finetune_t="jit",
                    train_textures=64, profile_ms=10.0, fid_samples=8, speed_batch=0, speed_steps=0)


def demo_model(name: str, device: torch.device) -> tuple[ShippedModel, str | None]:
    """The shipped model `sla2 demo --model NAME` runs on `device` (checked to be installed), and a notice
    when it is not the one asked for: a model too slow for a CPU gives way to the small demo model there."""
    if name not in SHIPPED_MODELS:
        raise InvalidParameter("model", name, "unknown {name} {value!r}; choose one of: {choices}",
                               choices=", ".join(SHIPPED_MODELS))
    shipped, notice = SHIPPED_MODELS[name], None
    if shipped.needs_cuda and device.type != "cuda":
        shipped, notice = DEMO, f"the {name} model needs a GPU; running the small {DEMO.name} model instead"
    shipped.check_installed()
    return shipped, notice


@dataclass
class Demo:
    """State carried from step to step."""

    out: Path
    device: torch.device
    plan: DemoPlan
    seed: int = 0
    shipped: ShippedModel = DEMO
    dense: JiT | None = None
    info: object = None
    candidates: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    converted: JiT | None = None
    tuned: JiT | None = None
    results: dict = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)


def prepare_out(out: Path) -> None:
    """Create `out`, or reuse it if it is empty or was made by an earlier `sla2 demo`; never touch others."""
    if out.exists() and not out.is_dir():
        raise InvalidParameter("out", out, "{name} {value} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise InvalidParameter("out", out, "{name} {value} is not empty and was not made by 'sla2 demo'; choose "
                               "another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps({"format": "sla2cli-demo", "complete": False}) + "\n")


def load_backends(demo: Demo) -> None:
    """On CUDA, say so when the Triton SLA2 kernels cannot load (the PyTorch reference then serves)."""
    if demo.device.type == "cuda" and kernels_unavailable(demo.device):
        demo.notices.append("Triton kernels unavailable; using the PyTorch reference")


def _eval_batch(demo: Demo, offset: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, z, t, y): held-out textures, noised at t from JiT's training distribution; the same on every run."""
    n = demo.plan.eval_images
    x, y = texture_batch(torch.arange(offset, offset + n), seed=demo.shipped.held_out_seed, size=_size(demo))
    z, t, _ = noised(x, range(offset, offset + n), seed=demo.seed, stream=PROBE_NOISE)
    return x.to(demo.device), z.to(demo.device), t.to(demo.device), y.to(demo.device)


def _size(demo: Demo) -> int:
    return demo.shipped.config.input_size


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def step_model(demo: Demo) -> dict:
    """Load the shipped model; describe it; show that it is trained (v-loss) and attends sparsely (entropy)."""
    demo.dense, demo.info = demo.shipped.load(device=demo.device)
    cfg = demo.dense.config
    x, z, t, y = _eval_batch(demo)
    with torch.no_grad():
        demo.cache["dense_out"] = demo.dense(z, t, y)
    loss = v_loss(demo.cache["dense_out"], x, z, t).mean().item()
    fixed_t = torch.full((min(2, x.shape[0]),), 0.6, device=demo.device)
    z6, _, _ = noised(x[: fixed_t.shape[0]], seed=demo.seed, stream=PROBE_NOISE, t=fixed_t)
    entropy = attention_entropy(demo.dense, z6, fixed_t, y[: fixed_t.shape[0]])
    rows = describe_layers(demo.dense)
    for r in rows:
        e = entropy[r["layer"]]
        n_k = num_blocks(r["tokens"], 64)
        r.update({"attention_entropy": e["entropy"], "log_n": e["log_n"], "key_blocks_64": n_k})
    prov = demo.info.provenance
    return {"path": str(demo.shipped.path), "config": cfg.to_dict(),
            "parameters": sum(p.numel() for p in demo.dense.parameters()),
            "file_bytes": demo.shipped.path.stat().st_size, "classes": list(CLASS_NAMES),
            "trained": {k: prov.get(k) for k in ("steps", "batch_size", "train_seconds", "device", "date")},
            "held_out_v_loss": loss, "per_layer": rows}


def step_plan_layers(demo: Demo) -> dict:
    """Layers worth converting: those with enough key blocks for sparsity to pay off (as `sla2 convert` warns)."""
    rows = describe_layers(demo.dense)
    settings = demo_settings(demo.shipped)
    demo.candidates = [r["layer"] for r in rows
                       if num_blocks(r["tokens"], settings.block_k) >= MIN_KEY_BLOCKS_TO_PAY_OFF]
    demo.layers = list(demo.candidates)
    return {"candidates": demo.candidates,
            "rule": f">= {MIN_KEY_BLOCKS_TO_PAY_OFF} key blocks of {settings.block_k} tokens",
            "conversion": demo_conversion(demo.shipped).describe(), "settings": settings.to_dict()}


def step_profile(demo: Demo) -> dict:
    """`sla2 profile` of the candidate conversion; its recommendation picks the layers to convert.

    Where no layer is faster with SLA2 on this device (the PyTorch reference on a CPU never is), the demo
    converts every candidate anyway so the rest of the pipeline has something to show, and says so. Where the
    demo times sampling, the profile runs the sampler's forward batch (guidance doubles it), not batch 1.
    """
    from .profiling import Timer, profile_model

    model = copy.deepcopy(demo.dense)
    settings = demo_settings(demo.shipped)
    apply_sla2(model, demo.candidates, settings)
    plan = demo.plan
    dtype = torch.bfloat16 if demo.device.type == "cuda" else torch.float32
    forward_batch = plan.speed_batch * (2 if SPEED_CFG != 1 else 1)  # the speed step's guided forwards
    report = profile_model(model, device=demo.device, dtype=dtype, batch_size=forward_batch or 1,
                           timer=Timer(demo.device, warmup_ms=plan.profile_ms, rep_ms=plan.profile_ms,
                                       min_run_time=plan.profile_ms / 1e3),
                           seed=demo.seed, label=f"{demo.shipped.path.name} (candidate layers, topk {settings.topk:g})")
    del model
    recommended = list(report["recommendation"]["convert"])
    if recommended:
        demo.layers = recommended
    else:
        demo.layers = list(demo.candidates)
        demo.notices.append(f"the profile recommends keeping every layer dense on {demo.device.type} "
                            f"({report['recommendation']['summary']}); the demo converts layers "
                            f"{', '.join(map(str, demo.layers))} anyway to show the rest of the pipeline")
    return report


def step_convert(demo: Demo) -> dict:
    """`sla2 convert --preset balanced` (the showcase: `--no-qat --max-error`), α calibrated (and the budget's
    errors measured) on held-out textures, written to --out."""
    conversion = demo_conversion(demo.shipped)
    settings = conversion.settings()
    _, z, t, y = _eval_batch(demo, CALIBRATION_OFFSET)
    demo.converted = copy.deepcopy(demo.dense)
    details = {"preset": conversion.preset}
    if conversion.max_error is None:
        result = convert_model(demo.converted, layer_spec=demo.layers, settings=settings, calibration=(z, t, y))
    else:
        result = convert_within_budget(demo.converted, layer_spec=demo.layers, settings=settings,
                                       max_error=conversion.max_error, calibration=(z, t, y))
        details["max_error"] = conversion.max_error
        if not result.layers:  # nothing within budget: the rest of the demo needs converted layers
            demo.notices.append(f"no layer converts within the error budget {conversion.max_error:g}; the demo "
                                f"converts layers {', '.join(map(str, demo.layers))} at topk {settings.topk:g}")
            result = convert_model(demo.converted, layer_spec=demo.layers, settings=settings,
                                   calibration=(z, t, y))
        demo.layers = result.layers
    demo.converted.eval()
    dst = demo.out / f"{demo.shipped.path.stem}-sla2.safetensors"
    write_converted(demo.converted, demo.shipped.path, dst, demo.info, force=True, **details,
                    calibration_samples=demo.plan.eval_images,
                    calibration=f"held-out textures (seed {demo.shipped.held_out_seed}), noised at JiT's training t")
    demo.files["converted"] = str(dst)
    return {"layers": result.layers, "conversion": conversion.describe(), "settings": settings.to_dict(),
            "budget": result.budget or None, "calibrated_alpha": result.calibrated_alpha,
            "per_layer": result.rows, "output": str(dst), "warnings": result.warnings}


def _measure(demo: Demo, model: JiT) -> dict:
    """Per converted layer: kept fraction, captured mass, output error vs dense; and the whole model's."""
    x, z, t, y = _eval_batch(demo)
    per_layer = measure_layers(model, z, t, y)
    with torch.no_grad():
        if "dense_out" not in demo.cache:
            demo.cache["dense_out"] = demo.dense(z, t, y)
        dense_out = demo.cache["dense_out"]
        out = model(z, t, y)
    return {"per_layer": per_layer, "model_relative_error": _relative_error(out, dense_out),
            "held_out_v_loss": v_loss(out, x, z, t).mean().item(),
            "dense_held_out_v_loss": v_loss(dense_out, x, z, t).mean().item()}


def _finetune(demo: Demo, src: Path, dst: Path, data: DataSpec, **options):
    """One `sla2 finetune` of the plan's batch and dtype from `src` to `dst` on `data` (`options`: the stage's
    own FinetuneConfig fields); its model becomes the one the later steps measure. Returns the result and the
    configuration it ran."""
    from .finetune import FinetuneConfig, run_finetune

    plan = demo.plan
    model, info = load_model(src)
    config = FinetuneConfig(batch_size=plan.finetune_batch, dtype=plan.finetune_dtype,
                            eval_samples=min(4, plan.train_textures), save_every=0, seed=demo.seed, **options)
    result = run_finetune(model, info, source=src, dst=dst, config=config, device=demo.device, force=True, data=data)
    demo.tuned = model.to(demo.device).eval()
    demo.files["finetuned"] = str(dst)
    return result, config


def step_finetune(demo: Demo) -> dict:
    """`sla2 finetune --data FOLDER`: stage 1 (router W_q, W_k and α against dense attention) on textures of
    the training seed, written as the image folder a user would pass."""
    from .finetune import DataSpec
    from .finetune.config import RECIPE_ROUTER

    plan = demo.plan
    images, labels = texture_batch(torch.arange(plan.train_textures), seed=TRAIN_SEED, size=_size(demo))
    folder = write_textures(demo.out / "train-textures", images, labels)
    demo.files["train_textures"] = str(folder)
    result, config = _finetune(demo, Path(demo.files["converted"]),
                               demo.out / f"{demo.shipped.path.stem}-sla2-finetuned.safetensors",
                               DataSpec(folder=folder, t_distribution=plan.finetune_t),
                               steps=plan.finetune_steps, lr=plan.finetune_lr, **RECIPE_ROUTER)
    worse = [r for r in result.per_layer if r["error_after"] > r["error_before"] * 1.05]
    if worse:  # advise what the demo ran, for longer (stage 1 alone leaves every model weight as it was)
        demo.notices.append(
            "the short finetune raised the attention error of layer(s) " + ", ".join(
                f"{r['layer']} ({r['error_before']:.3f} → {r['error_after']:.3f})" for r in worse)
            + f" on its {config.eval_samples} evaluation images; a real run trains stage 1 longer: sla2 finetune "
            f"--objective distill --t-distribution {plan.finetune_t} --steps 300 --batch-size 32 --data FOLDER")
    return result.to_dict()


def step_stage2(demo: Demo) -> dict:
    """`sla2 finetune --full` from stage 1's model: the recipe's stage 2 (every weight but the router, the model's
    own training continued) on the same textures, at JiT's t. Its output is the finetuned model the later steps
    measure; stage 1's stays beside it."""
    from .finetune import DataSpec
    from .finetune.config import RECIPE, recipe_stage2_data

    demo.files["stage1"] = demo.files["finetuned"]
    result, _ = _finetune(demo, Path(demo.files["stage1"]),
                          demo.out / f"{demo.shipped.path.stem}-sla2-stage2.safetensors",
                          recipe_stage2_data(DataSpec(folder=Path(demo.files["train_textures"]))),
                          steps=demo.plan.stage2_steps, full=True, **RECIPE)
    return result.to_dict()


def step_measure(demo: Demo) -> dict:
    """`sla2 stats --measure` on the converted (and the finetuned) model, on held-out noised textures."""
    record = {"converted": _measure(demo, demo.converted)}
    if demo.tuned is not None:
        record["finetuned"] = _measure(demo, demo.tuned)
    return record


def _paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    """PSNR (dB), SSIM and MAE per image between two sample sets on the uint8 grid, as `eval-fid --compare-to`."""
    from .metrics.paired import compare_pairs

    return compare_pairs(zip(_hwc(a), _hwc(b)))


def _hwc(images: torch.Tensor):
    return to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()


def step_samples(demo: Demo) -> dict:
    """Dense and SLA2 samples from the same seeds (noise and label per index): a PNG grid and PSNR/MAE."""
    plan = demo.plan
    cfg = demo.dense.config
    noise, labels = paired_inputs(demo.seed, range(plan.samples), (cfg.in_channels, cfg.input_size, cfg.input_size),
                                  cfg.num_classes, cfg.noise_scale)
    noise, labels = noise.to(demo.device), labels.to(demo.device)
    models = [("dense", demo.dense)]
    if demo.tuned is None or plan.sample_before_finetune:
        models.append(("SLA2 converted", demo.converted))
    if demo.tuned is not None:
        models.append(("SLA2 finetuned", demo.tuned))
    images = {}
    for name, model in models:
        images[name] = sample(graphed(model, demo.device), noise, labels, steps=plan.sample_steps, cfg=1.0)
    rows = list(images.items())
    best = rows[-1][0]
    rows.append((f"|dense - {best}| x4", (images["dense"] - images[best]).abs() * 4 - 1))
    path = demo.out / "dense-vs-sla2.png"
    image_grid([(name, _hwc(images)) for name, images in rows], [CLASS_NAMES[c] for c in labels.tolist()], path)
    demo.files["grid"] = str(path)
    dense_images = images["dense"]
    paired = {name: _paired(imgs, dense_images) for name, imgs in images.items() if name != "dense"}
    return {"samples": plan.samples, "steps": plan.sample_steps, "cfg": 1.0, "seed": demo.seed,
            "labels": labels.tolist(), "paired_vs_dense": paired, "grid": str(path)}


def write_textures(folder: Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """Textures as PNGs `{index:06d}.png`: flat (the form `eval-fid --ref` reads) or, with labels, in one
    subfolder per class name (the image-folder form `finetune --data` reads)."""
    from PIL import Image

    for i, img in enumerate(to_uint8(images).permute(0, 2, 3, 1).numpy()):
        where = folder if labels is None else folder / CLASS_NAMES[int(labels[i])]
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(where / f"{i:06d}.png")
    return folder


def step_fid(demo: Demo) -> dict:
    """`sla2 eval-fid --features textures` of the SLA2 model against the reference textures, paired with the
    dense model: a texture Fréchet distance (and KID) in the shipped texture network's feature space, offline.
    Inception FID needs a download and photographs; these numbers compare texture sets with each other only.
    The dense model's samples are drawn once per demo folder and compared with every model this step sees."""
    from .metrics import EvalRequest, evaluate

    plan = demo.plan
    model = Path(demo.files.get("finetuned") or demo.files["converted"])
    reference = write_textures(demo.out / "reference", reference_set(plan.fid_samples, size=_size(demo))[0])
    settings = dict(num_samples=plan.fid_samples, steps=plan.sample_steps, cfg=1.0, seed=demo.seed,
                    batch_size=min(64, plan.fid_samples), device=demo.device, dtype=torch.float32)
    dense = demo.out / f"samples-{demo.shipped.path.stem}"
    evaluate(EvalRequest(model=demo.shipped.path, out=dense, **settings))  # no reference: samples only
    report = evaluate(EvalRequest(model=model, ref=str(reference), features="textures",
                                  out=demo.out / f"samples-{model.stem}", compare_to=dense,
                                  dense_until=plan.dense_until, **settings))
    report["reference_set"] = (f"{plan.fid_samples} textures of seed {REFERENCE_SEED} "
                               f"(sla2cli.data.textures.reference_set), written to {reference}")
    return report


def step_speed(demo: Demo) -> dict:
    """End-to-end sampling speed of the dense and the SLA2 model (finetuned where the demo finetuned): images/s
    of JiT's Heun sampler with guidance, bf16 autocast, every forward replayed from CUDA graphs with the blocks'
    non-attention work compiled (`eval-fid --compile`'s path, the fastest for both), each whole sampling run
    timed by `profiling.Timer` (median and IQR). With the plan's `dense_until` the SLA2 model's evaluations
    before that t run its dense twin (graphed and compiled alike)."""
    from .metrics.generate import autocast
    from .profiling import Timer

    plan = demo.plan
    cfg = demo.dense.config
    noise, labels = paired_inputs(demo.seed, range(plan.speed_batch),
                                  (cfg.in_channels, cfg.input_size, cfg.input_size), cfg.num_classes, cfg.noise_scale)
    noise, labels = noise.to(demo.device), labels.to(demo.device)
    timer = Timer(demo.device, warmup_ms=plan.profile_ms, rep_ms=plan.profile_ms, min_run_time=plan.profile_ms / 1e3)
    sla2 = demo.tuned if demo.tuned is not None else demo.converted
    models = {}
    for name, model, until in (("dense", demo.dense, 0.0), ("SLA2", sla2, plan.dense_until)):
        net = graphed(model, demo.device, compile_blocks=True)
        twin = graphed(dense_twin(model), demo.device, compile_blocks=True) if until else None

        def run(net=net, twin=twin, until=until):
            with autocast(demo.device, torch.bfloat16):
                return sample(net, noise, labels, steps=plan.speed_steps, cfg=SPEED_CFG, dense_model=twin,
                              dense_until=until)

        timer.warm_up(run)
        timing = timer.eager(run)
        models[name] = {"ms_per_batch": timing.ms, "iqr_ms": timing.iqr_ms, "repeats": timing.samples,
                        "images_per_second": plan.speed_batch / (timing.ms / 1e3),
                        "compile_blocks": getattr(net, "compile_blocks", False),
                        "compile_error": getattr(net, "compile_error", None)}
    return {"batch": plan.speed_batch, "steps": plan.speed_steps, "cfg": SPEED_CFG, "sampler": "jit (Heun)",
            "dense_until": plan.dense_until,
            "dtype": "bf16", "cuda_graphs": demo.device.type == "cuda", "layers": demo.layers,
            "timer": timer.describe(), "models": models,
            "speedup": models["SLA2"]["images_per_second"] / models["dense"]["images_per_second"]}


def write_manifest(demo: Demo, timings: dict[str, float], complete: bool = True) -> Path:
    """The demo's folder manifest: every result so far and each step's seconds. Written after each step with
    `complete` False, so a demo stopped part-way (Ctrl-C, a time limit) keeps what its finished steps measured;
    replaced atomically, so a reader never sees half of it."""
    from .checkpoints.writing import atomic_write

    path = demo.out / MANIFEST
    document = {"format": "sla2cli-demo", "complete": complete, "model": demo.shipped.name,
                "plan": demo.plan.to_dict(), "device": str(demo.device),
                "seed": demo.seed, "layers": demo.layers, "files": demo.files, "notices": demo.notices,
                "seconds": timings, "results": demo.results}
    text = json.dumps(document, indent=1, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
