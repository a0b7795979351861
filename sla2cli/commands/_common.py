"""Options every command shares, device/dtype parsing, and the two output modes (tables or one JSON).

Nothing here imports torch at module level: `sla2 --help` and shell completion load every command module.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ..errors import UsageError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout; logs go to stderr.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device",
                                                  help="cpu, cuda or cuda:N (default: cuda when available).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: fp32, bf16 or fp16.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for every random draw.")]
WeightsOpt = Annotated[str, typer.Option("--weights", help="Weights inside the file: auto (EMA where the official "
                                         "evaluation uses it), model, model_ema1, model_ema2, denoiser, ema_denoiser.")]
InContextStartOpt = Annotated[Optional[int], typer.Option(
    "--in-context-start", help="Block where in-context tokens join; needed only for non-preset architectures.")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow a full unpickle of a file you trust.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
PresetOpt = Annotated[Optional[str], typer.Option(help="max-speed (topk 0.05, QAT), balanced (0.15, QAT), "
                                                  "quality (0.25, no QAT); explicit options override it.")]


def model_source(text) -> Path:
    """A model argument's value as a local file. Every command's MODEL, --compare-to and --dense parse through
    here, so an `hf://ORG/REPO/PATH` source is fetched into the Hugging Face cache before the command runs, and
    its output-is-input checks compare the cached file itself."""
    from ..checkpoints.sources import resolve_source

    return resolve_source(text)


def local_path(text) -> Path:
    """Every other path option's value (outputs, data): local only. Without this, `-o hf://org/repo/x` would be
    read as the folder `hf:`."""
    from ..checkpoints.sources import is_hub_source

    if is_hub_source(text):
        raise typer.BadParameter(f"{text} is on the Hugging Face Hub; hf:// is read only for models, this takes "
                                 "a local path")
    return Path(text)


HUB_HELP = ("local, or on the Hugging Face Hub as hf://ORG/REPO/PATH (hf://ORG/REPO@REVISION/PATH: a branch, tag or "
            "commit)")
ModelArg = Annotated[Path, typer.Argument(
    metavar="MODEL", help="Checkpoint: official JiT .pth, PixelGen .ckpt, state_dict or .safetensors (dense or "
                          f"converted), {HUB_HELP}.", show_default=False, parser=model_source)]

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def finite(text) -> float:
    """A float option's value; every float option parses through this (`parser=finite`, which a test checks).

    nan and inf mean nothing to any option, and nan passes every range check (`nan <= 0` is false): `--bench-ms
    nan` timed forever, `--cfg nan` sampled black images.
    """
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise typer.BadParameter(f"{text} is not a finite number")
    return value


def resolve_device(name: str | None):
    """`None` → cuda when available, else cpu; a CUDA device that is not there is a usage error."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for CUDA but none is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_dtype(name: str):
    """The torch dtype called `name` (fp32, bf16, fp16)."""
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r} is not supported; use {', '.join(DTYPES)}")
    import torch

    return getattr(torch, DTYPES[name])


class Stop(Exception):
    """End the command with exit code `code`, after `message` (if any) on stderr, without an 'error:' line: an
    expected end such as Ctrl-C after the state was saved. (Typer turns a raised Exit(130) into a bare return.)"""

    def __init__(self, message: str | None, code: int):
        super().__init__(message)
        self.message, self.code = message, code


# What the CLI was asked for beyond one command's options: set by `cli.run` and the root callback.
session = {"argv": None, "quiet": False}


def invocation() -> list[str]:
    """The arguments this `sla2` was run with (after the program name)."""
    return list(session["argv"]) if session["argv"] is not None else sys.argv[1:]


class _KnownTotal(ProgressColumn):
    """One of rich's columns, left blank for tasks of unknown length (a spinner has no count or ETA)."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task) -> Text:
        return self.column.render(task) if task.total is not None else Text("")


class Output:
    """Human mode renders rich tables on stdout; JSON mode prints exactly one document there.

    Logs, warnings and progress always go to stderr, so `--json` output stays machine-readable. Under
    `sla2 --quiet` progress and logs are dropped; warnings, errors and the result stay.
    """

    def __init__(self, json_mode: bool):
        self.json_mode = json_mode
        self.quiet = session["quiet"]
        # Piped output keeps full-width tables instead of wrapping at 80 columns.
        self.stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)
        self.stderr = Console(stderr=True)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.stderr.print(escape(message), highlight=False)

    def warn(self, message: str) -> None:
        self.stderr.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)

    def emit(self, document: dict, render) -> None:
        """Print `document` as JSON, or call `render(console)` to draw it for a person."""
        if self.json_mode:
            sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        else:
            render(self.stdout)

    @contextmanager
    def progress(self):
        """A progress display on stderr, only where a person is watching (a TTY) and not `--quiet`: count done
        of total and time remaining where the total is known."""
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      _KnownTotal(MofNCompleteColumn()), TimeElapsedColumn(), _KnownTotal(TimeRemainingColumn()),
                      console=self.stderr, transient=True,
                      disable=self.quiet or not self.stderr.is_terminal) as progress:
            yield progress


def load_model_warned(out: "Output", path, **options):
    """`load_model`, with what the file's numbers hold (NaN, infinities, integer tensors) said as warnings."""
    from ..checkpoints import load_model

    model, info = load_model(path, **options)
    for warning in info.warnings:
        out.warn(warning)
    return model, info


def claim_outputs(ctx: typer.Context, paths, sources=()) -> None:
    """Claim `paths` against other writers (`checkpoints.writing.claim`) until this command ends, however."""
    from ..checkpoints.writing import claim
    ctx.with_resource(claim(paths, sources))
