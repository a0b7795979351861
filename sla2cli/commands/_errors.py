"""The one table from library parameter names to the flags that set them, and the rendering that uses it.

Library errors (`ParameterError`, `InvalidParameter`) name parameters as Python spells them (`num_samples`);
the CLI shows the same message with each name replaced by its command's flag (`-n/--num-samples`).
"""

from __future__ import annotations

from ..errors import ParameterError

# parameter (or setting, as `force=True`) -> flag, or {command: flag} with "*" for the other commands.
# None: a library-only parameter no flag sets; a message naming it keeps the Python name.
FLAGS: dict[str, str | dict[str, str] | None] = {
    # sampling and eval-fid
    "sampler": "--sampler", "steps": "--steps", "cfg": {"finetune": "--data-free-cfg", "*": "--cfg"},
    "cfg_interval": "--cfg-interval",
    "time_shift": "--time-shift", "seed": "--seed", "method": None,
    "num_samples": "-n/--num-samples", "ref": "--ref", "path": None, "inception_weights": "--inception-weights",
    "compare_to": "--compare-to", "out": "--out", "batch_size": "--batch-size", "dtype": "--dtype",
    "features": "--features", "features='inception'": "--features inception", "isc": "--isc",
    # profile
    "arch": "--arch", "counter": "--counter", "resolution": "--resolution", "sweep": "--sweep-resolution",
    "plot": "--plot", "x": None,
    # SLA2 implementations: eval-fid's flag is --sla2-backend, finetune's --backend
    "backend": {"eval-fid": "--sla2-backend", "*": "--backend"}, "sla2_backend": "--sla2-backend",
    # convert: SLA2 settings and checkpoints
    "topk": "--topk", "block_q": "--block-q", "block_k": "--block-k", "feature_map": "--feature-map",
    "alpha_mode": "--alpha-mode", "feature_rank": "--feature-rank",
    "preset": "--preset", "format": "--format", "max_error": "--max-error",
    "in_context_start": "--in-context-start", "weights": "--weights", "trust_checkpoint": "--trust-checkpoint",
    "trust_checkpoint=True": "--trust-checkpoint",
    "dst": {"profile": "--plot", "eval-fid": "--grid", "*": "-o/--output"}, "force=True": "--force",
    # finetune
    "lr": "--lr", "tau": "--tau", "e2e_weight": "--e2e-weight", "save_every": "--save-every",
    "eval_samples": "--eval-samples", "topk_schedule": "--topk-schedule", "class_index": "--class-index",
    "root": "--data", "folder": "--data", "folder=None": "--data-free", "teacher_samples": "--data-free-samples",
    "sampling_steps": "--data-free-steps", "states": "--data-free-states", "resume": "--resume",
    "resume=True": "--resume", "dtype='fp32'": "--dtype fp32",
    "schedule": "--schedule", "warmup": "--warmup", "ema": "--ema", "objective": "--objective", "full": "--full",
    "objective='distill'": "--objective distill",
    "workers": "--workers", "t_distribution": "--t-distribution", "dense_until": "--dense-until",
    "dense_model": None,
    # quality
    "samples": "-n/--samples", "dense": "--dense",
    # demo
    "model": "--model",
}


def flag(parameter: str, command: str | None) -> str:
    """How `command` spells `parameter`; the parameter itself where no flag sets it."""
    entry = FLAGS.get(parameter)
    if isinstance(entry, dict):
        entry = entry.get(command or "*", entry.get("*"))
    return entry or parameter


def cli_message(exc: ParameterError, command: str | None) -> str:
    """`exc`'s message with every parameter it names shown as `command`'s flag."""
    return exc.render(lambda parameter: flag(parameter, command))
