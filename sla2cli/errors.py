"""Typed errors a user can cause; the CLI turns each into one line and an exit code."""


class SLA2Error(Exception):
    """A failure the user can act on (bad file, unsupported checkpoint, ...). Exit code 1."""

    exit_code = 1


class UsageError(SLA2Error):
    """The command was asked for something invalid (bad option value, existing output). Exit code 2."""

    exit_code = 2


class CheckpointError(SLA2Error):
    """A checkpoint file is missing, unreadable, unsafe or not a JiT model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle needs globals outside the allowlist; `--trust-checkpoint` opts in."""
