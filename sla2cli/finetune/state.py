"""The resumable state a finetune leaves next to its output: written atomically, checked on `--resume`.

`DST.resume.pt` holds the step reached, the trainable weights (stage 1: the SLA2 parameters only;
stage 2: the whole model), the optimiser, the RNG states, the loss history, the errors measured
before training, and the options and input it belongs to. It is read with `weights_only=True`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import wraps
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..checkpoints.reading import open_regular
from ..checkpoints.writing import atomic_write, claim
from ..distributed import ProcessGroup, from_main
from ..errors import CheckpointError, InvalidParameter, Param, ParameterError, SLA2Error

STATE_FORMAT = "sla2cli-finetune-state"
STATE_VERSION = 1
# Options that must match for a resumed run to continue the same computation.
RESUME_KEYS = ("stage", "steps", "batch_size", "lr", "topk_schedule", "tau", "e2e_weight", "eval_samples", "seed",
               "dtype", "data")


def state_path(dst: Path) -> Path:
    return Path(dst).with_name(Path(dst).name + ".resume.pt")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with what a resume needs to know: the step reached and the step whose state
    `state_file` holds (None: nothing saved yet). Still a KeyboardInterrupt for callers that catch those."""

    def __init__(self, step: int, steps: int, saved: int | None, state_file: Path):
        super().__init__(f"interrupted at step {step} of {steps}")
        self.step, self.steps, self.saved, self.state_file = step, steps, saved, Path(state_file)


@contextmanager
def claimed(group: ProcessGroup, paths: Iterable[Path], sources: Iterable[Path]) -> Iterator[None]:
    """Rank 0 claims `paths` against other processes (`claim`) for the block; every rank fails alike if it cannot."""
    with ExitStack() as stack:
        error = None
        if group.is_main:
            try:
                stack.enter_context(claim(paths, sources))
            except SLA2Error as exc:
                error = exc
        error = from_main(group, error)
        if error is not None:
            raise error
        yield


def claiming(paths_of: Callable[[Path, dict], list[Path]]):
    """Decorate a finetune (`source=`, `dst=`, `group=` keywords) to run while rank 0 claims every file it
    writes, `paths_of(dst, other keywords)`: a second finetune writing any of them is refused at once."""
    def decorate(fn):
        @wraps(fn)
        def run(*args, source, dst, group: ProcessGroup = ProcessGroup(), **kwargs):
            with claimed(group, paths_of(Path(dst), kwargs), (Path(source),)):
                return fn(*args, source=source, dst=dst, group=group, **kwargs)
        return run
    return decorate


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
        with open_regular(path) as f:  # a FIFO in its place must not hang the run
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means the same thing here
        reason = " ".join(str(exc).split())[:160]
        raise ParameterError("resume", True, "cannot read the resumable state {path} ({kind}: {reason}); delete "
                             "it, or pass {force} without {name} to start over", path=path,
                             kind=type(exc).__name__, reason=reason, force=Param("force=True")) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ParameterError("resume", True, "{path} is not a finetune state of sla2cli; delete it, or pass {force} "
                             "without {name} to start over", path=path, force=Param("force=True"))
    if state.get("version") != STATE_VERSION:
        raise ParameterError("resume", True, "{path} has state version {version}, this sla2cli reads {reads}; "
                             "start over with {force}", path=path, version=state.get("version"),
                             reads=STATE_VERSION, force=Param("force=True"))
    return state


def _damaged(path: Path, detail: str) -> ParameterError:
    return ParameterError("resume", True, "{path} is damaged ({detail}); delete it, or pass {force} without {name} "
                          "to start over", path=path, detail=detail, force=Param("force=True"))


def _check_contents(state: dict, steps: int, path: Path) -> None:
    """What a saved state holds beside its tensors, as `save_state` writes it: a hand-made one may hold anything."""
    missing = [k for k in ("step", "history", "errors_before", "weights", "optimizer", "rng") if k not in state]
    if missing:
        raise _damaged(path, f"no {', '.join(missing)}")
    step, history = state["step"], state["history"]
    if type(step) is not int or not 0 <= step <= steps:
        raise _damaged(path, f"step {step!r} of a run of {steps} steps")
    if not isinstance(history, list) or len(history) != step:
        raise _damaged(path, f"a loss history of {len(history) if isinstance(history, list) else history!r} "
                       f"entries at step {step}")


def restore_state(state: dict, path: Path, named: list, optimizer: torch.optim.Optimizer, ema,
                  layers: list[int], device: torch.device) -> tuple[int, list[float], dict]:
    """Put a checked state's trainable weights, optimiser, EMA and RNG states back; returns the step, the loss
    history and the errors measured before training. Tensors are checked against this run's first:
    `copy_` would broadcast a wrong shape, and the optimiser would only fail at its first step."""
    weights, before = state["weights"], state["errors_before"]
    names = [name for name, _ in named]
    if not isinstance(weights, dict) or sorted(weights) != sorted(names) or any(
            not torch.is_tensor(weights[n]) or weights[n].shape != p.shape for n, p in named):
        raise _damaged(path, "its weights are not this run's trainable parameters")
    if not isinstance(before, dict) or any(not isinstance(before.get(i), dict)
                                           or "relative_squared_error" not in before[i] for i in layers):
        raise _damaged(path, "no errors measured before training for every layer")
    try:
        with torch.no_grad():
            for name, p in named:
                p.copy_(weights[name])
        optimizer.load_state_dict(state["optimizer"])
        if ema.decay:
            ema.load_state_dict(state["ema"])
        restore_rng(state["rng"], device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError, CheckpointError) as exc:
        raise _damaged(path, " ".join(str(exc).split())[:160] or type(exc).__name__) from None
    if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape for p, s in optimizer.state.items()
           for v in s.values()):
        raise _damaged(path, "its optimiser state does not match the trainable parameters")
    return state["step"], list(state["history"]), before


def check_resumable(state: dict, options: dict, source_sha256: str, path: Path) -> None:
    """The saved run must be this run: same input file and the same training options."""
    if state.get("source_sha256") != source_sha256:
        raise InvalidParameter("resume", True, "{path} belongs to a finetune of another input file; use that file, "
                               "or pass {force} without {name} to start over", path=path, force=Param("force=True"))
    saved = state.get("options", {})
    diffs = [f"{key} {saved.get(key)!r} (now {options.get(key)!r})" for key in RESUME_KEYS
             if saved.get(key) != options.get(key)]
    if diffs:
        raise InvalidParameter("resume", True, "{name}: the saved run used different options: {diffs}; resume "
                               "with the same options, or pass {force} without {name} to start over",
                               diffs="; ".join(diffs), force=Param("force=True"))
    _check_contents(state, options["steps"], path)
