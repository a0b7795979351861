"""The resumable state a finetune leaves next to its output: written atomically, checked on `--resume`.

`DST.resume.pt` holds the step reached, the trainable weights (stage 1: the SLA2 parameters only;
stage 2: the whole model), the optimiser, the RNG states, the loss history, the errors measured
before training, and the options and input it belongs to. It is read with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoints.writing import atomic_write
from ..errors import SLA2Error, UsageError

STATE_FORMAT = "sla2cli-finetune-state"
STATE_VERSION = 1
# Options that must match for a resumed run to continue the same computation.
RESUME_KEYS = ("stage", "steps", "batch_size", "lr", "topk_schedule", "tau", "e2e_weight", "eval_samples", "seed",
               "dtype", "data")


def state_path(dst: Path) -> Path:
    return Path(dst).with_name(Path(dst).name + ".resume.pt")


def rng_states(device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def save_state(path: Path, state: dict) -> None:
    payload = {"format": STATE_FORMAT, "version": STATE_VERSION, **state}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_state(path: Path) -> dict:
    """Read a resumable state; anything else (truncated, foreign, unsafe) is a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means the same thing here
        reason = " ".join(str(exc).split())[:160]
        raise SLA2Error(f"cannot read the resumable state {path} ({type(exc).__name__}: {reason}); delete it, or "
                        f"pass --force without --resume to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SLA2Error(f"{path} is not a finetune state of sla2cli; delete it, or pass --force without --resume "
                        f"to start over")
    if state.get("version") != STATE_VERSION:
        raise SLA2Error(f"{path} has state version {state.get('version')}, this sla2cli reads {STATE_VERSION}; "
                        f"start over with --force")
    return state


def check_resumable(state: dict, options: dict, source_sha256: str, path: Path) -> None:
    """The saved run must be this run: same input file and the same training options."""
    if state.get("source_sha256") != source_sha256:
        raise UsageError(f"{path} belongs to a finetune of another input file; use that file, or pass --force "
                         f"without --resume to start over")
    saved = state.get("options", {})
    diffs = [f"{key} {saved.get(key)!r} (now {options.get(key)!r})" for key in RESUME_KEYS
             if saved.get(key) != options.get(key)]
    if diffs:
        raise UsageError(f"--resume: the saved run used different options: {'; '.join(diffs)}; resume with the "
                         f"same options, or pass --force without --resume to start over")
