"""The SLA2 backends: one registry of implementations, what each serves, and the one choice of "auto".

A backend is a function with `sla2_reference`'s signature plus what it can run. The PyTorch reference
("torch") runs everything; the Triton kernels (`sla2cli.kernels`, "triton") are imported on first need
for a CUDA tensor and register themselves, or, without Triton, the reference serves alone. `resolve`
turns "auto" into the most recently registered backend that serves the inputs (the reference, registered
first, is the last resort) and checks an explicitly named one.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InvalidParameter
from .reference import sla2_reference

AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """One SLA2 implementation and the inputs it serves (None: any).

    `reference_fallback`: `fn` hands the qat / return_stats calls it has no kernel for to `sla2_reference`,
    so naming it explicitly stays valid for them, while "auto" prefers a backend that runs them itself.
    `auto`: whether "auto" may pick it (False: only when named). `qat_problem(q, block_q, block_k)`: why it
    cannot run QAT itself for these inputs although it has a QAT kernel (None: it can).
    """

    name: str
    fn: Callable
    devices: frozenset[str] | None = None
    dtypes: frozenset[torch.dtype] | None = None
    max_head_dim: int | None = None
    feature_maps: frozenset[str] | None = None
    qat: bool = True
    return_stats: bool = True
    reference_fallback: bool = False
    auto: bool = True
    qat_problem: Callable[[torch.Tensor, int, int], str | None] | None = None

    def problem(self, q: torch.Tensor, *, feature_map: str, qat: bool, return_stats: bool, block_q: int = 64,
                block_k: int = 64) -> str | None:
        """What of these inputs it cannot run itself, worded to follow "cannot run" (None: it runs them all)."""
        if self.devices is not None and q.device.type not in self.devices:
            return f"{q.device.type} tensors"
        if self.dtypes is not None and q.dtype not in self.dtypes:
            return f"{str(q.dtype).removeprefix('torch.')} tensors"
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            return f"head dim {q.shape[-1]} (at most {self.max_head_dim})"
        if self.feature_maps is not None and feature_map not in self.feature_maps:
            return f"feature map {feature_map!r}"
        if qat and not self.qat:
            return "qat"
        if qat and self.qat_problem is not None and (why := self.qat_problem(q, block_q, block_k)):
            return f"qat ({why})"
        if return_stats and not self.return_stats:
            return "return_stats"
        return None


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    """Add `backend` (replacing one of the same name); "auto" tries it before those registered earlier."""
    if backend.name == AUTO:
        raise ValueError(f"{AUTO!r} chooses a backend; it cannot name one")
    _BACKENDS.pop(backend.name, None)
    _BACKENDS[backend.name] = backend


def names() -> tuple[str, ...]:
    """The registered backends, in registration order (the Triton kernels join on first need)."""
    return tuple(_BACKENDS)


@functools.cache
def _load_kernels() -> str | None:
    """Import `sla2cli.kernels` once (it registers the "triton" backend); None, or why it could not."""
    try:
        importlib.import_module("sla2cli.kernels")
    except Exception as exc:  # noqa: BLE001 - a missing or broken optional backend leaves the reference serving
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def kernels_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot serve `device` (None: they can); loads them on first call for CUDA."""
    if device.type != "cuda":
        return f"the Triton kernels run on CUDA only, not {device.type}"
    return _load_kernels()


def get(name: str, parameter: str = "backend") -> Backend:
    """The registered backend `name` (the Triton kernels are tried first if it is not registered yet)."""
    if name not in _BACKENDS:
        _load_kernels()
    if name not in _BACKENDS:
        raise InvalidParameter(parameter, name, "{name} {value!r} is not one of: {choices}",
                               choices=", ".join((AUTO, *_BACKENDS)))
    return _BACKENDS[name]


def check_name(name: str, parameter: str = "backend") -> None:
    """Reject a backend option that is neither "auto" nor a registered backend, before any slow work."""
    if name != AUTO:
        get(name, parameter)


def resolve(name: str, q: torch.Tensor, *, feature_map: str, qat: bool, return_stats: bool, block_q: int = 64,
            block_k: int = 64) -> Backend:
    """The backend that `backend=name` runs inputs like `q` with; InvalidParameter (a UsageError) where
    `name` is unknown or cannot run them."""
    if q.is_cuda:
        _load_kernels()
    needs = dict(feature_map=feature_map, qat=qat, return_stats=return_stats, block_q=block_q, block_k=block_k)
    if name == AUTO:
        for backend in reversed(_BACKENDS.values()):
            if backend.auto and backend.problem(q, **needs) is None:
                return backend
        raise InvalidParameter("backend", name, "no registered SLA2 backend can run these inputs ({choices})",
                               choices=", ".join(_BACKENDS))
    backend = get(name)
    strict = not backend.reference_fallback  # with a fallback, the reference inside `fn` runs qat and return_stats
    why = backend.problem(q, feature_map=feature_map, qat=qat and strict, return_stats=return_stats and strict,
                          block_q=block_q, block_k=block_k)
    if why is not None:
        able = [b.name for b in _BACKENDS.values() if b.problem(q, **needs) is None]
        raise InvalidParameter("backend", name, "{name} {value!r} cannot run {why}; backends that can: {choices}",
                               why=why, choices=", ".join((AUTO, *able)))
    return backend


def qat_fallback(backend: Backend, q: torch.Tensor, *, feature_map: str, block_q: int, block_k: int) -> str | None:
    """Why `backend` leaves QAT's sparse branch on inputs like `q` to the reference (None: its own low-bit
    kernels run it)."""
    def why_not(b: Backend) -> str | None:
        return (b.problem(q, feature_map=feature_map, qat=False, return_stats=False)
                or b.qat_problem(q, block_q, block_k))

    if backend.qat_problem is not None:
        return why_not(backend)
    broken = _load_kernels() if q.is_cuda else None
    reasons = [why_not(b) for b in _BACKENDS.values() if b.qat_problem is not None]
    if None in reasons:
        return f"backend {backend.name!r} has no low-bit kernel"
    if not q.is_cuda:
        return f"the low-bit kernels run on CUDA only, not {q.device.type}"
    return reasons[0] if reasons else "no low-bit kernel is registered" + (f" ({broken})" if broken else "")


register(Backend("torch", sla2_reference))


@dataclass(frozen=True)
class _PredicateBackend(Backend):
    """A backend added through the deprecated `register_backend`: its predicate on q alone decides."""

    available: Callable[[torch.Tensor], bool] = lambda q: True

    def problem(self, q: torch.Tensor, *, feature_map: str, qat: bool, return_stats: bool, block_q: int = 64,
                block_k: int = 64) -> str | None:
        return None if self.available(q) else f"{q.device.type} tensors of dtype {q.dtype} (its predicate says no)"


def register_backend(name: str, fn: Callable, available: Callable[[torch.Tensor], bool]) -> None:
    """Deprecated: `register(Backend(...))` declares what a backend serves. Registered this way a backend
    is used only when named, as before."""
    warnings.warn("sla2cli.sla2.register_backend is deprecated; use sla2cli.sla2.backends.register(Backend(...))",
                  DeprecationWarning, stacklevel=2)
    register(_PredicateBackend(name, fn, auto=False, available=available))
