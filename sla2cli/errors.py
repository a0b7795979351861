"""Typed errors a user can cause; the CLI turns each into one line and an exit code."""

from __future__ import annotations

from typing import Callable


class SLA2Error(Exception):
    """A failure the user can act on (bad file, unsupported checkpoint, ...). Exit code 1."""

    exit_code = 1


class UsageError(SLA2Error):
    """The command was asked for something invalid (bad option value, existing output). Exit code 2."""

    exit_code = 2


class CheckpointError(SLA2Error):
    """A checkpoint file is missing, unreadable, unsafe or not a JiT model."""


class Param(str):
    """Another parameter, or a setting such as `force=True`, named inside a `ParameterError`'s message."""


class ParameterError(SLA2Error):
    """A failure whose message names a library parameter as Python spells it (`steps`, `ref`). Exit code 1.

    `template` is a `str.format` pattern over `name` (the parameter), `value` and `details`; details that
    are `Param`s name further parameters. The CLI renders it with each name shown as the command's flag.
    """

    def __init__(self, parameter: str, value, template: str, **details):
        self.parameter, self.value, self.template, self.details = parameter, value, template, details
        super().__init__(self.render())

    def render(self, show: Callable[[str], str] = str) -> str:
        """The message with every parameter `p` shown as `show(p)` (a CLI flag, say)."""
        details = {k: show(v) if isinstance(v, Param) else v for k, v in self.details.items()}
        return self.template.format(name=show(self.parameter), value=self.value, **details)

    @property
    def parameters(self) -> list[str]:
        """Every parameter the message names, `parameter` first."""
        return [self.parameter, *(v for v in self.details.values() if isinstance(v, Param))]

    def __reduce__(self):
        return _rebuild, (type(self), self.parameter, self.value, self.template, self.details)


class InvalidParameter(ParameterError, UsageError, ValueError):
    """An argument has an invalid value: a ValueError for Python callers, exit code 2 on the command line."""


class UnsafeCheckpointError(ParameterError, CheckpointError):
    """A pickle needs globals outside the allowlist; `trust_checkpoint=True` opts in."""


def _rebuild(cls, parameter: str, value, template: str, details: dict) -> ParameterError:
    return cls(parameter, value, template, **details)
